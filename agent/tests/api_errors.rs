//! Bad input to the node API gets a 4xx with a JSON error that says what to
//! do, never a panic, a hang or a 5xx. Runs against a real agent process;
//! only the missing-file case boots a VM.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{images_dir_or_skip, raw_exchange, Agent};
use serde_json::{json, Value};

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.len() > 10, "message too thin: {message:?}");
}

#[test]
fn invalid_create_requests_are_4xx_with_a_message() {
    let Some(images) = images_dir_or_skip("invalid_create_requests") else {
        return;
    };
    let agent = Agent::start(&images);
    let create = |body: Value| agent.post("/v1/sandboxes", body);

    assert_error(&create(json!({"template": "nope"})), 404, "not_found");
    assert_error(&create(json!({"template": "a/b"})), 400, "invalid_argument");
    assert_error(&create(json!({"vcpus": 0})), 400, "invalid_argument");
    assert_error(&create(json!({"vcpus": 1000})), 400, "invalid_argument");
    assert_error(&create(json!({"memory_mb": 0})), 400, "invalid_argument");
    assert_error(
        &create(json!({"memory_mb": 100_000_000})),
        400,
        "invalid_argument",
    );
    assert_error(&create(json!({"timeout_s": 0})), 400, "invalid_argument");
    assert_error(&create(json!({"vcpus": "two"})), 400, "invalid_argument");
    assert_error(&create(json!({"colour": "blue"})), 400, "invalid_argument");
    assert_error(
        &agent.post_raw("/v1/sandboxes", b"{not json"),
        400,
        "invalid_json",
    );
    // Nothing was left behind by the refusals.
    let (_, list) = agent.get("/v1/sandboxes");
    assert_eq!(list["sandboxes"], json!([]));
}

#[test]
fn unknown_sandboxes_routes_and_methods_are_404_and_405() {
    let Some(images) = images_dir_or_skip("unknown_sandboxes") else {
        return;
    };
    let agent = Agent::start(&images);
    let missing = "sb-aaaaaaaaaaaaaaaaaaaa";
    assert_error(
        &agent.get(&format!("/v1/sandboxes/{missing}")),
        404,
        "not_found",
    );
    assert_error(
        &agent.delete(&format!("/v1/sandboxes/{missing}")),
        404,
        "not_found",
    );
    assert_error(&agent.get("/v1/sandboxes/not-an-id"), 404, "not_found");
    assert_error(
        &agent.post(
            &format!("/v1/sandboxes/{missing}/exec"),
            json!({"cmd": "true"}),
        ),
        404,
        "not_found",
    );
    assert_error(
        &agent.get(&format!("/v1/sandboxes/{missing}/files?path=/etc/hostname")),
        404,
        "not_found",
    );
    assert_error(&agent.get("/v1/nothing"), 404, "not_found");
    assert_error(&agent.delete("/v1/sandboxes"), 405, "method_not_allowed");
}

#[test]
fn a_2_gib_json_body_is_refused_with_413_without_reading_it() {
    let Some(images) = images_dir_or_skip("a_2_gib_json_body") else {
        return;
    };
    let agent = Agent::start(&images);
    let request = b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                    Content-Length: 2147483648\r\n\r\n{\"template\":";
    let response = raw_exchange(&agent.url, request);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("payload_too_large"), "{response}");
    // The agent is still healthy afterwards.
    assert_eq!(agent.get("/v1/health").0, 200);
}

#[test]
fn a_missing_file_in_a_sandbox_is_404_and_bad_exec_is_400() {
    let Some(images) = images_dir_or_skip("a_missing_file") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256}));
    assert_error(
        &agent.get(&format!("/v1/sandboxes/{id}/files?path=/no/such/file")),
        404,
        "not_found",
    );
    assert_error(
        &agent.get(&format!("/v1/sandboxes/{id}/fs/stat?path=/no/such/file")),
        404,
        "not_found",
    );
    assert_error(
        &agent.post(&format!("/v1/sandboxes/{id}/exec"), json!({"cmd": ""})),
        400,
        "invalid_argument",
    );
    assert_error(
        &agent.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "no-such-program"}),
        ),
        404,
        "not_found",
    );
    assert_error(
        &agent.post(
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 0}),
        ),
        400,
        "invalid_argument",
    );
}

#[test]
fn the_agent_refuses_to_listen_beyond_loopback_without_an_api_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn-agent"))
        .args(["--listen", "0.0.0.0:0", "--state-dir"])
        .arg(std::env::temp_dir().join(format!("wrenn-refuse-{}", std::process::id())))
        .output()
        .expect("run wrenn-agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without an API key"), "{stderr}");
    assert!(stderr.contains("--api-key"), "{stderr}");
}

#[test]
fn with_api_keys_configured_every_call_but_health_needs_one() {
    let Some(images) = images_dir_or_skip("api_keys") else {
        return;
    };
    let agent = Agent::start_with_env(&images, &[("WRENN_API_KEY", "letmein")]);
    assert_eq!(agent.get("/v1/health").0, 200);
    assert_error(&agent.get("/v1/sandboxes"), 401, "unauthorized");
    let with = |key: &str| {
        ureq::get(&format!("{}/v1/sandboxes", agent.url))
            .set("Authorization", &format!("Bearer {key}"))
            .call()
            .map(|r| r.status())
            .unwrap_or_else(|e| match e {
                ureq::Error::Status(code, _) => code,
                _ => 0,
            })
    };
    assert_eq!(with("letmein"), 200);
    assert_eq!(with("wrong"), 401);
}
