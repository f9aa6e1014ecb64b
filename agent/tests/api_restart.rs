//! The agent can die at any moment: `kill -9` leaves its sandboxes running,
//! and the next start re-attaches to them and finishes or rolls back what
//! was half done.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::time::Duration;

use common::{images_dir_or_skip, Agent};
use serde_json::json;

#[test]
fn sandboxes_survive_kill_9_of_the_agent_and_answer_after_restart() {
    let Some(images) = images_dir_or_skip("survive_kill_9") else {
        return;
    };
    let mut agent = Agent::start(&images);
    let a = agent.create(json!({"memory_mb": 256}));
    let b = agent.create(json!({"memory_mb": 256}));
    agent.put_bytes(
        &format!("/v1/sandboxes/{a}/files?path=/root/a.txt"),
        b"from a",
    );

    agent.kill9();
    agent.restart();

    for id in [&a, &b] {
        let (_, sandbox) = agent.get(&format!("/v1/sandboxes/{id}"));
        assert_eq!(sandbox["status"], "running", "{sandbox}\n{}", agent.log());
        assert_eq!(
            agent.python(id, "print('alive')"),
            (0, "alive\n".to_owned())
        );
    }
    assert_eq!(
        agent.get_bytes(&format!("/v1/sandboxes/{a}/files?path=/root/a.txt")),
        (200, b"from a".to_vec())
    );
    assert!(agent.log().contains("re-attached to running VM"));
}

#[test]
fn a_create_interrupted_by_kill_9_is_finished_or_cleaned_up() {
    let Some(images) = images_dir_or_skip("interrupted_create") else {
        return;
    };
    for delay in [Duration::from_millis(300), Duration::from_secs(2)] {
        let mut agent = Agent::start(&images);
        let url = agent.url.clone();
        let creating = std::thread::spawn(move || {
            // The answer never comes: the agent dies mid-create.
            let _ = ureq::post(&format!("{url}/v1/sandboxes"))
                .timeout(Duration::from_secs(60))
                .send_json(json!({"memory_mb": 256}));
        });
        std::thread::sleep(delay);
        agent.kill9();
        let _ = creating.join();
        agent.restart();

        let (_, list) = agent.get("/v1/sandboxes");
        let sandboxes = list["sandboxes"].as_array().cloned().unwrap_or_default();
        match sandboxes.as_slice() {
            [] => assert_eq!(agent.leftovers(), Vec::<String>::new(), "{}", agent.log()),
            [sandbox] => {
                assert_eq!(sandbox["status"], "running", "{sandbox}\n{}", agent.log());
                let id = sandbox["id"].as_str().expect("id");
                assert_eq!(agent.python(id, "print(1)"), (0, "1\n".to_owned()));
            }
            more => panic!("one create made {} sandboxes", more.len()),
        }
    }
}

#[test]
fn leftovers_of_sandboxes_that_no_longer_exist_are_removed_at_start() {
    let Some(images) = images_dir_or_skip("leftovers_removed") else {
        return;
    };
    let mut agent = Agent::start(&images);
    agent.kill9();
    let slot = agent.slots().end - 1;
    let netns = format!("wrenn-{slot}");
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .expect("ip");
    assert!(status.success());
    let stray = agent.dir.join("state/sandboxes/sb-straystraystraystray");
    std::fs::create_dir_all(&stray).expect("mkdir");
    std::fs::write(stray.join("rootfs.qcow2"), b"left behind").expect("write");

    agent.restart();
    assert!(
        !std::path::Path::new(&format!("/run/netns/{netns}")).exists(),
        "{}",
        agent.log()
    );
    assert!(!stray.exists(), "{}", agent.log());
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}
