//! Snapshot and restore of a guest stopped mid-run: the `counter` program
//! (vmm/guests/counter.s) must print after a restore exactly what an
//! uninterrupted run prints. Needs /dev/kvm; says so and passes without.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{counter_output, kvm_or_skip, Console, COUNTER_TARGET};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use wrenn_vmm::{Exit, Machine, MachineConfig, MemoryFrom};

const CONFIG: MachineConfig = MachineConfig {
    vcpus: 1,
    memory_mb: 16,
    track_dirty_pages: true,
};

fn program() -> Vec<u8> {
    std::fs::read(env!("WRENN_GUEST_COUNTER")).unwrap()
}

/// Runs the counter until it is stopped about `after` into its run.
fn stopped_midway(after: Duration) -> (Machine, u64) {
    let mut machine = Machine::new(CONFIG, Box::new(std::io::sink())).unwrap();
    machine.load_program(&program()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(after);
            stop.store(true, Ordering::Release);
        })
    };
    let exit = machine.run_until(&stop).unwrap();
    stopper.join().unwrap();
    assert_eq!(
        exit,
        Exit::Paused,
        "the counter finished before it was stopped"
    );
    // The last count the guest stored in its ring is the newest value.
    let count = (0..65536u64)
        .map(|i| {
            let word: u64 = machine
                .memory()
                .read_obj(GuestAddress(0x30_0000 + 8 * i))
                .unwrap();
            word ^ 0x9e37_79b9_7f4a_7c15
        })
        .filter(|c| *c <= COUNTER_TARGET)
        .max()
        .unwrap();
    (machine, count)
}

#[test]
fn a_counter_stopped_saved_and_restored_continues_exactly() {
    if !kvm_or_skip("snapshot counter") {
        return;
    }
    for from in [MemoryFrom::File, MemoryFrom::Copy] {
        let (machine, count) = stopped_midway(Duration::from_millis(300));
        assert!(count > 0 && count < COUNTER_TARGET, "stopped at {count}");
        let dir = tempfile::tempdir().unwrap();
        machine.save(dir.path()).unwrap();
        drop(machine);

        let console = Console::default();
        let mut restored = Machine::restore(dir.path(), from, Box::new(console.clone())).unwrap();
        assert_eq!(restored.run().unwrap(), Exit::Reset, "{from:?}");
        assert_eq!(
            console.text(),
            counter_output(),
            "restored ({from:?}) from count {count}"
        );
    }
}

#[test]
fn a_damaged_or_missing_snapshot_is_an_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = Machine::restore(dir.path(), MemoryFrom::File, Box::new(std::io::sink()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vmstate"), "{err}");
    std::fs::write(dir.path().join("vmstate"), b"\x01garbage-state").unwrap();
    let err = Machine::restore(dir.path(), MemoryFrom::File, Box::new(std::io::sink()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("damaged"), "{err}");
}

#[test]
fn a_full_then_a_diff_snapshot_restore_to_the_later_point() {
    if !kvm_or_skip("diff snapshot") {
        return;
    }
    let (mut machine, first) = stopped_midway(Duration::from_millis(200));
    let full = tempfile::tempdir().unwrap();
    machine.save(full.path()).unwrap();

    // Run on a little, stop again, save only what changed.
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            stop.store(true, Ordering::Release);
        })
    };
    assert_eq!(machine.run_until(&stop).unwrap(), Exit::Paused);
    stopper.join().unwrap();
    let diff = tempfile::tempdir().unwrap();
    let pages = machine.save_diff(diff.path()).unwrap();
    drop(machine);
    // The counter writes its ring (128 pages) and its stack; far less than
    // the 4096 pages of memory.
    assert!(
        !pages.is_empty() && pages.len() < 1024,
        "{} dirty pages",
        pages.len()
    );
    let written = std::fs::metadata(diff.path().join("memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(written.blocks() * 512 <= (pages.len() as u64 + 16) * 4096);

    let console = Console::default();
    let mut restored =
        Machine::restore_chain(&[full.path(), diff.path()], Box::new(console.clone())).unwrap();
    assert_eq!(restored.run().unwrap(), Exit::Reset);
    assert_eq!(
        console.text(),
        counter_output(),
        "from count {first} and a diff"
    );
}

#[test]
fn a_full_snapshot_holds_every_written_page_and_nothing_else() {
    if !kvm_or_skip("snapshot contents") {
        return;
    }
    // Pages the process never touched are skipped without being read;
    // every page written (here by the host, at scattered places, including
    // the first and last) must still be in the file, byte for byte.
    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 64,
        track_dirty_pages: false,
    };
    let machine = Machine::new(config, Box::new(std::io::sink())).unwrap();
    let size = 64u64 << 20;
    let written: Vec<u64> = (0..40u64)
        .map(|i| (i * 0x19_3000 + 0x40) % (size - 8))
        .chain([0, size - 8])
        .collect();
    for (i, &addr) in written.iter().enumerate() {
        let word = 0x5a5a_0000_0000_0000u64 | (i as u64 + 1);
        machine
            .memory()
            .write_obj(word, GuestAddress(addr))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    machine.save(dir.path()).unwrap();
    let file = std::fs::read(dir.path().join("memory")).unwrap();
    assert_eq!(file.len() as u64, size);
    let mut expected = vec![0u8; size as usize];
    machine
        .memory()
        .read_slice(&mut expected, GuestAddress(0))
        .unwrap();
    assert!(
        file == expected,
        "the memory file differs from guest memory"
    );
    let nonzero = file.iter().filter(|&&b| b != 0).count();
    assert!(nonzero >= written.len() * 2, "{nonzero} non-zero bytes");
}
