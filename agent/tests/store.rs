//! The layer store on real files in temporary folders, a real LMDB file
//! and both I/O backends: snapshots, generations, dirty lists, content
//! addressing, reference counts, garbage collection, damaged headers,
//! crashes, block reads.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "support/rng.rs"]
mod rng;

use rng::Rng;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lmdb_schema::{LayerId, Store, StoreOptions};
use sha2::{Digest, Sha256};
use wrenn_agent::store::{
    Backend, Block, Error, FormatError, Header, HeaderId, Io, LayerStore, Options, DISK_BLOCK_SIZE,
    MEMORY_BLOCK_SIZE,
};

const MIB: u64 = 1 << 20;
const BS: u64 = MEMORY_BLOCK_SIZE as u64;

// ---------------------------------------------------------------------------
// Harness

/// A state folder with its LMDB store and layer store.
struct Env {
    dir: tempfile::TempDir,
    db: Arc<Store>,
    store: LayerStore,
}

impl Env {
    fn new(backend: Backend) -> Env {
        let dir = tempfile::Builder::new()
            .prefix(&format!("wrenn-store-test-{}-", backend.as_str()))
            .tempdir()
            .unwrap();
        let db = Arc::new(Store::open(dir.path(), StoreOptions::new()).unwrap());
        let store = open_store(dir.path(), &db, backend);
        Env { dir, db, store }
    }

    /// A device file in the state folder.
    fn device(&self, name: &str, size: u64) -> Device {
        Device::new(&self.dir.path().join(name), size)
    }

    /// Retains `header` in a committed transaction, then settles it.
    fn retain(&self, header: &Header) {
        self.db
            .write_with(|txn| self.store.retain(txn, header))
            .unwrap();
        self.store.settle(header).unwrap();
    }

    /// Releases `header` in a committed transaction.
    fn release(&self, header: &Header) -> Vec<LayerId> {
        self.db
            .write_with(|txn| self.store.release(txn, header))
            .unwrap()
    }

    fn refcount(&self, id: &LayerId) -> Option<u64> {
        self.db
            .read(|r| r.layers().get(id))
            .unwrap()
            .map(|r| r.refcount)
    }

    fn layer_files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.store.layers_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Materializes `header` and returns the bytes.
    fn materialize(&self, header: &Header) -> Vec<u8> {
        let out = self.dir.path().join("materialized");
        self.store.materialize(header, &out).unwrap();
        let bytes = fs::read(&out).unwrap();
        fs::remove_file(&out).unwrap();
        bytes
    }
}

fn open_store(dir: &Path, db: &Arc<Store>, backend: Backend) -> LayerStore {
    let options = Options {
        force_fallback: backend == Backend::Pread,
    };
    let store = LayerStore::open_with(dir, Arc::clone(db), options).unwrap();
    if backend == Backend::IoUring && store.backend() != Backend::IoUring {
        eprintln!("NOTE: io_uring is not usable here; the io_uring run uses the fallback");
    }
    store
}

/// Both backends: io_uring (when the kernel allows it) and the fallback.
fn backends() -> [Backend; 2] {
    [Backend::IoUring, Backend::Pread]
}

/// A device file and a copy of what it should hold.
struct Device {
    path: PathBuf,
    file: File,
    expected: Vec<u8>,
}

impl Device {
    fn new(path: &Path, size: u64) -> Device {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        Device {
            path: path.to_owned(),
            file,
            expected: vec![0; size as usize],
        }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        self.file.write_all_at(bytes, offset).unwrap();
        let at = offset as usize;
        self.expected[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Fills block `block` (of `bs` bytes) with random bytes.
    fn fill(&mut self, rng: &mut Rng, block: u64, bs: u64) {
        let bytes = rng.bytes(bs as usize);
        self.write(block * bs, &bytes);
    }

    /// Writes zeros over a block (data that is zero, not a hole).
    fn write_zeros(&mut self, block: u64, bs: u64) {
        self.write(block * bs, &vec![0; bs as usize]);
    }

    /// Turns a block into a hole.
    fn punch(&mut self, block: u64, bs: u64) {
        let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor the test owns; no memory is shared.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                flags,
                (block * bs) as libc::off_t,
                bs as libc::off_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let at = (block * bs) as usize;
        self.expected[at..at + bs as usize].fill(0);
    }

    fn block(&self, block: u64, bs: u64) -> &[u8] {
        let at = (block * bs) as usize;
        &self.expected[at..at + bs as usize]
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Asserts equal buffers, naming the first difference (not printing them).
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if got == want {
        return;
    }
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} (block {} of 4 KiB)",
            at / 4096
        );
    }
}

