//! `make bench`: gossip convergence of a fleet of real agent processes, for
//! 3, 5 and 50 members: from the moment the last agent answers
//! `/v1/health` until every node lists every other as live. Each agent runs
//! in a network namespace on a bridge ([`FleetNet`]), on its own address;
//! for 50, ten agents share each namespace. Gossip only: no sandbox is
//! created. Prints a Markdown table and writes it to `target/bench/fleet.md`.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::FleetNet;
use common::Agent;

const SECRET: &str = "hex:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const API_KEY: &str = "fleet-bench-key";
/// The defaults of docs/fleet.md: what a fleet gets unless it says otherwise.
const INTERVAL_MS: u64 = 500;
const DEAD_AFTER_MS: u64 = 10_000;
/// Give up on a run after this long.
const LIMIT: Duration = Duration::from_secs(60);

/// One fleet size: members, namespaces they are spread over, runs.
struct Case {
    members: usize,
    namespaces: usize,
    runs: usize,
}

/// What one run measured.
struct Run {
    converged: Duration,
    /// Mean resident memory of an agent once converged, in KiB.
    rss_kib: u64,
}

fn main() {
    let Some(images) = common::images_dir_or_skip("fleet bench") else {
        return;
    };
    let cases = [
        Case {
            members: 3,
            namespaces: 3,
            runs: 5,
        },
        Case {
            members: 5,
            namespaces: 5,
            runs: 5,
        },
        Case {
            members: 50,
            namespaces: 5,
            runs: 3,
        },
    ];
    let mut rows = Vec::new();
    for case in &cases {
        let runs: Vec<Run> = (0..case.runs).map(|_| run(&images, case)).collect();
        let mut ms: Vec<f64> = runs
            .iter()
            .map(|r| r.converged.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let rss = runs.iter().map(|r| r.rss_kib).sum::<u64>() as f64 / runs.len() as f64 / 1024.0;
        rows.push(format!(
            "| {} | {} x {} | {} | {:.0} | {:.0} | {:.0} | {rss:.1} |",
            case.members,
            case.namespaces,
            case.members / case.namespaces,
            ms.len(),
            ms[0],
            ms[ms.len() / 2],
            ms[ms.len() - 1],
        ));
    }
    let table = [
        format!(
            "Gossip every {INTERVAL_MS} ms, dead after {DEAD_AFTER_MS} ms (the defaults); \
             host: {} CPUs. From the last agent answering /v1/health to every node \
             listing every other as live.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        "| members | namespaces x agents | runs | min ms | p50 ms | max ms | agent RSS MiB |"
            .to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
    ]
    .into_iter()
    .chain(rows)
    .collect::<Vec<_>>()
    .join("\n");
    println!("{table}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("fleet.md"), format!("{table}\n"));
}

/// Starts a fresh fleet of `case.members`, measures its convergence, and
/// stops it (agents by PID, then the network).
fn run(images: &Path, case: &Case) -> Run {
    let per_ns = case.members / case.namespaces;
    let net = FleetNet::with_addrs(case.namespaces, per_ns);
    // Member m is address m % per_ns of namespace m / per_ns.
    let addr = |m: usize| net.addrs(m / per_ns)[m % per_ns];
    let names: Vec<String> = (1..=case.members).map(|m| format!("n{m}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.toml");
    let mut text = format!(
        "[cluster]\nname = \"bench\"\nversion = 1\nsecrets = [\"{SECRET}\"]\n\n\
         [gossip]\ninterval_ms = {INTERVAL_MS}\ndead_after_ms = {DEAD_AFTER_MS}\n"
    );
    for (m, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "\n[[node]]\nname = \"{name}\"\napi = \"http://{}:8080\"\ngossip = \"{}:7946\"\n",
            addr(m),
            addr(m)
        ));
    }
    std::fs::write(&fleet, text).unwrap();
    let fleet = fleet.to_str().unwrap();
    // One thread per namespace starts its agents, one after another.
    let agents: Vec<Agent> = std::thread::scope(|scope| {
        let starters: Vec<_> = (0..case.namespaces)
            .map(|ns| {
                let (names, net, addr) = (&names, &net, &addr);
                scope.spawn(move || {
                    (ns * per_ns..(ns + 1) * per_ns)
                        .map(|m| {
                            Agent::start_in(
                                images,
                                net.netns(ns),
                                SocketAddr::new(addr(m).into(), 8080),
                                Some(API_KEY),
                                &[("WRENN_FLEET", fleet), ("WRENN_NODE_NAME", &names[m])],
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        starters
            .into_iter()
            .flat_map(|s| s.join().unwrap())
            .collect()
    });
    let started = Instant::now();
    // When each agent first saw every member live; polled until all have.
    let mut seen_all: Vec<Option<Duration>> = vec![None; agents.len()];
    while seen_all.iter().any(Option::is_none) {
        assert!(
            started.elapsed() < LIMIT,
            "{} members did not converge within {LIMIT:?}",
            case.members
        );
        for (agent, seen) in agents.iter().zip(&mut seen_all) {
            if seen.is_none() && sees_all_live(agent, case.members) {
                *seen = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let converged = seen_all.into_iter().flatten().max().unwrap_or_default();
    let rss_kib = agents.iter().map(rss_kib).sum::<u64>() / agents.len() as u64;
    // Agents go first (by PID, in their drop), then the network.
    drop(agents);
    drop(net);
    Run { converged, rss_kib }
}

/// Whether `agent` lists `members` members, every one live.
fn sees_all_live(agent: &Agent, members: usize) -> bool {
    let (status, nodes) = agent.get("/v1/nodes");
    let Some(all) = nodes["nodes"].as_array().filter(|_| status == 200) else {
        return false;
    };
    all.len() == members && all.iter().all(|n| n["state"] == "live")
}

/// The agent's resident memory, from /proc.
fn rss_kib(agent: &Agent) -> u64 {
    let status = agent
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
