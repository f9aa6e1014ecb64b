//! A fleet of three real agents, each in its own network namespace with its
//! own address on a bridge the test makes, from one fleet.toml, running
//! real QEMU sandboxes: creates placed by load, labels and room, every call
//! on a sandbox forwarded to the node holding it (exec, 50 MiB files both
//! ways, the SDK's WebSockets, PTY and port proxy through a node that holds
//! none of them), fleet-wide lists with each sandbox's node, a killed
//! node's sandboxes listed as `missing` until it is back, and keys that see
//! only their own sandboxes with quotas that hold across nodes.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::FleetNet;
use common::{sdk_python, Agent};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SECRET: &str = "hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Every node's own key: an operator's, seeing everything.
const OPERATOR: &str = "fleet-operator-key";
/// Keys of the manifest: team-a's may hold 2 sandboxes.
const KEY_A: &str = "key-of-team-a";
const KEY_B: &str = "key-of-team-b";
const API_PORT: u16 = 8080;
const GOSSIP_PORT: u16 = 7946;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Three nodes n1 (zone a), n2 (zone a), n3 (zone b).
struct Fleet {
    agents: Vec<Agent>,
    // Dropped after the agents.
    net: FleetNet,
    manifest: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Keys of the manifest: id, owner, key, quota.
const KEYS: [(&str, &str, &str, &str); 2] = [
    ("ka", "team-a", KEY_A, "{ sandboxes = 2 }"),
    ("kb", "team-b", KEY_B, "{}"),
];

/// The fleet's manifest at `version` with `keys`.
fn manifest_text(net: &FleetNet, version: u64, keys: &[(&str, &str, &str, &str)]) -> String {
    let mut text = format!(
        "[cluster]\nname = \"test\"\nversion = {version}\nsecrets = [\"{SECRET}\"]\n\n\
         [gossip]\ninterval_ms = 200\ndead_after_ms = 4000\n"
    );
    for (i, zone) in ["a", "a", "b"].iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\napi = \"http://{}:{API_PORT}\"\n\
             gossip = \"{}:{GOSSIP_PORT}\"\nlabels = {{ zone = \"{zone}\", host = \"n{}\" }}\n",
            i + 1,
            net.addr(i),
            net.addr(i),
            i + 1
        ));
    }
    for (id, owner, key, quota) in keys {
        text.push_str(&format!(
            "\n[[key]]\nid = \"{id}\"\nowner = \"{owner}\"\nhash = \"sha256:{}\"\nquota = {quota}\n",
            sha256_hex(key.as_bytes())
        ));
    }
    text
}

impl Fleet {
    /// Starts the fleet; `max_running[i]` is node i's limit (0: none).
    fn start(images: &Path, max_running: [u32; 3]) -> Fleet {
        Self::start_with(images, max_running, "")
    }

    /// [`Fleet::start`] with `extra` TOML tables in every node's config.
    fn start_with(images: &Path, max_running: [u32; 3], extra: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let net = FleetNet::new(3);
        let text = manifest_text(&net, 1, &KEYS);
        let manifest = dir.path().join("fleet.toml");
        std::fs::write(&manifest, text).unwrap();
        let agents: Vec<Agent> = (0..3)
            .map(|i| {
                let name = format!("n{}", i + 1);
                Agent::start_in_with(
                    images,
                    net.netns(i),
                    SocketAddr::new(net.addr(i).into(), API_PORT),
                    Some(OPERATOR),
                    &[
                        ("WRENN_FLEET", manifest.to_str().unwrap()),
                        ("WRENN_NODE_NAME", &name),
                    ],
                    &format!("[sandbox]\nmax_running = {}\n{extra}", max_running[i]),
                )
            })
            .collect();
        let fleet = Fleet {
            agents,
            net,
            manifest,
            _dir: dir,
        };
        let took = fleet.wait_for(Duration::from_secs(30), "membership", |f| {
            f.agents.iter().all(|a| {
                let (_, nodes) = a.get("/v1/nodes");
                nodes["nodes"]
                    .as_array()
                    .is_some_and(|n| n.len() == 3 && n.iter().all(|m| m["state"] == "live"))
            })
        });
        println!("3 members converged in {took:?}");
        fleet
    }

    fn node(&self, name: &str) -> &Agent {
        let i: usize = name[1..].parse().unwrap();
        &self.agents[i - 1]
    }

