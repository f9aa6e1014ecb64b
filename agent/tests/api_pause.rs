//! Pause and resume through the API, on real QEMU: memory, processes and
//! files come back exactly, across many generations; wrong-state requests
//! are refused with a message.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{images_dir_or_skip, Agent};
use serde_json::json;

/// A Python process that holds a 50 MiB bytearray and a counter in memory
/// and answers on a local socket with both, so that its state can be read
/// back after a resume.
const HOLDER: &str = r#"
import hashlib, os, socket
blob = bytearray(os.urandom(50 * 1024 * 1024))
counter = 0
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7000))
server.listen()
while True:
    conn, _ = server.accept()
    counter += 1
    conn.sendall(f"{counter} {hashlib.sha256(blob).hexdigest()}".encode())
    conn.close()
"#;

const ASK: &str = r#"
import socket, time
for _ in range(100):
    try:
        s = socket.create_connection(("127.0.0.1", 7000)); print(s.recv(200).decode()); break
    except OSError:
        time.sleep(0.2)
"#;

fn ask(agent: &Agent, id: &str) -> (u64, String) {
    let (code, out) = agent.python(id, ASK);
    assert_eq!(code, 0, "{out}");
    let (counter, digest) = out.trim().split_once(' ').expect("answer");
    (counter.parse().expect("counter"), digest.to_owned())
}

/// Starts [`HOLDER`] in the background in the sandbox at `base`.
fn start_holder(agent: &Agent, base: &str) {
    let (status, _) = agent.post(
        &format!("{base}/processes"),
        json!({"cmd": "python3", "args": ["-c", HOLDER], "background": true, "tag": "holder"}),
    );
    assert_eq!(status, 201);
}

#[test]
fn memory_processes_and_files_survive_pause_and_resume() {
    let Some(images) = images_dir_or_skip("pause_resume") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 512}));
    let base = format!("/v1/sandboxes/{id}");
    start_holder(&agent, &base);
    let (first, digest) = ask(&agent, &id);
    agent.put_bytes(&format!("{base}/files?path=/root/disk.txt"), b"on disk");
    agent.put_bytes(&format!("{base}/files?path=/tmp/ram.txt"), b"in tmpfs");

    let (status, paused) = agent.post(&format!("{base}/pause"), json!({}));
    assert_eq!(
        (status, paused["status"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (_, listed) = agent.get("/v1/sandboxes?status=paused");
    assert_eq!(listed["sandboxes"][0]["id"], id.as_str());
    assert_eq!(
        agent
            .leftovers()
            .iter()
            .filter(|l| l.contains("QEMU"))
            .count(),
        0
    );

    let (status, resumed) = agent.post(&format!("{base}/resume"), json!({}));
    assert_eq!(
        (status, resumed["status"].as_str()),
        (200, Some("running")),
        "{resumed}"
    );
    assert_eq!(ask(&agent, &id), (first + 1, digest.clone()));
    for (path, content) in [("/root/disk.txt", "on disk"), ("/tmp/ram.txt", "in tmpfs")] {
        assert_eq!(
            agent.get_bytes(&format!("{base}/files?path={path}")),
            (200, content.as_bytes().to_vec())
        );
    }

    // A call on a paused sandbox wakes it up.
    assert_eq!(agent.post(&format!("{base}/pause"), json!({})).0, 200);
    assert_eq!(ask(&agent, &id), (first + 2, digest));
}

#[test]
fn files_written_across_ten_generations_are_all_there() {
    let Some(images) = images_dir_or_skip("ten_generations") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256}));
    let base = format!("/v1/sandboxes/{id}");
    for generation in 0..10 {
        let path = format!("/root/gen-{generation}.txt");
        let body = format!("generation {generation}");
        assert_eq!(
            agent
                .put_bytes(&format!("{base}/files?path={path}"), body.as_bytes())
                .0,
            201
        );
        assert_eq!(agent.post(&format!("{base}/pause"), json!({})).0, 200);
        assert_eq!(agent.post(&format!("{base}/resume"), json!({})).0, 200);
        for earlier in 0..=generation {
            let (status, content) =
                agent.get_bytes(&format!("{base}/files?path=/root/gen-{earlier}.txt"));
            assert_eq!(
                status, 200,
                "gen-{earlier} lost after generation {generation}"
            );
            assert_eq!(content, format!("generation {earlier}").into_bytes());
        }
    }
}

