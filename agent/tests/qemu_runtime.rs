//! The QEMU runtime boots the real guest image in a network namespace,
//! leaves a VM that is not the agent's child, finds it again by PID and QMP,
//! and stops it.
//!
//! Needs root, QEMU and the guest image (`make image`); under `make test`
//! (`WRENN_E2E=1`) a missing image fails, elsewhere the test is skipped.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use wrenn_agent::runtime::probe::probe_host;
use wrenn_agent::runtime::qemu::{QemuRuntime, CONSOLE_LOG};
use wrenn_agent::runtime::qmp::Qmp;
use wrenn_agent::runtime::{Runtime, VmHandle, VmSpec, VmState};
use wrenn_tests::envd::{Envd, ENVD_PORT};
use wrenn_tests::guest::{image_or_skip, GuestImage};
use wrenn_tests::netns::{NetNs, GUEST_IP};

fn parent_pid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split_whitespace()
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("ppid")
}

/// A VM spec for the test image in `netns`, with its folder under /tmp.
fn spec_for(image: &GuestImage, netns: &NetNs, name: &str) -> VmSpec {
    VmSpec {
        sandbox_id: format!("sb-{name}"),
        vcpus: 1,
        memory_mb: 512,
        kernel: image.kernel.clone(),
        initramfs: image.initramfs.clone(),
        base_rootfs: image.rootfs.clone(),
        base_format: wrenn_agent::runtime::DiskFormat::Raw,
        dir: std::env::temp_dir().join(format!("wrenn-{name}-{}", std::process::id())),
        netns: netns.name().to_owned(),
        extra_cmdline: String::new(),
    }
}

/// Stops the VM and removes its folder however the test ends.
struct Cleanup<'a> {
    runtime: &'a QemuRuntime,
    handle: VmHandle,
    dir: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.runtime.stop(&self.handle);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn qemu_vm_boots_detached_is_found_again_and_stops() {
    let Some(image) = image_or_skip("QEMU runtime test") else {
        return;
    };
    let netns = NetNs::with_tap().expect("netns");
    let spec = spec_for(&image, &netns, "runtimetest");
    let dir = spec.dir.clone();
    let runtime = QemuRuntime::find(probe_host().accel).expect("QEMU is installed (make deps)");
    let handle = runtime.boot(&spec).expect("boot");
    let _cleanup = Cleanup {
        runtime: &runtime,
        handle: handle.clone(),
        dir: dir.clone(),
    };

    assert_ne!(
        parent_pid(handle.pid),
        std::process::id(),
        "the VM must not be the agent's child"
    );
    let ready = netns.run(|| Envd::new(GUEST_IP, ENVD_PORT).wait_healthy(Duration::from_secs(180)));
    let console = std::fs::read_to_string(dir.join(CONSOLE_LOG)).unwrap_or_default();
    assert!(ready, "envd never answered; console:\n{console}");
    assert!(console.contains("Linux version"), "console log: {console}");

    assert_eq!(runtime.attach(&handle), VmState::Running);
    let stats = runtime.stats(&handle).expect("stats");
    assert!(stats.rss_bytes > 32 << 20, "{stats:?}");

    runtime.stop(&handle).expect("stop");
    assert_eq!(runtime.attach(&handle), VmState::Gone);
    runtime
        .stop(&handle)
        .expect("stopping a stopped VM succeeds");
}

/// Boots `spec` and waits for its envd; the VM is stopped when the returned
/// guard drops.
fn boot_ready<'a>(runtime: &'a QemuRuntime, spec: &VmSpec, netns: &NetNs) -> Cleanup<'a> {
    let handle = runtime.boot(spec).expect("boot");
    let cleanup = Cleanup {
        runtime,
        handle,
        dir: spec.dir.clone(),
    };
    let ready = netns.run(|| Envd::new(GUEST_IP, ENVD_PORT).wait_healthy(Duration::from_secs(180)));
    assert!(ready, "envd never answered");
    cleanup
}

#[test]
fn qemu_vm_paused_to_a_file_restores_with_memory_and_processes_intact() {
    let Some(image) = image_or_skip("QEMU pause/restore test") else {
        return;
    };
    let netns = NetNs::with_tap().expect("netns");
    let spec = spec_for(&image, &netns, "pausetest");
    let dir = spec.dir.clone();
    let runtime = QemuRuntime::find(probe_host().accel).expect("QEMU is installed (make deps)");
    let mut cleanup = boot_ready(&runtime, &spec, &netns);
    let handle = cleanup.handle.clone();
    let envd = || Envd::new(GUEST_IP, ENVD_PORT);
    netns.run(|| {
        let out = envd()
            .exec(
                "/bin/sh",
                &[
                    "-c",
                    "head -c 16000000 /dev/urandom > /tmp/blob; sha256sum /tmp/blob",
                ],
            )
            .expect("write blob");
        assert_eq!(out.exit_code, Some(0));
        envd()
            .spawn_background("sleep", &["1000"])
            .expect("background sleep");
        out.stdout_text()
    });
    let before = netns
        .run(|| envd().exec("sha256sum", &["/tmp/blob"]))
        .expect("hash")
        .stdout_text();

    let state = dir.join("vmstate");
    runtime.pause_to(&handle, &state).expect("pause");
    assert_eq!(
        runtime.attach(&handle),
        VmState::Gone,
        "QEMU must be gone after a pause"
    );
    assert!(state.is_file());

    let restored = runtime.restore(&spec, &state).expect("restore");
    cleanup.handle = restored.clone();
    assert!(netns.run(|| envd().wait_healthy(Duration::from_secs(60))));
    let after = netns
        .run(|| envd().exec("sha256sum", &["/tmp/blob"]))
        .expect("hash after")
        .stdout_text();
    assert_eq!(before, after, "tmpfs content changed across pause/restore");
    let ps = netns
        .run(|| envd().exec("pgrep", &["-x", "sleep"]))
        .expect("pgrep");
    assert_eq!(
        ps.exit_code,
        Some(0),
        "the background sleep did not survive"
    );
}

#[test]
fn a_pause_cut_short_after_the_state_was_saved_can_be_finished() {
    let Some(image) = image_or_skip("QEMU interrupted pause test") else {
        return;
    };
    let netns = NetNs::with_tap().expect("netns");
    let spec = spec_for(&image, &netns, "cutpause");
    let dir = spec.dir.clone();
    let runtime = QemuRuntime::find(probe_host().accel).expect("QEMU is installed (make deps)");
    let mut cleanup = boot_ready(&runtime, &spec, &netns);
    let handle = cleanup.handle.clone();
    let envd = || Envd::new(GUEST_IP, ENVD_PORT);

    // What a pause does up to the moment the agent was killed: the state is
    // saved to the temporary name and QEMU waits in "postmigrate".
    let state = dir.join("vmstate");
    let partial = state.with_extension("partial");
    let mut qmp = Qmp::connect(&handle.control_socket).expect("qmp");
    qmp.execute("stop", Value::Null).expect("stop");
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )
    .expect("caps");
    let uri = format!("exec:cat > '{}'", partial.display());
    qmp.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    while qmp.status().expect("status") != "postmigrate" {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(qmp);

    runtime.pause_to(&handle, &state).expect("finish the pause");
    assert!(state.is_file() && !partial.exists());
    assert_eq!(runtime.attach(&handle), VmState::Gone);
    let restored = runtime.restore(&spec, &state).expect("restore");
    cleanup.handle = restored;
    assert!(netns.run(|| envd().wait_healthy(Duration::from_secs(60))));
}