    fn wait_for(&self, limit: Duration, what: &str, check: impl Fn(&Fleet) -> bool) -> Duration {
        let start = Instant::now();
        while !check(self) {
            assert!(
                start.elapsed() < limit,
                "{what} did not happen within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        start.elapsed()
    }

    /// Waits until every node's gossip shows sandbox `id` (or, with `gone`,
    /// no longer shows it).
    fn wait_gossiped(&self, id: &str, gone: bool) {
        self.wait_for(Duration::from_secs(15), &format!("gossip of {id}"), |f| {
            f.agents.iter().all(|a| {
                let (_, nodes) = a.get("/v1/nodes");
                let seen = nodes["nodes"].as_array().unwrap().iter().any(|n| {
                    n["published"]
                        .as_object()
                        .is_some_and(|p| p.contains_key(&format!("sbx:{id}")))
                });
                seen != gone
            })
        });
    }
}

/// A call with API key `key` (not the agent's own).
fn call(agent: &Agent, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let request = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(300))
        .build()
        .request(method, &format!("{}{path}", agent.url))
        .set("X-API-Key", key);
    let answer = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    match answer {
        Ok(r) => {
            let status = r.status();
            (status, r.into_json().unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(status, r)) => (status, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {path} on {}: {e}", agent.url),
    }
}

/// Creates a sandbox through `agent`; its id and the node it landed on.
fn create(agent: &Agent, key: &str, body: Value) -> (String, String) {
    let (status, sandbox) = call(agent, "POST", "/v1/sandboxes", key, Some(body));
    assert_eq!(status, 201, "create through {}: {sandbox}", agent.url);
    (
        sandbox["id"].as_str().unwrap().to_owned(),
        sandbox["node"].as_str().unwrap().to_owned(),
    )
}

/// The fleet's sandboxes as `agent` lists them for `key`: id → (status, node).
fn listed(agent: &Agent, key: &str) -> std::collections::BTreeMap<String, (String, String)> {
    let (status, list) = call(agent, "GET", "/v1/sandboxes", key, None);
    assert_eq!(status, 200, "{list}");
    list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                (
                    s["status"].as_str().unwrap().to_owned(),
                    s["node"].as_str().unwrap_or("?").to_owned(),
                ),
            )
        })
        .collect()
}

fn python(agent: &Agent, id: &str, code: &str) -> (u16, Value) {
    call(
        agent,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        OPERATOR,
        Some(json!({"cmd": "python3", "args": ["-c", code]})),
    )
}

