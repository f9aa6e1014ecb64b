//! The userfaultfd page server against real userfaultfds, without KVM: the
//! test process plays the VMM (anonymous memory registered with a
//! userfaultfd, handed over through a real socket pair) and the guest
//! (threads touching that memory), and a page server in the same process
//! serves it from a two-generation snapshot in a real layer store.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmdb_schema::{Store, StoreOptions};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use wrenn_agent::store::{Block, Header, LayerStore, MEMORY_BLOCK_SIZE};
use wrenn_agent::uffd::{
    self, accept_with_prefetch, handover, load_prefetch, prefetch_path, save_prefetch, Error, Exit,
    Options, PageServer, Region, Stats, FAULT_AROUND,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = MEMORY_BLOCK_SIZE as u64;
/// The memory device: 16 MiB, 4096 pages.
const DEVICE: u64 = 16 * MIB;
const PAGES: u64 = DEVICE / PAGE;

// ---------------------------------------------------------------------------
// Harness

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn page(&mut self) -> Vec<u8> {
        (0..PAGE / 8)
            .flat_map(|_| self.next().to_le_bytes())
            .collect()
    }
}

/// A state folder with a layer store and a memory snapshot of two
/// generations: `header` (generation 2) maps blocks to the layers of both
/// generations, to zero extents from written zeros, and to holes.
struct Snapshot {
    dir: tempfile::TempDir,
    store: Arc<LayerStore>,
    header: Header,
    /// What the device held when generation 2 was taken.
    expected: Vec<u8>,
}

impl Snapshot {
    fn new() -> Snapshot {
        let dir = tempfile::Builder::new()
            .prefix("wrenn-uffd-test-")
            .tempdir()
            .unwrap();
        let db = Arc::new(Store::open(dir.path(), StoreOptions::new()).unwrap());
        let store = Arc::new(LayerStore::open(dir.path(), db).unwrap());
        let path = dir.path().join("memory");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(DEVICE).unwrap();
        let mut expected = vec![0u8; DEVICE as usize];
        let mut rng = Rng(0x5eed);

        // Generation 1: random pages, a run, written zeros; the rest holes.
        for _ in 0..900 {
            let block = rng.below(PAGES);
            write_page(&file, &mut expected, block, &rng.page());
        }
        for block in 100..164 {
            write_page(&file, &mut expected, block, &rng.page());
        }
        for block in 200..210 {
            write_page(&file, &mut expected, block, &[0; PAGE as usize]);
        }
        let first = store.snapshot_file(&path, PAGE as u32, None, None).unwrap();

        // Generation 2: new data, zeros written and holes punched over data.
        for _ in 0..300 {
            let block = rng.below(PAGES);
            write_page(&file, &mut expected, block, &rng.page());
        }
        for block in 110..120 {
            write_page(&file, &mut expected, block, &[0; PAGE as usize]);
        }
        for block in 130..140 {
            punch_page(&file, &mut expected, block);
        }
        let header = store
            .snapshot_file(&path, PAGE as u32, Some(&first), None)
            .unwrap();
        drop(file);
        fs::remove_file(&path).unwrap();
        assert_eq!(header.generation(), 2);
        assert_eq!(header.layers().len(), 2, "blocks resolve from both layers");
        Snapshot {
            dir,
            store,
            header,
            expected,
        }
    }

    fn page(&self, block: u64) -> &[u8] {
        &self.expected[(block * PAGE) as usize..((block + 1) * PAGE) as usize]
    }

    /// Blocks that the header maps to zero, and blocks in layers.
    fn blocks_by_kind(&self) -> (Vec<u64>, Vec<u64>) {
        (0..PAGES).partition(|&b| self.header.resolve(b) == Some(Block::Zero))
    }
}

fn write_page(file: &File, expected: &mut [u8], block: u64, bytes: &[u8]) {
    file.write_all_at(bytes, block * PAGE).unwrap();
    expected[(block * PAGE) as usize..((block + 1) * PAGE) as usize].copy_from_slice(bytes);
}

fn punch_page(file: &File, expected: &mut [u8], block: u64) {
    let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor the test owns; no memory is shared.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            flags,
            (block * PAGE) as libc::off_t,
            PAGE as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    expected[(block * PAGE) as usize..((block + 1) * PAGE) as usize].fill(0);
}

/// Anonymous memory, unmapped on drop.
struct Memory {
    addr: usize,
    len: usize,
}

impl Memory {
    fn new(len: u64) -> Memory {
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        Memory {
            addr: addr as usize,
            len: len as usize,
        }
    }

