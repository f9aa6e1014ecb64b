//! The layered disk on real KVM, with a real layer store: a base image is
//! imported into a `LayerStore` (`snapshot_file` of a raw file), a guest
//! program reads the base and writes through a layered drive, and the host
//! checks the overlay, the untouched layers and the written-block list;
//! then the overlay with its list is snapshotted as a child of the base
//! and read back through `wrenn_layers::Reader`. Needs /dev/kvm for the
//! guest parts; says so and passes the rest without.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, run_for, Console};
use lmdb_schema::{Store, StoreOptions};
use serde_json::json;
use wrenn_agent::store::{Header, LayerStore, DISK_BLOCK_SIZE};
use wrenn_layers::{list_path, Reader, WrittenBlocks};
use wrenn_vmm::virtio::block::{DriveConfig, DriveSource, LayeredSource};
use wrenn_vmm::{Exit, Machine, MachineConfig, MemoryFrom};

const CONFIG: MachineConfig = MachineConfig {
    vcpus: 1,
    memory_mb: 16,
    track_dirty_pages: false,
};
const BS: usize = DISK_BLOCK_SIZE as usize;
/// 1 MiB: 16 blocks of 64 KiB.
const SIZE: usize = 1 << 20;
/// What the base holds at the start of sector 0, for the guest to read.
const SECTOR_0: &[u8] = b"wrenn-base-sec0!";

/// A base image in a real layer store.
struct Base {
    dir: tempfile::TempDir,
    store: LayerStore,
    header: Header,
    header_path: PathBuf,
    /// The image's bytes.
    image: Vec<u8>,
}

/// Sector 0: [`SECTOR_0`] then byte i = 13 i; the rest of block 0 and all
/// of block 5 a pattern the guest never writes; every other block zero.
fn base() -> Base {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let db = Arc::new(Store::open(&state, StoreOptions::new()).unwrap());
    let store = LayerStore::open(&state, db).unwrap();
    let mut image = vec![0u8; SIZE];
    for (i, byte) in image[..BS].iter_mut().enumerate() {
        *byte = (i * 13) as u8;
    }
    image[..16].copy_from_slice(SECTOR_0);
    for (i, byte) in image[5 * BS..6 * BS].iter_mut().enumerate() {
        *byte = (i % 241) as u8 | 0x80;
    }
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, &image).unwrap();
    let header = store
        .snapshot_file(&raw, DISK_BLOCK_SIZE, None, None)
        .unwrap();
    let id = store.save_header(&header).unwrap();
    std::fs::remove_file(&raw).unwrap();
    Base {
        header_path: store.header_path(&id),
        dir,
        store,
        header,
        image,
    }
}

impl Base {
    fn layered(&self, overlay: &str) -> LayeredSource {
        LayeredSource {
            header: self.header_path.clone(),
            layers_dir: self.store.layers_dir().to_path_buf(),
            overlay: self.dir.path().join(overlay),
        }
    }

    /// Every layer file with its bytes.
    fn layer_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(self.store.layers_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(p).unwrap()))
            .collect();
        files.sort();
        files
    }
}

fn sum_words(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .fold(0, u64::wrapping_add)
}

/// What `virtio_blk` prints on a writable drive over [`base`]'s image.
fn blk_expected(image: &[u8]) -> String {
    format!(
        "capacity {:016x}\nwrite 00\nread 00 {} {:016x}\nflush 00\nid 00 rootfs\nrange 01\ninterrupts yes\n",
        SIZE / 512,
        std::str::from_utf8(SECTOR_0).unwrap(),
        sum_words(&image[..512])
    )
}

/// The sector `virtio_blk` writes to sector 1: byte i = 3 + 7 i.
fn sector_1() -> Vec<u8> {
    (0..512).map(|i| (3 + 7 * i) as u8).collect()
}

fn layered_body(source: &LayeredSource) -> serde_json::Value {
    json!({"header_path": source.header, "layers_dir": source.layers_dir,
           "overlay_path": source.overlay})
}

