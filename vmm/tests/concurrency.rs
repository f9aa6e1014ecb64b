//! Concurrent requests to one real `wrenn-vmm` process: the VM's owner
//! runs one action at a time, so of many `InstanceStart` and
//! `snapshot/load` calls racing on a fresh VMM exactly one builds a VM and
//! every other one is refused with 409, and no stray vCPU thread is left
//! running. Needs /dev/kvm.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{kvm_or_skip, Vmm};
use serde_json::json;

/// The names of the process's vCPU threads (`vcpu0`, `vcpu1`, ...).
fn vcpu_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the VMM's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("vcpu") && name[4..].parse::<u32>().is_ok())
        .collect();
    names.sort();
    names
}

/// A paused two-vCPU `smp` guest saved into `dir/snapshot`.
fn smp_snapshot(dir: &std::path::Path) -> std::path::PathBuf {
    let mut vmm = Vmm::start(dir, "source");
    let config = json!({"vcpu_count": 2, "mem_size_mib": 16});
    assert_eq!(vmm.put("/machine-config", config).0, 204);
    vmm.boot_program(env!("WRENN_GUEST_SMP"));
    vmm.wait_serial("cpus 0000000000000003");
    let (status, body) = vmm.put("/actions", json!({"action_type": "Pause"}));
    assert_eq!(status, 204, "{body}");
    let snapshot = dir.join("snapshot");
    let (status, body) = vmm.put("/snapshot/create", json!({"snapshot_path": snapshot}));
    assert_eq!(status, 204, "{body}");
    let (status, body) = vmm.put("/actions", json!({"action_type": "Shutdown"}));
    assert_eq!(status, 204, "{body}");
    assert!(vmm.wait().success());
    snapshot
}

#[test]
fn of_twenty_concurrent_starts_and_loads_exactly_one_builds_a_vm() {
    if !kvm_or_skip("concurrent InstanceStart and snapshot/load") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = smp_snapshot(dir.path());

    let vmm = Arc::new(Vmm::start(dir.path(), "raced"));
    let config = json!({"vcpu_count": 2, "mem_size_mib": 16});
    assert_eq!(vmm.put("/machine-config", config).0, 204);
    let program = json!({"program_path": env!("WRENN_GUEST_SMP")});
    assert_eq!(vmm.put("/boot-source", program).0, 204);

    const CALLS: usize = 20;
    let barrier = Arc::new(Barrier::new(CALLS));
    let callers: Vec<_> = (0..CALLS)
        .map(|i| {
            let (vmm, barrier) = (Arc::clone(&vmm), Arc::clone(&barrier));
            let (path, body) = if i % 2 == 0 {
                ("/actions", json!({"action_type": "InstanceStart"}))
            } else {
                (
                    "/snapshot/load",
                    json!({"snapshot_path": snapshot, "resume_vm": true}),
                )
            };
            std::thread::spawn(move || {
                barrier.wait();
                let (status, answer) = vmm.put(path, body);
                (path, status, answer)
            })
        })
        .collect();
    let answers: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();

    let won: Vec<_> = answers.iter().filter(|(_, s, _)| *s == 204).collect();
    assert_eq!(won.len(), 1, "exactly one call builds the VM: {answers:?}");
    for (path, status, answer) in answers.iter().filter(|(_, s, _)| *s != 204) {
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(*status, 409, "{path}: {answer}");
        assert!(
            message.contains("the VM is running"),
            "{path}: a refusal says why: {message}"
        );
    }
    assert_eq!(vmm.state(), "running");

    // The guest runs on both vCPUs, each on one thread, and no other vCPU
    // thread was left behind by a losing call.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vcpu_threads(vmm.child.id()).len() < 2 {
        assert!(Instant::now() < deadline, "the vCPU threads did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vcpu_threads(vmm.child.id()), ["vcpu0", "vcpu1"]);

    let (status, body) = vmm.put("/actions", json!({"action_type": "Shutdown"}));
    assert_eq!(status, 204, "{body}");
    let mut vmm = Arc::into_inner(vmm).expect("every caller has finished");
    assert!(vmm.wait().success());
}