    fn page_addr(&self, page: u64) -> usize {
        self.addr + (page * PAGE) as usize
    }

    /// Reads one page (faulting it in if missing).
    fn read_page(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE as usize];
        // SAFETY: the page lies inside this mapping, which lives as long as
        // `self`; a missing page blocks the copy until the server places it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.page_addr(page) as *const u8,
                out.as_mut_ptr(),
                PAGE as usize,
            );
        }
        out
    }

    /// Which pages are resident, without touching them.
    fn resident(&self) -> Vec<bool> {
        let mut vec = vec![0u8; self.len / PAGE as usize];
        // SAFETY: mincore writes one byte per page of the mapping into
        // `vec`, which has exactly that many.
        let rc =
            unsafe { libc::mincore(self.addr as *mut libc::c_void, self.len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    /// `madvise(MADV_DONTNEED)` over `pages` pages from `first`.
    fn free(&self, first: u64, pages: u64) {
        // SAFETY: the range lies inside this mapping; dropping its pages
        // only makes them fault again.
        let rc = unsafe {
            libc::madvise(
                self.page_addr(first) as *mut libc::c_void,
                (pages * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping this value made.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// The VMM side of a restored VM. Fields drop in order: the server stops
/// first, then the VMM's userfaultfd and socket close, then the memory goes.
struct Vm {
    server: PageServer,
    uffd: Uffd,
    vmm: UnixStream,
    memory: Memory,
}

/// The regions of a 16 MiB mapping at `base`, in two halves swapped: the
/// first host half is the second device half, and the other way round.
fn swapped_regions(base: usize) -> Vec<Region> {
    let half = DEVICE / 2;
    let region = |host: u64, offset: u64| Region {
        base_host_virt_addr: host,
        size: half,
        offset,
        page_size: PAGE,
    };
    vec![region(base as u64, half), region(base as u64 + half, 0)]
}

/// Device block behind page `page` of the mapping of [`swapped_regions`].
fn block_of(page: u64) -> u64 {
    (page + PAGES / 2) % PAGES
}

/// A userfaultfd over `memory` with the remove event, as a VMM makes it.
fn register(memory: &Memory, features: FeatureFlags) -> Uffd {
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .require_features(features)
        .create()
        .unwrap();
    uffd.register(memory.addr as *mut libc::c_void, memory.len)
        .unwrap();
    uffd
}

/// Maps and registers memory, hands it over and returns the running VM.
fn restore(snapshot: &Snapshot, options: &Options<'_>) -> Vm {
    restore_with(snapshot, options, FeatureFlags::EVENT_REMOVE)
}

fn restore_with(snapshot: &Snapshot, options: &Options<'_>, features: FeatureFlags) -> Vm {
    restore_mapped(features, swapped_regions, |agent| {
        uffd::accept(
            agent,
            snapshot.header.clone(),
            Arc::clone(&snapshot.store),
            options,
        )
    })
}

/// Maps and registers memory, sends the handover of `regions(base)` and
/// has `serve` take it.
fn restore_mapped(
    features: FeatureFlags,
    regions: impl Fn(usize) -> Vec<Region>,
    serve: impl FnOnce(UnixStream) -> uffd::Result<PageServer>,
) -> Vm {
    let memory = Memory::new(DEVICE);
    let uffd = register(&memory, features);
    let (vmm, agent) = UnixStream::pair().unwrap();
    handover::send(&vmm, &regions(memory.addr), uffd.as_fd()).unwrap();
    let server = serve(agent).unwrap();
    handover::read_answer(&vmm).unwrap();
    Vm {
        server,
        uffd,
        vmm,
        memory,
    }
}

/// Waits until the server's stats satisfy `done` (the counters of a page
/// are updated just after the guest sees it).
#[track_caller]
fn wait_for(server: &PageServer, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = server.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads `pages` of the VM's memory from another thread (the guest) and
/// checks each against `expected(page)`.
#[track_caller]
fn touch_and_check(vm: &Vm, pages: &[u64], expected: impl Fn(u64) -> Vec<u8> + Sync) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                for &page in pages {
                    let got = vm.memory.read_page(page);
                    if got != expected(page) {
                        panic!("page {page} (device block {}) differs", block_of(page));
                    }
                }
            })
            .join()
            .unwrap();
    });
}

/// Options placing only the faulting page, for exact counts.
fn one_page() -> Options<'static> {
    Options {
        fault_around: 1,
        ..Options::default()
    }
}

/// Device blocks of the window of `FAULT_AROUND` pages around `block`
/// (both halves of the swapped regions hold whole windows).
fn window_of(block: u64) -> std::ops::Range<u64> {
    let first = block / FAULT_AROUND * FAULT_AROUND;
    first..first + FAULT_AROUND
}

/// Page of the mapping of [`swapped_regions`] holding device block `block`.
fn page_of(block: u64) -> u64 {
    (block + PAGES / 2) % PAGES
}

/// Pages placed so far, either way.
fn placed(stats: &Stats) -> u64 {
    stats.zero_pages + stats.copied_pages
}

// ---------------------------------------------------------------------------
// Serving faults

#[test]
fn every_page_reads_back_as_the_device_across_two_layers() {
    let snapshot = Snapshot::new();
    let (zeros, stored) = snapshot.blocks_by_kind();
    let vm = restore(&snapshot, &Options::default());
    let all: Vec<u64> = (0..PAGES).collect();
    touch_and_check(&vm, &all, |page| snapshot.page(block_of(page)).to_vec());

    let stats = wait_for(&vm.server, "every page", |s| placed(s) == PAGES);
    // One reader in page order: one fault per window, the rest placed
    // around it.
    assert_eq!(stats.faults, PAGES / FAULT_AROUND, "{stats:?}");
    assert_eq!(stats.zero_pages, zeros.len() as u64);
    assert_eq!(stats.copied_pages, stored.len() as u64);
    assert_eq!(stats.bytes_copied, stored.len() as u64 * PAGE);
    assert!(stats.layer_reads <= stats.faults, "{stats:?}");
    assert_eq!(stats.latency.count(), stats.faults);
    let (p50, p99) = (
        stats.latency.percentile(0.5).unwrap(),
        stats.latency.percentile(0.99).unwrap(),
    );
    assert!(p50 <= p99, "p50 {p50:?} p99 {p99:?}");
    // A second pass is served by the page tables alone.
    touch_and_check(&vm, &all, |page| snapshot.page(block_of(page)).to_vec());
    assert_eq!(vm.server.stats().faults, PAGES / FAULT_AROUND);
    assert_eq!(vm.server.stop().unwrap(), Exit::Stopped);
}

#[test]
fn with_a_window_of_one_every_page_faults_once() {
    let snapshot = Snapshot::new();
    let (zeros, stored) = snapshot.blocks_by_kind();
    let vm = restore(&snapshot, &one_page());
    let all: Vec<u64> = (0..PAGES).collect();
    touch_and_check(&vm, &all, |page| snapshot.page(block_of(page)).to_vec());
    let stats = wait_for(&vm.server, "every page", |s| placed(s) == PAGES);
    assert_eq!(stats.faults, PAGES, "{stats:?}");
    assert_eq!(stats.zero_pages, zeros.len() as u64);
    assert_eq!(stats.copied_pages, stored.len() as u64);
    assert_eq!(stats.latency.count(), PAGES);
}

#[test]
fn a_zero_block_is_served_without_reading_a_layer() {
    let snapshot = Snapshot::new();
    let (zeros, stored) = snapshot.blocks_by_kind();
    let vm = restore(&snapshot, &one_page());

    touch_and_check(&vm, &[page_of(zeros[0])], |_| vec![0; PAGE as usize]);
    let stats = wait_for(&vm.server, "the zero page", |s| s.zero_pages == 1);
    assert_eq!(stats.layer_reads, 0, "{stats:?}");
    assert_eq!(stats.copied_pages, 0);

    let block = stored[0];
    touch_and_check(&vm, &[page_of(block)], |_| snapshot.page(block).to_vec());
    let stats = wait_for(&vm.server, "the copied page", |s| s.copied_pages == 1);
    assert_eq!(stats.layer_reads, 1, "{stats:?}");
    assert_eq!(stats.zero_pages, 1);
}

#[test]
fn one_fault_places_its_whole_window_with_one_layer_read() {
    let snapshot = Snapshot::new();
    let kind = |b: u64| snapshot.header.resolve(b) == Some(Block::Zero);
    // A window holding zero blocks and blocks of both layers.
    let window = (0..PAGES / FAULT_AROUND)
        .map(|w| window_of(w * FAULT_AROUND))
        .find(|w| w.clone().filter(|&b| kind(b)).count() >= 2 && w.clone().any(|b| !kind(b)))
        .unwrap();
    let zeros = window.clone().filter(|&b| kind(b)).count() as u64;
    let vm = restore(&snapshot, &Options::default());
    let faulting = window.start + 5;
    touch_and_check(&vm, &[page_of(faulting)], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    let stats = wait_for(&vm.server, "the window", |s| placed(s) == FAULT_AROUND);
    assert_eq!(stats.faults, 1, "{stats:?}");
    assert_eq!(stats.layer_reads, 1, "{stats:?}");
    assert_eq!(stats.zero_pages, zeros);
    assert_eq!(stats.copied_pages, FAULT_AROUND - zeros);
    // Exactly the window is in place, and it holds the snapshot.
    let resident = vm.memory.resident();
    for page in 0..PAGES {
        assert_eq!(
            resident[page as usize],
            window.contains(&block_of(page)),
            "page {page}"
        );
    }
    let pages: Vec<u64> = window.clone().map(page_of).collect();
    touch_and_check(&vm, &pages, |page| snapshot.page(block_of(page)).to_vec());
    assert_eq!(vm.server.stats().faults, 1, "the window faults no more");
    assert_eq!(
        vm.server.record(),
        vec![faulting],
        "only the fault is recorded"
    );
}

#[test]
fn windows_stop_at_region_edges_that_are_not_aligned() {
    let snapshot = Snapshot::new();
    // Three regions whose edges fall inside windows, in host and device
    // addresses alike: (first host page, first device block, pages).
    const REGIONS: [(u64, u64, u64); 3] = [(0, 3091, 1005), (1005, 1093, 1998), (3003, 0, 1093)];
    let regions = |base: usize| {
        REGIONS
            .iter()
            .map(|&(host, block, pages)| Region {
                base_host_virt_addr: base as u64 + host * PAGE,
                size: pages * PAGE,
                offset: block * PAGE,
                page_size: PAGE,
            })
            .collect::<Vec<_>>()
    };
    let block_at = |page: u64| {
        let (host, block, _) = REGIONS
            .iter()
            .copied()
            .find(|&(host, _, pages)| (host..host + pages).contains(&page))
            .unwrap();
        block + (page - host)
    };
    let options = Options {
        fault_around: 64,
        ..Options::default()
    };
    let vm = restore_mapped(FeatureFlags::EVENT_REMOVE, regions, |agent| {
        uffd::accept(
            agent,
            snapshot.header.clone(),
            Arc::clone(&snapshot.store),
            &options,
        )
    });
    // Four threads touch every page in scattered orders; each checks all
    // bytes of what it reads.
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (vm, snapshot) = (&vm, &snapshot);
            scope.spawn(move || {
                for i in 0..PAGES {
                    let page = (i * 1031 + t * 977) % PAGES;
                    assert!(
                        vm.memory.read_page(page) == snapshot.page(block_at(page)),
                        "page {page}"
                    );
                }
            });
        }
    });
    let stats = wait_for(&vm.server, "every page", |s| placed(s) == PAGES);
    assert!(stats.faults < PAGES, "{stats:?}");
    assert!(!vm.server.is_finished(), "the server still runs");
}

