//! Directory watches: create/write/remove/rename events as they happen,
//! recursive watches that follow new sub-directories, and the end of the
//! stream when the watched directory is deleted.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{q, Envd, Scratch};
use serde_json::{json, Value};

/// Collects events until one matches `want`; panics after 10 s.
fn wait_for(events: &Receiver<(Instant, Value)>, want: &Value, seen: &mut Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|e| matches(e, want)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok((_, event)) => seen.push(event),
            Err(_) => panic!("no event like {want}; saw {seen:#?}"),
        }
    }
}

/// True when every field of `want` is equal in `event`.
fn matches(event: &Value, want: &Value) -> bool {
    want.as_object()
        .is_some_and(|fields| fields.iter().all(|(k, v)| &event[k] == v))
}

fn watch(envd: &Envd, dir: &str, recursive: bool) -> Receiver<(Instant, Value)> {
    let path = format!("/fs/watch?path={}&recursive={recursive}", q(dir));
    // envd adds the inotify watch before it sends the response headers.
    envd.stream("GET", &path, None).into_channel()
}

#[test]
fn watch_reports_create_write_remove_and_rename() {
    let envd = Envd::start();
    let dir = Scratch::new("watch");
    let events = watch(&envd, &dir.path(""), false);
    let mut seen = Vec::new();
    let file = dir.path("new.txt");

    std::fs::write(&file, b"hello").expect("create");
    wait_for(
        &events,
        &json!({"type": "create", "path": file, "is_dir": false}),
        &mut seen,
    );
    wait_for(&events, &json!({"type": "write", "path": file}), &mut seen);

    let renamed = dir.path("renamed.txt");
    std::fs::rename(&file, &renamed).expect("rename");
    wait_for(
        &events,
        &json!({"type": "rename", "path": renamed, "from": file}),
        &mut seen,
    );

    std::fs::remove_file(&renamed).expect("remove");
    wait_for(
        &events,
        &json!({"type": "remove", "path": renamed}),
        &mut seen,
    );

    std::fs::create_dir(dir.path("sub")).expect("mkdir");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("sub"), "is_dir": true}),
        &mut seen,
    );
    // Not recursive: changes inside sub/ are not reported.
    std::fs::write(dir.path("sub/inner"), b"x").expect("write");
    std::fs::write(dir.path("marker"), b"x").expect("write");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("marker")}),
        &mut seen,
    );
    assert!(!seen.iter().any(|e| e["path"] == dir.path("sub/inner")));
}

#[test]
fn recursive_watch_follows_new_subdirectories() {
    let envd = Envd::start();
    let dir = Scratch::new("watch-rec");
    std::fs::create_dir(dir.path("existing")).expect("mkdir");
    let events = watch(&envd, &dir.path(""), true);
    let mut seen = Vec::new();

    std::fs::write(dir.path("existing/a"), b"1").expect("write");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("existing/a")}),
        &mut seen,
    );

    std::fs::create_dir_all(dir.path("new/deeper")).expect("mkdir -p");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("new"), "is_dir": true}),
        &mut seen,
    );
    std::fs::write(dir.path("new/deeper/b"), b"2").expect("write");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("new/deeper/b")}),
        &mut seen,
    );

    std::fs::rename(dir.path("new"), dir.path("moved")).expect("rename dir");
    wait_for(
        &events,
        &json!({"type": "rename", "path": dir.path("moved"), "is_dir": true}),
        &mut seen,
    );
    std::fs::write(dir.path("moved/deeper/c"), b"3").expect("write");
    wait_for(
        &events,
        &json!({"type": "create", "path": dir.path("moved/deeper/c")}),
        &mut seen,
    );
}

#[test]
fn watch_ends_when_the_directory_is_deleted() {
    let envd = Envd::start();
    let dir = Scratch::new("watch-gone");
    let target = dir.path("target");
    std::fs::create_dir(&target).expect("mkdir");
    let events = watch(&envd, &target, false);
    std::fs::remove_dir(&target).expect("rmdir");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, event)) => seen.push(event),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("stream did not end: {seen:?}")
            }
        }
    }
    assert!(seen
        .iter()
        .any(|e| matches(e, &json!({"type": "remove", "path": target}))));
}

#[test]
fn watch_of_missing_path_is_404_and_of_a_file_is_400() {
    let envd = Envd::start();
    let dir = Scratch::new("watch-err");
    std::fs::write(dir.path("file"), b"x").expect("write");
    envd.get(&format!("/fs/watch?path={}", q(&dir.path("missing"))))
        .assert_error(404, "not_found");
    envd.get(&format!("/fs/watch?path={}", q(&dir.path("file"))))
        .assert_error(400, "invalid_argument");
    envd.get(&format!(
        "/fs/watch?path={}&recursive=maybe",
        q(&dir.path(""))
    ))
    .assert_error(400, "invalid_argument");
}
