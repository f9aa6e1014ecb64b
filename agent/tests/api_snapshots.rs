//! Snapshot templates through the API, on real QEMU: a snapshot of a running
//! sandbox, sandboxes restored from it that diverge independently, deletion
//! refused while they live, layers shared and freed, and bad input.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{images_dir_or_skip, Agent};
use serde_json::{json, Value};

/// A Python process holding a 20 MiB blob and a value in memory, served on
/// a local socket: `get` answers `VALUE SHA256`, `set X` sets the value.
const HOLDER: &str = r#"
import hashlib, os, socket
blob = bytearray(os.urandom(20 * 1024 * 1024))
value = "prepared"
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7000))
server.listen()
while True:
    conn, _ = server.accept()
    words = conn.recv(200).decode().split()
    if words[:1] == ["set"]:
        value = words[1]
    conn.sendall(f"{value} {hashlib.sha256(blob).hexdigest()}".encode())
    conn.close()
"#;

/// Sends `message` to the holder and returns its answer.
fn holder(agent: &Agent, id: &str, message: &str) -> (String, String) {
    let code = format!(
        r#"
import socket, time
for _ in range(100):
    try:
        s = socket.create_connection(("127.0.0.1", 7000)); s.sendall(b"{message}"); print(s.recv(200).decode()); break
    except OSError:
        time.sleep(0.2)
"#
    );
    let (exit, out) = agent.python(id, &code);
    assert_eq!(exit, 0, "{out}");
    let (value, digest) = out.trim().split_once(' ').expect("answer");
    (value.to_owned(), digest.to_owned())
}

fn layers(agent: &Agent) -> Value {
    let (status, node) = agent.get("/v1/node");
    assert_eq!(status, 200, "{node}");
    node["layers"].clone()
}

