//! A snapshot restored through userfaultfd from the agent's layer store:
//! the counter guest is stopped midway and saved, its memory file becomes a
//! layer-store header, and a new VM's memory is placed page by page by the
//! agent's page server. The counter must finish exactly as an
//! uninterrupted run does. Needs /dev/kvm and userfaultfd.

mod common;

use common::{counter_output, Console};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wrenn_agent::store::{LayerStore, MEMORY_BLOCK_SIZE};
use wrenn_agent::uffd::{accept, Options};
use wrenn_vmm::{Exit, Machine, MachineConfig};

#[test]
fn a_snapshot_restored_through_the_page_server_continues_exactly() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED uffd restore: no /dev/kvm on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
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
    let snapshot = dir.path().join("snapshot");
    machine.save(&snapshot).unwrap();
    drop(machine);

    // Its memory into the layer store.
    let state_dir = dir.path().join("state");
    let db = lmdb_schema::Store::open(&state_dir, lmdb_schema::StoreOptions::new()).unwrap();
    let layers = Arc::new(LayerStore::open(&state_dir, Arc::new(db)).unwrap());
    let header = layers
        .snapshot_file(&snapshot.join("memory"), MEMORY_BLOCK_SIZE, None, None)
        .unwrap();
    assert!(header.stored_blocks() > 0);
    // The snapshot's memory file goes: every page must come from the layers.
    std::fs::remove_file(snapshot.join("memory")).unwrap();

    // The page server takes the VMM's handover on a Unix socket.
    let socket = dir.path().join("pages.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = {
        let layers = Arc::clone(&layers);
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            accept(stream, header, layers, &Options::default()).unwrap()
        })
    };
    let console = Console::default();
    let mut restored =
        Machine::restore_served(&snapshot, &socket, Box::new(console.clone())).unwrap();
    let server = server.join().unwrap();
    assert_eq!(restored.run().unwrap(), Exit::Reset);
    assert_eq!(console.text(), counter_output());
    let stats = server.stats();
    eprintln!("page server: {stats:?}");
    assert!(stats.copied_pages > 0 && stats.zero_pages > 0, "{stats:?}");
    assert_eq!(
        stats.faults,
        stats.copied_pages + stats.zero_pages,
        "{stats:?}"
    );
    drop(restored);
}