/// Whether a buffer is all zero (memcmp, fast in debug builds too).
fn all_zero(bytes: &[u8]) -> bool {
    bytes == vec![0u8; bytes.len()].as_slice()
}

/// Fills about `count` random blocks and a few runs; returns the device.
fn random_device(env: &Env, size: u64, bs: u64, count: u64, seed: u64) -> Device {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("device-{}", N.fetch_add(1, Ordering::SeqCst));
    let mut rng = Rng(seed);
    let mut device = env.device(&name, size);
    let blocks = size / bs;
    for _ in 0..count {
        let block = rng.below(blocks);
        device.fill(&mut rng, block, bs);
    }
    for _ in 0..4 {
        let start = rng.below(blocks - 64);
        for block in start..start + 1 + rng.below(63) {
            device.fill(&mut rng, block, bs);
        }
    }
    device
}

// ---------------------------------------------------------------------------
// Snapshots and materialization

#[test]
fn a_random_sparse_device_round_trips_byte_for_byte() {
    for backend in backends() {
        let env = Env::new(backend);
        let mut device = random_device(&env, 64 * MIB, BS, 2000, 7);
        // A block of written zeros and a block with a single byte.
        device.write_zeros(5, BS);
        device.write(9 * BS + 4095, &[1]);

        let header = env
            .store
            .snapshot_file(&device.path, BS as u32, None, None)
            .unwrap();
        let zero_block = vec![0u8; BS as usize];
        let nonzero = (0..64 * MIB / BS)
            .filter(|&b| device.block(b, BS) != zero_block.as_slice())
            .count() as u64;
        assert_eq!(header.stored_blocks(), nonzero, "{backend}");
        assert_eq!(header.generation(), 1);
        assert_eq!(header.parent(), None);
        assert_eq!(header.resolve(5), Some(Block::Zero), "zeros are not stored");
        assert_eq!(header.layers().len(), 1);
        let layer = header.layers()[0];
        let layer_size = fs::metadata(env.store.layer_path(&layer.id)).unwrap().len();
        assert_eq!(layer_size, nonzero * BS);

        let out = env.dir.path().join("restored.raw");
        env.store.materialize(&header, &out).unwrap();
        let restored = fs::read(&out).unwrap();
        assert_same(&restored, &device.expected, backend.as_str());
        assert_same(
            &restored,
            &fs::read(&device.path).unwrap(),
            backend.as_str(),
        );

        let allocated = fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated <= layer_size + 4 * MIB,
            "the output is sparse: {allocated} bytes allocated"
        );
    }
}

#[test]
fn a_mostly_zero_512_mib_device_gives_a_tiny_header_and_layer() {
    let env = Env::new(Backend::IoUring);
    let mut rng = Rng(3);
    let mut device = env.device("memory", 512 * MIB);
    for block in [0, 77_777, 131_071] {
        device.fill(&mut rng, block, BS);
    }
    let started = Instant::now();
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    let took = started.elapsed();
    let encoded = header.encode().unwrap();
    assert!(encoded.len() < 120, "header is {} bytes", encoded.len());
    assert_eq!(header.stored_blocks(), 3);
    let layer = header.layers()[0];
    assert_eq!(
        fs::metadata(env.store.layer_path(&layer.id)).unwrap().len(),
        3 * BS
    );
    assert!(took.as_secs() < 5, "holes are skipped, took {took:?}");
    let mut out = vec![0u8; 3 * BS as usize];
    header.resolve(77_777).unwrap();
    env.store
        .read_blocks(&header, &[131_071, 1, 77_777], &mut out)
        .unwrap();
    assert_eq!(&out[..BS as usize], device.block(131_071, BS));
    assert!(all_zero(&out[BS as usize..2 * BS as usize]));
    assert_eq!(&out[2 * BS as usize..], device.block(77_777, BS));
}