#[test]
fn a_layered_drive_reads_its_base_and_keeps_guest_writes_in_whole_overlay_blocks() {
    let base = base();
    let layers_before = base.layer_files();
    let source = base.layered("disk.overlay");
    let dir = base.dir.path();
    let vmm = common::Vmm::start(dir, "vmm");
    let drive = |layered: serde_json::Value| json!({"drive_id": "rootfs", "is_root_device": true, "layered": layered});

    // Bad input: each a 400 that says what is wrong and what to do.
    let damaged = dir.join("damaged.header");
    let mut bytes = std::fs::read(&base.header_path).unwrap();
    bytes[2] ^= 1;
    std::fs::write(&damaged, bytes).unwrap();
    let both = json!({"drive_id": "rootfs", "is_root_device": true,
                      "path_on_host": dir.join("x.raw"), "layered": layered_body(&source)});
    let neither = json!({"drive_id": "rootfs", "is_root_device": true});
    let missing = LayeredSource {
        header: dir.join("absent.header"),
        ..source.clone()
    };
    let bad = LayeredSource {
        header: damaged,
        ..source.clone()
    };
    let cases = [
        (both, "not both".to_owned()),
        (neither, "neither path_on_host nor layered".to_owned()),
        (
            drive(layered_body(&missing)),
            format!("{}", missing.header.display()),
        ),
        (drive(layered_body(&missing)), "header_path must be".into()),
        (drive(layered_body(&bad)), "is damaged".into()),
    ];
    for (body, words) in cases {
        let (status, answer) = vmm.put("/drives/rootfs", body);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            status == 400 && message.contains(&words),
            "{status} {answer}"
        );
    }
    if !kvm_or_skip("layered virtio-blk through the API") {
        return;
    }

    // The real VMM, under its seccomp filters: the flush writes the list.
    let mut vmm = vmm;
    let (status, body) = vmm.put("/drives/rootfs", drive(layered_body(&source)));
    assert_eq!(status, 204, "{body}");
    let program = json!({"program_path": env!("WRENN_GUEST_VIRTIO_BLK")});
    assert_eq!(vmm.put("/boot-source", program).0, 204);
    let (status, body) = vmm.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(status, 204, "{body}");
    let status = vmm.wait();
    assert_eq!(vmm.serial(), blk_expected(&base.image), "{status}");
    assert!(status.success(), "{status}");

    // Block 0 is whole in the overlay: the base with sector 1 replaced.
    let mut expected = base.image.clone();
    expected[512..1024].copy_from_slice(&sector_1());
    let overlay = std::fs::read(&source.overlay).unwrap();
    assert_eq!(overlay.len(), SIZE);
    assert!(overlay[..BS] == expected[..BS], "block 0 of the overlay");
    assert!(
        overlay[BS..].iter().all(|&b| b == 0),
        "only block 0 written"
    );
    let list = WrittenBlocks::load(&list_path(&source.overlay))
        .unwrap()
        .expect("the flush wrote the list");
    assert_eq!(list.blocks, [0]);
    assert_eq!(
        (list.block_size, list.device_size),
        (DISK_BLOCK_SIZE, SIZE as u64)
    );
    assert_eq!(
        base.layer_files(),
        layers_before,
        "the base is never written"
    );
}

#[test]
fn an_overlay_and_its_list_snapshot_into_a_child_that_reads_as_base_with_writes() {
    if !kvm_or_skip("layered disk snapshot_file round trip") {
        return;
    }
    let base = base();
    let source = base.layered("disk.overlay");
    let console = Console::default();
    let mut machine = Machine::new(CONFIG, Box::new(console.clone())).unwrap();
    machine
        .add_drive(DriveConfig {
            drive_id: "rootfs".into(),
            source: DriveSource::Layered(source.clone()),
            is_root_device: true,
            read_only: false,
        })
        .unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_VIRTIO_BLK")).unwrap())
        .unwrap();
    let (_machine, exit) = run_for(machine, Duration::from_secs(60));
    assert_eq!(
        (exit, console.text()),
        (Exit::Reset, blk_expected(&base.image))
    );

    let list = WrittenBlocks::load(&list_path(&source.overlay))
        .unwrap()
        .unwrap();
    let child = base
        .store
        .snapshot_file(
            &source.overlay,
            DISK_BLOCK_SIZE,
            Some(&base.header),
            Some(&list.blocks),
        )
        .unwrap();
    assert_eq!(child.parent(), Some(base.header.id().unwrap()));
    assert_eq!(child.generation(), 2);
    let mut expected = base.image.clone();
    expected[512..1024].copy_from_slice(&sector_1());
    let reader = Reader::new(child, base.store.layers_dir()).unwrap();
    let mut read = vec![0u8; SIZE];
    reader.read_at(&mut read, 0).unwrap();
    assert!(
        read == expected,
        "the child reads as the base with the write"
    );
}