/// Runs SDK pytest files through `agent`'s node.
fn pytest(fleet: &Fleet, through: usize, tests: &[&str]) {
    let agent = &fleet.agents[through];
    let out = Command::new(sdk_python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--timeout=900",
        ])
        .args(tests)
        .current_dir(common::repo().join("tests/sdk"))
        .env("WRENN_BASE_URL", &agent.url)
        .env("WRENN_API_KEY", KEY_B)
        .env("WRENN_PROXY_DOMAIN", format!("localhost:{API_PORT}"))
        .env("WRENN_TEST_PROXY_IP", fleet.net.addr(through).to_string())
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "the SDK tests through {} failed:\n{report}\nlogs:\n{}",
        agent.url,
        fleet
            .agents
            .iter()
            .map(|a| tail(&a.log(), 30))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn creates_are_placed_and_every_call_reaches_the_node_that_holds_the_sandbox() {
    let Some(images) = common::images_dir_or_skip("fleet placement and forwarding") else {
        return;
    };
    // n2 and n3 take one running sandbox each.
    let mut fleet = Fleet::start(&images, [0, 1, 1]);
    let (n1, n2, n3) = (fleet.node("n1"), fleet.node("n2"), fleet.node("n3"));

    // Equal nodes: the first by name. Then the least loaded.
    let (s1, on) = create(n1, OPERATOR, json!({}));
    assert_eq!(on, "n1");
    fleet.wait_gossiped(&s1, false);
    let (s2, on) = create(n2, OPERATOR, json!({}));
    assert_eq!(on, "n2", "n2 and n3 are free, n1 holds one");
    fleet.wait_gossiped(&s2, false);
    // n2 is full: created through n1, the sandbox goes to n3 (free), not
    // n1 (loaded) or n2 (at its limit).
    let (s3, on) = create(n1, OPERATOR, json!({}));
    assert_eq!(on, "n3", "placement forced by n2's limit");
    fleet.wait_gossiped(&s3, false);
    // Labels constrain: zone a through n3 lands on n1 (n2 is full); zone b
    // has only n3, which is full, and the client hears why.
    let (s4, on) = create(n3, OPERATOR, json!({"node_labels": {"zone": "a"}}));
    assert_eq!(on, "n1");
    let (status, err) = call(
        n2,
        "POST",
        "/v1/sandboxes",
        OPERATOR,
        Some(json!({"node_labels": {"zone": "b"}})),
    );
    assert_eq!(status, 503, "{err}");
    let why = err["error"]["message"].as_str().unwrap();
    assert!(why.contains("n3") && why.contains("limit"), "{why}");

    // s4 lives on n1; every call through n3 reaches it.
    let (status, out) = python(n3, &s4, "import socket; print(6*7)");
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("42\n")),
        "{out}"
    );
    let data: Vec<u8> = (0..50u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let base = format!("/v1/sandboxes/{s4}");
    let (status, body) = n3.put_bytes(&format!("{base}/files?path=/root/big.bin"), &data);
    assert!(status < 300, "upload through n3: {status} {body}");
    let (status, got) = n3.get_bytes(&format!("{base}/files?path=/root/big.bin"));
    assert_eq!(status, 200);
    assert_eq!(
        sha256_hex(&got),
        sha256_hex(&data),
        "50 MiB back through n3"
    );
    let (_, out) = python(
        n1,
        &s4,
        "import hashlib; print(hashlib.sha256(open('/root/big.bin','rb').read()).hexdigest())",
    );
    assert_eq!(out["stdout"].as_str().unwrap().trim(), sha256_hex(&data));
    // And s3 (on n3) through n2.
    let (status, out) = python(n2, &s3, "print('on n3')");
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("on n3\n")),
        "{out}"
    );

    // The SDK through n3, whose capsules all land on n1 (n2 and n3 are
    // full): exec over WebSockets, PTY, background and reconnect, the port
    // proxy (HTTP and WebSocket), files, pause and resume.
    pytest(
        &fleet,
        2,
        &[
            "test_sockets.py",
            "test_rest.py",
            "-k",
            "not wrong_key and not create_with_and_without",
        ],
    );

    // Every node lists the fleet's sandboxes, each with its node.
    let want = [(&s1, "n1"), (&s2, "n2"), (&s3, "n3"), (&s4, "n1")];
    for agent in &fleet.agents {
        let all = listed(agent, OPERATOR);
        for (id, node) in want {
            assert_eq!(
                all.get(id.as_str()).map(|(s, n)| (s.as_str(), n.as_str())),
                Some(("running", node)),
                "{id} as {} lists it: {all:?}",
                agent.url
            );
        }
    }

    // Destroy through another node than the holder's.
    let (status, _) = call(n1, "DELETE", &format!("/v1/sandboxes/{s3}"), OPERATOR, None);
    assert_eq!(status, 204);
    fleet.wait_gossiped(&s3, true);
    let (status, _) = call(n2, "GET", &format!("/v1/sandboxes/{s3}"), OPERATOR, None);
    assert_eq!(status, 404);

    // n2 killed: its sandbox is missing (with its node), not absent, and
    // calls on it say why; restarted, it is listed running again (its VM
    // outlived the agent).
    fleet.agents[1].kill9();
    let n1 = fleet.node("n1");
    assert_eq!(
        listed(n1, OPERATOR)
            .get(&s2)
            .map(|(s, n)| (s.clone(), n.clone())),
        Some(("missing".to_owned(), "n2".to_owned()))
    );
    let (status, got) = call(n1, "GET", &format!("/v1/sandboxes/{s2}"), OPERATOR, None);
    assert_eq!(
        (status, got["status"].as_str(), got["node"].as_str()),
        (200, Some("missing"), Some("n2"))
    );
    fleet.wait_for(Duration::from_secs(10), "n2 dead", |f| {
        let (_, nodes) = f.agents[0].get("/v1/nodes");
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "n2" && n["state"] == "dead")
    });
    let (status, err) = python(n1, &s2, "print(1)");
    assert_eq!(status, 503, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("n2"),
        "{err}"
    );
    fleet.agents[1].start_again();
    fleet.wait_for(Duration::from_secs(30), "s2 listed again", |f| {
        listed(&f.agents[0], OPERATOR)
            .get(&s2)
            .map(|(s, n)| (s.as_str() == "running", n.as_str() == "n2"))
            == Some((true, true))
    });
    let (status, out) = python(fleet.node("n3"), &s2, "print('back')");
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("back\n")),
        "{out}"
    );

    for id in [&s1, &s2, &s4] {
        let (status, body) = call(
            fleet.node("n3"),
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            OPERATOR,
            None,
        );
        assert_eq!(status, 204, "{body}");
    }
}

