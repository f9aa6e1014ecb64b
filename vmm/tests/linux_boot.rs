//! Linux early boot on wrenn-vmm: the guest image's kernel runs far enough
//! to print its banner on the serial port, and to read the VMM's ACPI
//! tables. Under this machine's PVM KVM a full boot is out of reach (ring-0
//! code is emulated), so the tests stop there; with hardware KVM they take
//! milliseconds.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::Console;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The kernel arguments of these tests: early output on the serial port,
/// no XSAVE (PVM cannot emulate `xrstor`), and a fixed TSC and delay loop
/// (no calibration, which hangs under load).
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave \
                       tsc_early_khz=2000000 lpj=8000000 panic=-1 reboot=k";

/// One guest at a time: each keeps a host core busy, and two at once would
/// each take twice as long to reach what they wait for.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// What a bounded boot printed and how it ended.
struct Boot {
    output: String,
    waited: Duration,
    exit: wrenn_vmm::Result<Exit>,
}

/// Boots the image's kernel on `vcpus` vCPUs and `memory_mb` until `done` holds for the
/// serial output or `limit` passes; `None` (said loudly) without a guest
/// image or KVM.
fn boot_until(
    test: &str,
    vcpus: u8,
    memory_mb: u32,
    limit: Duration,
    done: impl Fn(&str) -> bool + Send + 'static,
) -> Option<Boot> {
    let Some(kernel) = kernel() else {
        eprintln!("SKIPPED {test}: no guest image (run `make image`)");
        return None;
    };
    if !common::kvm_or_skip(test) {
        return None;
    }
    let _one = ONE_GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let console = Console::default();
    let config = MachineConfig {
        vcpus,
        memory_mb,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(console.clone())).unwrap();
    machine.load_linux(&kernel, None, CMDLINE).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, console) = (Arc::clone(&stop), console.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < limit && !done(&console.text()) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Release);
            started.elapsed()
        })
    };
    let exit = machine.run_until(&stop);
    stop.store(true, Ordering::Release);
    let waited = watcher.join().unwrap();
    Some(Boot {
        output: console.text(),
        waited,
        exit,
    })
}

#[test]
fn the_debian_kernel_prints_its_banner() {
    let Some(boot) = boot_until(
        "linux early boot",
        1,
        256,
        Duration::from_secs(240),
        |output| output.contains("Linux version"),
    ) else {
        return;
    };
    let Boot {
        output,
        waited,
        exit,
    } = boot;
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

/// Lines Linux prints as it reads the VMM's ACPI tables (after 25-30 s
/// here, 50-60 s while other builds load the host; the test gives up at
/// 90 s): the e820 entry that keeps them out of RAM, each table where the
/// RSDP leads, then what it took from the MADT: the NMI on LINT1, the
/// IOAPIC, and one CPU per local APIC.
const ACPI_LINES: [&str; 10] = [
    "BIOS-e820: [mem 0x00000000000e0000-0x00000000000e0fff] ACPI data",
    "ACPI: RSDP 0x00000000000E0000 000024 (v02 WRENN )",
    "ACPI: XSDT 0x",
    "ACPI: FACP 0x",
    "ACPI: DSDT 0x",
    "ACPI: APIC 0x",
    "ACPI: LAPIC_NMI (acpi_id[0xff] high edge lint[0x1])",
    "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
    "ACPI: Using ACPI (MADT) for SMP configuration information",
    "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
];

/// Little memory: the kernel initialises a `struct page` per page (emulated
/// here) before it reads the MADT.
const MEMORY_MB_ACPI: u32 = 64;

#[test]
fn linux_finds_the_acpi_tables_of_a_two_vcpu_machine() {
    let Some(boot) = boot_until(
        "linux ACPI tables",
        2,
        MEMORY_MB_ACPI,
        Duration::from_secs(90),
        |output| ACPI_LINES.iter().all(|line| output.contains(line)),
    ) else {
        return;
    };
    let Boot {
        output,
        waited,
        exit,
    } = boot;
    for line in ACPI_LINES {
        assert!(
            output.contains(line),
            "no {line:?} after {waited:?} (exit {exit:?}); serial:\n{output}"
        );
    }
    let complaints = ["ACPI Error", "ACPI BIOS Error", "ACPI Warning", "checksum"];
    let bad: Vec<_> = output
        .lines()
        .filter(|l| {
            complaints.iter().any(|c| l.contains(c)) && !l.contains("verification disabled")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "Linux complained about the tables: {bad:#?}"
    );
    eprintln!("ACPI tables read after {waited:?}:");
    for line in output
        .lines()
        .filter(|l| ["ACPI", "IOAPIC", "smpboot"].iter().any(|w| l.contains(w)))
    {
        eprintln!("  {line}");
    }
    if let Ok(exit) = exit {
        assert!(matches!(exit, Exit::Paused), "{exit:?}");
    }
}
