//! `make bench`: sandbox lifecycle timings on this host, against a real
//! agent process: create-to-ready, exec round trip, pause, resume, destroy. Prints a
//! Markdown table and writes it to `target/bench/lifecycle.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Agent;
use serde_json::json;

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
        cycle(&mut pause_idle, &mut resume_idle);
        let dirty = "b = bytearray(100 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\n\
                     open('/dev/shm/keep', 'wb').write(b)";
        assert_eq!(agent.python(&id, dirty).0, 0);
        cycle(&mut pause_dirty, &mut resume_dirty);
        let start = Instant::now();
        assert_eq!(agent.delete(&format!("/v1/sandboxes/{id}")).0, 204);
        destroy.0.push(start.elapsed());
    }
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
    ]
    .join("\n");
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("lifecycle.md"), format!("{table}\n"));
}
