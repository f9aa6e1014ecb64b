//! The committed snapshots of `tests/fixtures/` (README.md there): every
//! state version this VMM reads must still restore. Each is the `counter`
//! guest (vmm/guests/counter.s) stopped early in its run, on one vCPU
//! with 16 MiB; restored, it must print exactly what an uninterrupted run
//! prints. Needs /dev/kvm for the restores; says so and passes without.
//!
//! The memory of a fixture is kept packed (`memory.pages`: per non-zero
//! page, its index as a little-endian u64, then its 4096 bytes) and
//! unpacked into a sparse `memory` file before a restore.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{counter_output, kvm_or_skip, Console};
use wrenn_vmm::snapshot::{self, FileVersion, StateVersion, STATE_VERSION};
use wrenn_vmm::{Exit, Machine, MachineConfig, MemoryFrom};

const PAGE: usize = 4096;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A snapshot folder made from the fixture folder `name`.
fn unpack(name: &str) -> tempfile::TempDir {
    let from = fixture(name);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let state = std::fs::read(from.join("vmstate")).expect("the fixture's vmstate");
    let (decoded, _) =
        snapshot::format::decode(&from.join("vmstate"), &state).expect("the fixture decodes");
    std::fs::write(dir.path().join("vmstate"), &state).expect("vmstate copied");
    let memory = File::create(dir.path().join("memory")).expect("memory file");
    memory
        .set_len(u64::from(decoded.machine.memory_mb) << 20)
        .expect("memory sized");
    let packed = std::fs::read(from.join("memory.pages")).expect("the fixture's memory");
    for entry in packed.chunks(8 + PAGE) {
        assert_eq!(entry.len(), 8 + PAGE, "memory.pages is damaged");
        let index = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        memory
            .write_all_at(&entry[8..], index * PAGE as u64)
            .expect("page written");
    }
    dir
}

/// Restores the fixture `name` both ways and checks the counter finishes
/// exactly.
fn restores_and_counts_on(name: &str) {
    for from in [MemoryFrom::File, MemoryFrom::Copy] {
        let dir = unpack(name);
        let console = Console::default();
        let mut machine =
            Machine::restore(dir.path(), from, Box::new(console.clone())).expect("restores");
        assert_eq!(machine.run().expect("runs"), Exit::Reset, "{name} {from:?}");
        assert_eq!(
            console.text(),
            counter_output(),
            "{name} restored ({from:?})"
        );
    }
}

#[test]
fn the_format_4_counter_fixture_is_read_as_format_4() {
    let path = fixture("counter-format4/vmstate");
    assert_eq!(
        snapshot::probe(&path).expect("readable"),
        FileVersion::Legacy(4)
    );
}

#[test]
fn the_format_4_counter_fixture_restores_and_counts_on_exactly() {
    if !kvm_or_skip("format-4 fixture") {
        return;
    }
    restores_and_counts_on("counter-format4");
}

#[test]
fn the_1_0_counter_fixture_restores_and_counts_on_exactly() {
    let path = fixture("counter-1.0/vmstate");
    assert_eq!(
        snapshot::probe(&path).expect("readable"),
        FileVersion::Versioned(StateVersion { major: 1, minor: 0 })
    );
    if !kvm_or_skip("1.0 fixture") {
        return;
    }
    restores_and_counts_on("counter-1.0");
}

#[test]
fn a_new_snapshot_carries_the_header_of_this_version() {
    if !kvm_or_skip("snapshot header") {
        return;
    }
    let (machine, _) = counter_stopped_after(Duration::from_millis(10));
    let dir = tempfile::tempdir().expect("a temporary folder");
    machine.save(dir.path()).expect("saved");
    let path = dir.path().join("vmstate");
    let bytes = std::fs::read(&path).expect("vmstate");
    assert_eq!(&bytes[..8], &snapshot::MAGIC);
    assert_eq!(
        snapshot::read_version(&path).expect("a version"),
        FileVersion::Versioned(STATE_VERSION)
    );
}

