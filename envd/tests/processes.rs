//! Processes: streamed foreground runs, exit codes and signals, encodings,
//! concurrency, background processes with re-attach and stdin, users, and
//! spawn failures reported as JSON errors before any stream starts.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::time::{Duration, Instant};

use common::{end_of, event_bytes, output_of, wait_for_output, Envd};
use serde_json::{json, Value};

#[test]
fn foreground_stream_has_start_output_and_exit_code() {
    let envd = Envd::start();
    let events = envd.run(json!({"cmd": "sh", "args": ["-c", "echo out; echo err >&2; exit 3"]}));
    assert_eq!(events[0]["type"], "start");
    assert!(events[0]["pid"].as_u64().is_some());
    assert_eq!(output_of(&events, "stdout"), b"out\n");
    assert_eq!(output_of(&events, "stderr"), b"err\n");
    let end = end_of(&events);
    assert_eq!(end["exit_code"], 3);
    assert_eq!(end["signal"], Value::Null);
    assert_eq!(end["error"], Value::Null);
}

#[test]
fn output_is_streamed_while_the_process_runs() {
    let envd = Envd::start();
    let started = Instant::now();
    let events = envd
        .stream(
            "POST",
            "/processes",
            Some(json!({"cmd": "sh", "args": ["-c", "echo a; sleep 2; echo b"]})),
        )
        .into_channel();
    let mut arrivals = Vec::new();
    while let Ok((at, event)) = events.recv_timeout(Duration::from_secs(10)) {
        arrivals.push((at.duration_since(started), event));
    }
    let first_a = arrivals
        .iter()
        .find(|(_, e)| e["type"] == "stdout" && event_bytes(e) == b"a\n")
        .map(|(t, _)| *t)
        .expect("a event");
    let end = arrivals
        .iter()
        .find(|(_, e)| e["type"] == "end")
        .map(|(t, _)| *t)
        .expect("end event");
    assert!(
        end - first_a >= Duration::from_millis(1500),
        "a arrived at {first_a:?}, end at {end:?}: output was buffered"
    );
    let start = arrivals
        .iter()
        .find(|(_, e)| e["type"] == "start")
        .map(|(t, _)| *t)
        .expect("start event");
    assert!(start < Duration::from_millis(1500), "start arrived late");
}

#[test]
fn non_utf8_output_arrives_as_base64_with_the_exact_bytes() {
    let envd = Envd::start();
    let events = envd.run(json!({"cmd": "printf", "args": ["\\377\\376"]}));
    let chunks: Vec<&Value> = events.iter().filter(|e| e["type"] == "stdout").collect();
    assert!(chunks.iter().all(|e| e["encoding"] == "base64"));
    assert_eq!(output_of(&events, "stdout"), vec![0xff, 0xfe]);
}

#[test]
fn utf8_character_split_across_writes_is_not_broken() {
    let envd = Envd::start();
    let events = envd.run(json!({
        "cmd": "sh",
        "args": ["-c", "printf '\\342\\202'; sleep 0.3; printf '\\254'"],
    }));
    let chunks: Vec<&Value> = events.iter().filter(|e| e["type"] == "stdout").collect();
    assert!(chunks.iter().all(|e| e["encoding"] == "utf8"), "{chunks:?}");
    assert_eq!(output_of(&events, "stdout"), "€".as_bytes());
}

#[test]
fn twenty_concurrent_processes_each_get_their_own_output_and_exit_code() {
    let envd = Envd::start();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let envd = &envd;
                scope.spawn(move || {
                    let script = format!("echo unique-{i}; sleep 0.2; exit {}", i % 7);
                    let events = envd.run(json!({"cmd": "sh", "args": ["-c", script]}));
                    assert_eq!(
                        output_of(&events, "stdout"),
                        format!("unique-{i}\n").as_bytes()
                    );
                    assert_eq!(end_of(&events)["exit_code"], i % 7);
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("worker thread");
        }
    });
}

#[test]
fn signal_ends_a_sleep_and_the_end_event_names_it() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"], "tag": "sleeper"}));
    let events = envd.stream("GET", &format!("/processes/{pid}/events"), None);
    let signal = envd.post("/processes/sleeper/signal", json!({"signal": "TERM"}));
    assert_eq!(signal.status, 200, "{}", signal.text());
    let events: Vec<Value> = events.collect();
    let end = end_of(&events);
    assert_eq!(end["signal"], "SIGTERM");
    assert_eq!(end["exit_code"], Value::Null);
    envd.post(&format!("/processes/{pid}/signal"), json!({"signal": 9}))
        .assert_error(409, "conflict");
}

