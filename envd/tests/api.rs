//! Sandbox-level API: health, metrics, /init and token enforcement, error
//! shapes for bad requests, and HTTP edge cases (100-continue, aborted
//! uploads with huge Content-Length).

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{end_of, output_of, Envd};
use serde_json::json;

#[test]
fn health_is_open_and_reports_version() {
    let envd = Envd::start();
    let resp = envd.get("/health");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type, "application/json");
    let body = resp.json();
    assert_eq!(body["status"], "ok");
    assert!(body["version"].as_str().is_some_and(|v| !v.is_empty()));
}

#[test]
fn metrics_report_cpu_memory_disk_load_and_uptime() {
    let envd = Envd::start();
    let m = envd.get("/metrics").json();
    assert!(m["cpu_count"].as_u64().unwrap_or(0) >= 1);
    let cpu = m["cpu_used_pct"].as_f64().expect("cpu percent");
    assert!((0.0..=100.0).contains(&cpu));
    let total = m["mem_total_bytes"].as_u64().expect("mem total");
    let used = m["mem_used_bytes"].as_u64().expect("mem used");
    let available = m["mem_available_bytes"].as_u64().expect("mem available");
    assert!(total > 0 && used + available == total);
    let disk_total = m["disk_total_bytes"].as_u64().expect("disk total");
    assert!(disk_total >= m["disk_used_bytes"].as_u64().expect("disk used"));
    assert_eq!(m["load_avg"].as_array().map(Vec::len), Some(3));
    assert!(m["uptime_secs"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn init_sets_a_token_that_every_call_but_health_requires() {
    let mut envd = Envd::start();
    assert_eq!(envd.get("/processes").status, 200, "no token before /init");
    let init = envd.post("/init", json!({"access_token": "s3cret"}));
    assert_eq!(init.status, 200, "{}", init.text());

    envd.get("/processes").assert_error(401, "unauthorized");
    envd.get("/no-such-route").assert_error(401, "unauthorized");
    assert_eq!(envd.get("/health").status, 200, "/health stays open");
    let wrong = common::Resp::from(
        envd.request("GET", "/processes")
            .set("X-Access-Token", "nope")
            .call(),
    );
    wrong.assert_error(401, "unauthorized");
    let bearer = common::Resp::from(
        envd.request("GET", "/processes")
            .set("Authorization", "Bearer s3cret")
            .call(),
    );
    assert_eq!(bearer.status, 200);

    // A second /init needs the current token; it may rotate it.
    envd.post("/init", json!({"access_token": "other"}))
        .assert_error(401, "unauthorized");
    envd.use_token("s3cret");
    assert_eq!(envd.get("/processes").status, 200);
    assert_eq!(
        envd.post("/init", json!({"access_token": "rotated"}))
            .status,
        200
    );
    envd.get("/processes").assert_error(401, "unauthorized");
    envd.use_token("rotated");
    assert_eq!(envd.get("/metrics").status, 200);
}

#[test]
fn init_default_env_and_user_apply_to_new_processes() {
    let envd = Envd::start();
    let init = envd.post(
        "/init",
        json!({"env_vars": {"FROM_INIT": "1", "SHARED": "init"}, "default_user": "nobody"}),
    );
    assert_eq!(init.status, 200, "{}", init.text());
    let events = envd.run(json!({
        "cmd": "sh",
        "args": ["-c", "echo $FROM_INIT $SHARED $(id -un) $USER"],
        "env": {"SHARED": "request"},
    }));
    assert_eq!(output_of(&events, "stdout"), b"1 request nobody nobody\n");
    assert_eq!(end_of(&events)["exit_code"], 0);
}

#[test]
fn init_validates_user_env_and_timestamp() {
    let envd = Envd::start();
    envd.post("/init", json!({"default_user": "no-such-user-xyz"}))
        .assert_error(400, "invalid_argument");
    envd.post("/init", json!({"env_vars": {"A=B": "x"}}))
        .assert_error(400, "invalid_argument");
    envd.post("/init", json!({"timestamp_ms": 0}))
        .assert_error(400, "invalid_argument");
    envd.post("/init", json!({"access_token": ""}))
        .assert_error(400, "invalid_argument");
    // The current time is within tolerance, so the clock is left alone.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let resp = envd.post("/init", json!({"timestamp_ms": now}));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["clock_set"], false);
    assert_eq!(
        envd.get("/processes").status,
        200,
        "invalid inits set no token"
    );
}

#[test]
fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
    let envd = Envd::start();
    envd.get("/nope").assert_error(404, "not_found");
    envd.get("/processes/1/bogus")
        .assert_error(404, "not_found");
    let wrong = envd.delete("/health");
    wrong.assert_error(405, "method_not_allowed");
    assert_eq!(wrong.allow.as_deref(), Some("GET, HEAD"));
    envd.get("/fs/mkdir")
        .assert_error(405, "method_not_allowed");
    envd.delete("/processes")
        .assert_error(405, "method_not_allowed");
}

#[test]
fn malformed_json_is_400_invalid_json_and_missing_fields_400_invalid_argument() {
    let envd = Envd::start();
    envd.post_bytes("/processes", b"{not json")
        .assert_error(400, "invalid_json");
    envd.post_bytes("/processes", b"")
        .assert_error(400, "invalid_json");
    envd.post("/processes", json!({"args": ["x"]}))
        .assert_error(400, "invalid_argument");
    envd.post("/processes", json!({"cmd": 5}))
        .assert_error(400, "invalid_argument");
    envd.post("/fs/mkdir", json!({}))
        .assert_error(400, "invalid_argument");
    envd.post("/fs/move", json!({"from": "/tmp/x"}))
        .assert_error(400, "invalid_argument");
}

#[test]
fn oversized_json_body_is_413() {
    let envd = Envd::start();
    let big = format!("{{\"cmd\":\"{}\"}}", "a".repeat(2 << 20));
    envd.post_bytes("/processes", big.as_bytes())
        .assert_error(413, "payload_too_large");
    assert_eq!(envd.get("/health").status, 200);
}

#[test]
fn unknown_process_is_404_everywhere() {
    let envd = Envd::start();
    envd.get("/processes/999999").assert_error(404, "not_found");
    envd.get("/processes/no-such-tag/events")
        .assert_error(404, "not_found");
    envd.post_bytes("/processes/999999/stdin", b"x")
        .assert_error(404, "not_found");
    envd.post("/processes/999999/stdin/close", json!({}))
        .assert_error(404, "not_found");
    envd.post("/processes/999999/signal", json!({"signal": "TERM"}))
        .assert_error(404, "not_found");
    envd.post("/processes/999999/resize", json!({"cols": 10, "rows": 10}))
        .assert_error(404, "not_found");
}

fn raw_request(envd: &Envd, head: &str) -> TcpStream {
    let addr = envd.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(head.as_bytes()).expect("send head");
    stream
}

fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn expect_100_continue_upload_gets_continue_then_201() {
    let envd = Envd::start();
    let dir = common::Scratch::new("continue");
    let path = dir.path("f.txt");
    let body = "x".repeat(5000);
    let head = format!(
        "PUT /files?path={} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        common::q(&path),
        body.len()
    );
    let mut stream = raw_request(&envd, &head);
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).expect("interim response");
    assert!(String::from_utf8_lossy(&interim).starts_with("HTTP/1.1 100 Continue"));
    stream.write_all(body.as_bytes()).expect("send body");
    let response = read_response(&mut stream);
    assert!(response.contains("201 Created"), "{response}");
    assert_eq!(std::fs::read(&path).map(|b| b.len()).ok(), Some(5000));
}

#[test]
fn truncated_upload_leaves_the_target_unchanged() {
    let envd = Envd::start();
    let dir = common::Scratch::new("truncated");
    let path = dir.path("keep.txt");
    std::fs::write(&path, b"original").expect("seed file");
    let head = format!(
        "PUT /files?path={} HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n",
        common::q(&path)
    );
    let mut stream = raw_request(&envd, &head);
    stream.write_all(&[b'y'; 5000]).expect("partial body");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half close");
    let response = read_response(&mut stream);
    assert!(response.contains("400 Bad Request"), "{response}");
    assert_eq!(std::fs::read(&path).ok(), Some(b"original".to_vec()));
    let leftovers = std::fs::read_dir(&dir.0).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 1, "the temporary file is removed");
}

#[test]
fn aborted_upload_announcing_more_than_ram_does_not_crash_envd() {
    let envd = Envd::start();
    let dir = common::Scratch::new("huge");
    for length in [1u64 << 40, 1 << 50] {
        let head = format!(
            "PUT /files?path={} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n",
            common::q(&dir.path("huge.bin"))
        );
        let mut stream = raw_request(&envd, &head);
        stream.write_all(b"only a few bytes").expect("partial body");
        drop(stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(envd.get("/health").status, 200, "envd survived");
    assert!(!std::path::Path::new(&dir.path("huge.bin")).exists());
}
