//! Terminals: a PTY is the controlling terminal with the requested size,
//! resizes reach the program, stdin goes through the terminal, and EOF is ^D.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{end_of, output_of, wait_for_output, Envd};
use serde_json::{json, Value};

#[test]
fn pty_process_has_a_terminal_of_the_requested_size() {
    let envd = Envd::start();
    let events = envd.run(json!({
        "cmd": "sh",
        "args": ["-c", "tty; stty size; echo $TERM"],
        "pty": {"cols": 111, "rows": 33},
    }));
    assert!(events
        .iter()
        .all(|e| e["type"] != "stdout" && e["type"] != "stderr"));
    let out = String::from_utf8_lossy(&output_of(&events, "pty")).into_owned();
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "tty printed {out:?}");
    assert_eq!(lines[1], "33 111");
    assert_eq!(lines[2], "xterm-256color");
    assert_eq!(end_of(&events)["exit_code"], 0);
}

#[test]
fn resize_changes_the_size_an_interactive_shell_sees() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({
        "cmd": "/bin/bash",
        "args": ["--norc", "--noprofile"],
        "pty": {"cols": 80, "rows": 24},
        "stdin": true,
        "tag": "shell",
    }));
    let events = envd
        .stream("GET", "/processes/shell/events", None)
        .into_channel();
    let mut seen = Vec::new();
    let write = |text: &str| {
        let resp = envd.post_bytes("/processes/shell/stdin", text.as_bytes());
        assert_eq!(resp.status, 200, "{}", resp.text());
    };
    write("stty size\n");
    wait_for_output(&events, "pty", "24 80", &mut seen);

    let resized = envd.post(
        &format!("/processes/{pid}/resize"),
        json!({"cols": 200, "rows": 50}),
    );
    assert_eq!(resized.status, 200, "{}", resized.text());
    write("stty size\n");
    wait_for_output(&events, "pty", "50 200", &mut seen);

    write("exit 7\n");
    let rest: Vec<Value> = events.iter().map(|(_, e)| e).collect();
    assert_eq!(end_of(&rest)["exit_code"], 7);
}

#[test]
fn closing_stdin_of_a_pty_sends_end_of_file() {
    let envd = Envd::start();
    envd.spawn_background(json!({
        "cmd": "cat",
        "pty": {"cols": 80, "rows": 24},
        "tag": "ptycat",
    }));
    let events = envd
        .stream("GET", "/processes/ptycat/events", None)
        .into_channel();
    assert_eq!(
        envd.post_bytes("/processes/ptycat/stdin", b"typed\n")
            .status,
        200
    );
    let mut seen = Vec::new();
    wait_for_output(&events, "pty", "typed", &mut seen);
    assert_eq!(
        envd.post("/processes/ptycat/stdin/close", json!({})).status,
        200
    );
    let rest: Vec<Value> = events.iter().map(|(_, e)| e).collect();
    assert_eq!(end_of(&rest)["exit_code"], 0);
}

#[test]
fn resize_is_409_without_a_terminal_and_400_for_zero_sizes() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"]}));
    envd.post(
        &format!("/processes/{pid}/resize"),
        json!({"cols": 80, "rows": 24}),
    )
    .assert_error(409, "conflict");
    let pty = envd.spawn_background(
        json!({"cmd": "sleep", "args": ["1000"], "pty": {"cols": 80, "rows": 24}}),
    );
    envd.post(
        &format!("/processes/{pty}/resize"),
        json!({"cols": 0, "rows": 24}),
    )
    .assert_error(400, "invalid_argument");
    envd.post(
        &format!("/processes/{pty}/resize"),
        json!({"cols": 70000, "rows": 24}),
    )
    .assert_error(400, "invalid_argument");
}
