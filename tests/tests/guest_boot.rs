//! Boots the real guest image (kernel, initramfs with wrenn-init, rootfs with
//! envd) under QEMU microvm, reaches envd over TCP through the guest's tap in
//! a network namespace, and runs Python in it.
//!
//! Needs root, QEMU and a built image (`make image`). Under `make test`
//! (`WRENN_E2E=1`) a missing image fails the test; elsewhere it is skipped
//! with a loud message.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::io::Write;
use std::time::{Duration, Instant};

use wrenn_tests::envd::{Envd, ENVD_PORT};
use wrenn_tests::guest::{hardware_kvm, image_or_skip, BootSpec, GuestImage, GuestVm};
use wrenn_tests::netns::GUEST_IP;

/// Boot watchdog: TCG boots in seconds; a hung boot must not hang the suite.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn boot_until_envd_ready(image: &GuestImage) -> (GuestVm, Duration) {
    let vm = GuestVm::boot(image, &BootSpec::default()).expect("boot guest");
    let ready = vm
        .netns()
        .run(|| Envd::new(GUEST_IP, ENVD_PORT).wait_healthy(BOOT_TIMEOUT));
    let elapsed = vm.uptime();
    assert!(
        ready,
        "envd did not answer within {BOOT_TIMEOUT:?}; console:\n{}",
        vm.console_tail(60)
    );
    (vm, elapsed)
}

#[test]
fn guest_boots_to_envd_and_runs_python() {
    let Some(image) = image_or_skip("guest boot test") else {
        return;
    };
    let (vm, ready_after) = boot_until_envd_ready(&image);
    // Written past the test harness's capture so that `make test` shows it.
    let _ = writeln!(
        std::io::stderr(),
        "guest boot-to-envd-ready: {:.2}s ({})",
        ready_after.as_secs_f64(),
        if hardware_kvm() { "KVM" } else { "TCG" }
    );

    let output = vm
        .netns()
        .run(|| Envd::new(GUEST_IP, ENVD_PORT).exec("python3", &["-c", "print(6*7)"]));
    let output = output.unwrap_or_else(|e| panic!("exec failed: {e}\n{}", vm.console_tail(40)));
    assert_eq!(output.stdout_text(), "42\n", "run: {output:?}");
    assert_eq!(output.exit_code, Some(0));

    // wrenn-init configured the guest as the command line asked.
    let facts = vm
        .netns()
        .run(|| {
            Envd::new(GUEST_IP, ENVD_PORT).exec(
                "/bin/sh",
                &[
                    "-c",
                    "hostname; ip -4 -o addr show dev eth0; ip route show default; \
                        cat /etc/resolv.conf; findmnt -n -o FSTYPE /; findmnt -n -o FSTYPE /tmp; \
                        findmnt -n -o FSTYPE /sys/fs/cgroup; cat /proc/1/comm",
                ],
            )
        })
        .expect("exec sh");
    let text = facts.stdout_text();
    for expected in [
        "wrenn\n",
        "169.254.0.21/30",
        "default via 169.254.0.22 dev eth0",
        "nameserver ",
        "ext4\n",
        "tmpfs\n",
        "cgroup2\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn guest_init_restarts_envd_and_powers_off_cleanly() {
    let Some(image) = image_or_skip("guest boot test") else {
        return;
    };
    let (mut vm, _) = boot_until_envd_ready(&image);

    // Kill envd from inside: wrenn-init must start it again.
    vm.netns().run(|| {
        let envd = Envd::new(GUEST_IP, ENVD_PORT);
        envd.spawn_background("/bin/sh", &["-c", "sleep 0.5; pkill -9 -x envd"])
            .expect("spawn killer");
        let gone_at = Instant::now() + Duration::from_secs(30);
        while envd.healthy() && Instant::now() < gone_at {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(Instant::now() < gone_at, "envd was never killed");
        assert!(
            envd.wait_healthy(Duration::from_secs(60)),
            "envd did not come back"
        );
    });
    assert!(
        vm.console().contains("envd exited"),
        "wrenn-init did not log envd's exit:\n{}",
        vm.console_tail(30)
    );

    // SIGTERM to PID 1 powers the guest off, and QEMU exits.
    vm.netns()
        .run(|| Envd::new(GUEST_IP, ENVD_PORT).spawn_background("/bin/kill", &["-TERM", "1"]))
        .expect("signal init");
    let status = vm.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some(),
        "QEMU still runs 60 s after SIGTERM to wrenn-init:\n{}",
        vm.console_tail(30)
    );
    assert!(
        vm.console().contains("reboot: Power down"),
        "{}",
        vm.console_tail(30)
    );
}
