//! Machines with more than one vCPU: every vCPU runs on its own thread,
//! sees its own APIC ID, and is paused, saved and restored with the rest.
//! The `smp` guest (vmm/guests/smp.s) counts on every vCPU.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, Console};
use vm_memory::{Bytes, GuestAddress};
use wrenn_vmm::{Exit, Machine, MachineConfig, MemoryFrom};

const MASK: u64 = 0x20_0000;
const THRESHOLD: u64 = 0x20_0010;
const TICKS: u64 = 0x20_0040;

fn program() -> Vec<u8> {
    std::fs::read(env!("WRENN_GUEST_SMP")).unwrap()
}

fn config(vcpus: u8) -> MachineConfig {
    MachineConfig {
        vcpus,
        memory_mb: 16,
        track_dirty_pages: false,
    }
}

fn ticks(machine: &Machine, vcpus: u8) -> Vec<u64> {
    (0..u64::from(vcpus))
        .map(|i| {
            machine
                .memory()
                .read_obj(GuestAddress(TICKS + 8 * i))
                .unwrap()
        })
        .collect()
}

#[test]
fn every_vcpu_runs_and_sees_its_own_apic_id() {
    if !kvm_or_skip("smp") {
        return;
    }
    for vcpus in [1u8, 2, 4] {
        let console = Console::default();
        let mut machine = Machine::new(config(vcpus), Box::new(console.clone())).unwrap();
        machine.load_program(&program()).unwrap();
        machine
            .memory()
            .write_obj(1000u64, GuestAddress(THRESHOLD))
            .unwrap();
        assert_eq!(machine.run().unwrap(), Exit::Reset, "{vcpus} vCPUs");
        let mask = (1u64 << vcpus) - 1;
        assert_eq!(console.text(), format!("cpus {mask:016x}\nok\n"));
        let counted = ticks(&machine, vcpus);
        assert!(
            counted[1..].iter().all(|&t| t >= 1000),
            "every AP counted to the threshold: {counted:?}"
        );
    }
}

/// Runs `machine` until `until` holds of its tick counters, then stops it.
fn run_until_ticks(
    machine: &mut Machine,
    vcpus: u8,
    until: impl Fn(&[u64]) -> bool + Send + 'static,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let memory = machine.memory().clone();
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let started = Instant::now();
            loop {
                let counted: Vec<u64> = (0..u64::from(vcpus))
                    .map(|i| memory.read_obj(GuestAddress(TICKS + 8 * i)).unwrap())
                    .collect();
                if until(&counted) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Release);
        })
    };
    let exit = machine.run_until(&stop).unwrap();
    watcher.join().unwrap();
    assert_eq!(exit, Exit::Paused);
}

#[test]
fn a_paused_two_vcpu_machine_is_saved_and_both_vcpus_run_on_after_restore() {
    if !kvm_or_skip("smp snapshot") {
        return;
    }
    let console = Console::default();
    let mut machine = Machine::new(config(2), Box::new(console.clone())).unwrap();
    machine.load_program(&program()).unwrap();
    // Threshold 0: the guest counts until it is stopped.
    run_until_ticks(&mut machine, 2, |t| t.iter().all(|&c| c >= 1000));
    assert_eq!(console.text(), "cpus 0000000000000003\n");
    let saved = ticks(&machine, 2);
    let mask: u64 = machine.memory().read_obj(GuestAddress(MASK)).unwrap();
    assert_eq!(mask, 3);

    let dir = tempfile::tempdir().unwrap();
    machine.save(dir.path()).unwrap();
    drop(machine);

    let restored_console = Console::default();
    let mut restored = Machine::restore(
        dir.path(),
        MemoryFrom::File,
        Box::new(restored_console.clone()),
    )
    .unwrap();
    assert_eq!(ticks(&restored, 2), saved, "the counts are those saved");
    let target: Vec<u64> = saved.iter().map(|c| c + 1000).collect();
    run_until_ticks(&mut restored, 2, move |t| {
        t.iter().zip(&target).all(|(now, want)| now >= want)
    });
    let after = ticks(&restored, 2);
    assert!(
        after.iter().zip(&saved).all(|(a, s)| a >= &(s + 1000)),
        "both vCPUs counted on after the restore: {saved:?} -> {after:?}"
    );
    // Nothing printed again: the bootstrap processor went on where it was.
    assert_eq!(restored_console.text(), "");
}
