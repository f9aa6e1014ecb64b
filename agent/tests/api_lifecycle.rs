//! The main job, end to end on real QEMU, namespaces and HTTP: create a
//! sandbox, run Python, move files, destroy it, and find nothing left; many
//! sandboxes at once, isolated; internet on and off; timeouts.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{images_dir_or_skip, qemu_pids_under, Agent};
use serde_json::json;
use wrenn_tests::netns::NetNs;

#[test]
fn sandbox_runs_python_moves_files_and_leaves_nothing_after_destroy() {
    let Some(images) = images_dir_or_skip("sandbox_lifecycle") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256, "metadata": {"owner": "lifecycle"}}));
    let (_, sandbox) = agent.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(sandbox["status"], "running");
    assert_eq!(sandbox["metadata"]["owner"], "lifecycle");

    assert_eq!(agent.python(&id, "print(6*7)"), (0, "42\n".to_owned()));

    let base = format!("/v1/sandboxes/{id}");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(
        agent
            .put_bytes(&format!("{base}/files?path=/root/data.bin"), &data)
            .0,
        201
    );
    assert_eq!(
        agent.get_bytes(&format!("{base}/files?path=/root/data.bin")),
        (200, data)
    );
    let (status, _) = agent.post(&format!("{base}/fs/mkdir"), json!({"path": "/root/a/b"}));
    assert!(status == 200 || status == 201, "mkdir: {status}");
    let (status, _) = agent.post(
        &format!("{base}/fs/move"),
        json!({"from": "/root/data.bin", "to": "/root/a/b/moved.bin"}),
    );
    assert_eq!(status, 200);
    let (status, listing) = agent.get(&format!("{base}/fs/list?path=/root/a&depth=2"));
    assert_eq!(status, 200);
    assert!(
        listing.to_string().contains("/root/a/b/moved.bin"),
        "{listing}"
    );
    let (status, stat) = agent.get(&format!("{base}/fs/stat?path=/root/a/b/moved.bin"));
    assert_eq!((status, stat["size"].as_u64()), (200, Some(300_000)));
    assert_eq!(agent.delete(&format!("{base}/files?path=/root/a")).0, 204);
    assert_eq!(agent.get(&format!("{base}/fs/stat?path=/root/a")).0, 404);

    let (status, filtered) = agent.get("/v1/sandboxes?metadata.owner=lifecycle&status=running");
    assert_eq!(status, 200);
    assert_eq!(filtered["sandboxes"].as_array().map(Vec::len), Some(1));
    let (_, other) = agent.get("/v1/sandboxes?metadata.owner=someone-else");
    assert_eq!(other["sandboxes"].as_array().map(Vec::len), Some(0));
    let (status, logs) = agent.get_bytes(&format!("{base}/logs"));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&logs).contains("Linux version"));

    background_processes_take_stdin_and_signals(&agent, &base);

    assert_eq!(agent.delete(&base).0, 204);
    assert_eq!(agent.get(&base).0, 404);
    assert_eq!(
        agent.leftovers(),
        Vec::<String>::new(),
        "log:\n{}",
        agent.log()
    );
}

/// Background processes, stdin, signals and exec timeouts pass through to
/// the sandbox's envd.
fn background_processes_take_stdin_and_signals(agent: &Agent, base: &str) {
    let (status, started) = agent.post(
        &format!("{base}/processes"),
        json!({"cmd": "cat", "tag": "echo", "stdin": true, "background": true}),
    );
    assert_eq!(status, 201, "{started}");
    let (status, _) = agent.put_bytes(&format!("{base}/processes/echo/stdin"), b"");
    assert_eq!(status, 405, "stdin takes POST");
    let http = ureq::post(&format!("{}{base}/processes/echo/stdin", agent.url));
    let written = http.send_bytes(b"hello through the agent\n");
    assert_eq!(written.map(|r| r.status()).ok(), Some(200));
    let (status, _) = agent.post(&format!("{base}/processes/echo/stdin/close"), json!({}));
    assert_eq!(status, 200);
    let (status, events) = agent.get_bytes(&format!("{base}/processes/echo/events"));
    assert_eq!(status, 200);
    let events = String::from_utf8_lossy(&events);
    assert!(events.contains("hello through the agent"), "{events}");
    assert!(events.contains(r#""exit_code":0"#), "{events}");

    let (status, _) = agent.post(
        &format!("{base}/processes"),
        json!({"cmd": "sleep", "args": ["1000"], "tag": "sleeper", "background": true}),
    );
    assert_eq!(status, 201);
    let (status, _) = agent.post(
        &format!("{base}/processes/sleeper/signal"),
        json!({"signal": "SIGKILL"}),
    );
    assert_eq!(status, 200);
    let (_, events) = agent.get_bytes(&format!("{base}/processes/sleeper/events"));
    assert!(String::from_utf8_lossy(&events).contains("SIGKILL"));

    let (status, result) = agent.post(
        &format!("{base}/exec"),
        json!({"cmd": "sleep", "args": ["30"], "timeout_s": 1}),
    );
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["timed_out"], true, "{result}");
    assert_eq!(result["signal"], "SIGKILL", "{result}");
}

#[test]
fn four_sandboxes_at_once_do_not_see_each_others_files_or_processes() {
    let Some(images) = images_dir_or_skip("four_sandboxes") else {
        return;
    };
    let agent = Agent::start(&images);
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| agent.create(json!({"memory_mb": 256}))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("create"))
            .collect()
    });
    for id in &ids {
        let base = format!("/v1/sandboxes/{id}");
        assert_eq!(
            agent
                .put_bytes(&format!("{base}/files?path=/root/me"), id.as_bytes())
                .0,
            201
        );
        let (status, _) = agent.post(
            &format!("{base}/processes"),
            json!({"cmd": "sleep", "args": ["1000"], "tag": format!("marker-{id}"), "background": true}),
        );
        assert_eq!(status, 201);
    }
    for id in &ids {
        let base = format!("/v1/sandboxes/{id}");
        assert_eq!(
            agent.get_bytes(&format!("{base}/files?path=/root/me")),
            (200, id.as_bytes().to_vec())
        );
        let (_, processes) = agent.get(&format!("{base}/processes"));
        let tags: Vec<String> = processes["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter_map(|p| p["tag"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(tags, vec![format!("marker-{id}")]);
        let (_, ps) = agent.python(
            id,
            "import subprocess; print(subprocess.run(['ps','-eo','args'],capture_output=True,text=True).stdout)",
        );
        let others = ids.iter().filter(|other| *other != id);
        for other in others {
            assert!(!ps.contains(other.as_str()), "{id} sees {other}");
        }
    }
}

