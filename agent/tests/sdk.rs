//! The published `wrenn` Python SDK (0.3.0) drives real nodes: the pytest
//! suite in `tests/sdk/` runs in a virtual environment made by
//! `scripts/sdk-venv.sh`, against an open node and, for the authentication
//! checks, a node with an API key. Real QEMU guests, real sockets.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Agent;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python, made (or checked) by the script.
fn sdk_python() -> String {
    let out = Command::new(repo().join("scripts/sdk-venv.sh"))
        .output()
        .expect("run scripts/sdk-venv.sh");
    assert!(
        out.status.success(),
        "scripts/sdk-venv.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned()
}

/// Runs the pytest files `tests` (relative to tests/sdk) against `agent`.
fn pytest(agent: &Agent, keyed: &Agent, tests: &[&str]) {
    let python = sdk_python();
    let port = agent.url.rsplit(':').next().unwrap();
    let out = Command::new(python)
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
        .current_dir(repo().join("tests/sdk"))
        .env("WRENN_BASE_URL", &agent.url)
        .env("WRENN_API_KEY", "wrn_open_node_takes_any_key")
        .env("WRENN_PROXY_DOMAIN", format!("localhost:{port}"))
        .env("WRENN_TEST_KEYED_URL", &keyed.url)
        .env("WRENN_TEST_KEYED_KEY", KEY)
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
        "the SDK tests failed:\n{report}\nagent log (tail):\n{}",
        tail(&agent.log(), 60)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

const KEY: &str = "wrn_0123456789abcdef0123456789abcdef";

#[test]
fn the_sdk_drives_a_node() {
    let Some(images) = common::images_dir_or_skip("the_sdk_drives_a_node") else {
        return;
    };
    let agent = Agent::start(&images);
    let keyed = Agent::start_with_env(&images, &[("WRENN_API_KEY", KEY)]);
    pytest(&agent, &keyed, &["test_rest.py", "test_sockets.py"]);
}