fn u(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn a_snapshot_spawns_sandboxes_that_diverge_and_cannot_be_deleted_while_they_live() {
    let Some(images) = images_dir_or_skip("snapshots") else {
        return;
    };
    let agent = Agent::start(&images);
    let source = agent.create(json!({"memory_mb": 384}));
    let (status, _) = agent.post(
        &format!("/v1/sandboxes/{source}/processes"),
        json!({"cmd": "python3", "args": ["-c", HOLDER], "background": true}),
    );
    assert_eq!(status, 201);
    let (_, digest) = holder(&agent, &source, "get");
    agent.put_bytes(
        &format!("/v1/sandboxes/{source}/files?path=/root/prepared.txt"),
        b"prepared on disk",
    );

    // Snapshot of a running sandbox: it runs on afterwards.
    let (status, snapshot) = agent.post(
        "/v1/snapshots",
        json!({"sandbox_id": source, "name": "tpl-test"}),
    );
    assert_eq!(status, 201, "{snapshot}\n{}", agent.log());
    assert_eq!(snapshot["name"], "tpl-test");
    assert_eq!(
        (snapshot["vcpus"].clone(), snapshot["memory_mb"].clone()),
        (json!(1), json!(384))
    );
    assert!(u(&snapshot["size_bytes"]) > 20 << 20, "{snapshot}");
    assert!(snapshot["created_at"].is_string(), "{snapshot}");
    let (_, sandbox) = agent.get(&format!("/v1/sandboxes/{source}"));
    assert_eq!(sandbox["status"], "running", "{sandbox}");
    assert_eq!(
        holder(&agent, &source, "get"),
        ("prepared".into(), digest.clone())
    );

    // Listed with its type, next to the base image.
    let (_, templates) = agent.get("/v1/templates");
    let types: Vec<(String, String)> = templates["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().into(),
                t["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        types.contains(&("base".into(), "base".into())),
        "{templates}"
    );
    assert!(
        types.contains(&("tpl-test".into(), "snapshot".into())),
        "{templates}"
    );
    let (status, listed) = agent.get("/v1/snapshots");
    assert_eq!(
        (
            status,
            listed
                .as_array()
                .and_then(|all| all.iter().find(|t| t["type"] == "snapshot"))
                .map(|t| t["name"].clone())
                .unwrap_or_default()
        ),
        (200, json!("tpl-test"))
    );

    // Its vCPUs and memory are fixed.
    let (status, refused) = agent.post(
        "/v1/sandboxes",
        json!({"template": "tpl-test", "memory_mb": 512}),
    );
    assert_eq!(status, 400, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("snapshot") && message.contains("memory_mb"),
        "{message}"
    );

    // Four sandboxes from it: each starts with the snapshot's memory and
    // files, then goes its own way.
    let children: Vec<String> = (0..4)
        .map(|_| agent.create(json!({"template": "tpl-test"})))
        .collect();
    for (n, child) in children.iter().enumerate() {
        assert_eq!(
            holder(&agent, child, "get"),
            ("prepared".into(), digest.clone())
        );
        assert_eq!(
            agent.get_bytes(&format!(
                "/v1/sandboxes/{child}/files?path=/root/prepared.txt"
            )),
            (200, b"prepared on disk".to_vec())
        );
        holder(&agent, child, &format!("set child-{n}"));
        agent.put_bytes(
            &format!("/v1/sandboxes/{child}/files?path=/root/mine.txt"),
            format!("child {n}").as_bytes(),
        );
    }
    for (n, child) in children.iter().enumerate() {
        assert_eq!(
            holder(&agent, child, "get"),
            (format!("child-{n}"), digest.clone())
        );
        assert_eq!(
            agent.get_bytes(&format!("/v1/sandboxes/{child}/files?path=/root/mine.txt")),
            (200, format!("child {n}").into_bytes())
        );
    }
    // The source saw none of it.
    assert_eq!(holder(&agent, &source, "get").0, "prepared");
    let (status, _) = agent.get_bytes(&format!("/v1/sandboxes/{source}/files?path=/root/mine.txt"));
    assert_eq!(status, 404);

    // A paused child stores only what it changed: far less than the
    // snapshot's memory.
    let before = layers(&agent);
    let (status, paused) = agent.post(&format!("/v1/sandboxes/{}/pause", children[0]), json!({}));
    assert_eq!(status, 200, "{paused}");
    let after = layers(&agent);
    let added = u(&after["bytes"]) - u(&before["bytes"]);
    assert!(
        added < 20 << 20,
        "a pause after small changes stored {added} bytes"
    );
    assert_eq!(
        holder(&agent, &children[0], "get"),
        ("child-0".into(), digest.clone())
    );

    // In use: neither deleted nor replaced.
    let (status, refused) = agent.delete("/v1/snapshots/tpl-test");
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&children[1]),
        "{refused}"
    );
    let (status, taken) = agent.post(
        "/v1/snapshots",
        json!({"sandbox_id": source, "name": "tpl-test"}),
    );
    assert_eq!(status, 409, "{taken}");
    assert!(
        taken["error"]["message"]
            .as_str()
            .unwrap()
            .contains("overwrite"),
        "{taken}"
    );
    let (status, _) = agent.post(
        "/v1/snapshots?overwrite=true",
        json!({"sandbox_id": source, "name": "tpl-test"}),
    );
    assert_eq!(status, 409);
    let (_, got) = agent.get("/v1/snapshots/tpl-test");
    assert_eq!(got["used_by"].as_array().unwrap().len(), 4, "{got}");

    // Once they are gone it can be replaced, then deleted.
    for child in &children {
        assert_eq!(agent.delete(&format!("/v1/sandboxes/{child}")).0, 204);
    }
    let (status, replaced) = agent.post(
        "/v1/snapshots?overwrite=true",
        json!({"sandbox_id": source, "name": "tpl-test"}),
    );
    assert_eq!(status, 201, "{replaced}");
    assert_eq!(agent.delete("/v1/snapshots/tpl-test").0, 204);
    assert_eq!(agent.get("/v1/snapshots/tpl-test").0, 404);
    assert_eq!(agent.delete(&format!("/v1/sandboxes/{source}")).0, 204);

    // Nothing uses a layer any more: every layer and header file is gone.
    let left = layers(&agent);
    assert_eq!(
        (u(&left["count"]), u(&left["files"]), u(&left["headers"])),
        (0, 0, 0),
        "{left}"
    );
    assert!(agent.leftovers().is_empty(), "{:?}", agent.leftovers());
}

#[test]
fn bad_snapshot_requests_are_4xx_with_a_message() {
    let Some(images) = images_dir_or_skip("snapshot_errors") else {
        return;
    };
    let agent = Agent::start(&images);
    let long = "a".repeat(300);
    let cases = [
        (
            json!({"sandbox_id": "sb-nosuch", "name": "x"}),
            404,
            "does not exist",
        ),
        (
            json!({"sandbox_id": "sb-nosuch", "name": "a/b"}),
            400,
            "'/' is not allowed",
        ),
        (
            json!({"sandbox_id": "sb-nosuch", "name": long}),
            400,
            "300 characters",
        ),
        (
            json!({"sandbox_id": "sb-nosuch", "name": "base"}),
            409,
            "base image",
        ),
        (json!({"name": "x"}), 400, "sandbox_id"),
        (json!({"sandbox_id": "sb-nosuch", "size": 1}), 400, "size"),
    ];
    for (body, want, words) in cases {
        let (status, error) = agent.post("/v1/snapshots", body.clone());
        assert_eq!(status, want, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{body}: {message}");
    }
    for (status, error) in [
        agent.get("/v1/snapshots/nosuch"),
        agent.delete("/v1/snapshots/nosuch"),
        agent.post("/v1/sandboxes", json!({"template": "nosuch"})),
    ] {
        assert_eq!(status, 404, "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("GET /v1/"),
            "{error}"
        );
    }
    let (status, error) = agent.post("/v1/snapshots/nosuch", json!({}));
    assert_eq!(status, 405, "{error}");
}
