//! `make bench`: what the fleet's placement and forwarding cost. Two real
//! agents, each in its own network namespace on a bridge ([`FleetNet`]):
//! n1 (zone a) and n2 (zone b). Every sandbox is on n2 (created with
//! `node_labels = {zone = "b"}`); each figure is measured calling n2
//! directly and calling n1, which places or forwards to n2: a create, an
//! exec of `true`, and a GET of the sandbox. Prints a Markdown table and
//! writes it to `target/bench/forwarding.md`.
//!
//! Then template transfer: snapshots taken on n2, each created from on n1
//! (zone a), which fetches it first, unpaced; the bytes and time of each
//! transfer (from n1's log) and the create's time, beside a create from the
//! same snapshot on n2, in `target/bench/transfer.md`.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::FleetNet;
use common::Agent;
use serde_json::{json, Value};

const SECRET: &str = "hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const API_KEY: &str = "forwarding-bench-key";
const CREATES: usize = 5;
const EXECS: usize = 30;
const GETS: usize = 200;
const TRANSFERS: usize = 3;

fn main() {
    let Some(images) = common::images_dir_or_skip("forwarding bench") else {
        return;
    };
    let net = FleetNet::new(2);
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    let mut text = format!(
        "[cluster]\nname = \"bench\"\nversion = 1\nsecrets = [\"{SECRET}\"]\n\
         [gossip]\ninterval_ms = 200\ndead_after_ms = 4000\n"
    );
    for (i, zone) in ["a", "b"].iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"n{}\"\napi = \"http://{}:8080\"\ngossip = \"{}:7946\"\n\
             labels = {{ zone = \"{zone}\" }}\n",
            i + 1,
            net.addr(i),
            net.addr(i)
        ));
    }
    std::fs::write(&fleet, text).unwrap();
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            Agent::start_in(
                &images,
                net.netns(i),
                SocketAddr::new(net.addr(i).into(), 8080),
                Some(API_KEY),
                &[
                    ("WRENN_FLEET", fleet.to_str().unwrap()),
                    ("WRENN_NODE_NAME", &format!("n{}", i + 1)),
                ],
            )
        })
        .collect();
    let (n1, n2) = (&agents[0], &agents[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agents.iter().all(|a| {
        let (_, nodes) = a.get("/v1/nodes");
        nodes["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().all(|m| m["state"] == "live"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the two nodes never saw each other"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_b = json!({"node_labels": {"zone": "b"}});
    let create = |agent: &Agent| -> (Duration, String) {
        let started = Instant::now();
        let (status, sandbox) = agent.post("/v1/sandboxes", on_b.clone());
        let took = started.elapsed();
        assert_eq!(status, 201, "{sandbox}");
        assert_eq!(sandbox["node"], "n2");
        (took, sandbox["id"].as_str().unwrap().to_owned())
    };
    let mut rows = Vec::new();
    // Creates, alternating direct and placed through n1.
    let (mut direct, mut placed) = (Vec::new(), Vec::new());
    for _ in 0..CREATES {
        for (agent, times) in [(n2, &mut direct), (n1, &mut placed)] {
            let (took, id) = create(agent);
            times.push(took);
            assert_eq!(n2.delete(&format!("/v1/sandboxes/{id}")).0, 204);
        }
    }
    rows.push(row("create (cold boot)", &mut direct, &mut placed));
    let (_, id) = create(n2);
    let exec = format!("/v1/sandboxes/{id}/exec");
    let get = format!("/v1/sandboxes/{id}");
    // Wait for n1 to learn where the sandbox is.
    while n1.get(&get).0 != 200 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let time = |agent: &Agent, n: usize, call: &dyn Fn(&Agent) -> (u16, Value)| {
        (0..n)
            .map(|_| {
                let started = Instant::now();
                let (status, body) = call(agent);
                assert_eq!(status, 200, "{body}");
                started.elapsed()
            })
            .collect::<Vec<_>>()
    };
    let run_true = |a: &Agent| a.post(&exec, json!({"cmd": "true"}));
    let get_it = |a: &Agent| a.get(&get);
    for (what, n, call) in [
        (
            "exec `true`",
            EXECS,
            &run_true as &dyn Fn(&Agent) -> (u16, Value),
        ),
        ("GET the sandbox", GETS, &get_it),
    ] {
        let mut direct = time(n2, n, call);
        let mut forwarded = time(n1, n, call);
        rows.push(row(what, &mut direct, &mut forwarded));
    }
    let transfers = transfer_rows(n1, n2, &id);
    assert_eq!(n1.delete(&get).0, 204);
    let table = [
        format!(
            "Two nodes on a bridge, each in its own network namespace; every sandbox on n2. \
             Direct: the call to n2; through n1: n1 places the create on n2, or joins the \
             connection to n2. Host: {} CPUs, runtime {}.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            n2.get("/v1/node").1["runtime"]["name"].as_str().unwrap_or("?"),
        ),
        "| call | runs | direct p50 ms | through n1 p50 ms | added p50 ms | direct p90 ms | through n1 p90 ms |"
            .to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
    ]
    .into_iter()
    .chain(rows)
    .collect::<Vec<_>>()
    .join("\n");
    println!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("forwarding.md"), format!("{table}\n"));
    println!("{transfers}");
    let _ = std::fs::write(out.join("transfer.md"), format!("{transfers}\n"));
    drop(agents);
    drop(net);
}

fn row(what: &str, direct: &mut [Duration], through: &mut [Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &mut [Duration], p: usize| {
        v.sort();
        ms(v[(v.len() * p / 100).min(v.len() - 1)])
    };
    let (d50, t50) = (pct(direct, 50), pct(through, 50));
    format!(
        "| {what} | {} | {d50:.2} | {t50:.2} | {:.2} | {:.2} | {:.2} |",
        direct.len(),
        t50 - d50,
        pct(direct, 90),
        pct(through, 90)
    )
}

/// Snapshots of sandbox `id` (on n2), each fetched by n1 for a create: the
/// table of their transfers.
fn transfer_rows(n1: &Agent, n2: &Agent, id: &str) -> String {
    // 64 MiB of random bytes in the sandbox's memory, so that the snapshot
    // is not mostly zero pages.
    let (status, out) = n2.post(
        &format!("/v1/sandboxes/{id}/processes"),
        json!({"cmd": "python3", "background": true, "args": ["-c",
            "import os, time\nblob = os.urandom(64 << 20)\nopen('/tmp/ready', 'w').close()\ntime.sleep(1e9)"]}),
    );
    assert_eq!(status, 201, "{out}");
    let (status, out) = n2.post(
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": "sh", "args": ["-c", "while [ ! -e /tmp/ready ]; do sleep 0.2; done"]}),
    );
    assert_eq!(status, 200, "{out}");
    let mut rows = vec![
        "| snapshot | bundle MiB | transfer s | MiB/s | create on n1 (fetch + restore) s | create on n2 (holder) s |"
            .to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    for n in 0..TRANSFERS {
        let name = format!("bench-transfer-{n}");
        let (status, snap) = n2.post("/v1/snapshots", json!({"sandbox_id": id, "name": name}));
        assert_eq!(status, 201, "{snap}");
        let timed_create = |agent: &Agent, zone: &str| -> f64 {
            let started = Instant::now();
            let (status, sandbox) = agent.post(
                "/v1/sandboxes",
                json!({"template": name, "node_labels": {"zone": zone}}),
            );
            let took = started.elapsed().as_secs_f64();
            assert_eq!(status, 201, "{sandbox}");
            let path = format!("/v1/sandboxes/{}", sandbox["id"].as_str().unwrap());
            assert_eq!(agent.delete(&path).0, 204);
            took
        };
        let on_n2 = timed_create(n2, "b");
        let on_n1 = timed_create(n1, "a");
        let log = n1.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("snapshot fetched") && l.contains(&name))
            .unwrap_or_else(|| panic!("n1 did not log fetching {name}"));
        let (bytes, ms) = (
            common::log_number(line, "bytes"),
            common::log_number(line, "ms"),
        );
        let mib = bytes as f64 / f64::from(1 << 20);
        rows.push(format!(
            "| {name} | {mib:.0} | {:.2} | {:.0} | {on_n1:.2} | {on_n2:.2} |",
            ms as f64 / 1000.0,
            mib / (ms.max(1) as f64 / 1000.0),
        ));
        assert_eq!(n1.delete(&format!("/v1/snapshots/{name}")).0, 204);
    }
    format!(
        "Snapshot templates between nodes: each snapshot taken on n2 (a sandbox holding \
         64 MiB of random bytes), then created from on n1, which fetches it from n2 over \
         HTTP (unpaced; SHA-256 checked) and restores it. Host: {} CPUs.\n\n{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rows.join("\n")
    )
}