/// Changes generation `g` makes: new data, written zeros, punched holes.
fn mutate(device: &mut Device, rng: &mut Rng, g: u64, bs: u64) -> Vec<u64> {
    let blocks = device.expected.len() as u64 / bs;
    let mut dirty = Vec::new();
    // Blocks no other generation picks, plus a few random ones.
    for block in (g..blocks).step_by(37).take(40) {
        device.fill(rng, block, bs);
        dirty.push(block);
    }
    for _ in 0..20 {
        let block = rng.below(blocks);
        device.fill(rng, block, bs);
        dirty.push(block);
    }
    for _ in 0..5 {
        let block = rng.below(blocks);
        device.write_zeros(block, bs);
        dirty.push(block);
    }
    for _ in 0..5 {
        let block = rng.below(blocks);
        device.punch(block, bs);
        dirty.push(block);
    }
    dirty
}

/// Runs ten generations; returns the last header and each generation's
/// header id with the device's bytes at that time.
fn ten_generations(env: &Env, bs: u64) -> (Header, Vec<(HeaderId, Vec<u8>)>) {
    let mut rng = Rng(11);
    let mut device = random_device(env, 16 * MIB, bs, 300, 5);
    let mut parent: Option<Header> = None;
    let mut history = Vec::new();
    for g in 1..=10 {
        if g > 1 {
            mutate(&mut device, &mut rng, g, bs);
        }
        let header = env
            .store
            .snapshot_file(&device.path, bs as u32, parent.as_ref(), None)
            .unwrap();
        assert_eq!(header.generation(), g);
        let id = env.store.save_header(&header).unwrap();
        if let Some(p) = &parent {
            assert_eq!(header.parent(), Some(p.id().unwrap()));
        }
        env.retain(&header);
        assert_same(
            &env.materialize(&header),
            &device.expected,
            &format!("generation {g}"),
        );
        history.push((id, device.expected.clone()));
        parent = Some(header);
    }
    let last = parent.unwrap();
    // One lookup per block finds the right bytes.
    let mut buf = vec![0u8; bs as usize];
    for block in 0..last.block_count() {
        match last.resolve(block).unwrap() {
            Block::Zero => assert!(all_zero(device.block(block, bs)), "block {block}"),
            Block::Layer { layer, block: at } => {
                File::open(env.store.layer_path(&layer))
                    .unwrap()
                    .read_exact_at(&mut buf, at * bs)
                    .unwrap();
                assert_eq!(&buf[..], device.block(block, bs), "block {block}");
            }
        }
    }
    (last, history)
}

#[test]
fn ten_generations_read_like_one() {
    for (backend, bs) in [
        (Backend::IoUring, BS),
        (Backend::Pread, BS),
        (Backend::IoUring, u64::from(DISK_BLOCK_SIZE)),
    ] {
        let env = Env::new(backend);
        let (last, history) = ten_generations(&env, bs);
        assert!(last.layers().len() <= 10);
        // Every generation's header still loads and materializes as it was.
        for (g, (id, bytes)) in history.iter().enumerate() {
            let header = env.store.load_header(id).unwrap();
            assert_eq!(header.generation(), g as u64 + 1);
            let what = format!("generation {} read back at the end", g + 1);
            assert_same(&env.materialize(&header), bytes, &what);
        }
    }
}

