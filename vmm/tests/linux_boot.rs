//! Linux early boot on wrenn-vmm: the guest image's kernel runs
//! far enough to print its banner on the serial port. Under this machine's
//! PVM KVM a full boot is out of reach (ring-0 code is emulated), so the
//! test stops at the banner; with hardware KVM it takes milliseconds.

mod common;

use common::Console;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wrenn_vmm::{Exit, Machine, MachineConfig};

/// The base image's kernel as `make image` builds it: the ELF `vmlinux`
/// (no decompressor to run: ~20 s to the banner here), else the bzImage
/// (~150 s). `WRENN_VMM_KERNEL` names another.
fn kernel() -> Option<PathBuf> {
    if let Some(kernel) = std::env::var_os("WRENN_VMM_KERNEL") {
        return Some(PathBuf::from(kernel));
    }
    let dir = std::env::var_os("WRENN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/wrenn/images/base"));
    ["vmlinux", "vmlinuz"]
        .iter()
        .map(|name| dir.join(name))
        .find(|kernel| kernel.is_file())
}

#[test]
fn the_debian_kernel_prints_its_banner() {
    let Some(kernel) = kernel() else {
        eprintln!("SKIPPED linux early boot: no guest image (run `make image`)");
        return;
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED linux early boot: no /dev/kvm on this host");
        return;
    }
    let console = Console::default();
    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 256,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(console.clone())).unwrap();
    machine
        .load_linux(
            &kernel,
            None,
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave tsc_early_khz=2000000 \
             lpj=8000000 panic=-1 reboot=k",
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, console) = (Arc::clone(&stop), console.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(240)
                && !console.text().contains("Linux version")
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Release);
            started.elapsed()
        })
    };
    let exit = machine.run_until(&stop);
    stop.store(true, Ordering::Release);
    let waited = watcher.join().unwrap();
    let output = console.text();
    assert!(
        output.contains("Linux version"),
        "no banner after {waited:?} (exit {exit:?}); serial:\n{output}"
    );
    eprintln!(
        "banner after {waited:?}: {}",
        output
            .lines()
            .find(|l| l.contains("Linux version"))
            .unwrap_or("")
    );
    if let Ok(exit) = exit {
        assert!(matches!(exit, Exit::Paused | Exit::Reset), "{exit:?}");
    }
}