/// Sum of every word `virtio_blk_many` writes: word i of sector s is
/// s << 32 | i, for sectors 2 to 129.
fn many_sum() -> u64 {
    (2u64..130)
        .flat_map(|s| (0u64..64).map(move |i| s << 32 | i))
        .fold(0, u64::wrapping_add)
}

/// Stops once the overlay holds sector `sector`'s first word.
fn stop_when_written(
    overlay: &Path,
    sector: u64,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, overlay) = (Arc::clone(&stop), overlay.to_path_buf());
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut word = [0u8; 8];
        loop {
            let written = std::fs::File::open(&overlay)
                .and_then(|f| f.read_exact_at(&mut word, sector * 512))
                .is_ok_and(|()| u64::from_le_bytes(word) == sector << 32);
            if written || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        flag.store(true, Ordering::Release);
    });
    (stop, watcher)
}

#[test]
fn layered_writes_before_a_snapshot_are_read_back_after_the_restore() {
    if !kvm_or_skip("layered virtio-blk snapshot") {
        return;
    }
    let base = base();
    let source = base.layered("disk.overlay");
    let mut machine = Machine::new(CONFIG, Box::new(std::io::sink())).unwrap();
    machine
        .add_drive(DriveConfig {
            drive_id: "rootfs".into(),
            source: DriveSource::Layered(source.clone()),
            is_root_device: true,
            read_only: false,
        })
        .unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_VIRTIO_BLK_MANY")).unwrap())
        .unwrap();
    let (stop, watcher) = stop_when_written(&source.overlay, 20);
    machine.virtio().start(false).unwrap();
    let exit = machine.run_until(&stop).unwrap();
    machine.virtio().stop().unwrap();
    watcher.join().unwrap();
    assert_eq!(exit, Exit::Paused, "the guest finished before the stop");
    let snapshot = base.dir.path().join("snapshot");
    machine.save(&snapshot).unwrap();
    let saved = machine.virtio().save().unwrap();
    drop(machine);

    // Another sandbox: a copy of the overlay, named at load time. The
    // restored drive reopens the base and the copy and starts from the
    // saved written blocks, which it also writes to the copy's list file.
    let copy = base.layered("copy.overlay");
    std::fs::copy(&source.overlay, &copy.overlay).unwrap();
    let original = std::fs::read(&source.overlay).unwrap();
    let overrides = [("rootfs".to_owned(), DriveSource::Layered(copy.clone()))].into();
    let console = Console::default();
    let restored = Machine::restore_with_drives(
        &snapshot,
        MemoryFrom::Copy,
        Box::new(console.clone()),
        &overrides,
    )
    .unwrap();
    let state = restored.virtio().save().unwrap();
    assert_eq!(state[0].transport, saved[0].transport);
    let list = WrittenBlocks::load(&list_path(&copy.overlay))
        .unwrap()
        .unwrap();
    assert_eq!(list.blocks, [0]);
    let (restored, exit) = run_for(restored, Duration::from_secs(60));
    assert_eq!(
        (exit, console.text()),
        (Exit::Reset, format!("wrote 128 sum {:016x}\n", many_sum()))
    );

    // Sectors 2..130 span blocks 0 and 1; the rest of block 0 is the base's.
    assert!(
        std::fs::read(&source.overlay).unwrap() == original,
        "the original is left alone"
    );
    let overlay = std::fs::read(&copy.overlay).unwrap();
    assert_eq!(
        overlay[..1024],
        base.image[..1024],
        "sectors 0 and 1 from the base"
    );
    for s in 2usize..130 {
        let first = u64::from_le_bytes(overlay[s * 512..][..8].try_into().unwrap());
        assert_eq!(first, (s as u64) << 32, "sector {s}");
    }
    let state = restored.virtio().save().unwrap();
    let wrenn_vmm::virtio::persist::DeviceStateKind::Block(block) = &state[0].kind else {
        panic!("slot 0 is not the drive");
    };
    assert_eq!(block.overlay.as_ref().unwrap().blocks, [0, 1]);
}