#[test]
fn signal_reaches_the_whole_process_group() {
    let envd = Envd::start();
    let events = envd
        .stream(
            "POST",
            "/processes",
            Some(json!({"cmd": "sh", "args": ["-c", "sleep 1000; echo not-reached"], "tag": "group"})),
        )
        .into_channel();
    let (_, start) = events.recv_timeout(Duration::from_secs(10)).expect("start");
    let leader = start["pid"].as_u64().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while members_of_group(leader).len() < 2 {
        assert!(Instant::now() < deadline, "sh did not start its sleep");
        std::thread::sleep(Duration::from_millis(20));
    }
    let resp = envd.post("/processes/group/signal", json!({"signal": "SIGKILL"}));
    assert_eq!(resp.status, 200);
    let all: Vec<Value> = events.iter().map(|(_, e)| e).collect();
    assert_eq!(end_of(&all)["signal"], "SIGKILL");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        members_of_group(leader).is_empty(),
        "the child sleep survived"
    );
}

/// Live (non-zombie) processes whose process group is `pgid`.
fn members_of_group(pgid: u64) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the ")" that ends the command: state ppid pgrp ...
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
        })
        .collect()
}

#[test]
fn unknown_signal_is_400() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"]}));
    envd.post(
        &format!("/processes/{pid}/signal"),
        json!({"signal": "SIGNOPE"}),
    )
    .assert_error(400, "invalid_argument");
    envd.post(&format!("/processes/{pid}/signal"), json!({}))
        .assert_error(400, "invalid_argument");
}

