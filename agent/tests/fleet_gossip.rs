//! Fleet membership by gossip between real agent processes, each in a
//! network namespace of its own with its own address on a bridge the test
//! makes ([`FleetNet`]), all from one fleet.toml: convergence, failure
//! detection after `kill -9`, rejoining, a partition (gossip dropped by
//! nftables between two groups) that heals with every view agreeing again,
//! and the refusals (wrong secret, a node the manifest does not list, an
//! older manifest). No sandbox is created.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fleet::FleetNet;
use common::Agent;
use serde_json::Value;

const SECRET: &str = "hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_SECRET: &str = "hex:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
/// The configured bound for declaring a silent node dead.
const DEAD_AFTER_MS: u64 = 4000;
/// Every node's API key: off loopback, the agent requires one.
const API_KEY: &str = "fleet-test-key";
const API_PORT: u16 = 8080;
const GOSSIP_PORT: u16 = 7946;

/// Node names `n1..=nN`.
fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

fn api_addr(net: &FleetNet, i: usize) -> SocketAddr {
    SocketAddr::new(net.addr(i).into(), API_PORT)
}

/// A manifest listing node `names[i]` at namespace `i`'s address.
fn manifest(
    dir: &Path,
    file: &str,
    version: u64,
    secret: &str,
    net: &FleetNet,
    names: &[String],
) -> PathBuf {
    let mut text = format!(
        "[cluster]\nname = \"test\"\nversion = {version}\nsecrets = [\"{secret}\"]\n\n\
         [gossip]\ninterval_ms = 200\ndead_after_ms = {DEAD_AFTER_MS}\n"
    );
    for (i, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\napi = \"http://{}\"\ngossip = \"{}:{GOSSIP_PORT}\"\n",
            api_addr(net, i),
            net.addr(i)
        ));
    }
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts node `name` in namespace `i`.
fn start(images: &Path, net: &FleetNet, i: usize, fleet: &Path, name: &str) -> Agent {
    Agent::start_in(
        images,
        net.netns(i),
        api_addr(net, i),
        Some(API_KEY),
        &[
            ("WRENN_FLEET", fleet.to_str().unwrap()),
            ("WRENN_NODE_NAME", name),
        ],
    )
}

/// Every member as `agent` sees it, by name.
fn members(agent: &Agent) -> BTreeMap<String, Value> {
    let (status, nodes) = agent.get("/v1/nodes");
    assert_eq!(status, 200, "GET /v1/nodes on {}: {nodes}", agent.url);
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n.clone()))
        .collect()
}

/// `name`'s state as `agent` sees it.
fn state_of(agent: &Agent, name: &str) -> String {
    members(agent)
        .get(name)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
        .to_owned()
}

/// Whether every agent sees every node of `names` live.
fn all_live(agents: &[Agent], names: &[String]) -> bool {
    agents.iter().all(|a| {
        let seen = members(a);
        names
            .iter()
            .all(|n| seen.get(n).is_some_and(|m| m["state"] == "live"))
    })
}

/// Waits until `check` holds, up to `limit`; the time it took.
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn rejected(agent: &Agent) -> u64 {
    let (_, nodes): (u16, Value) = agent.get("/v1/nodes");
    nodes["gossip"]["rejected"].as_u64().unwrap()
}

