//! `make bench`: sandbox lifecycle timings on this host, against a real
//! agent process: create-to-ready, exec round trip, pause, resume, destroy,
//! snapshot, create from a snapshot, and the disk a paused sandbox uses.
//! Prints Markdown tables and writes them to `target/bench/lifecycle.md`.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Agent;
use serde_json::{json, Value};

const SANDBOXES: usize = 5;
const EXECS: usize = 20;

struct Stats(Vec<Duration>);

impl Stats {
    fn row(&mut self, what: &str) -> String {
        self.0.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let n = self.0.len();
        let mean = self.0.iter().map(|d| ms(*d)).sum::<f64>() / n as f64;
        let p = |q: f64| ms(self.0[((n as f64 - 1.0) * q).round() as usize]);
        format!(
            "| {what} | {n} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p(0.0),
            p(0.5),
            mean,
            p(1.0)
        )
    }
}

/// Disk samples in bytes, shown in MiB.
struct Disk(Vec<u64>);

impl Disk {
    fn row(&self, what: &str) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let n = self.0.len();
        let mean = self.0.iter().map(|b| mib(*b)).sum::<f64>() / n as f64;
        let min = self.0.iter().copied().min().map_or(0.0, mib);
        let max = self.0.iter().copied().max().map_or(0.0, mib);
        format!("| {what} | {n} | {min:.1} | {mean:.1} | {max:.1} |")
    }
}

/// Bytes of layers the node holds.
fn layer_bytes(agent: &Agent) -> u64 {
    let (_, node): (u16, Value) = agent.get("/v1/node");
    node["layers"]["bytes"].as_u64().expect("layers.bytes")
}

/// Bytes on disk of a sandbox's folder (VM state, disk overlay, logs).
fn folder_bytes(agent: &Agent, id: &str) -> u64 {
    wrenn_agent::sandbox::snapshots::dir_size(&agent.dir.join("state/sandboxes").join(id))
}

fn post_ok(agent: &Agent, path: &str) {
    let (status, body) = agent.post(path, json!({}));
    assert_eq!(status, 200, "{path}: {body}");
}

fn main() {
    let Some(images) = common::images_dir_or_skip("lifecycle bench") else {
        return;
    };
    let agent = Agent::start(&images);
    let (_, node) = agent.get("/v1/node");
    let runtime = format!(
        "{} ({})",
        node["runtime"]["name"].as_str().unwrap_or("?"),
        node["runtime"]["accel"].as_str().unwrap_or("?")
    );
    let (mut create, mut exec_true, mut exec_python, mut destroy) =
        (Stats(vec![]), Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut pause_idle, mut resume_idle, mut pause_dirty, mut resume_dirty) =
        (Stats(vec![]), Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut disk_idle, mut disk_dirty) = (Disk(vec![]), Disk(vec![]));
    for _ in 0..SANDBOXES {
        let start = Instant::now();
        let id = agent.create(json!({"memory_mb": 512}));
        create.0.push(start.elapsed());
        for _ in 0..EXECS {
            let start = Instant::now();
            let (status, _) =
                agent.post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": "true"}));
            assert_eq!(status, 200);
            exec_true.0.push(start.elapsed());
        }
        let start = Instant::now();
        assert_eq!(agent.python(&id, "print(1)").0, 0);
        exec_python.0.push(start.elapsed());
        let cycle = |pause: &mut Stats, resume: &mut Stats| {
            let start = Instant::now();
            assert_eq!(
                agent
                    .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
                    .0,
                200
            );
            pause.0.push(start.elapsed());
            let start = Instant::now();
            assert_eq!(
                agent
                    .post(&format!("/v1/sandboxes/{id}/resume"), json!({}))
                    .0,
                200
            );
            resume.0.push(start.elapsed());
        };
        let disk = |samples: &mut Disk| {
            post_ok(&agent, &format!("/v1/sandboxes/{id}/pause"));
            // The only sandbox: every layer is its own.
            samples
                .0
                .push(layer_bytes(&agent) + folder_bytes(&agent, &id));
            post_ok(&agent, &format!("/v1/sandboxes/{id}/resume"));
        };
        cycle(&mut pause_idle, &mut resume_idle);
        disk(&mut disk_idle);
        let dirty = "b = bytearray(100 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\n\
                     open('/dev/shm/keep', 'wb').write(b)";
        assert_eq!(agent.python(&id, dirty).0, 0);
        cycle(&mut pause_dirty, &mut resume_dirty);
        disk(&mut disk_dirty);
        let start = Instant::now();
        assert_eq!(agent.delete(&format!("/v1/sandboxes/{id}")).0, 204);
        destroy.0.push(start.elapsed());
    }
    // Snapshots: one of a booted sandbox, four sandboxes from it, each
    // changing a little and paused.
    let (mut snapshot, mut from_snapshot) = (Stats(vec![]), Stats(vec![]));
    let mut disk_child = Disk(vec![]);
    let source = agent.create(json!({"memory_mb": 512}));
    let start = Instant::now();
    let (status, body) = agent.post(
        "/v1/snapshots",
        json!({"sandbox_id": source, "name": "bench"}),
    );
    assert_eq!(status, 201, "{body}");
    snapshot.0.push(start.elapsed());
    let snapshot_bytes = body["size_bytes"].as_u64().unwrap_or(0);
    assert_eq!(agent.delete(&format!("/v1/sandboxes/{source}")).0, 204);
    let mut children = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        children.push(agent.create(json!({"template": "bench"})));
        from_snapshot.0.push(start.elapsed());
    }
    for child in &children {
        assert_eq!(
            agent
                .python(child, "open('/root/mine', 'w').write('x' * 4096)")
                .0,
            0
        );
        let before = layer_bytes(&agent);
        post_ok(&agent, &format!("/v1/sandboxes/{child}/pause"));
        disk_child
            .0
            .push(layer_bytes(&agent) - before + folder_bytes(&agent, child));
    }
    for child in &children {
        assert_eq!(agent.delete(&format!("/v1/sandboxes/{child}")).0, 204);
    }
    assert_eq!(agent.delete("/v1/snapshots/bench").0, 204);

    let table = [
        format!(
            "Runtime: {runtime}; host: {} CPUs; 512 MiB, 1 vCPU sandboxes.\n",
            node["capacity"]["vcpus"]
        ),
        "| operation | n | min ms | p50 ms | mean ms | max ms |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
        create.row("create to envd ready"),
        exec_true.row("exec `true` round trip"),
        exec_python.row("exec `python3 -c print(1)`"),
        pause_idle.row("pause (idle)"),
        resume_idle.row("resume to envd ready (idle)"),
        pause_dirty.row("pause (after writing 100 MiB)"),
        resume_dirty.row("resume to envd ready (after writing 100 MiB)"),
        destroy.row("destroy"),
        snapshot.row("snapshot of a running sandbox (it runs on)"),
        from_snapshot.row("create from a snapshot to envd ready (4 from one)"),
        String::new(),
        "Disk per paused sandbox: its own memory layers, VM state and disk overlay.\n".to_owned(),
        "| sandbox | n | min MiB | mean MiB | max MiB |".to_owned(),
        "|---|---|---|---|---|".to_owned(),
        disk_idle.row("booted, idle"),
        disk_dirty.row("booted, after writing 100 MiB"),
        disk_child.row("from a snapshot, after a small change"),
        format!(
            "\nThe snapshot itself: {:.1} MiB, shared by the sandboxes made from it.",
            snapshot_bytes as f64 / f64::from(1 << 20)
        ),
    ]
    .join("\n");
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("lifecycle.md"), format!("{table}\n"));
}