#[test]
fn a_dirty_list_gives_what_a_full_comparison_gives() {
    for backend in backends() {
        let env = Env::new(backend);
        let mut device = random_device(&env, 16 * MIB, BS, 500, 21);
        let parent = env
            .store
            .snapshot_file(&device.path, BS as u32, None, None)
            .unwrap();
        let mut rng = Rng(99);
        let dirty = mutate(&mut device, &mut rng, 3, BS);

        let full = env
            .store
            .snapshot_file(&device.path, BS as u32, Some(&parent), None)
            .unwrap();
        let listed = env
            .store
            .snapshot_file(&device.path, BS as u32, Some(&parent), Some(&dirty))
            .unwrap();
        assert_eq!(
            listed, full,
            "{backend}: an exact dirty list gives the same header"
        );
        assert_eq!(listed.id().unwrap(), full.id().unwrap());

        // A dirty list with blocks that did not change: stored again, same bytes.
        let mut more = dirty.clone();
        more.extend(0..64);
        let wider = env
            .store
            .snapshot_file(&device.path, BS as u32, Some(&parent), Some(&more))
            .unwrap();
        assert_same(
            &env.materialize(&wider),
            &device.expected,
            "wider dirty list",
        );
        assert_same(&env.materialize(&full), &device.expected, "full comparison");

        let past_end = [16 * MIB / BS];
        let err = env
            .store
            .snapshot_file(&device.path, BS as u32, Some(&parent), Some(&past_end))
            .unwrap_err();
        assert!(matches!(err, Error::BlockOutOfRange { .. }), "{err}");
    }
}

#[test]
fn read_blocks_equals_materialize_across_layers() {
    for backend in backends() {
        let env = Env::new(backend);
        let (header, _) = ten_generations(&env, BS);
        assert!(
            header.layers().len() >= 3,
            "{} layers",
            header.layers().len()
        );
        let image = env.materialize(&header);
        let mut rng = Rng(5);
        // Random blocks, runs of neighbours, repeats, zero and layer blocks.
        let mut blocks: Vec<u64> = (0..300).map(|_| rng.below(header.block_count())).collect();
        blocks.extend(100..180);
        blocks.extend([7, 7, 0, header.block_count() - 1]);
        let zeros = blocks
            .iter()
            .filter(|&&b| header.resolve(b) == Some(Block::Zero))
            .count();
        assert!(
            zeros > 0 && zeros < blocks.len(),
            "a mix of zero and layer blocks"
        );
        let mut out = vec![0xeeu8; blocks.len() * BS as usize];
        env.store.read_blocks(&header, &blocks, &mut out).unwrap();
        for (slot, &block) in blocks.iter().enumerate() {
            let want = &image[(block * BS) as usize..((block + 1) * BS) as usize];
            let got = &out[slot * BS as usize..(slot + 1) * BS as usize];
            assert_eq!(got, want, "{backend}: block {block}");
        }

        let err = env
            .store
            .read_blocks(&header, &[1, 2], &mut out[..10])
            .unwrap_err();
        assert!(matches!(err, Error::BufferSize { .. }), "{err}");
        let err = env
            .store
            .read_blocks(&header, &[header.block_count()], &mut out[..BS as usize])
            .unwrap_err();
        assert!(matches!(err, Error::BlockOutOfRange { .. }), "{err}");
    }
}

#[test]
fn both_backends_produce_identical_results() {
    let envs = backends().map(Env::new);
    if envs[0].store.backend() != Backend::IoUring {
        eprintln!("NOTE: io_uring is not usable here; comparing the fallback with itself");
    }
    let results: Vec<_> = envs
        .iter()
        .map(|env| {
            let mut device = random_device(env, 8 * MIB, BS, 400, 42);
            let first = env
                .store
                .snapshot_file(&device.path, BS as u32, None, None)
                .unwrap();
            let dirty = mutate(&mut device, &mut Rng(8), 2, BS);
            let second = env
                .store
                .snapshot_file(&device.path, BS as u32, Some(&first), Some(&dirty))
                .unwrap();
            let layers: Vec<Vec<u8>> = second
                .layers()
                .iter()
                .map(|l| fs::read(env.store.layer_path(&l.id)).unwrap())
                .collect();
            let blocks: Vec<u64> = (0..second.block_count()).step_by(3).collect();
            let mut read = vec![0u8; blocks.len() * BS as usize];
            env.store.read_blocks(&second, &blocks, &mut read).unwrap();
            (
                first.id().unwrap(),
                second.id().unwrap(),
                layers,
                env.materialize(&second),
                read,
            )
        })
        .collect();
    assert!(results[0] == results[1], "the backends differ");
}

