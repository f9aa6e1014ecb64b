//! The control API of a real `wrenn-vmm` process on its Unix socket: boot a
//! guest program, pause, snapshot (full and diff), resume, load a snapshot
//! in a second process, and bad requests. Needs /dev/kvm for the VM parts.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::time::{Duration, Instant};

use common::{counter_output, kvm_or_skip, Vmm};
use serde_json::json;

#[test]
fn boot_pause_snapshot_resume_and_load_through_the_api() {
    if !kvm_or_skip("vmm api") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut first = Vmm::start(dir.path(), "first");
    assert_eq!(first.state(), "not_started");
    assert_eq!(
        first
            .put(
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 16, "track_dirty_pages": true})
            )
            .0,
        204
    );
    first.boot_program(env!("WRENN_GUEST_COUNTER"));
    assert_eq!(first.state(), "running");
    // Every thread runs under seccomp; the vCPU thread under its own
    // filter on top of the VMM's (which it installs first thing).
    let threads = || {
        let mut threads = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", first.child.id())).unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            threads.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
        }
        threads
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = threads();
    while !seen
        .iter()
        .any(|(name, _, filters)| name == "vcpu0" && filters == "2")
    {
        assert!(Instant::now() < deadline, "{seen:?}");
        std::thread::sleep(Duration::from_millis(5));
        seen = threads();
    }
    assert!(seen.iter().all(|(_, mode, _)| mode == "2"), "{seen:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        first.put("/actions", json!({"action_type": "Pause"})).0,
        204
    );
    assert_eq!(first.state(), "paused");
    let full = dir.path().join("full");
    let (status, body) = first.put("/snapshot/create", json!({"snapshot_path": full}));
    assert_eq!(status, 204, "{body}");
    assert_eq!(
        first.put("/actions", json!({"action_type": "Resume"})).0,
        204
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        first.put("/actions", json!({"action_type": "Pause"})).0,
        204
    );
    let diff = dir.path().join("diff");
    let (status, body) = first.put(
        "/snapshot/create",
        json!({"snapshot_path": diff, "snapshot_type": "Diff"}),
    );
    assert_eq!(status, 204, "{body}");
    assert!(diff.join("dirty").is_file());
    // Run to the end: the guest resets and the process exits.
    assert_eq!(
        first.put("/actions", json!({"action_type": "Resume"})).0,
        204
    );
    assert!(first.wait().success());
    assert_eq!(first.serial(), counter_output());

    // A second process restores the full snapshot and runs it to the end.
    let mut second = Vmm::start(dir.path(), "second");
    let (status, body) = second.put(
        "/snapshot/load",
        json!({"snapshot_path": full, "mem_backend": {"backend_type": "File"}, "resume_vm": true}),
    );
    assert_eq!(status, 204, "{body}");
    assert!(second.wait().success());
    assert_eq!(second.serial(), counter_output());
}

