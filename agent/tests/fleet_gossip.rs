//! Fleet membership by gossip between real agent processes: convergence,
//! failure detection after `kill -9`, rejoining, and the refusals (wrong
//! secret, a node the manifest does not list, an older manifest). Gossip
//! runs over UDP on loopback; no sandbox is created.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Agent;
use serde_json::Value;

const SECRET: &str = "hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_SECRET: &str = "hex:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
/// The configured bound for declaring a silent node dead.
const DEAD_AFTER_MS: u64 = 4000;

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A manifest for nodes `names` gossiping on `ports`.
fn manifest(dir: &Path, file: &str, version: u64, secret: &str, nodes: &[(&str, u16)]) -> PathBuf {
    let mut text = format!(
        "[cluster]\nname = \"test\"\nversion = {version}\nsecrets = [\"{secret}\"]\n\n\
         [gossip]\ninterval_ms = 200\ndead_after_ms = {DEAD_AFTER_MS}\n"
    );
    for (name, port) in nodes {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\napi = \"http://127.0.0.1:1\"\ngossip = \"127.0.0.1:{port}\"\n"
        ));
    }
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

fn start(images: &Path, fleet: &Path, name: &str) -> Agent {
    Agent::start_with_env(
        images,
        &[
            ("WRENN_FLEET", fleet.to_str().unwrap()),
            ("WRENN_NODE_NAME", name),
        ],
    )
}

/// `name`'s state as `agent` sees it.
fn state_of(agent: &Agent, name: &str) -> String {
    let (_, nodes) = agent.get("/v1/nodes");
    nodes["nodes"]
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == name))
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
        .to_owned()
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
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let nodes = [("n1", ports[0]), ("n2", ports[1]), ("n3", ports[2])];
    let fleet = manifest(dir.path(), "fleet.toml", 5, SECRET, &nodes);
    let mut agents: Vec<Agent> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| start(&images, &fleet, name))
        .collect();
    let took = wait_for(Duration::from_secs(30), "membership convergence", || {
        agents
            .iter()
            .all(|a| ["n1", "n2", "n3"].iter().all(|n| state_of(a, n) == "live"))
    });
    println!("3 members converged in {took:?}");
    // Each node published its state.
    let (_, nodes) = agents[0].get("/v1/nodes");
    let n2 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "n2")
        .unwrap();
    assert_eq!(n2["published"]["mf"], "5");
    let cap: Value = serde_json::from_str(n2["published"]["cap"].as_str().unwrap()).unwrap();
    assert!(cap["vcpus"].as_u64().unwrap() >= 1);
    // Its templates, for placement: the base image every node has.
    assert_eq!(n2["published"]["tpl:base"], "base");

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
fn a_wrong_secret_an_unlisted_node_and_an_older_manifest_are_refused() {
    let Some(images) = common::images_dir_or_skip("fleet refusals") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let nodes = [("n1", ports[0]), ("n2", ports[1]), ("n3", ports[2])];
    let fleet = manifest(dir.path(), "fleet.toml", 7, SECRET, &nodes);
    let n1 = start(&images, &fleet, "n1");
    let n2 = start(&images, &fleet, "n2");
    wait_for(Duration::from_secs(30), "n1 and n2 see each other", || {
        state_of(&n1, "n2") == "live" && state_of(&n2, "n1") == "live"
    });

    // n3 with the wrong secret: its gossip is dropped and counted.
    let forged = manifest(dir.path(), "forged.toml", 7, OTHER_SECRET, &nodes);
    let before = rejected(&n1);
    let n3 = start(&images, &forged, "n3");
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
    let older = manifest(dir.path(), "older.toml", 6, SECRET, &nodes);
    let n3 = start(&images, &older, "n3");
    wait_for(Duration::from_secs(30), "n3 refuses itself", || {
        let (_, nodes) = n3.get("/v1/nodes");
        nodes["refused"]
            .as_str()
            .is_some_and(|why| why.contains("version 7"))
    });
    assert_ne!(state_of(&n1, "n3"), "live");
    assert_eq!(state_of(&n3, "n3"), "refused");
}