#[test]
fn a_partial_last_block_and_a_wrong_parent() {
    let env = Env::new(Backend::IoUring);
    let mut rng = Rng(1);
    let mut device = env.device("odd", 3 * MIB + 100);
    device.fill(&mut rng, 0, BS);
    let tail = rng.bytes(100);
    device.write(3 * MIB, &tail);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    assert_eq!(header.block_count(), 3 * MIB / BS + 1);
    assert_same(&env.materialize(&header), &device.expected, "partial block");

    let other = env.device("other", 4 * MIB);
    let err = env
        .store
        .snapshot_file(&other.path, BS as u32, Some(&header), None)
        .unwrap_err();
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("snapshot it without a parent"),
        "{err}"
    );
    let err = env
        .store
        .snapshot_file(&other.path, 12_288, None, None)
        .unwrap_err();
    assert!(
        matches!(err, Error::Format(FormatError::BlockSize { .. })),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Content addressing, reference counts, garbage collection

#[test]
fn identical_content_is_one_layer_file_with_two_references() {
    let env = Env::new(Backend::IoUring);
    let a = random_device(&env, 4 * MIB, BS, 100, 77);
    let b_path = env.dir.path().join("copy");
    fs::copy(&a.path, &b_path).unwrap();

    let first = env
        .store
        .snapshot_file(&a.path, BS as u32, None, None)
        .unwrap();
    let layer = first.layers()[0].id;
    let inode = fs::metadata(env.store.layer_path(&layer)).unwrap().ino();
    let second = env
        .store
        .snapshot_file(&b_path, BS as u32, None, None)
        .unwrap();
    assert_eq!(second.layers()[0].id, layer);
    assert_eq!(
        fs::metadata(env.store.layer_path(&layer)).unwrap().ino(),
        inode,
        "the file was written once"
    );
    assert_eq!(env.layer_files(), [layer.to_string()]);
    env.retain(&first);
    env.retain(&second);
    assert_eq!(env.refcount(&layer), Some(2));
    env.store.verify(&layer).unwrap();

    // Headers are content-addressed too.
    let id1 = env.store.save_header(&first).unwrap();
    let id2 = env.store.save_header(&second).unwrap();
    assert_eq!(id1, id2);
}

#[test]
fn release_frees_only_unshared_layers_and_gc_deletes_exactly_those() {
    let env = Env::new(Backend::IoUring);
    let mut rng = Rng(4);
    let mut device = random_device(&env, 8 * MIB, BS, 200, 1);
    let a = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    mutate(&mut device, &mut rng, 2, BS);
    let b = env
        .store
        .snapshot_file(&device.path, BS as u32, Some(&a), None)
        .unwrap();
    let other = random_device(&env, 8 * MIB, BS, 50, 2);
    let c = env
        .store
        .snapshot_file(&other.path, BS as u32, None, None)
        .unwrap();
    for header in [&a, &b, &c] {
        env.retain(header);
    }
    let la = a.layers()[0].id;
    let lb = b
        .layers()
        .iter()
        .map(|l| l.id)
        .find(|id| *id != la)
        .unwrap();
    let lc = c.layers()[0].id;
    assert!(b.layers().iter().any(|l| l.id == la), "b shares a's layer");
    assert_eq!(env.refcount(&la), Some(2));

    assert_eq!(env.release(&b), [lb]);
    let report = env.store.collect_garbage().unwrap();
    assert_eq!(report.deleted, [lb]);
    assert!(report.strays.is_empty() && report.missing.is_empty());
    assert!(!env.store.layer_path(&lb).exists());
    assert!(env.store.layer_path(&la).exists() && env.store.layer_path(&lc).exists());
    assert_eq!(env.refcount(&lb), None);
    assert_eq!(env.refcount(&la), Some(1));
    // What `a` and `c` hold still reads back.
    assert_same(&env.materialize(&c), &other.expected, "c");

    assert_eq!(env.release(&a), [la]);
    assert_eq!(env.store.collect_garbage().unwrap().deleted, [la]);
    assert_eq!(env.layer_files(), [lc.to_string()]);

    // Releasing again is refused and changes nothing.
    let err = env
        .db
        .write_with(|txn| env.store.release(txn, &a))
        .unwrap_err();
    assert!(matches!(err, Error::RefcountUnderflow { .. }), "{err}");
    assert_eq!(env.refcount(&lc), Some(1));
}

#[test]
fn gc_removes_strays_and_temp_files_and_reports_missing_files() {
    let env = Env::new(Backend::Pread);
    let device = random_device(&env, 4 * MIB, BS, 50, 9);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    env.retain(&header);
    let kept = header.layers()[0].id;

    // A layer file nobody recorded, and a temporary file of a dead process.
    let stray = LayerId(sha256(b"stray"));
    fs::write(env.store.layer_path(&stray), b"stray").unwrap();
    let temp = env.store.layers_dir().join(".tmp-999999-0");
    fs::write(&temp, b"half").unwrap();
    let unrelated = env.store.layers_dir().join("README");
    fs::write(&unrelated, b"left alone").unwrap();

    let report = env.store.collect_garbage().unwrap();
    assert_eq!(report.strays, [stray]);
    assert_eq!(report.temp_files, 1);
    assert!(report.deleted.is_empty() && report.missing.is_empty());
    assert!(!env.store.layer_path(&stray).exists() && !temp.exists());
    assert!(unrelated.exists() && env.store.layer_path(&kept).exists());

    // A record whose file is gone is reported and kept.
    fs::remove_file(env.store.layer_path(&kept)).unwrap();
    let report = env.store.collect_garbage().unwrap();
    assert_eq!(report.missing, [kept]);
    assert_eq!(env.refcount(&kept), Some(1));
    let err = env.store.verify(&kept).unwrap_err();
    assert!(
        matches!(err, Error::Format(FormatError::LayerMissing { .. })),
        "{err}"
    );
}

#[test]
fn a_crash_between_layer_file_and_record_is_repaired_by_gc() {
    let dir;
    let db;
    let layer;
    {
        let env = Env::new(Backend::IoUring);
        let device = random_device(&env, 4 * MIB, BS, 60, 13);
        let header = env
            .store
            .snapshot_file(&device.path, BS as u32, None, None)
            .unwrap();
        layer = header.layers()[0].id;
        // The transaction that would record it is aborted.
        let aborted: Result<(), Error> = env.db.write_with(|txn| {
            env.store.retain(txn, &header)?;
            Err(Error::LayerUnknown { id: layer })
        });
        assert!(aborted.is_err());
        assert_eq!(env.refcount(&layer), None);
        // While this process may still record it, the layer is spared.
        let report = env.store.collect_garbage().unwrap();
        assert!(report.strays.is_empty());
        assert!(env.store.layer_path(&layer).exists());
        // The process dies here: the store is dropped, the file stays.
        let Env {
            dir: d,
            db: b,
            store,
        } = env;
        drop(store);
        dir = d;
        db = b;
    }
    let store = open_store(dir.path(), &db, Backend::IoUring);
    assert!(store.layer_path(&layer).exists());
    let report = store.collect_garbage().unwrap();
    assert_eq!(report.strays, [layer]);
    assert!(!store.layer_path(&layer).exists());
    assert_eq!(fs::read_dir(store.layers_dir()).unwrap().count(), 0);
}

#[test]
fn settling_without_retaining_makes_the_layer_a_stray() {
    let env = Env::new(Backend::IoUring);
    let device = random_device(&env, 2 * MIB, BS, 20, 17);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    env.store.settle(&header).unwrap();
    let report = env.store.collect_garbage().unwrap();
    assert_eq!(report.strays, [header.layers()[0].id]);
}

#[test]
fn verify_detects_a_damaged_layer() {
    let env = Env::new(Backend::IoUring);
    let device = random_device(&env, 2 * MIB, BS, 20, 19);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    let id = header.layers()[0].id;
    assert!(matches!(
        env.store.verify(&id),
        Err(Error::LayerUnknown { .. })
    ));
    env.retain(&header);
    env.store.verify(&id).unwrap();

    let path = env.store.layer_path(&id);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let mut byte = [0u8; 1];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, 100)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], 100).unwrap();
    let err = env.store.verify(&id).unwrap_err();
    assert!(matches!(err, Error::LayerCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("hashes to"), "{err}");
}