#[test]
fn bad_requests_get_4xx_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path(), "errors");
    let cases: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        ("GET", "/nothing", None, 404, "no resource"),
        ("DELETE", "/actions", None, 405, "PUT"),
        ("PUT", "/actions", Some("{"), 400, ""),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Jump"}"#),
            400,
            "Jump",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Pause"}"#),
            409,
            "not started",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            409,
            "boot-source",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":0,"mem_size_mib":64}"#),
            400,
            "vcpus is 0",
        ),
        ("PUT", "/boot-source", Some(r#"{}"#), 400, "exactly one"),
        (
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path":"/nonexistent"}"#),
            400,
            "vmstate",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path":"/tmp/x"}"#),
            409,
            "paused",
        ),
    ];
    for (method, path, body, want, words) in cases {
        let (status, answer) = vmm.call(method, path, body);
        assert_eq!(status, want, "{method} {path} {body:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(words), "{method} {path}: {message}");
    }
    assert_eq!(vmm.state(), "not_started");
    // Failed requests left it usable.
    if kvm_or_skip("vmm api after errors") {
        vmm.boot_program(env!("WRENN_GUEST_HELLO"));
        vmm.wait_serial("hello");
    }
}

#[test]
fn two_vcpus_run_under_their_filters_and_shutdown_ends_the_process() {
    if !kvm_or_skip("vmm api smp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), "smp");
    let config = json!({"vcpu_count": 2, "mem_size_mib": 16});
    assert_eq!(vmm.put("/machine-config", config).0, 204);
    vmm.boot_program(env!("WRENN_GUEST_SMP"));
    // The guest prints once both vCPUs have checked in; it then counts on
    // both until it is stopped.
    vmm.wait_serial("cpus 0000000000000003");
    let filters = |name: &str| {
        std::fs::read_dir(format!("/proc/{}/task", vmm.child.id()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).ok())
            .find(|s| s.lines().any(|l| l == format!("Name:\t{name}")))
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                    .map(|v| v.trim().to_owned())
            })
    };
    assert_eq!(filters("vcpu0").as_deref(), Some("2"));
    assert_eq!(filters("vcpu1").as_deref(), Some("2"));
    assert_eq!(
        filters("api").as_deref(),
        Some("2"),
        "the api thread adds its own filter"
    );
    assert_eq!(vmm.put("/actions", json!({"action_type": "Pause"})).0, 204);
    assert_eq!(vmm.state(), "paused");
    assert_eq!(filters("vcpu0"), None, "paused vCPUs leave no threads");
    assert_eq!(vmm.put("/actions", json!({"action_type": "Resume"})).0, 204);
    assert_eq!(vmm.state(), "running");
    let (status, body) = vmm.put("/actions", json!({"action_type": "Shutdown"}));
    assert_eq!(status, 204, "{body}");
    assert!(vmm.wait().success());
}

#[test]
fn sigterm_ends_the_vmm_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), "term");
    if kvm_or_skip("vmm sigterm with a running guest") {
        vmm.boot_program(env!("WRENN_GUEST_SMP"));
        vmm.wait_serial("cpus");
    }
    let pid = vmm.child.id() as i32;
    // SAFETY: kill has no memory arguments; the PID is our child's.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    assert!(vmm.wait().success(), "a stop signal is a clean end");
    assert!(!vmm.socket.exists(), "the API socket is removed");
}

#[test]
fn the_agents_client_reads_typed_phases_and_tells_an_older_vmm_by_its_error_code() {
    use vmm_api::{paths, Action, BootSource, MachineConfig, VmPhase};
    use wrenn_agent::runtime::vmm_api::{CallError, VmmApi};

    let dir = tempfile::tempdir().unwrap();
    let mut vmm = Vmm::start(dir.path(), "client");
    let api = VmmApi::new(&vmm.socket);
    let info = api.info().expect("GET /");
    assert_eq!(info.phase, VmPhase::NotStarted);
    // A resource this VMM does not have, as an older VMM answers a newer
    // agent.
    let err = api
        .put("/drives-v2/rootfs", &json!({}))
        .expect_err("no such resource");
    assert!(err.is_unknown_resource(), "{err}");
    let err = api.action(Action::Pause).expect_err("not started");
    assert!(
        matches!(&err, CallError::Refused { status: 409, code, .. } if code == "conflict"),
        "{err}"
    );
    assert!(!err.is_unknown_resource());
    if !kvm_or_skip("the agent's client starting a guest") {
        return;
    }
    let config = MachineConfig {
        vcpu_count: 1,
        mem_size_mib: 16,
        track_dirty_pages: false,
    };
    api.put(paths::MACHINE_CONFIG, &config).expect("config");
    let program = BootSource::Program {
        program_path: env!("WRENN_GUEST_SMP").into(),
    };
    api.put(paths::BOOT_SOURCE, &program).expect("boot source");
    api.action(Action::InstanceStart).expect("start");
    let info = api.info().expect("GET / while running");
    assert_eq!(
        (info.phase, info.vcpu_count, info.mem_size_mib),
        (VmPhase::Running, 1, 16)
    );
    api.action(Action::Shutdown).expect("shutdown");
    assert!(vmm.wait().success());
}