#[test]
fn a_snapshot_of_a_newer_version_is_refused_naming_both_versions() {
    if !kvm_or_skip("newer snapshot") {
        return;
    }
    let (machine, _) = counter_stopped_after(Duration::from_millis(10));
    let dir = tempfile::tempdir().expect("a temporary folder");
    machine.save(dir.path()).expect("saved");
    drop(machine);
    // The same file as a VMM of state 1.1 would write it (a minor adds
    // after the body, which this VMM would not know how to read).
    let path = dir.path().join("vmstate");
    let mut bytes = std::fs::read(&path).expect("vmstate");
    bytes[10..12].copy_from_slice(&1u16.to_le_bytes());
    let body = bytes.len() - 4;
    let crc = crc32c::crc32c(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).expect("rewritten");
    let err = Machine::restore(dir.path(), MemoryFrom::File, Box::new(std::io::sink()))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("VM state 1.1") && err.contains("writes 1.0"),
        "{err}"
    );
    assert!(err.contains("resume it with a wrenn-vmm >="), "{err}");
}

/// The counter on 1 vCPU and 16 MiB, stopped about `after` into its run;
/// with the count it reached (from its ring).
fn counter_stopped_after(after: Duration) -> (Machine, u64) {
    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 16,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(std::io::sink())).expect("a machine");
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_COUNTER")).expect("the counter"))
        .expect("loaded");
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(after);
            stop.store(true, Ordering::Release);
        })
    };
    assert_eq!(machine.run_until(&stop).expect("runs"), Exit::Paused);
    stopper.join().expect("stopper");
    use vm_memory::{Bytes, GuestAddress};
    let count = (0..65536u64)
        .map(|i| {
            let word: u64 = machine
                .memory()
                .read_obj(GuestAddress(0x30_0000 + 8 * i))
                .expect("ring word");
            word ^ 0x9e37_79b9_7f4a_7c15
        })
        .filter(|c| *c <= common::COUNTER_TARGET)
        .max()
        .unwrap_or(0);
    (machine, count)
}

/// Writes `tests/fixtures/counter-<STATE_VERSION>/`; refuses to replace a
/// committed one. Run once when a state version is added:
/// `cargo test --release -p wrenn-vmm --test state_fixtures -- --ignored`.
#[test]
#[ignore]
fn write_counter_fixture() {
    let out = fixture(&format!("counter-{STATE_VERSION}"));
    assert!(
        !out.exists(),
        "{} is committed: a fixture is never regenerated, only added",
        out.display()
    );
    let (machine, count) = counter_stopped_after(Duration::from_millis(30));
    assert!(
        count > 0 && count < common::COUNTER_TARGET,
        "stopped at {count}"
    );
    let dir = tempfile::tempdir().expect("a temporary folder");
    machine.save(dir.path()).expect("saved");
    std::fs::create_dir_all(&out).expect("fixture folder");
    std::fs::copy(dir.path().join("vmstate"), out.join("vmstate")).expect("vmstate");
    let memory = std::fs::read(dir.path().join("memory")).expect("memory");
    let mut packed = Vec::new();
    for (index, page) in memory.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            packed.extend_from_slice(&(index as u64).to_le_bytes());
            packed.extend_from_slice(page);
        }
    }
    std::fs::write(out.join("memory.pages"), packed).expect("memory.pages");
    eprintln!("wrote {} (count {count})", out.display());
}

#[test]
fn the_binary_prints_the_state_version_it_writes_and_reads() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn-vmm"))
        .arg("--state-version")
        .output()
        .expect("wrenn-vmm runs");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        text.trim(),
        format!("writes VM state {STATE_VERSION}; reads 1.0 to {STATE_VERSION} and format 4 (before versioned headers)")
    );
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn-vmm"))
        .args(["--state-version", "--json"])
        .output()
        .expect("wrenn-vmm runs");
    let support: vmm_api::state::StateSupport =
        serde_json::from_slice(&json.stdout).expect("--json prints a StateSupport");
    assert_eq!(support.writes, STATE_VERSION);
    assert_eq!(support.legacy_format, 4);
}

#[test]
fn the_version_this_vmm_writes_has_its_committed_fixtures() {
    // A new state version: run the generators of README.md and commit
    // what they write; keep every older fixture.
    for name in [
        format!("sample-{STATE_VERSION}.vmstate"),
        format!("counter-{STATE_VERSION}/vmstate"),
        format!("counter-{STATE_VERSION}/memory.pages"),
        "sample-format4.vmstate".to_owned(),
        "counter-format4/vmstate".to_owned(),
        "counter-format4/memory.pages".to_owned(),
    ] {
        assert!(fixture(&name).is_file(), "tests/fixtures/{name} is missing");
    }
}