#[test]
fn keys_see_only_their_own_and_quotas_hold_on_every_node() {
    let Some(images) = common::images_dir_or_skip("fleet keys and quotas") else {
        return;
    };
    let fleet = Fleet::start(&images, [0, 0, 0]);
    let (n1, n2, n3) = (fleet.node("n1"), fleet.node("n2"), fleet.node("n3"));
    let (a1, on1) = create(n1, KEY_A, json!({}));
    fleet.wait_gossiped(&a1, false);
    let (a2, on2) = create(n2, KEY_A, json!({}));
    assert_ne!(on1, on2, "the second goes to a less loaded node");
    fleet.wait_gossiped(&a2, false);
    // The third, whichever node is asked: 429 with the limit and the use.
    for agent in &fleet.agents {
        let (status, err) = call(agent, "POST", "/v1/sandboxes", KEY_A, Some(json!({})));
        assert_eq!(status, 429, "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("may hold 2 sandboxes") && message.contains("holds 2"),
            "{message}"
        );
    }
    // Team b sees none of them, through any node, and cannot touch them.
    let (b1, _) = create(n3, KEY_B, json!({}));
    for agent in &fleet.agents {
        let seen = listed(agent, KEY_B);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            [&b1],
            "{} lists for team b",
            agent.url
        );
        let seen = listed(agent, KEY_A);
        assert!(seen.contains_key(&a1) && seen.contains_key(&a2) && !seen.contains_key(&b1));
        for id in [&a1, &a2] {
            for (method, path, body) in [
                ("GET", format!("/v1/sandboxes/{id}"), None),
                (
                    "POST",
                    format!("/v1/sandboxes/{id}/exec"),
                    Some(json!({"cmd": "true"})),
                ),
                ("DELETE", format!("/v1/sandboxes/{id}"), None),
            ] {
                let (status, err) = call(agent, method, &path, KEY_B, body);
                assert_eq!(
                    status, 404,
                    "{method} {path} by team b through {}: {err}",
                    agent.url
                );
            }
        }
    }
    // Team a's own calls work through any node.
    let (status, out) = call(
        n3,
        "POST",
        &format!("/v1/sandboxes/{a1}/exec"),
        KEY_A,
        Some(json!({"cmd": "echo", "args": ["mine"]})),
    );
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("mine\n")),
        "{out}"
    );
    // A wrong key is refused and counted; /metrics tells an operator.
    let (status, _) = call(n3, "GET", "/v1/sandboxes", "not-a-key", None);
    assert_eq!(status, 401);
    let (status, text) = n3.get_bytes("/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    };
    assert_eq!(value("wrenn_gossip_members{state=\"live\"}"), 3.0);
    assert!(value("wrenn_auth_failures_total") >= 1.0);
    assert!(
        value("wrenn_forwarded_requests_total") >= 1.0,
        "n3 forwarded team a's exec"
    );
    assert!(value("wrenn_gossip_messages_total{direction=\"received\"}") > 0.0);
    assert!(text.contains("wrenn_operation_seconds_bucket{op=\"create\",le=\"+Inf\"}"));
    assert!(text.contains("wrenn_layer_store_bytes "));

    // Snapshots are the owner's too. Team a's snapshot of a1, asked of
    // n3, is taken where a1 is.
    let (status, _) = call(n2, "DELETE", &format!("/v1/sandboxes/{a2}"), KEY_A, None);
    assert_eq!(status, 204);
    fleet.wait_gossiped(&a2, true);
    let (status, snap) = call(
        n3,
        "POST",
        "/v1/snapshots",
        KEY_A,
        Some(json!({"sandbox_id": a1, "name": "team-a-snap"})),
    );
    assert_eq!(status, 201, "{snap}");
    assert_eq!(snap["node"], on1.as_str());
    // Every node lists it for team a, none for team b.
    let wait_template = |agent: &Agent| {
        fleet.wait_for(Duration::from_secs(15), "the snapshot gossiped", |_| {
            let (_, nodes) = agent.get("/v1/nodes");
            nodes["nodes"].as_array().unwrap().iter().any(|n| {
                n["published"]
                    .as_object()
                    .is_some_and(|p| p.contains_key("tpl:team-a-snap"))
            })
        });
    };
    for agent in &fleet.agents {
        wait_template(agent);
        let names = |key: &str| -> Vec<String> {
            let (status, list) = call(agent, "GET", "/v1/snapshots?type=snapshot", key, None);
            assert_eq!(status, 200, "{list}");
            list.as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(KEY_A), ["team-a-snap"], "through {}", agent.url);
        assert!(names(KEY_B).is_empty(), "through {}", agent.url);
        let (status, _) = call(agent, "GET", "/v1/snapshots/team-a-snap", KEY_B, None);
        assert_eq!(status, 404);
        let (status, got) = call(agent, "GET", "/v1/snapshots/team-a-snap", KEY_A, None);
        assert_eq!(
            (status, got["node"].as_str()),
            (200, Some(on1.as_str())),
            "{got}"
        );
    }
    // Team b cannot create from it, nor take its name anywhere.
    let (status, err) = call(
        n2,
        "POST",
        "/v1/sandboxes",
        KEY_B,
        Some(json!({"template": "team-a-snap"})),
    );
    assert_eq!(status, 404, "{err}");
    let (status, err) = call(
        n1,
        "POST",
        "/v1/snapshots",
        KEY_B,
        Some(json!({"sandbox_id": b1, "name": "team-a-snap"})),
    );
    assert_eq!(status, 409, "{err}");
    // Team a's create from it, asked of n2, lands where the snapshot is.
    let (from_snap, on) = create(n2, KEY_A, json!({"template": "team-a-snap"}));
    assert_eq!(on, on1);
    let (status, err) = call(n3, "DELETE", "/v1/snapshots/team-a-snap", KEY_A, None);
    assert_eq!(status, 409, "in use: {err}");
    let (status, _) = call(
        n3,
        "DELETE",
        &format!("/v1/sandboxes/{from_snap}"),
        KEY_A,
        None,
    );
    assert_eq!(status, 204);
    let (status, err) = call(n3, "DELETE", "/v1/snapshots/team-a-snap", KEY_A, None);
    assert_eq!(status, 204, "{err}");

    for (id, key) in [(&a1, KEY_A), (&b1, KEY_B)] {
        let (status, body) = call(n2, "DELETE", &format!("/v1/sandboxes/{id}"), key, None);
        assert_eq!(status, 204, "{body}");
    }
    // Room again: the quota counts what is held now.
    fleet.wait_gossiped(&a1, true);
    let (a3, _) = create(n1, KEY_A, json!({}));
    let (status, _) = call(n1, "DELETE", &format!("/v1/sandboxes/{a3}"), KEY_A, None);
    assert_eq!(status, 204);
}

