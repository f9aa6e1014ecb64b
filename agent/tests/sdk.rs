//! The published `wrenn` Python SDK (0.3.0) drives real nodes: the pytest
//! suite in `tests/sdk/` runs in a virtual environment made by
//! `scripts/sdk-venv.sh`, against an open node and, for the authentication
//! checks, a node with an API key. Real QEMU guests, real sockets.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{repo, sdk_python, Agent};

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
    // WRENN_SDK_TESTS="test_x.py ..." runs only those files (for work on one).
    let chosen = std::env::var("WRENN_SDK_TESTS").unwrap_or_default();
    let files: Vec<&str> = match chosen.trim() {
        "" => vec![
            "test_rest.py",
            "test_sockets.py",
            "test_activity.py",
            "test_openapi.py",
        ],
        some => some.split_whitespace().collect(),
    };
    pytest(&agent, &keyed, &files);
}

/// `wrenn.code_runner` on the `code-runner-beta` template. The node warms
/// the template first (boots it once, starts a kernel, snapshots it): under
/// TCG a cold Jupyter start takes longer than the SDK waits.
#[test]
fn the_code_runner_keeps_state_between_calls() {
    let Some(images) = common::images_dir_or_skip("the_code_runner_keeps_state_between_calls")
    else {
        return;
    };
    assert!(
        images
            .join("code-runner-beta")
            .join("manifest.json")
            .exists(),
        "the code-runner-beta template is missing from {}: run `make image`",
        images.display()
    );
    let agent = Agent::start_with_env(&images, &[("WRENN_WARM", "1")]);
    let keyed = Agent::start_with_env(&images, &[("WRENN_API_KEY", KEY)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1500);
    loop {
        let (_, templates) = agent.get("/v1/templates");
        let warm = templates["templates"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["name"] == "code-runner-beta"))
            .map(|t| t["warm"].clone())
            .unwrap_or_default();
        if warm["state"] == "ready" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "code-runner-beta was not warm after 25 minutes: {warm}\n{}",
            tail(&agent.log(), 40)
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    pytest(&agent, &keyed, &["test_code_runner.py"]);
}