// ---------------------------------------------------------------------------
// Headers

#[test]
fn a_damaged_header_is_a_checksum_error_naming_the_file() {
    let env = Env::new(Backend::IoUring);
    let device = random_device(&env, 2 * MIB, BS, 30, 23);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    let id = env.store.save_header(&header).unwrap();
    assert_eq!(env.store.load_header(&id).unwrap(), header);

    let path = env.store.header_path(&id);
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let err = env.store.load_header(&id).unwrap_err();
    assert!(
        matches!(err, Error::Format(FormatError::HeaderChecksum { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    fs::write(&path, &bytes[..3]).unwrap();
    let err = env.store.load_header(&id).unwrap_err();
    assert!(
        matches!(err, Error::Format(FormatError::HeaderCorrupt { .. })),
        "{err}"
    );
}

#[test]
fn a_newer_header_version_asks_for_an_upgrade() {
    let env = Env::new(Backend::Pread);
    let device = random_device(&env, 2 * MIB, BS, 10, 29);
    let header = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    let mut bytes = header.encode().unwrap();
    bytes[0] = 2;
    let err = Header::decode("future.hdr", &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::HeaderTooNew {
                found: 2,
                known: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "future.hdr has header format version 2 but this program reads up to 1: upgrade \
         wrenn-agent and wrenn-vmm"
    );

    // A file whose name does not match its content is refused as well.
    let id = env.store.save_header(&header).unwrap();
    let other = HeaderId([0x11; 32]);
    fs::copy(env.store.header_path(&id), env.store.header_path(&other)).unwrap();
    let err = env.store.load_header(&other).unwrap_err();
    assert!(matches!(err, Error::HeaderIdMismatch { .. }), "{err}");
}

#[test]
fn prune_headers_keeps_live_and_unsettled_headers() {
    let env = Env::new(Backend::IoUring);
    let device = random_device(&env, 2 * MIB, BS, 10, 31);
    let a = env
        .store
        .snapshot_file(&device.path, BS as u32, None, None)
        .unwrap();
    let a_id = env.store.save_header(&a).unwrap();
    let mut other = random_device(&env, 2 * MIB, BS, 10, 32);
    other.write_zeros(0, BS);
    let b = env
        .store
        .snapshot_file(&other.path, BS as u32, None, None)
        .unwrap();
    let b_id = env.store.save_header(&b).unwrap();
    assert_ne!(a_id, b_id);

    // Both are unsettled: nothing goes.
    assert!(env.store.prune_headers(&HashSet::new()).unwrap().is_empty());
    env.store.settle(&a).unwrap();
    env.store.settle(&b).unwrap();
    assert_eq!(
        env.store.prune_headers(&HashSet::from([a_id])).unwrap(),
        [b_id]
    );
    assert!(env.store.header_path(&a_id).exists());
    assert!(!env.store.header_path(&b_id).exists());
}

#[test]
fn the_probe_names_a_backend() {
    let backend = Io::probe().backend();
    eprintln!("layer I/O backend on this machine: {backend}");
    assert!(matches!(backend, Backend::IoUring | Backend::Pread));
}