#[test]
fn the_manifest_is_read_again_on_sighup_and_every_quota_holds() {
    let Some(images) = common::images_dir_or_skip("fleet manifest reload") else {
        return;
    };
    let fleet = Fleet::start(&images, [0, 0, 0]);
    const KEY_C: &str = "key-of-team-c";
    let n1 = fleet.node("n1");
    let (status, _) = call(n1, "GET", "/v1/sandboxes", KEY_C, None);
    assert_eq!(status, 401, "not in the manifest yet");
    let hup = |fleet: &Fleet| {
        for agent in &fleet.agents {
            let pid = agent.pid().unwrap().to_string();
            assert!(Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success());
        }
    };
    let version_everywhere = |fleet: &Fleet, v: u64| {
        fleet
            .agents
            .iter()
            .all(|a| a.get("/v1/nodes").1["version"] == v)
    };
    // Version 2 adds team c's key: every node takes it, without a restart.
    let mut keys = KEYS.to_vec();
    keys.push((
        "kc",
        "team-c",
        KEY_C,
        "{ sandboxes = 1, paused = 0, snapshot_bytes = 1 }",
    ));
    std::fs::write(&fleet.manifest, manifest_text(&fleet.net, 2, &keys)).unwrap();
    hup(&fleet);
    fleet.wait_for(Duration::from_secs(10), "version 2 in force", |f| {
        version_everywhere(f, 2)
    });
    let (c1, _) = create(fleet.node("n2"), KEY_C, json!({}));
    fleet.wait_gossiped(&c1, false);
    // Each quota: one running sandbox, no paused one, snapshots up to a byte.
    let (status, err) = call(
        fleet.node("n3"),
        "POST",
        "/v1/sandboxes",
        KEY_C,
        Some(json!({})),
    );
    assert_eq!(status, 429, "{err}");
    let (status, err) = call(
        n1,
        "POST",
        &format!("/v1/sandboxes/{c1}/pause"),
        KEY_C,
        None,
    );
    assert_eq!(status, 429, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("paused"),
        "{err}"
    );
    let snapshot = |name: &str| {
        call(
            n1,
            "POST",
            "/v1/snapshots",
            KEY_C,
            Some(json!({"sandbox_id": c1, "name": name})),
        )
    };
    let (status, snap) = snapshot("c-snap-1");
    assert_eq!(status, 201, "{snap}");
    let (status, err) = snapshot("c-snap-2");
    assert_eq!(status, 429, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bytes of snapshots"),
        "{err}"
    );
    // An older manifest is refused, and the one in force stays.
    std::fs::write(&fleet.manifest, manifest_text(&fleet.net, 1, &KEYS)).unwrap();
    hup(&fleet);
    fleet.wait_for(Duration::from_secs(10), "the refusal logged", |f| {
        f.agents
            .iter()
            .all(|a| a.log().contains("fleet manifest not reloaded"))
    });
    assert!(version_everywhere(&fleet, 2));
    let (status, _) = call(n1, "GET", "/v1/sandboxes", KEY_C, None);
    assert_eq!(status, 200, "team c's key still works");
    let (status, _) = call(n1, "DELETE", &format!("/v1/sandboxes/{c1}"), KEY_C, None);
    assert_eq!(status, 204);
    let (status, err) = call(n1, "DELETE", "/v1/snapshots/c-snap-1", KEY_C, None);
    assert_eq!(status, 204, "{err}");
}

/// A Python process holding 24 MiB of random bytes in memory, answering
/// their SHA-256 on 127.0.0.1:7000.
const HOLDER: &str = r#"
import hashlib, os, socket
blob = bytearray(os.urandom(24 * 1024 * 1024))
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7000))
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(hashlib.sha256(blob).hexdigest().encode())
    conn.close()
"#;