/// "The internet" for a test: a namespace behind a veth from the root
/// namespace, with a TCP server that answers one line per connection. It
/// has no route back to the sandboxes' ranges, so only masqueraded traffic
/// gets an answer. Removed on drop.
struct Outside {
    name: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

const OUTSIDE_HOST: &str = "198.51.100.9";
const OUTSIDE_PORT: u16 = 8088;

impl Outside {
    fn start() -> Outside {
        let name = format!("wrenn-test-out-{}", std::process::id());
        let host_end = format!("wto{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "ip {}", args.join(" "));
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["addr", "add", "198.51.100.10/30", "dev", &host_end]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{OUTSIDE_HOST}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ns = NetNs::existing(&name);
        let flag = std::sync::Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            ns.run(|| {
                let listener =
                    TcpListener::bind((OUTSIDE_HOST, OUTSIDE_PORT)).expect("bind outside");
                listener.set_nonblocking(true).expect("nonblocking");
                let _ = ready_tx.send(());
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let mut buf = [0u8; 1024];
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                            let _ = conn.read(&mut buf);
                            let _ = conn.write_all(
                                b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\noutside says hi",
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("outside server ready");
        Outside {
            name,
            stop,
            server: Some(server),
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        // Deleting the namespace removes both ends of the veth.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[test]
fn internet_true_reaches_the_outside_and_internet_false_reaches_nothing() {
    let Some(images) = images_dir_or_skip("internet") else {
        return;
    };
    let agent = Agent::start(&images);
    let _outside = Outside::start();
    let online = agent.create(json!({"memory_mb": 256, "internet": true}));
    let offline = agent.create(json!({"memory_mb": 256, "internet": false}));
    let fetch = |id: &str, url: &str| {
        let (status, result) = agent.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "curl", "args": ["-sS", "-m", "5", url]}),
        );
        assert_eq!(status, 200, "{result}");
        result
    };
    let url = format!("http://{OUTSIDE_HOST}:{OUTSIDE_PORT}/");
    let result = fetch(&online, &url);
    assert_eq!(result["exit_code"], 0, "{result}");
    assert_eq!(result["stdout"], "outside says hi");
    let result = fetch(&offline, &url);
    assert_ne!(result["exit_code"], 0, "offline sandbox got out: {result}");
    assert_eq!(result["stdout"], "");
    // Neither reaches the other sandbox through the host.
    let (_, other) = agent.get(&format!("/v1/sandboxes/{offline}"));
    let other_envd = format!(
        "http://{}:49983/health",
        other["address"].as_str().expect("address")
    );
    assert_ne!(fetch(&online, &other_envd)["exit_code"], 0);
}

#[test]
fn a_sandbox_whose_timeout_passes_is_destroyed_and_its_resources_freed() {
    let Some(images) = images_dir_or_skip("timeout") else {
        return;
    };
    let agent = Agent::start(&images);
    let id = agent.create(json!({"memory_mb": 256, "timeout_s": 3}));
    let path = format!("/v1/sandboxes/{id}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.get(&path).0 == 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(agent.get(&path).0, 404, "still there after its timeout");
    assert_eq!(agent.leftovers(), Vec::<String>::new());
    assert!(qemu_pids_under(&agent.dir).is_empty());

    // Extending a timeout keeps a sandbox alive past its first deadline.
    let id = agent.create(json!({"memory_mb": 256, "timeout_s": 3}));
    let path = format!("/v1/sandboxes/{id}");
    let (status, _) = agent.post(&format!("{path}/timeout"), json!({"timeout_s": 120}));
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(agent.get(&path).1["status"], "running");
}
