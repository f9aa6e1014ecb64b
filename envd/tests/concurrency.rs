//! Long-lived streams get their own threads: many open event streams and
//! watches must not delay ordinary requests.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::time::{Duration, Instant};

use common::{end_of, q, Envd, Scratch};
use serde_json::{json, Value};

#[test]
fn thirty_open_streams_do_not_block_ordinary_requests() {
    let envd = Envd::start();
    let dir = Scratch::new("busy");
    let mut streams = Vec::new();
    for i in 0..25 {
        let pid = envd
            .spawn_background(json!({"cmd": "sleep", "args": ["1000"], "tag": format!("s{i}")}));
        streams.push((
            pid,
            envd.stream("GET", &format!("/processes/{pid}/events"), None)
                .into_channel(),
        ));
    }
    let watches: Vec<_> = (0..5)
        .map(|_| envd.stream("GET", &format!("/fs/watch?path={}", q(&dir.path(""))), None))
        .collect();

    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(envd.get("/health").status, 200);
        assert_eq!(
            envd.get(&format!("/fs/stat?path={}", q(&dir.path(""))))
                .status,
            200
        );
    }
    let events = envd.run(json!({"cmd": "echo", "args": ["still responsive"]}));
    assert_eq!(end_of(&events)["exit_code"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ordinary requests were delayed"
    );

    for (pid, _) in &streams {
        envd.post(
            &format!("/processes/{pid}/signal"),
            json!({"signal": "KILL"}),
        );
    }
    for (_, events) in streams {
        let all: Vec<Value> = events.iter().map(|(_, e)| e).collect();
        assert_eq!(end_of(&all)["signal"], "SIGKILL");
    }
    drop(watches);
}
