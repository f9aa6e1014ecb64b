//! `make bench`: wrenn-vmm on this host, through real `wrenn-vmm` processes
//! and their control API: process start to API ready, full and diff
//! snapshots of a 256 MiB guest, snapshot load (file-mapped and copied
//! memory), time until the restored guest prints again, and the RSS of an
//! idle restored VMM. Prints a Markdown table and writes it to
//! `target/bench/vmm.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use common::Vmm;
use serde_json::json;
use wrenn_agent::store::{Header, LayerStore, MEMORY_BLOCK_SIZE};
use wrenn_agent::uffd::{accept, Options, PageServer};

const ROUNDS: usize = 5;

struct Stats(Vec<f64>);

impl Stats {
    fn row(&mut self, what: &str, unit: &str) -> String {
        self.0.sort_by(f64::total_cmp);
        let n = self.0.len();
        let mean = self.0.iter().sum::<f64>() / n as f64;
        let p = |q: f64| self.0[((n as f64 - 1.0) * q).round() as usize];
        format!(
            "| {what} | {unit} | {n} | {:.2} | {:.2} | {mean:.2} | {:.2} |",
            p(0.0),
            p(0.5),
            p(1.0)
        )
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Waits until the serial log has grown past `len` bytes.
fn wait_output(vmm: &Vmm, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while vmm.serial().len() <= len {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A page server for `header` on a fresh socket in `dir`, taking one
/// handover on its own thread.
fn page_server(
    dir: &std::path::Path,
    name: &str,
    header: Header,
    layers: &Arc<LayerStore>,
) -> (std::path::PathBuf, std::thread::JoinHandle<PageServer>) {
    let socket = dir.join(format!("{name}.pages"));
    let listener = UnixListener::bind(&socket).unwrap();
    let layers = Arc::clone(layers);
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        accept(stream, header, layers, &Options::default()).unwrap()
    });
    (socket, thread)
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED vmm bench: no /dev/kvm on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut start, mut full, mut diff) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut load_file, mut load_copy) = (Stats(vec![]), Stats(vec![]));
    let (mut first_output, mut rss) = (Stats(vec![]), Stats(vec![]));
    let (mut load_uffd, mut first_output_uffd, mut rss_uffd) =
        (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut fault_rate, mut fault_p99) = (Stats(vec![]), Stats(vec![]));
    let state_dir = dir.path().join("state");
    let db = lmdb_schema::Store::open(&state_dir, lmdb_schema::StoreOptions::new()).unwrap();
    let layers = Arc::new(LayerStore::open(&state_dir, Arc::new(db)).unwrap());
    for round in 0..ROUNDS {
        let t = Instant::now();
        let vmm = Vmm::start(dir.path(), &format!("source-{round}"));
        start.0.push(ms(t));
        assert_eq!(
            vmm.put(
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 256, "track_dirty_pages": true})
            )
            .0,
            204
        );
        let program = json!({"program_path": env!("WRENN_GUEST_TICKER")});
        assert_eq!(vmm.put("/boot-source", program).0, 204);
        assert_eq!(
            vmm.put("/actions", json!({"action_type": "InstanceStart"}))
                .0,
            204
        );
        wait_output(&vmm, 0);
        assert_eq!(vmm.put("/actions", json!({"action_type": "Pause"})).0, 204);
        let snapshot = dir.path().join(format!("full-{round}"));
        let t = Instant::now();
        let (status, body) = vmm.put("/snapshot/create", json!({"snapshot_path": snapshot}));
        assert_eq!(status, 204, "{body}");
        full.0.push(ms(t));
        assert_eq!(vmm.put("/actions", json!({"action_type": "Resume"})).0, 204);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vmm.put("/actions", json!({"action_type": "Pause"})).0, 204);
        let t = Instant::now();
        let (status, body) = vmm.put(
            "/snapshot/create",
            json!({"snapshot_path": dir.path().join(format!("diff-{round}")), "snapshot_type": "Diff"}),
        );
        assert_eq!(status, 204, "{body}");
        diff.0.push(ms(t));
        drop(vmm);

        for (backend, stats) in [("File", &mut load_file), ("Copy", &mut load_copy)] {
            let restored = Vmm::start(dir.path(), &format!("{backend}-{round}"));
            let t = Instant::now();
            let (status, body) = restored.put(
                "/snapshot/load",
                json!({"snapshot_path": snapshot, "mem_backend": {"backend_type": backend}}),
            );
            assert_eq!(status, 204, "{body}");
            stats.0.push(ms(t));
            if backend == "File" {
                let t = Instant::now();
                assert_eq!(
                    restored.put("/actions", json!({"action_type": "Resume"})).0,
                    204
                );
                wait_output(&restored, 0);
                first_output.0.push(ms(t));
                assert_eq!(
                    restored.put("/actions", json!({"action_type": "Pause"})).0,
                    204
                );
                rss.0.push(rss_mib(restored.child.id()));
            }
        }

        // The same snapshot, its memory served from the layer store.
        let header = layers
            .snapshot_file(&snapshot.join("memory"), MEMORY_BLOCK_SIZE, None, None)
            .unwrap();
        let (socket, server) = page_server(dir.path(), &format!("vm-{round}"), header, &layers);
        let restored = Vmm::start(dir.path(), &format!("uffd-{round}"));
        let t = Instant::now();
        let (status, body) = restored.put(
            "/snapshot/load",
            json!({"snapshot_path": snapshot,
                   "mem_backend": {"backend_type": "Uffd", "backend_path": socket}}),
        );
        assert_eq!(status, 204, "{body}");
        load_uffd.0.push(ms(t));
        let server = server.join().unwrap();
        let t = Instant::now();
        assert_eq!(
            restored.put("/actions", json!({"action_type": "Resume"})).0,
            204
        );
        wait_output(&restored, 0);
        first_output_uffd.0.push(ms(t));
        assert_eq!(
            restored.put("/actions", json!({"action_type": "Pause"})).0,
            204
        );
        rss_uffd.0.push(rss_mib(restored.child.id()));
        drop(restored);
        drop(server);

        // Page server throughput: this process touches every page of the
        // guest's memory (64 MiB of data, the rest zero) right after a
        // handover, one thread, no KVM in the way.
        let header = layers
            .snapshot_file(&snapshot.join("memory"), MEMORY_BLOCK_SIZE, None, None)
            .unwrap();
        let (socket, server) = page_server(dir.path(), &format!("touch-{round}"), header, &layers);
        let served = wrenn_vmm::uffd::serve_memory(256, &socket).unwrap();
        let server = server.join().unwrap();
        let base = {
            use vm_memory::{GuestAddress, GuestMemoryBackend};
            served.memory.get_host_address(GuestAddress(0)).unwrap() as usize
        };
        let t = Instant::now();
        let pages = (256usize << 20) / 4096;
        let mut sum = 0u64;
        for page in 0..pages {
            // SAFETY: inside the 256 MiB mapping, which `served` keeps alive.
            sum = sum.wrapping_add(unsafe {
                std::ptr::read_volatile((base + page * 4096) as *const u64)
            });
        }
        let seconds = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        let stats = server.stats();
        fault_rate.0.push(stats.faults as f64 / seconds / 1000.0);
        fault_p99.0.push(
            stats
                .latency
                .percentile(0.99)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6),
        );
        drop(served);
        drop(server);
    }
    let table = [
        "wrenn-vmm; guest: 1 vCPU, 256 MiB, 64 MiB of it touched (the `ticker` program); \
         KVM as found on this host.\n"
            .to_owned(),
        "| operation | unit | n | min | p50 | mean | max |".to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
        start.row("process start to API ready", "ms"),
        full.row("full snapshot (256 MiB, sparse)", "ms"),
        diff.row("diff snapshot (pages written in 50 ms)", "ms"),
        load_file.row("snapshot load, memory file-mapped", "ms"),
        load_copy.row("snapshot load, memory copied", "ms"),
        first_output.row("resume to the guest's next output (file-mapped)", "ms"),
        rss.row("RSS of a restored, paused VMM (file-mapped)", "MiB"),
        load_uffd.row(
            "snapshot load, memory from the page server (userfaultfd)",
            "ms",
        ),
        first_output_uffd.row("resume to the guest's next output (userfaultfd)", "ms"),
        rss_uffd.row("RSS of a restored, paused VMM (userfaultfd)", "MiB"),
        fault_rate.row(
            "page server: faults served (256 MiB touched by a host thread)",
            "k/s",
        ),
        fault_p99.row("page server: p99 fault latency", "µs"),
    ]
    .join("\n");
    println!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("vmm.md"), format!("{table}\n"));
}
