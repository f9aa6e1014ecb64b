//! `make bench`: the `wrenn` Python SDK's view of a node beside the same
//! operations over `/v1/sandboxes`: create to ready, a `true` round trip
//! (HTTP, and the SDK's WebSocket stream), and 50 MiB up and down.
//! Prints a Markdown table and writes it to `target/bench/sdk.md`.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::Agent;
use serde_json::{json, Value};

const SANDBOXES: usize = 3;
const EXECS: usize = 20;
const SIZE: usize = 50 << 20;

/// Seconds, as "p50 ms / mean ms" for timings.
fn ms(samples: &[f64]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p50 = sorted[sorted.len() / 2] * 1000.0;
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64 * 1000.0;
    format!("{p50:.1} / {mean:.1}")
}

/// MiB/s of SIZE bytes moved in each sample.
fn rate(samples: &[f64]) -> String {
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    format!("{:.1} MiB/s", SIZE as f64 / f64::from(1 << 20) / mean)
}

fn seconds(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect()
}

fn main() {
    let Some(images) = common::images_dir_or_skip("sdk bench") else {
        return;
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = Command::new(repo.join("scripts/sdk-venv.sh"))
        .output()
        .unwrap();
    assert!(
        venv.status.success(),
        "{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python = String::from_utf8_lossy(&venv.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let agent = Agent::start(&images);

    // Our API.
    let (mut create, mut exec, mut upload, mut download) = (vec![], vec![], vec![], vec![]);
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    for _ in 0..SANDBOXES {
        let start = Instant::now();
        let id = agent.create(json!({}));
        create.push(start.elapsed().as_secs_f64());
        for _ in 0..EXECS {
            let start = Instant::now();
            let (status, _) =
                agent.post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": "true"}));
            assert_eq!(status, 200);
            exec.push(start.elapsed().as_secs_f64());
        }
        let start = Instant::now();
        let (status, _) = agent.put_bytes(
            &format!("/v1/sandboxes/{id}/files?path=/tmp/bench.bin"),
            &data,
        );
        assert_eq!(status, 201);
        upload.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let (status, got) =
            agent.get_bytes(&format!("/v1/sandboxes/{id}/files?path=/tmp/bench.bin"));
        assert_eq!((status, got.len()), (200, SIZE));
        download.push(start.elapsed().as_secs_f64());
        assert_eq!(agent.delete(&format!("/v1/sandboxes/{id}")).0, 204);
    }

    // The SDK.
    let out = Command::new(python)
        .arg(repo.join("tests/sdk/bench.py"))
        .env("WRENN_BASE_URL", &agent.url)
        .env("WRENN_API_KEY", "wrn_bench")
        .env("WRENN_BENCH_SANDBOXES", SANDBOXES.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sdk: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    let table = [
        format!("{SANDBOXES} sandboxes of 512 MiB, 1 vCPU; {EXECS} commands each. Times are p50 / mean.\n"),
        "| operation | SDK (`/v1/capsules`) | `/v1/sandboxes` |".to_owned(),
        "|---|---|---|".to_owned(),
        format!("| create to ready (ms) | {} | {} |", ms(&seconds(&sdk["create"])), ms(&create)),
        format!("| `true` round trip, HTTP (ms) | {} | {} |", ms(&seconds(&sdk["run"])), ms(&exec)),
        format!("| `true` round trip, SDK WebSocket stream (ms) | {} | – |", ms(&seconds(&sdk["stream"]))),
        format!("| 50 MiB upload | {} | {} |", rate(&seconds(&sdk["upload"])), rate(&upload)),
        format!("| 50 MiB download | {} | {} |", rate(&seconds(&sdk["download"])), rate(&download)),
    ]
    .join("\n");
    println!("{table}");
    let dir = repo.join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("sdk.md"), format!("{table}\n"));
}
