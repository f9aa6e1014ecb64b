//! A snapshot restored through userfaultfd from the agent's layer store:
//! the counter guest is stopped midway and saved, its memory file becomes a
//! layer-store header, and a new VM's memory is placed page by page by the
//! agent's page server. The counter must finish exactly as an
//! uninterrupted run does, also when a second restore of the snapshot
//! prefetches what the first one faulted on. Needs /dev/kvm and
//! userfaultfd.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{counter_output, kvm_or_skip, Console};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::path::{Path, PathBuf};

use wrenn_agent::store::{Header, LayerStore, MEMORY_BLOCK_SIZE};
use wrenn_agent::uffd::{accept, accept_with_prefetch, load_prefetch, Options, PageServer, Stats};
use wrenn_vmm::{Exit, Machine, MachineConfig};

/// A counter guest stopped midway and saved in `dir`, its memory moved
/// into a layer store in `dir/state`: the snapshot folder (without its
/// memory file), the store and the memory's header.
fn saved_counter(dir: &Path) -> (PathBuf, Arc<LayerStore>, Header) {
    // Stop the counter midway and save it.
    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 16,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(std::io::sink())).unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_COUNTER")).unwrap())
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Release);
        })
    };
    assert_eq!(machine.run_until(&stop).unwrap(), Exit::Paused);
    stopper.join().unwrap();
    let snapshot = dir.join("snapshot");
    machine.save(&snapshot).unwrap();
    drop(machine);

    // Its memory into the layer store.
    let state_dir = dir.join("state");
    let db = lmdb_schema::Store::open(&state_dir, lmdb_schema::StoreOptions::new()).unwrap();
    let layers = Arc::new(LayerStore::open(&state_dir, Arc::new(db)).unwrap());
    let header = layers
        .snapshot_file(&snapshot.join("memory"), MEMORY_BLOCK_SIZE, None, None)
        .unwrap();
    assert!(header.stored_blocks() > 0);
    // The snapshot's memory file goes: every page must come from the layers.
    std::fs::remove_file(snapshot.join("memory")).unwrap();
    (snapshot, layers, header)
}

/// Restores `snapshot` with its memory from a page server that `serve`
/// starts on the VMM's connection, runs the guest to its end and checks
/// that it counted exactly; returns the server's counters at the end.
fn restore_and_finish(
    snapshot: &Path,
    socket: &Path,
    serve: impl FnOnce(UnixStream) -> PageServer + Send + 'static,
) -> Stats {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream)
    });
    let console = Console::default();
    let mut restored =
        Machine::restore_served(snapshot, socket, Box::new(console.clone())).unwrap();
    let server = server.join().unwrap();
    assert_eq!(restored.run().unwrap(), Exit::Reset);
    assert_eq!(console.text(), counter_output());
    let stats = server.stats();
    drop(restored);
    // Ending the server saves the prefetch list when it keeps one.
    drop(server);
    stats
}

#[test]
fn a_snapshot_restored_through_the_page_server_continues_exactly() {
    if !kvm_or_skip("uffd restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, layers, header) = saved_counter(dir.path());
    // One page per fault: every fault places exactly one page.
    let stats = restore_and_finish(&snapshot, &dir.path().join("pages.sock"), move |stream| {
        let options = Options {
            fault_around: 1,
            ..Options::default()
        };
        accept(stream, header, layers, &options).unwrap()
    });
    eprintln!("page server: {stats:?}");
    assert!(stats.copied_pages > 0 && stats.zero_pages > 0, "{stats:?}");
    assert_eq!(
        stats.faults,
        stats.copied_pages + stats.zero_pages,
        "{stats:?}"
    );
}

#[test]
fn a_second_restore_prefetches_the_first_ones_faults_and_faults_less() {
    if !kvm_or_skip("uffd prefetch restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, layers, header) = saved_counter(dir.path());
    let state_dir = dir.path().join("state");
    let id = header.id().unwrap();
    let socket = dir.path().join("pages.sock");
    // Record the whole run, whatever this host's speed.
    let serve = |header: Header| {
        let (layers, state_dir) = (Arc::clone(&layers), state_dir.clone());
        move |stream| {
            let options = Options {
                record_for: Duration::from_secs(600),
                ..Options::default()
            };
            accept_with_prefetch(stream, header, layers, &state_dir, &options).unwrap()
        }
    };

    // Restore #1 has no list: it faults, records and saves the list.
    assert_eq!(load_prefetch(&state_dir, &id).unwrap(), None);
    let first = restore_and_finish(&snapshot, &socket, serve(header.clone()));
    let list = load_prefetch(&state_dir, &id)
        .unwrap()
        .expect("a saved list");
    eprintln!("restore #1: {first:?}, list of {} pages", list.len());
    assert_eq!(first.prefetched_pages, 0, "{first:?}");
    assert_eq!(list.len() as u64, first.faults, "each fault recorded once");

    // Restore #2 of the same snapshot places the list before the guest
    // runs, and the guest still counts exactly.
    let second = restore_and_finish(&snapshot, &socket, serve(header));
    eprintln!("restore #2: {second:?}");
    assert!(second.prefetch_done && second.prefetched_pages >= list.len() as u64);
    assert!(
        second.faults < first.faults,
        "restore #2 faulted {} times, restore #1 {}",
        second.faults,
        first.faults
    );
}