/// What the holder in sandbox `id` answers, asked through `agent`.
fn held(agent: &Agent, id: &str) -> String {
    let code = r#"
import socket, time
for _ in range(150):
    try:
        s = socket.create_connection(("127.0.0.1", 7000)); print(s.recv(100).decode()); break
    except OSError:
        time.sleep(0.2)
"#;
    let (status, out) = python(agent, id, code);
    assert_eq!(status, 200, "{out}");
    let answer = out["stdout"].as_str().unwrap().trim().to_owned();
    assert_eq!(answer.len(), 64, "the holder in {id} answered {out}");
    answer
}

/// The value of series `series` in `agent`'s `/metrics`.
fn metric(agent: &Agent, series: &str) -> f64 {
    let (status, text) = agent.get_bytes("/metrics");
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// What gossip says of template `name` on `node`, as `agent` sees it.
fn gossiped_template(agent: &Agent, node: &str, name: &str) -> Option<String> {
    let (_, nodes) = agent.get("/v1/nodes");
    nodes["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)?["published"][format!("tpl:{name}")]
    .as_str()
    .map(str::to_owned)
}

/// Files (name, bytes) in the transfer folders of `agent`.
fn incoming(agent: &Agent) -> Vec<(String, u64)> {
    let mut files = Vec::new();
    let Ok(folders) = std::fs::read_dir(agent.dir.join("state/incoming")) else {
        return files;
    };
    for folder in folders.flatten() {
        for file in std::fs::read_dir(folder.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let size = file.metadata().map(|m| m.len()).unwrap_or_default();
            files.push((file.file_name().to_string_lossy().into_owned(), size));
        }
    }
    files
}

#[test]
fn a_snapshot_travels_to_the_node_that_needs_it_once_and_a_cut_transfer_resumes() {
    let Some(images) = common::images_dir_or_skip("fleet snapshot transfer") else {
        return;
    };
    // Transfers slow enough to be cut halfway.
    let mut fleet = Fleet::start_with(&images, [0, 0, 0], "[fleet]\ntransfer_mib_per_s = 12\n");
    let n1 = fleet.node("n1");
    let (source, on) = create(n1, OPERATOR, json!({}));
    assert_eq!(on, "n1");
    let (status, started) = call(
        n1,
        "POST",
        &format!("/v1/sandboxes/{source}/processes"),
        OPERATOR,
        Some(json!({"cmd": "python3", "args": ["-c", HOLDER], "background": true})),
    );
    assert_eq!(status, 201, "{started}");
    let in_memory = held(n1, &source);
    let (status, body) = n1.put_bytes(
        &format!("/v1/sandboxes/{source}/files?path=/root/marker.txt"),
        b"written on n1",
    );
    assert!(status < 300, "{status} {body}");
    let (status, snap) = call(
        n1,
        "POST",
        "/v1/snapshots",
        OPERATOR,
        Some(json!({"sandbox_id": source, "name": "travels"})),
    );
    assert_eq!(status, 201, "{snap}");
    fleet.wait_for(Duration::from_secs(15), "the snapshot gossiped", |f| {
        gossiped_template(&f.agents[2], "n1", "travels").is_some()
    });
    let on_n1 = gossiped_template(fleet.node("n3"), "n1", "travels").unwrap();
    let digest = on_n1.rsplit('|').next().unwrap().to_owned();
    assert_eq!(digest.len(), 64, "gossiped as {on_n1}");

    // A create of it on n3 (the only node of zone b) fetches it there; n3
    // is killed a third of the way through.
    let url = format!("{}/v1/sandboxes", fleet.node("n3").url);
    let cut = std::thread::spawn(move || {
        ureq::post(&url)
            .set("X-API-Key", OPERATOR)
            .timeout(Duration::from_secs(600))
            .send_json(json!({"template": "travels", "node_labels": {"zone": "b"}}))
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    let size = snap["size_bytes"].as_u64().unwrap();
    fleet.wait_for(Duration::from_secs(120), "a third transferred", |f| {
        let files = incoming(&f.agents[2]);
        files.iter().map(|(_, n)| n).sum::<u64>() > size / 3
            && files
                .iter()
                .any(|(name, n)| name.ends_with(".part") && *n > 0)
    });
    fleet.agents[2].kill9();
    let answer = cut.join().unwrap();
    assert!(answer.is_err(), "the create outlived its node: {answer:?}");
    let had: u64 = incoming(&fleet.agents[2]).iter().map(|(_, n)| n).sum();
    println!("transfer cut at {had} of about {size} bytes");
    assert!(had < size, "cut before the end");

    // Back, n3 takes ten creates at once: one transfer, from where it
    // stopped, and ten sandboxes of the snapshot.
    fleet.agents[2].start_again();
    fleet.wait_for(Duration::from_secs(30), "n3 live again", |f| {
        f.agents.iter().all(|a| {
            let (_, nodes) = a.get("/v1/nodes");
            nodes["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().all(|m| m["state"] == "live"))
        })
    });
    let n3_url = fleet.node("n3").url.clone();
    let creates: Vec<_> = (0..10)
        .map(|_| {
            let url = format!("{n3_url}/v1/sandboxes");
            std::thread::spawn(move || {
                match ureq::post(&url)
                    .set("X-API-Key", OPERATOR)
                    .timeout(Duration::from_secs(900))
                    .send_json(json!({"template": "travels", "node_labels": {"zone": "b"}}))
                {
                    Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
                    Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
                    Err(e) => panic!("create on n3: {e}"),
                }
            })
        })
        .collect();
    let mut clones = Vec::new();
    for create in creates {
        let (status, sandbox) = create.join().unwrap();
        assert_eq!(
            status,
            201,
            "{sandbox}\n{}",
            tail(&fleet.agents[2].log(), 40)
        );
        assert_eq!(sandbox["node"], "n3", "{sandbox}");
        clones.push(sandbox["id"].as_str().unwrap().to_owned());
    }
    let n3 = fleet.node("n3");
    let log = n3.log();
    let fetched: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("snapshot fetched"))
        .collect();
    assert_eq!(fetched.len(), 1, "fetched once:\n{}", fetched.join("\n"));
    let (bytes, received) = (
        common::log_number(fetched[0], "bytes"),
        common::log_number(fetched[0], "received"),
    );
    println!(
        "bundle of {bytes} bytes; {received} received after the restart, {had} kept from before"
    );
    assert_eq!(
        received,
        bytes - had,
        "the transfer went on from where it was cut"
    );
    assert_eq!(metric(n3, "wrenn_snapshot_fetches_total"), 1.0);
    assert!(metric(n3, "wrenn_snapshot_fetch_resumed_total") >= 1.0);
    assert_eq!(
        metric(n3, "wrenn_snapshot_fetched_bytes_total"),
        received as f64
    );
    assert!(
        metric(fleet.node("n1"), "wrenn_snapshot_served_bytes_total") < (bytes + had / 2) as f64,
        "n1 sent the cut part once, not again"
    );
    assert!(incoming(n3).is_empty(), "the transfer folder is gone");
    // n3 gossips the same snapshot: the same digest.
    fleet.wait_for(Duration::from_secs(15), "n3's copy gossiped", |f| {
        gossiped_template(&f.agents[0], "n3", "travels")
            .is_some_and(|v| v.rsplit('|').next() == Some(digest.as_str()))
    });
    // Each clone has the source's disk and memory.
    for id in &clones {
        let (status, got) = fleet
            .node("n2")
            .get_bytes(&format!("/v1/sandboxes/{id}/files?path=/root/marker.txt"));
        assert_eq!((status, got.as_slice()), (200, &b"written on n1"[..]));
        assert_eq!(held(fleet.node("n2"), id), in_memory, "{id}'s memory");
    }
    // One name in the fleet: listed once, and not taken again elsewhere.
    let (status, list) = call(
        fleet.node("n2"),
        "GET",
        "/v1/snapshots?type=snapshot",
        OPERATOR,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] == "travels")
            .count(),
        1,
        "{list}"
    );
    let (status, err) = call(
        n3,
        "POST",
        "/v1/snapshots",
        OPERATOR,
        Some(json!({"sandbox_id": clones[0], "name": "travels"})),
    );
    assert_eq!(status, 409, "{err}");

    // Deleted through n2: refused while n3's clones use it, then gone from
    // every node that had it.
    let (status, err) = call(
        fleet.node("n2"),
        "DELETE",
        "/v1/snapshots/travels",
        OPERATOR,
        None,
    );
    assert_eq!(status, 409, "in use on n3: {err}");
    for id in clones.iter().chain([&source]) {
        let (status, body) = call(
            fleet.node("n1"),
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            OPERATOR,
            None,
        );
        assert_eq!(status, 204, "{body}");
    }
    let (status, err) = call(
        fleet.node("n2"),
        "DELETE",
        "/v1/snapshots/travels",
        OPERATOR,
        None,
    );
    assert_eq!(status, 204, "{err}");
    for node in ["n1", "n3"] {
        let (status, _) = fleet.node(node).get("/v1/snapshots/travels");
        assert_eq!(status, 404, "{node} still has it");
    }
    fleet.wait_for(Duration::from_secs(15), "the deletion gossiped", |f| {
        ["n1", "n3"]
            .iter()
            .all(|n| gossiped_template(&f.agents[1], n, "travels").is_none())
    });
}

/// The drain state node `name` publishes, as `agent` sees it.
fn gossiped_drain(agent: &Agent, name: &str) -> Option<String> {
    let (_, nodes) = agent.get("/v1/nodes");
    nodes["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)?["published"]["drain"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn a_drained_node_s_sandboxes_run_on_the_others_with_memory_and_files_intact() {
    let Some(images) = common::images_dir_or_skip("fleet drain") else {
        return;
    };
    let fleet = Fleet::start(&images, [0, 0, 0]);
    let n1 = fleet.node("n1");
    // Two sandboxes on n1, each with a process holding random bytes in
    // memory and a file on its disk.
    let mut sandboxes = Vec::new();
    for i in 0..2 {
        let (id, on) = create(n1, OPERATOR, json!({"node_labels": {"host": "n1"}}));
        assert_eq!(on, "n1");
        let (status, started) = call(
            n1,
            "POST",
            &format!("/v1/sandboxes/{id}/processes"),
            OPERATOR,
            Some(json!({"cmd": "python3", "args": ["-c", HOLDER], "background": true})),
        );
        assert_eq!(status, 201, "{started}");
        let memory = held(n1, &id);
        let text = format!("sandbox {i} was on n1");
        let (status, body) = n1.put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/root/marker.txt"),
            text.as_bytes(),
        );
        assert!(status < 300, "{status} {body}");
        fleet.wait_gossiped(&id, false);
        sandboxes.push((id, memory, text));
    }

    // A fleet key may not drain; an unknown node is 404 with the names.
    let (status, err) = call(fleet.node("n2"), "POST", "/v1/nodes/n1/drain", KEY_A, None);
    assert_eq!(status, 403, "{err}");
    let (status, err) = call(
        fleet.node("n2"),
        "POST",
        "/v1/nodes/n9/drain",
        OPERATOR,
        None,
    );
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("n1"),
        "{err}"
    );

    // Drained through n2.
    let (status, drained) = call(
        fleet.node("n2"),
        "POST",
        "/v1/nodes/n1/drain",
        OPERATOR,
        None,
    );
    assert_eq!(
        status,
        200,
        "{drained}\n{}",
        fleet
            .agents
            .iter()
            .map(|a| tail(&a.log(), 30))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    assert_eq!(drained["state"], "drained", "{drained}");
    let moved = drained["moved"].as_array().unwrap();
    assert_eq!(moved.len(), 2, "{drained}");
    for m in moved {
        assert_ne!(m["to"], "n1", "{drained}");
    }
    let (_, node) = n1.get("/v1/node");
    assert_eq!(node["drain"], "drained", "{node}");
    fleet.wait_for(Duration::from_secs(15), "the moves gossiped", |f| {
        let list = listed(&f.agents[2], OPERATOR);
        sandboxes.iter().all(|(id, _, _)| {
            list.get(id)
                .is_some_and(|(status, node)| status == "running" && node != "n1")
        }) && gossiped_drain(&f.agents[2], "n1").as_deref() == Some("drained")
    });
    // Through every node, each runs where it went, with its memory and
    // its files.
    for agent in &fleet.agents {
        for (id, memory, text) in &sandboxes {
            assert_eq!(
                &held(agent, id),
                memory,
                "{id}'s memory through {}",
                agent.url
            );
            let (status, got) =
                agent.get_bytes(&format!("/v1/sandboxes/{id}/files?path=/root/marker.txt"));
            assert_eq!(
                (status, got.as_slice()),
                (200, text.as_bytes()),
                "{id} through {}",
                agent.url
            );
        }
    }
    // Listed once each: n1 forgot them.
    let (_, list) = n1.get("/v1/sandboxes");
    for (id, _, _) in &sandboxes {
        let times = list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["id"] == id.as_str())
            .count();
        assert_eq!(times, 1, "{id} in {list}");
    }

    // A drained node takes no sandboxes: not through placement, not itself.
    let (status, err) = call(
        fleet.node("n3"),
        "POST",
        "/v1/sandboxes",
        OPERATOR,
        Some(json!({"node_labels": {"host": "n1"}})),
    );
    assert_eq!(status, 503, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("drained"),
        "{err}"
    );

    // Undrained through n3: n1 takes sandboxes again.
    let (status, body) = call(
        fleet.node("n3"),
        "POST",
        "/v1/nodes/n1/undrain",
        OPERATOR,
        None,
    );
    assert_eq!(status, 200, "{body}");
    fleet.wait_for(Duration::from_secs(15), "the undrain gossiped", |f| {
        f.agents
            .iter()
            .all(|a| gossiped_drain(a, "n1").as_deref() == Some(""))
    });
    let (back, on) = create(
        fleet.node("n3"),
        OPERATOR,
        json!({"node_labels": {"host": "n1"}}),
    );
    assert_eq!(on, "n1");
    for id in sandboxes.iter().map(|(id, _, _)| id).chain([&back]) {
        let (status, body) = call(
            fleet.node("n2"),
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            OPERATOR,
            None,
        );
        assert_eq!(status, 204, "{body}");
    }
}