#[test]
fn background_process_is_listed_reattachable_and_takes_stdin() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({"cmd": "cat", "stdin": true, "tag": "echoer"}));

    let listed = envd.get("/processes").json();
    let entry = listed["processes"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["pid"] == pid).cloned())
        .expect("listed");
    assert_eq!(entry["tag"], "echoer");
    assert_eq!(entry["cmd"], "cat");
    assert_eq!(entry["running"], true);
    assert_eq!(entry["pty"], false);
    assert!(entry["started_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    let written = envd.post_bytes("/processes/echoer/stdin", b"first line\n");
    assert_eq!(written.status, 200, "{}", written.text());
    assert_eq!(written.json()["written"], 11);
    let by_pid = envd
        .stream("GET", &format!("/processes/{pid}/events"), None)
        .into_channel();
    let mut seen = Vec::new();
    wait_for_output(&by_pid, "stdout", "first line\n", &mut seen);
    envd.post_bytes(&format!("/processes/{pid}/stdin"), b"second\n");
    wait_for_output(&by_pid, "stdout", "second\n", &mut seen);

    let close = envd.post("/processes/echoer/stdin/close", json!({}));
    assert_eq!(close.status, 200);
    let rest: Vec<Value> = by_pid.iter().map(|(_, e)| e).collect();
    assert_eq!(end_of(&rest)["exit_code"], 0);

    // A finished process replays everything, then ends.
    let by_tag: Vec<Value> = envd
        .stream("GET", "/processes/echoer/events", None)
        .collect();
    assert_eq!(by_tag[0]["type"], "start");
    assert_eq!(output_of(&by_tag, "stdout"), b"first line\nsecond\n");
    assert_eq!(end_of(&by_tag)["exit_code"], 0);
    let info = envd.get("/processes/echoer").json();
    assert_eq!(info["running"], false);
    assert_eq!(info["exit_code"], 0);
    envd.post_bytes("/processes/echoer/stdin", b"late")
        .assert_error(409, "conflict");
}

#[test]
fn stdin_of_a_process_started_without_it_is_409() {
    let envd = Envd::start();
    let pid = envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"]}));
    envd.post_bytes(&format!("/processes/{pid}/stdin"), b"x")
        .assert_error(409, "conflict");
    envd.post(&format!("/processes/{pid}/stdin/close"), json!({}))
        .assert_error(409, "conflict");
    // Without stdin: true, the child reads /dev/null.
    let events = envd.run(json!({"cmd": "cat"}));
    assert_eq!(end_of(&events)["exit_code"], 0);
}

#[test]
fn disconnecting_from_a_foreground_stream_does_not_kill_the_process() {
    let envd = Envd::start();
    let mut events = envd.stream(
        "POST",
        "/processes",
        Some(json!({"cmd": "sh", "args": ["-c", "sleep 1; echo done"], "tag": "orphan"})),
    );
    assert_eq!(
        events.next().map(|e| e["type"].clone()),
        Some(json!("start"))
    );
    drop(events);
    assert_eq!(envd.get("/processes/orphan").json()["running"], true);
    let rest: Vec<Value> = envd
        .stream("GET", "/processes/orphan/events", None)
        .collect();
    assert_eq!(output_of(&rest, "stdout"), b"done\n");
    assert_eq!(end_of(&rest)["exit_code"], 0);
}

#[test]
fn reattach_after_more_output_than_the_ring_reports_truncation() {
    let envd = Envd::start();
    let events = envd.run(json!({
        "cmd": "sh",
        "args": ["-c", "head -c 6000000 /dev/zero | tr '\\0' a"],
        "tag": "chatty",
    }));
    // A live client slower than the child may fall behind the ring; it is
    // then told how much it missed, so the byte count always adds up.
    let live_dropped: u64 = events
        .iter()
        .filter(|e| e["type"] == "truncated")
        .filter_map(|e| e["dropped_bytes"].as_u64())
        .sum();
    assert_eq!(
        live_dropped + output_of(&events, "stdout").len() as u64,
        6_000_000
    );
    let replay: Vec<Value> = envd
        .stream("GET", "/processes/chatty/events", None)
        .collect();
    assert_eq!(replay[1]["type"], "truncated");
    let dropped = replay[1]["dropped_bytes"].as_u64().expect("dropped_bytes");
    let kept = output_of(&replay, "stdout").len() as u64;
    assert_eq!(dropped + kept, 6_000_000);
    assert!(kept <= 4 << 20 && kept > 3 << 20, "kept {kept}");
    assert_eq!(end_of(&replay)["exit_code"], 0);
}

#[test]
fn processes_run_as_the_requested_user_in_its_home_by_default() {
    let envd = Envd::start();
    let events = envd.run(json!({
        "cmd": "sh",
        "args": ["-c", "echo $(id -u):$(id -g):$HOME:$LOGNAME:$(pwd)"],
        "user": "nobody",
        "cwd": "/tmp",
    }));
    assert_eq!(
        output_of(&events, "stdout"),
        b"65534:65534:/nonexistent:nobody:/tmp\n"
    );
    let root = envd.run(json!({"cmd": "pwd"}));
    assert_eq!(output_of(&root, "stdout"), b"/root\n");
}

#[test]
fn spawn_failures_are_json_errors_not_streams() {
    let envd = Envd::start();
    envd.post("/processes", json!({"cmd": "no-such-command-xyz"}))
        .assert_error(404, "not_found");
    envd.post("/processes", json!({"cmd": "/no/such/file"}))
        .assert_error(404, "not_found");
    envd.post("/processes", json!({"cmd": "/etc/passwd"}))
        .assert_error(403, "permission_denied");
    envd.post(
        "/processes",
        json!({"cmd": "true", "user": "no-such-user-xyz"}),
    )
    .assert_error(400, "invalid_argument");
    envd.post("/processes", json!({"cmd": "true", "cwd": "/no/such/dir"}))
        .assert_error(400, "invalid_argument");
    envd.post("/processes", json!({"cmd": "true", "cwd": "relative/dir"}))
        .assert_error(400, "invalid_argument");
    envd.post("/processes", json!({"cmd": ""}))
        .assert_error(400, "invalid_argument");
    envd.post("/processes", json!({"cmd": "true", "tag": "12345"}))
        .assert_error(400, "invalid_argument");
    envd.post(
        "/processes",
        json!({"cmd": "true", "pty": {"cols": 0, "rows": 10}}),
    )
    .assert_error(400, "invalid_argument");
}

#[test]
fn a_tag_in_use_by_a_running_process_is_409() {
    let envd = Envd::start();
    envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"], "tag": "dup"}));
    envd.post(
        "/processes",
        json!({"cmd": "true", "tag": "dup", "background": true}),
    )
    .assert_error(409, "conflict");
}

#[test]
fn path_is_searched_in_the_merged_environment() {
    let envd = Envd::start();
    let dir = common::Scratch::new("pathsearch");
    let script = dir.path("hello-envd");
    std::fs::write(&script, "#!/bin/sh\necho from-script\n").expect("write script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let path = format!("{}:/usr/bin:/bin", dir.0.display());
    let events = envd.run(json!({"cmd": "hello-envd", "env": {"PATH": path}}));
    assert_eq!(output_of(&events, "stdout"), b"from-script\n");
}

#[test]
fn children_inherit_only_their_three_stdio_descriptors() {
    let envd = Envd::start();
    let dir = common::Scratch::new("fds");
    // Give envd more open descriptors: a stdin pipe, a PTY and a watch.
    envd.spawn_background(json!({"cmd": "sleep", "args": ["1000"], "stdin": true}));
    envd.spawn_background(
        json!({"cmd": "sleep", "args": ["1000"], "pty": {"cols": 80, "rows": 24}}),
    );
    let _watch = envd.stream(
        "GET",
        &format!("/fs/watch?path={}", common::q(&dir.path(""))),
        None,
    );
    for pty in [Value::Null, json!({"cols": 80, "rows": 24})] {
        let events = envd.run(json!({"cmd": "ls", "args": ["/proc/self/fd"], "pty": pty}));
        let kind = if pty.is_null() { "stdout" } else { "pty" };
        let listing = String::from_utf8_lossy(&output_of(&events, kind)).into_owned();
        let fds: Vec<&str> = listing.split_whitespace().collect();
        // fd 3 is the directory ls itself opened to read /proc/self/fd.
        assert_eq!(fds, ["0", "1", "2", "3"], "{kind}: {listing:?}");
    }
}