#[test]
fn pages_freed_by_the_guest_read_as_zero_afterwards() {
    let snapshot = Snapshot::new();
    let vm = restore(&snapshot, &one_page());
    // 16 pages from the first one whose block is in a layer.
    let first = (0..PAGES)
        .find(|&p| snapshot.header.resolve(block_of(p)) != Some(Block::Zero))
        .unwrap();
    let range: Vec<u64> = (first..first + 16).collect();
    touch_and_check(&vm, &range, |page| snapshot.page(block_of(page)).to_vec());
    let before = wait_for(&vm.server, "the range", |s| placed(s) == 16);

    // madvise returns once the server has read the remove event; it counts
    // the pages just after, and before it serves any later fault.
    vm.memory.free(first + 4, 8);
    wait_for(&vm.server, "the freed pages", |s| s.freed_pages == 8);
    touch_and_check(&vm, &range, |page| {
        if (first + 4..first + 12).contains(&page) {
            vec![0; PAGE as usize]
        } else {
            snapshot.page(block_of(page)).to_vec()
        }
    });
    let after = wait_for(&vm.server, "the pages again", |s| placed(s) == 24);
    assert_eq!(after.faults, 24);
    assert_eq!(after.zero_pages - before.zero_pages, 8, "{after:?}");
    assert_eq!(after.copied_pages, before.copied_pages);
    assert_eq!(after.layer_reads, before.layer_reads);
}

