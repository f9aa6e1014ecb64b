//! Warm templates on real QEMU: an agent with warm-up on makes the warm
//! snapshot of `code-runner-beta` in the background (boot, Jupyter, a
//! `wrenn` kernel that ran `1+1`, snapshot), and a sandbox created from the
//! template afterwards restores it: Jupyter lists the `wrenn` kernel within
//! seconds. Under TCG the warm-up takes minutes; the test waits up to 25.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::time::{Duration, Instant};

use common::{images_dir_or_skip, Agent};
use serde_json::{json, Value};

const TEMPLATE: &str = "code-runner-beta";
const WARM: &str = "code-runner-beta.warm";

/// Whether the warm snapshot is listed by `GET /v1/snapshots`.
fn warm_listed(agent: &Agent) -> bool {
    let (status, list) = agent.get("/v1/snapshots");
    assert_eq!(status, 200, "list snapshots: {list}");
    list.as_array().unwrap().iter().any(|s| s["name"] == WARM)
}

/// The last lines of the agent's log.
fn log_tail(agent: &Agent, lines: usize) -> String {
    let log = agent.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn a_warm_template_creates_sandboxes_with_a_ready_kernel() {
    let Some(images) = images_dir_or_skip("a_warm_template_creates_sandboxes_with_a_ready_kernel")
    else {
        return;
    };
    let manifest =
        std::fs::read_to_string(images.join(TEMPLATE).join("manifest.json")).unwrap_or_default();
    if !manifest.contains("\"warm\"") {
        eprintln!(
            "skipped: {TEMPLATE} has no warm object in its manifest (build it with \
             image/build-guest.sh --template {TEMPLATE})"
        );
        return;
    }
    let agent = Agent::start_with_env(&images, &[("WRENN_WARM", "1")]);

    let started = Instant::now();
    let deadline = started + Duration::from_secs(25 * 60);
    let mut last_report = Instant::now();
    while !warm_listed(&agent) {
        let log = agent.log();
        assert!(
            !log.contains("warm-up failed"),
            "the warm-up failed; log:\n{}",
            log_tail(&agent, 40)
        );
        assert!(
            Instant::now() < deadline,
            "no warm snapshot after 25 min; log:\n{}",
            log_tail(&agent, 40)
        );
        if last_report.elapsed() > Duration::from_secs(60) {
            eprintln!("waiting for {WARM}: {} s", started.elapsed().as_secs());
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let warm_up_s = started.elapsed().as_secs();
    eprintln!("{WARM} ready after {warm_up_s} s");

    // The node's own: a user can neither delete nor take one under that name.
    let (status, body) = agent.delete(&format!("/v1/snapshots/{WARM}"));
    assert_eq!(status, 409, "deleting the warm snapshot: {body}");

    let created = Instant::now();
    let id = agent.create(json!({"template": TEMPLATE}));
    let create_s = created.elapsed().as_secs_f64();
    eprintln!("sandbox {id} created from the warm snapshot in {create_s:.1} s");
    let (status, sandbox) = agent.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(status, 200, "{sandbox}");
    eprintln!("its record: template {}", sandbox["template"]);

    // Jupyter answers at once and lists the kernel warmed before the snapshot.
    let asked = Instant::now();
    let kernels = loop {
        let (status, run) = agent.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "curl", "args": ["-s", "-m", "5", "http://127.0.0.1:8888/api/kernels"]}),
        );
        assert_eq!(status, 200, "exec curl: {run}");
        let stdout = run["stdout"].as_str().unwrap_or_default().to_owned();
        if let Ok(Value::Array(kernels)) = serde_json::from_str::<Value>(&stdout) {
            break kernels;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "Jupyter did not answer within 30 s of the create: {run}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let answer_s = asked.elapsed().as_secs_f64();
    eprintln!("Jupyter answered {answer_s:.1} s after the create: {kernels:?}");
    assert!(
        kernels.iter().any(|k| k["name"] == "wrenn"),
        "no wrenn kernel in {kernels:?}"
    );
    assert!(
        answer_s < 30.0,
        "the kernel list took {answer_s:.1} s: not warm"
    );

    let (status, body) = agent.delete(&format!("/v1/sandboxes/{id}"));
    assert!(status == 204 || status == 200, "destroy: {status} {body}");
}