#[test]
fn members_converge_detect_a_dead_node_and_take_it_back() {
    let Some(images) = common::images_dir_or_skip("fleet gossip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Declared before the agents: dropped after them.
    let net = FleetNet::new(3);
    let names = names(3);
    let fleet = manifest(dir.path(), "fleet.toml", 5, SECRET, &net, &names);
    let mut agents: Vec<Agent> = names
        .iter()
        .enumerate()
        .map(|(i, name)| start(&images, &net, i, &fleet, name))
        .collect();
    let took = wait_for(Duration::from_secs(30), "membership convergence", || {
        all_live(&agents, &names)
    });
    println!("3 members converged in {took:?}");
    // Each node published its state.
    let seen = members(&agents[0]);
    let n2 = &seen["n2"];
    assert_eq!(n2["api"], agents[1].url);
    assert_eq!(n2["gossip"], format!("{}:{GOSSIP_PORT}", net.addr(1)));
    assert_eq!(n2["published"]["mf"], "5");
    let cap: Value = serde_json::from_str(n2["published"]["cap"].as_str().unwrap()).unwrap();
    assert!(cap["vcpus"].as_u64().unwrap() >= 1);
    // Its templates, for placement: the base image every node has.
    // With its size and checksum from the image's manifest.
    let base = n2["published"]["tpl:base"].as_str().unwrap();
    let parts: Vec<&str> = base.split('|').collect();
    assert_eq!(parts[0], "base", "{base}");
    assert!(parts[1].parse::<u64>().unwrap() > 0, "{base}");
    assert_eq!(parts[2].len(), 64, "{base}");

    agents[2].kill9();
    let took = wait_for(
        Duration::from_millis(DEAD_AFTER_MS + 3000),
        "n3 declared dead",
        || state_of(&agents[0], "n3") == "dead" && state_of(&agents[1], "n3") == "dead",
    );
    println!("n3 declared dead {took:?} after kill -9 (bound {DEAD_AFTER_MS} ms)");
    agents[2].start_again();
    let took = wait_for(Duration::from_secs(30), "n3 live again", || {
        state_of(&agents[0], "n3") == "live" && state_of(&agents[1], "n3") == "live"
    });
    println!("n3 live again {took:?} after its restart");
}

#[test]
fn a_partition_heals_and_every_node_agrees_on_every_member_again() {
    let Some(images) = common::images_dir_or_skip("fleet partition") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let net = FleetNet::new(5);
    let names = names(5);
    let fleet = manifest(dir.path(), "fleet.toml", 1, SECRET, &net, &names);
    let agents: Vec<Agent> = names
        .iter()
        .enumerate()
        .map(|(i, name)| start(&images, &net, i, &fleet, name))
        .collect();
    let took = wait_for(Duration::from_secs(30), "membership convergence", || {
        all_live(&agents, &names)
    });
    println!("5 members converged in {took:?}");

    // {n1, n2} | {n3, n4, n5}: each side goes on alone.
    let (left, right) = ([0, 1], [2, 3, 4]);
    let cut = net.partition(&left, &right);
    let side = |i: usize| left.contains(&i);
    let took = wait_for(
        Duration::from_millis(DEAD_AFTER_MS + 5000),
        "each side seeing the other dead and its own live",
        || {
            agents.iter().enumerate().all(|(i, agent)| {
                let seen = members(agent);
                names.iter().enumerate().all(|(j, name)| {
                    let want = if side(i) == side(j) { "live" } else { "dead" };
                    seen[name]["state"] == want
                })
            })
        },
    );
    println!("partition {{n1,n2}} | {{n3,n4,n5}}: each side saw the other dead in {took:?}");

    cut.heal();
    let took = wait_for(Duration::from_secs(30), "every node live again", || {
        all_live(&agents, &names)
    });
    println!("partition healed: all 5 live everywhere {took:?} after");
    // What each node published, as each node sees it. No published key
    // changes on its own (`load` moves only with sandboxes, and there are
    // none), so the views must end up identical.
    let views = || -> Vec<BTreeMap<String, Value>> {
        agents
            .iter()
            .map(|a| {
                members(a)
                    .into_iter()
                    .map(|(name, m)| (name, m["published"].clone()))
                    .collect()
            })
            .collect()
    };
    let took = wait_for(Duration::from_secs(10), "every view the same", || {
        let all = views();
        all.iter().all(|v| v == &all[0])
    });
    let agreed = &views()[0];
    for name in &names {
        assert_eq!(agreed[name]["mf"], "1", "{name}: {}", agreed[name]);
        assert!(
            agreed[name].get("cap").is_some(),
            "{name}: {}",
            agreed[name]
        );
    }
    println!("views agreed {took:?} after every node was live");
}

#[test]
fn a_wrong_secret_an_unlisted_node_and_an_older_manifest_are_refused() {
    let Some(images) = common::images_dir_or_skip("fleet refusals") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let net = FleetNet::new(3);
    let names = names(3);
    let fleet = manifest(dir.path(), "fleet.toml", 7, SECRET, &net, &names);
    let n1 = start(&images, &net, 0, &fleet, "n1");
    let n2 = start(&images, &net, 1, &fleet, "n2");
    wait_for(Duration::from_secs(30), "n1 and n2 see each other", || {
        state_of(&n1, "n2") == "live" && state_of(&n2, "n1") == "live"
    });

    // n3 with the wrong secret: its gossip is dropped and counted.
    let forged = manifest(dir.path(), "forged.toml", 7, OTHER_SECRET, &net, &names);
    let before = rejected(&n1);
    let n3 = start(&images, &net, 2, &forged, "n3");
    wait_for(Duration::from_secs(10), "forged gossip rejected", || {
        rejected(&n1) > before
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(state_of(&n1, "n3"), "live");
    drop(n3);

    // A node the manifest does not list does not start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn-agent"))
        .env("WRENN_FLEET", &fleet)
        .env("WRENN_NODE_NAME", "n9")
        .env("WRENN_LISTEN", "127.0.0.1:0")
        .env("WRENN_STATE_DIR", dir.path().join("n9"))
        .env("WRENN_IMAGES_DIR", &images)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lists no such node"), "{stderr}");

    // n3 on an older manifest: the fleet does not count it, and it says why.
    let older = manifest(dir.path(), "older.toml", 6, SECRET, &net, &names);
    let n3 = start(&images, &net, 2, &older, "n3");
    wait_for(Duration::from_secs(30), "n3 refuses itself", || {
        let (_, nodes) = n3.get("/v1/nodes");
        nodes["refused"]
            .as_str()
            .is_some_and(|why| why.contains("version 7"))
    });
    assert_ne!(state_of(&n1, "n3"), "live");
    assert_eq!(state_of(&n3, "n3"), "refused");
}