#[test]
fn a_window_refilled_after_a_free_keeps_the_freed_pages_zero() {
    let snapshot = Snapshot::new();
    let (_, stored) = snapshot.blocks_by_kind();
    let vm = restore(&snapshot, &Options::default());
    // A window with at least 4 layer blocks, all of it in place.
    let window = stored
        .iter()
        .map(|&b| window_of(b))
        .find(|w| w.clone().filter(|b| stored.contains(b)).count() >= 4)
        .unwrap();
    let pages: Vec<u64> = window.clone().map(page_of).collect();
    touch_and_check(&vm, &pages[..1], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    let before = wait_for(&vm.server, "the window", |s| placed(s) == FAULT_AROUND);

    // The guest frees the middle of the window, then touches a freed page:
    // the window goes in again around the pages still there, and the freed
    // ones are zero, not the snapshot's data.
    let freed = 4..12;
    vm.memory
        .free(pages[0] + freed.start, freed.end - freed.start);
    wait_for(&vm.server, "the freed pages", |s| s.freed_pages == 8);
    touch_and_check(&vm, &[pages[6]], |_| vec![0; PAGE as usize]);
    touch_and_check(&vm, &pages, |page| {
        if freed.contains(&(page - pages[0])) {
            vec![0; PAGE as usize]
        } else {
            snapshot.page(block_of(page)).to_vec()
        }
    });
    let after = wait_for(&vm.server, "the freed pages again", |s| {
        placed(s) == FAULT_AROUND + 8
    });
    assert_eq!(after.faults, before.faults + 1, "{after:?}");
    assert_eq!(after.zero_pages - before.zero_pages, 8, "{after:?}");
    assert_eq!(after.copied_pages, before.copied_pages);
    assert_eq!(after.layer_reads, before.layer_reads);
}

#[test]
fn concurrent_touches_of_the_same_pages_all_see_the_snapshot() {
    let snapshot = Snapshot::new();
    for options in [Options::default(), one_page()] {
        let vm = restore(&snapshot, &options);
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (vm, snapshot) = (&vm, &snapshot);
                scope.spawn(move || {
                    // Each thread walks all pages from its own starting
                    // point, checking every byte.
                    for i in 0..PAGES {
                        let page = (i * 7 + t * 511) % PAGES;
                        assert!(
                            vm.memory.read_page(page) == snapshot.page(block_of(page)),
                            "page {page}"
                        );
                    }
                });
            }
        });
        let stats = wait_for(&vm.server, "every page", |s| placed(s) == PAGES);
        assert!(stats.faults >= PAGES / options.fault_around, "{stats:?}");
        assert_eq!(stats.latency.count(), stats.faults, "{stats:?}");
    }
}