#[test]
fn pausing_a_paused_and_resuming_a_running_sandbox_are_409() {
    let Some(images) = images_dir_or_skip("pause_wrong_state") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256}));
    let base = format!("/v1/sandboxes/{id}");
    let (status, error) = agent.post(&format!("{base}/resume"), json!({}));
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    assert!(error["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("running"));
    assert_eq!(agent.post(&format!("{base}/pause"), json!({})).0, 200);
    let (status, error) = agent.post(&format!("{base}/pause"), json!({}));
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let missing = "/v1/sandboxes/sb-aaaaaaaaaaaaaaaaaaaa/pause";
    assert_eq!(agent.post(missing, json!({})).0, 404);
}

#[test]
fn sigterm_pauses_running_sandboxes_and_the_next_start_resumes_them() {
    let Some(images) = images_dir_or_skip("sigterm_pauses") else {
        return;
    };
    let mut agent = Agent::start(&images);
    let ids: Vec<String> = (0..2)
        .map(|_| agent.create(json!({"memory_mb": 256})))
        .collect();
    for id in &ids {
        let (status, _) = agent.post(
            &format!("/v1/sandboxes/{id}/processes"),
            json!({"cmd": "sleep", "args": ["1000"], "tag": "survivor", "background": true}),
        );
        assert_eq!(status, 201);
    }
    let status = agent.terminate();
    assert!(status.success(), "agent exit: {status}\n{}", agent.log());
    assert!(
        common::qemu_pids_under(&agent.dir).is_empty(),
        "VMs left running"
    );

    agent.start_again();
    for id in &ids {
        let (_, sandbox) = agent.get(&format!("/v1/sandboxes/{id}"));
        assert_eq!(sandbox["status"], "running", "{sandbox}\n{}", agent.log());
        let (_, processes) = agent.get(&format!("/v1/sandboxes/{id}/processes"));
        let survivor = processes["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .find(|p| p["tag"] == "survivor")
            .cloned()
            .expect("the background process is gone");
        assert_eq!(survivor["running"], true, "{survivor}");
    }
}

#[test]
fn a_timeout_with_action_pause_pauses_instead_of_destroying() {
    let Some(images) = images_dir_or_skip("timeout_pause") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256, "timeout_s": 2, "timeout_action": "pause"}));
    let path = format!("/v1/sandboxes/{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while agent.get(&path).1["status"] != "paused" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(agent.get(&path).1["status"], "paused");
    assert_eq!(agent.python(&id, "print('woke')"), (0, "woke\n".to_owned()));
    assert_eq!(agent.get(&path).1["status"], "running");
}

#[test]
fn twenty_rapid_pause_resume_cycles_keep_memory_and_files() {
    let Some(images) = images_dir_or_skip("rapid_pause_resume") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256}));
    let base = format!("/v1/sandboxes/{id}");
    start_holder(&agent, &base);
    let (mut counter, digest) = ask(&agent, &id);
    for cycle in 0..20 {
        let file = format!("{base}/files?path=/root/cycle-{cycle}");
        assert_eq!(agent.put_bytes(&file, format!("{cycle}").as_bytes()).0, 201);
        assert_eq!(
            agent.post(&format!("{base}/pause"), json!({})).0,
            200,
            "cycle {cycle}"
        );
        assert_eq!(
            agent.post(&format!("{base}/resume"), json!({})).0,
            200,
            "cycle {cycle}"
        );
        counter += 1;
        assert_eq!(ask(&agent, &id), (counter, digest.clone()), "cycle {cycle}");
        assert_eq!(
            agent.get_bytes(&file),
            (200, format!("{cycle}").into_bytes())
        );
    }
}

#[test]
fn kill_9_during_pause_or_resume_leaves_a_usable_sandbox() {
    let Some(images) = images_dir_or_skip("kill_during_pause") else {
        return;
    };
    let mut agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256}));
    agent.put_bytes(
        &format!("/v1/sandboxes/{id}/files?path=/root/keep"),
        b"kept",
    );
    // Each delay lands the kill in another step: VM state, memory layers,
    // the record, the memory file written back, the VM restored.
    let rounds = [30u64, 150, 400, 1000]
        .into_iter()
        .flat_map(|delay| [("pause", delay), ("resume", delay)]);
    for (action, delay) in rounds {
        let url = format!("{}/v1/sandboxes/{id}/{action}", agent.url);
        let request = std::thread::spawn(move || {
            let _ = ureq::post(&url).send_json(json!({}));
        });
        std::thread::sleep(std::time::Duration::from_millis(delay));
        agent.kill9();
        let _ = request.join();
        agent.start_again();
        // No layer lost, none leaked: every recorded layer has its file and
        // every file a record.
        let (_, node) = agent.get("/v1/node");
        let layers = &node["layers"];
        assert_eq!(
            layers["files"], layers["count"],
            "after kill -9 {delay} ms into a {action}: {node}"
        );
        let (_, sandbox) = agent.get(&format!("/v1/sandboxes/{id}"));
        let status = sandbox["status"].as_str().unwrap_or_default().to_owned();
        assert!(
            status == "paused" || status == "running",
            "after kill -9 {delay} ms into a {action}: {sandbox}\n{}",
            agent.log()
        );
        // Usable either way: a call on a paused sandbox resumes it.
        assert_eq!(
            agent.get_bytes(&format!("/v1/sandboxes/{id}/files?path=/root/keep")),
            (200, b"kept".to_vec()),
            "{}",
            agent.log()
        );
        if action == "pause" {
            // Set up the next round: a paused sandbox to resume.
            assert_eq!(
                agent
                    .post(&format!("/v1/sandboxes/{id}/pause"), json!({}))
                    .0,
                200
            );
        }
    }
    assert_eq!(
        common::qemu_pids_under(&agent.dir).len(),
        1,
        "one VM, no strays"
    );
    assert_eq!(agent.delete(&format!("/v1/sandboxes/{id}")).0, 204);
    let (_, node) = agent.get("/v1/node");
    let layers = &node["layers"];
    assert_eq!(
        (&layers["count"], &layers["files"], &layers["headers"]),
        (&json!(0), &json!(0), &json!(0)),
        "destroyed, yet layers remain: {node}"
    );
}