#[test]
fn frees_racing_with_faults_leave_exactly_the_freed_pages_zero() {
    let snapshot = Snapshot::new();
    for options in [Options::default(), one_page()] {
        let vm = restore(&snapshot, &options);
        // Free 8 pages of every 64 while other threads fault everything in
        // (with windows, faults place pages the frees are removing).
        let freed = |page: u64| page % 64 < 8;
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let vm = &vm;
                scope.spawn(move || {
                    for i in 0..4 * PAGES {
                        std::hint::black_box(vm.memory.read_page((i + t * 1024) % PAGES));
                    }
                });
            }
            let vm = &vm;
            scope.spawn(move || {
                for _ in 0..10 {
                    for first in (0..PAGES).step_by(64) {
                        vm.memory.free(first, 8);
                    }
                }
            });
        });
        touch_and_check(&vm, &(0..PAGES).collect::<Vec<_>>(), |page| {
            if freed(page) {
                vec![0; PAGE as usize]
            } else {
                snapshot.page(block_of(page)).to_vec()
            }
        });
        let stats = vm.server.stats();
        assert_eq!(stats.freed_pages, PAGES / 8, "{stats:?}");
    }
}

// ---------------------------------------------------------------------------
// Prefetch

#[test]
fn recorded_pages_are_in_place_before_the_next_guest_touches_them() {
    let snapshot = Snapshot::new();
    let (zeros, stored) = snapshot.blocks_by_kind();
    // A first-touch order mixing layer blocks and zero blocks.
    let order: Vec<u64> = stored
        .iter()
        .step_by(7)
        .take(40)
        .chain(zeros.iter().step_by(97).take(10))
        .copied()
        .collect();
    let touched: Vec<u64> = order.iter().map(|&b| page_of(b)).collect();

    let options = Options {
        record_for: Duration::from_secs(600),
        ..one_page()
    };
    let first = restore(&snapshot, &options);
    touch_and_check(&first, &touched, |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    let record = first.server.record();
    assert_eq!(record, order, "blocks in the order they first faulted");
    drop(first);

    let id = snapshot.header.id().unwrap();
    let path = save_prefetch(snapshot.dir.path(), &id, &record).unwrap();
    assert_eq!(path, prefetch_path(snapshot.dir.path(), &id));
    assert!(path.starts_with(snapshot.dir.path().join("prefetch")));
    let list = load_prefetch(snapshot.dir.path(), &id).unwrap().unwrap();
    assert_eq!(list, record);

    // A repeated block and one past the device are skipped.
    let mut prefetch = list.clone();
    prefetch.extend([list[0], PAGES + 5]);
    let options = Options {
        prefetch: &prefetch,
        ..one_page()
    };
    let second = restore(&snapshot, &options);
    let stats = wait_for(&second.server, "the prefetch", |s| s.prefetch_done);
    assert_eq!(stats.prefetched_pages, list.len() as u64, "{stats:?}");
    assert_eq!(stats.faults, 0);
    let resident = second.memory.resident();
    for page in 0..PAGES {
        assert_eq!(
            resident[page as usize],
            touched.contains(&page),
            "page {page}"
        );
    }
    touch_and_check(&second, &touched, |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    assert_eq!(
        second.server.stats().faults,
        0,
        "prefetched pages do not fault"
    );
    let other = (0..PAGES).find(|p| !touched.contains(p)).unwrap();
    touch_and_check(&second, &[other], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    wait_for(&second.server, "one more page", |s| {
        placed(s) == list.len() as u64 + 1
    });
    assert_eq!(second.server.stats().faults, 1);
    assert!(second.server.record() == vec![block_of(other)]);
}

#[test]
fn a_prefetch_places_the_window_around_each_listed_block() {
    let snapshot = Snapshot::new();
    let list: Vec<u64> = vec![3, 40, 41, 47, 2050, 4095];
    let windows: Vec<std::ops::Range<u64>> = list.iter().map(|&b| window_of(b)).collect();
    let in_a_window = |block: u64| windows.iter().any(|w| w.contains(&block));
    let options = Options {
        prefetch: &list,
        ..Options::default()
    };
    let vm = restore(&snapshot, &options);
    let stats = wait_for(&vm.server, "the prefetch", |s| s.prefetch_done);
    // 40, 41 and 47 share a window.
    assert_eq!(stats.prefetched_pages, 4 * FAULT_AROUND, "{stats:?}");
    let resident = vm.memory.resident();
    for page in 0..PAGES {
        assert_eq!(
            resident[page as usize],
            in_a_window(block_of(page)),
            "page {page}"
        );
    }
    let pages: Vec<u64> = (0..PAGES).filter(|&p| in_a_window(block_of(p))).collect();
    touch_and_check(&vm, &pages, |page| snapshot.page(block_of(page)).to_vec());
    assert_eq!(vm.server.stats().faults, 0);
}

#[test]
fn a_second_restore_prefetches_what_the_first_learnt_and_faults_less() {
    let snapshot = Snapshot::new();
    let state = snapshot.dir.path();
    let id = snapshot.header.id().unwrap();
    // A guest that reads 300 scattered pages first.
    let touched: Vec<u64> = (0..300).map(|i| (i * 13 + 5) % PAGES).collect();
    let serve = |options: &Options<'_>| {
        restore_mapped(FeatureFlags::EVENT_REMOVE, swapped_regions, |agent| {
            accept_with_prefetch(
                agent,
                snapshot.header.clone(),
                Arc::clone(&snapshot.store),
                state,
                options,
            )
        })
    };
    let options = Options {
        record_for: Duration::from_secs(600),
        ..Options::default()
    };
    assert_eq!(load_prefetch(state, &id).unwrap(), None);
    let first = serve(&options);
    touch_and_check(&first, &touched, |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    let first_faults = first.server.stats().faults;
    let record = first.server.record();
    // Stopping the server saves the list at once, before the window ends.
    assert_eq!(first.server.stop().unwrap(), Exit::Stopped);
    drop((first.uffd, first.vmm, first.memory));
    let list = load_prefetch(state, &id).unwrap().unwrap();
    assert_eq!(list, record);
    assert!(first_faults > 0 && list.len() as u64 == first_faults);

    // The second restore of the snapshot prefetches the list and the same
    // guest faults on nothing; a page off the list is learnt too.
    let second = serve(&options);
    let stats = wait_for(&second.server, "the prefetch", |s| s.prefetch_done);
    touch_and_check(&second, &touched, |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    assert_eq!(second.server.stats().faults, 0, "{stats:?}");
    let other = (0..PAGES)
        .find(|&p| !list.iter().any(|&b| window_of(b).contains(&block_of(p))))
        .unwrap();
    touch_and_check(&second, &[other], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    assert_eq!(second.server.stats().faults, 1);
    drop(second);
    let mut grown = list.clone();
    grown.push(block_of(other));
    assert_eq!(load_prefetch(state, &id).unwrap().unwrap(), grown);

    // A damaged list is deleted: the restore goes on without it and
    // writes a new one.
    let path = prefetch_path(state, &id);
    fs::write(&path, b"\x01damaged").unwrap();
    let third = serve(&options);
    assert!(!path.exists(), "the damaged list is deleted");
    touch_and_check(&third, &touched[..10], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    let stats = third.server.stats();
    assert_eq!(stats.prefetched_pages, 0, "{stats:?}");
    assert!(stats.faults > 0, "{stats:?}");
    let record = third.server.record();
    drop(third);
    assert_eq!(load_prefetch(state, &id).unwrap().unwrap(), record);
}

#[test]
fn faults_after_the_record_window_are_not_recorded() {
    let snapshot = Snapshot::new();
    let options = Options {
        record_for: Duration::ZERO,
        ..Options::default()
    };
    let vm = restore(&snapshot, &options);
    touch_and_check(&vm, &[1, 2, 3], |page| {
        snapshot.page(block_of(page)).to_vec()
    });
    assert_eq!(vm.server.record(), Vec::<u64>::new());
}

#[test]
fn a_missing_prefetch_list_is_none_and_a_damaged_one_an_error() {
    let dir = tempfile::Builder::new()
        .prefix("wrenn-uffd-test-")
        .tempdir()
        .unwrap();
    let id = wrenn_agent::store::HeaderId([7; 32]);
    assert_eq!(load_prefetch(dir.path(), &id).unwrap(), None);
    let path = save_prefetch(dir.path(), &id, &[1, 2, 3]).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[3] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = load_prefetch(dir.path(), &id).unwrap_err();
    assert!(matches!(err, Error::PrefetchCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("delete it"), "{err}");
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("prefetch"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files: {leftovers:?}");
}

// ---------------------------------------------------------------------------
// How a server ends

#[test]
fn the_server_ends_when_the_vmm_closes_its_socket() {
    let snapshot = Snapshot::new();
    let Vm {
        server,
        uffd,
        vmm,
        memory,
    } = restore(&snapshot, &Options::default());
    drop(vmm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(Instant::now() < deadline, "the server did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(server.wait().unwrap(), Exit::Disconnected);
    drop(uffd);
    drop(memory);
}

#[test]
fn unmapping_all_guest_memory_ends_the_server() {
    let snapshot = Snapshot::new();
    let features = FeatureFlags::EVENT_REMOVE | FeatureFlags::EVENT_UNMAP;
    let Vm {
        server,
        uffd,
        vmm,
        mut memory,
    } = restore_with(&snapshot, &Options::default(), features);
    // munmap waits until the server has read the unmap event.
    // SAFETY: unmaps the test's own mapping, which is not used afterwards.
    let rc = unsafe { libc::munmap(memory.addr as *mut libc::c_void, memory.len) };
    assert_eq!(rc, 0);
    memory.len = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(Instant::now() < deadline, "the server did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(server.wait().unwrap(), Exit::Unmapped);
    drop((uffd, vmm));
}

// ---------------------------------------------------------------------------
// Bad handovers

/// Sends `body` with `fds` as a handover and returns the agent's error,
/// checking that the VMM got the same message as its answer.
fn refused(snapshot: &Snapshot, body: &[u8], with_uffd: bool) -> Error {
    let memory = Memory::new(DEVICE);
    let uffd = register(&memory, FeatureFlags::EVENT_REMOVE);
    let (vmm, agent) = UnixStream::pair().unwrap();
    let fds = if with_uffd {
        vec![uffd.as_fd()]
    } else {
        vec![]
    };
    handover::send_frame(&vmm, body, &fds).unwrap();
    let err = uffd::accept(
        agent,
        snapshot.header.clone(),
        Arc::clone(&snapshot.store),
        &Options::default(),
    )
    .unwrap_err();
    match handover::read_answer(&vmm).unwrap_err() {
        Error::Refused { message } => assert_eq!(message, err.to_string()),
        other => panic!("the VMM should read a refusal, not {other}"),
    }
    err
}

fn handover_json(regions: &[Region]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "version": 1, "regions": regions })).unwrap()
}

#[test]
fn bad_handovers_are_refused_with_a_reason() {
    let snapshot = Snapshot::new();
    let good = swapped_regions(0x7f00_0000_0000);
    let region = |host: u64, size: u64, offset: u64| Region {
        base_host_virt_addr: host,
        size,
        offset,
        page_size: PAGE,
    };

    let err = refused(&snapshot, &handover_json(&good), false);
    assert!(matches!(err, Error::NoDescriptor), "{err}");
    assert!(err.to_string().contains("SCM_RIGHTS"), "{err}");

    let outside = [region(0x7f00_0000_0000, 2 * MIB, DEVICE - MIB)];
    let err = refused(&snapshot, &handover_json(&outside), true);
    assert!(matches!(err, Error::Region { index: 0, .. }), "{err}");
    assert!(
        err.to_string().contains("past the end of the snapshot"),
        "{err}"
    );

    let misaligned = [region(0x7f00_0000_0800, MIB, 0)];
    let err = refused(&snapshot, &handover_json(&misaligned), true);
    assert!(
        err.to_string()
            .contains("base_host_virt_addr 0x7f0000000800"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("not a multiple of its page size 4096"),
        "{err}"
    );

    let overlapping = [
        region(0x7f00_0000_0000, 2 * MIB, 0),
        region(0x7f00_0010_0000, MIB, 4 * MIB),
    ];
    let err = refused(&snapshot, &handover_json(&overlapping), true);
    assert!(
        matches!(
            err,
            Error::Overlap {
                space: "host addresses",
                ..
            }
        ),
        "{err}"
    );

    let mut huge = region(0x7f00_0000_0000, 2 * MIB, 0);
    huge.page_size = 2 * MIB;
    let err = refused(&snapshot, &handover_json(&[huge]), true);
    assert!(err.to_string().contains("no huge pages"), "{err}");

    let newer = br#"{"version":2,"regions":[]}"#;
    let err = refused(&snapshot, newer, true);
    assert!(
        matches!(err, Error::Version { found: 2, known: 1 }),
        "{err}"
    );

    let err = refused(&snapshot, b"{\"regions\": [", true);
    assert!(matches!(err, Error::Json { .. }), "{err}");

    let err = refused(&snapshot, &handover_json(&[]), true);
    assert!(err.to_string().contains("at least one region"), "{err}");
}

#[test]
fn a_handover_with_two_descriptors_is_refused_and_both_are_closed() {
    let snapshot = Snapshot::new();
    let memory = Memory::new(DEVICE);
    let uffd = register(&memory, FeatureFlags::EVENT_REMOVE);
    let (vmm, agent) = UnixStream::pair().unwrap();
    let body = handover_json(&swapped_regions(memory.addr));
    handover::send_frame(&vmm, &body, &[uffd.as_fd(), vmm.as_fd()]).unwrap();
    let err = uffd::accept(
        agent,
        snapshot.header.clone(),
        Arc::clone(&snapshot.store),
        &Options::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::TooManyDescriptors { count: 2 }),
        "{err}"
    );
    assert!(handover::read_answer(&vmm).is_err());
}

#[test]
fn a_userfaultfd_without_uffdio_api_is_refused() {
    let snapshot = Snapshot::new();
    // SAFETY: the raw syscall returns a new descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let fd = if fd >= 0 {
        // SAFETY: `fd` was just created for us and nothing else owns it.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
    } else {
        // The syscall may be disabled; /dev/userfaultfd gives the same.
        let dev = File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .unwrap();
        const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
        // SAFETY: the ioctl returns a new userfaultfd descriptor we own.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: as above.
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    let (vmm, agent) = UnixStream::pair().unwrap();
    let body = handover_json(&swapped_regions(0x7f00_0000_0000));
    handover::send_frame(&vmm, &body, &[fd.as_fd()]).unwrap();
    let err = uffd::accept(
        agent,
        snapshot.header.clone(),
        Arc::clone(&snapshot.store),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UffdNotReady), "{err}");
}

#[test]
fn a_socket_instead_of_a_userfaultfd_is_refused() {
    let snapshot = Snapshot::new();
    let (vmm, agent) = UnixStream::pair().unwrap();
    let body = handover_json(&swapped_regions(0x7f00_0000_0000));
    handover::send_frame(&vmm, &body, &[vmm.as_fd()]).unwrap();
    let err = uffd::accept(
        agent,
        snapshot.header.clone(),
        Arc::clone(&snapshot.store),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotUserfaultfd { .. }), "{err}");
    assert!(err.to_string().contains("not a userfaultfd"), "{err}");
}
