//! `make bench`: wrenn-vmm on this host, through real `wrenn-vmm` processes
//! and their control API: process start to API ready, full and diff
//! snapshots of a 256 MiB guest, snapshot load (file-mapped, copied and
//! served by the agent's page server, with and without a prefetch list),
//! time until the restored guest prints again, the RSS of an idle restored
//! VMM, and the page server's own speed. Then the same operations for QEMU
//! as the agent's QEMU runtime runs it, on the guest image when there is
//! one. Prints Markdown tables and writes them to `target/bench/vmm.md`.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Vmm;
use serde_json::{json, Value};
use wrenn_agent::runtime::qmp::Qmp;
use wrenn_agent::store::{Header, LayerStore, MEMORY_BLOCK_SIZE};
use wrenn_agent::uffd::{accept, accept_with_prefetch, Options, PageServer, FAULT_AROUND};

const ROUNDS: usize = 5;
/// Guest memory of every VM here.
const MEMORY_MB: usize = 256;
const PAGE: usize = 4096;

struct Stats(Vec<f64>);

impl Stats {
    fn new() -> Stats {
        Stats(Vec::new())
    }

    fn row(&mut self, what: &str, unit: &str) -> String {
        if self.0.is_empty() {
            return format!("| {what} | {unit} | 0 | | | | |");
        }
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

/// How a page server in this process is started.
#[derive(Clone, Copy)]
enum Serve<'a> {
    /// `accept` placing `fault_around` pages per fault.
    Plain { fault_around: u64 },
    /// `accept_with_prefetch` with lists in this state folder.
    Learning { state_dir: &'a Path },
}

/// A page server for `header` on a fresh socket in `dir`, taking one
/// handover on its own thread.
fn page_server(
    dir: &Path,
    name: &str,
    header: Header,
    layers: &Arc<LayerStore>,
    serve: Serve<'_>,
) -> (PathBuf, std::thread::JoinHandle<PageServer>) {
    let socket = dir.join(format!("{name}.pages"));
    let listener = UnixListener::bind(&socket).unwrap();
    let layers = Arc::clone(layers);
    let state_dir = match serve {
        Serve::Learning { state_dir } => Some(state_dir.to_owned()),
        Serve::Plain { .. } => None,
    };
    let fault_around = match serve {
        Serve::Plain { fault_around } => fault_around,
        Serve::Learning { .. } => FAULT_AROUND,
    };
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let options = Options {
            fault_around,
            ..Options::default()
        };
        match state_dir {
            Some(state_dir) => {
                accept_with_prefetch(stream, header, layers, &state_dir, &options).unwrap()
            }
            None => accept(stream, header, layers, &options).unwrap(),
        }
    });
    (socket, thread)
}

/// Page server speed: this process maps 256 MiB, hands it over and touches
/// every page in `order` from one thread, no KVM in the way. Returns
/// faults per second, pages placed per second and the p99 fault latency
/// in µs.
fn touch_all(
    dir: &Path,
    name: &str,
    header: Header,
    layers: &Arc<LayerStore>,
    fault_around: u64,
    order: &[usize],
) -> (f64, f64, f64) {
    let serve = Serve::Plain { fault_around };
    let (socket, server) = page_server(dir, name, header, layers, serve);
    let served = wrenn_vmm::uffd::serve_memory(MEMORY_MB as u32, &socket).unwrap();
    let server = server.join().unwrap();
    let base = {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        served.memory.get_host_address(GuestAddress(0)).unwrap() as usize
    };
    let t = Instant::now();
    let mut sum = 0u64;
    for &page in order {
        // SAFETY: inside the 256 MiB mapping, which `served` keeps alive.
        sum = sum
            .wrapping_add(unsafe { std::ptr::read_volatile((base + page * PAGE) as *const u64) });
    }
    let seconds = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    let stats = server.stats();
    let p99 = stats
        .latency
        .percentile(0.99)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6);
    drop(served);
    drop(server);
    (
        stats.faults as f64 / seconds / 1000.0,
        (stats.zero_pages + stats.copied_pages) as f64 / seconds / 1000.0,
        p99,
    )
}

/// The pages of 256 MiB in a fixed shuffled order.
fn shuffled_pages() -> Vec<usize> {
    let mut pages: Vec<usize> = (0..(MEMORY_MB << 20) / PAGE).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pages.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pages.swap(i, (x % (i as u64 + 1)) as usize);
    }
    pages
}

/// Results of the userfaultfd restores of one snapshot.
#[derive(Default)]
struct UffdRows {
    load: Vec<f64>,
    first_output: Vec<f64>,
    faults: Vec<f64>,
    rss: Vec<f64>,
    prefetch_first_output: Vec<f64>,
    prefetch_faults: Vec<f64>,
    prefetched: Vec<f64>,
}

/// Restores `snapshot` twice with its memory served from `header`: the
/// first restore has no prefetch list and saves one, the second loads it.
fn uffd_restores(
    dir: &Path,
    round: usize,
    snapshot: &Path,
    header: &Header,
    layers: &Arc<LayerStore>,
    state_dir: &Path,
    rows: &mut UffdRows,
) {
    for pass in 0..2 {
        let name = format!("uffd-{round}-{pass}");
        let serve = Serve::Learning { state_dir };
        let (socket, server) = page_server(dir, &name, header.clone(), layers, serve);
        let restored = Vmm::start(dir, &name);
        let t = Instant::now();
        let (status, body) = restored.put(
            "/snapshot/load",
            json!({"snapshot_path": snapshot,
                   "mem_backend": {"backend_type": "Uffd", "backend_path": socket}}),
        );
        assert_eq!(status, 204, "{body}");
        let load = ms(t);
        let server = server.join().unwrap();
        // The prefetch runs before the server waits for faults.
        while !server.stats().prefetch_done {
            std::thread::sleep(Duration::from_micros(100));
        }
        let t = Instant::now();
        assert_eq!(
            restored.put("/actions", json!({"action_type": "Resume"})).0,
            204
        );
        wait_output(&restored, 0);
        let first_output = ms(t);
        assert_eq!(
            restored.put("/actions", json!({"action_type": "Pause"})).0,
            204
        );
        // Read once paused: a page's fault is counted just after the guest
        // has it.
        let stats = server.stats();
        if pass == 0 {
            rows.load.push(load);
            rows.first_output.push(first_output);
            rows.faults.push(stats.faults as f64);
            rows.rss.push(rss_mib(restored.child.id()));
        } else {
            rows.prefetch_first_output.push(first_output);
            rows.prefetch_faults.push(stats.faults as f64);
            rows.prefetched.push(stats.prefetched_pages as f64);
        }
        drop(restored);
        // Saves the list after the first pass.
        drop(server);
    }
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED vmm bench: no /dev/kvm on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut start, mut full, mut diff) = (Stats::new(), Stats::new(), Stats::new());
    let (mut load_file, mut load_copy) = (Stats::new(), Stats::new());
    let (mut first_output, mut rss) = (Stats::new(), Stats::new());
    let mut uffd = UffdRows::default();
    let mut speed: Vec<[Stats; 3]> = (0..3)
        .map(|_| [Stats::new(), Stats::new(), Stats::new()])
        .collect();
    let sequential: Vec<usize> = (0..(MEMORY_MB << 20) / PAGE).collect();
    let shuffled = shuffled_pages();
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
                json!({"vcpu_count": 1, "mem_size_mib": MEMORY_MB, "track_dirty_pages": true})
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
        uffd_restores(
            dir.path(),
            round,
            &snapshot,
            &header,
            &layers,
            &state_dir,
            &mut uffd,
        );

        // Page server speed over the guest's memory (64 MiB of data, the
        // rest zero): one page per fault in page order (how the server
        // worked before windows), then windows in page and shuffled order.
        let cases = [
            (1, &sequential, "one"),
            (FAULT_AROUND, &sequential, "seq"),
            (FAULT_AROUND, &shuffled, "shuffled"),
        ];
        for ((fault_around, order, name), stats) in cases.into_iter().zip(speed.iter_mut()) {
            let name = format!("touch-{round}-{name}");
            let (faults, pages, p99) = touch_all(
                dir.path(),
                &name,
                header.clone(),
                &layers,
                fault_around,
                order,
            );
            stats[0].0.push(faults);
            stats[1].0.push(pages);
            stats[2].0.push(p99);
        }
    }
    let [one, seq, shuffled] = &mut speed[..] else {
        unreachable!("three cases")
    };
    let mut table = vec![
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
        Stats(uffd.load).row(
            "snapshot load, memory from the page server (userfaultfd)",
            "ms",
        ),
        Stats(uffd.first_output).row(
            "resume to the guest's next output (userfaultfd, no prefetch list)",
            "ms",
        ),
        Stats(uffd.faults).row(
            "faults from resume to the pause after that output (no prefetch list)",
            "faults",
        ),
        Stats(uffd.rss).row("RSS of a restored, paused VMM (userfaultfd)", "MiB"),
        Stats(uffd.prefetch_first_output).row(
            "resume to the guest's next output (userfaultfd, second restore, prefetch list)",
            "ms",
        ),
        Stats(uffd.prefetch_faults).row(
            "faults from resume to the pause after that output (prefetch list)",
            "faults",
        ),
        Stats(uffd.prefetched).row("pages the prefetch placed", "pages"),
        one[0].row(
            "page server, 1 page per fault, page order: faults served",
            "k/s",
        ),
        one[1].row(
            "page server, 1 page per fault, page order: pages placed",
            "k/s",
        ),
        one[2].row(
            "page server, 1 page per fault, page order: p99 fault latency",
            "µs",
        ),
        seq[0].row(
            "page server, 16-page windows, page order: faults served",
            "k/s",
        ),
        seq[1].row(
            "page server, 16-page windows, page order: pages placed",
            "k/s",
        ),
        seq[2].row(
            "page server, 16-page windows, page order: p99 fault latency",
            "µs",
        ),
        shuffled[0].row(
            "page server, 16-page windows, shuffled order: faults served",
            "k/s",
        ),
        shuffled[1].row(
            "page server, 16-page windows, shuffled order: pages placed",
            "k/s",
        ),
        shuffled[2].row(
            "page server, 16-page windows, shuffled order: p99 fault latency",
            "µs",
        ),
    ];
    table.push(String::new());
    table.extend(qemu_table(dir.path()));
    let table = table.join("\n");
    println!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("vmm.md"), format!("{table}\n"));
}

// ---------------------------------------------------------------------------
// QEMU, as the agent's QEMU runtime runs it

/// The guest image's kernel, initramfs and root file system, from the
/// folder `WRENN_IMAGE_DIR` names (`make bench` sets it).
fn guest_image() -> Option<[PathBuf; 3]> {
    let dir = PathBuf::from(std::env::var_os("WRENN_IMAGE_DIR")?);
    let files = ["vmlinuz", "initramfs.cpio.gz", "rootfs.ext4"].map(|f| dir.join(f));
    files.iter().all(|f| f.is_file()).then_some(files)
}

/// Whether KVM here is hardware virtualization (not PVM): QEMU then uses
/// it, as the agent's runtime does, and TCG otherwise.
fn hardware_kvm() -> bool {
    wrenn_agent::runtime::probe::HostFacts::read().hardware_kvm()
}

/// One QEMU process, killed by its PID when dropped.
struct Qemu {
    child: Child,
    qmp: PathBuf,
    console: PathBuf,
}

impl Qemu {
    /// Starts QEMU with the agent runtime's machine, the guest `image`'s
    /// kernel and initramfs, `overlay` (qcow2 over its root file system) as
    /// disk and RAM in `memory` (a file mapped shared, or a private RAM
    /// backend when `None`); `incoming` waits for a saved state. Returns it
    /// once QMP answers, with the time that took.
    fn start(
        dir: &Path,
        name: &str,
        image: &[PathBuf; 3],
        overlay: &Path,
        memory: Option<&Path>,
        incoming: bool,
    ) -> (Qemu, f64) {
        let (accel, cpu) = if hardware_kvm() {
            ("kvm", "host")
        } else {
            ("tcg", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt")
        };
        let qmp = dir.join(format!("{name}.qmp"));
        let console = dir.join(format!("{name}.console"));
        let backend = match memory {
            Some(file) => format!(
                "memory-backend-file,id=mem0,size={MEMORY_MB}M,mem-path={},share=on",
                file.display()
            ),
            None => format!("memory-backend-ram,id=mem0,size={MEMORY_MB}M"),
        };
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args([
                "-M",
                "microvm,x-option-roms=off,rtc=off,acpi=on,memory-backend=mem0",
            ])
            .args(["-object", &backend])
            .args(["-accel", accel, "-cpu", cpu, "-smp", "1"])
            .args(["-m", &format!("{MEMORY_MB}M")])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-chardev")
            .arg(format!("file,id=con0,path={}", console.display()))
            .args(["-serial", "chardev:con0"])
            .arg("-kernel")
            .arg(&image[0])
            .arg("-initrd")
            .arg(&image[1])
            .args([
                "-append",
                "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw tsc_early_khz=2000000 \
                 lpj=8000000",
            ])
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=qcow2,if=none",
                overlay.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        let t = Instant::now();
        let child = command.spawn().expect("start qemu-system-x86_64");
        let qemu = Qemu {
            child,
            qmp,
            console,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while qemu.connect().is_none() {
            assert!(
                Instant::now() < deadline,
                "QEMU's QMP socket never answered"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (qemu, ms(t))
    }

    fn connect(&self) -> Option<Qmp> {
        Qmp::connect(&self.qmp).ok()
    }

    fn qmp(&self) -> Qmp {
        self.connect().expect("QMP")
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `query-migrate` until a migration has completed.
fn wait_migrated(qmp: &mut Qmp) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = qmp.execute("query-migrate", Value::Null).unwrap();
        match info["status"].as_str() {
            Some("completed") => return,
            Some("failed" | "cancelled") => panic!("migration failed: {info}"),
            // An incoming migration may say nothing; it is done once paused.
            None if qmp.status().unwrap() == "paused" => return,
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies `from` to `to`, holes kept.
fn copy_file(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

fn ignore_shared(on: bool) -> Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })
}

/// Boots the guest image once under QEMU, then snapshots and restores it
/// `ROUNDS` times both ways the agent can: its pause (RAM stays in the
/// shared memory file, only device state is written) and a full migration
/// of RAM to a file.
fn qemu_table(dir: &Path) -> Vec<String> {
    let Some(image) = guest_image() else {
        eprintln!("SKIPPED QEMU rows: no guest image in WRENN_IMAGE_DIR (make bench)");
        return vec!["QEMU: skipped, no guest image in `WRENN_IMAGE_DIR`.".to_owned()];
    };
    let dir = dir.join("qemu");
    std::fs::create_dir_all(&dir).unwrap();
    let overlay = dir.join("rootfs.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&image[2])
        .arg(&overlay)
        .status()
        .expect("run qemu-img");
    assert!(status.success());
    let memory = dir.join("memory");
    std::fs::File::create(&memory).unwrap();
    let (mut start, mut boot) = (Stats::new(), Stats::new());
    let (mut save_shared, mut save_full, mut full_size) =
        (Stats::new(), Stats::new(), Stats::new());
    let (mut restore_shared, mut restore_full) = (Stats::new(), Stats::new());
    let (mut rss_shared, mut rss_full) = (Stats::new(), Stats::new());

    let t = Instant::now();
    let (source, started) = Qemu::start(&dir, "source", &image, &overlay, Some(&memory), false);
    start.0.push(started);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !source.console().contains("envd listening") {
        assert!(
            Instant::now() < deadline,
            "the guest did not boot:\n{}",
            source.console()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    boot.0.push(ms(t));
    // Let the guest settle into idle.
    std::thread::sleep(Duration::from_secs(1));
    let accel = if hardware_kvm() { "kvm" } else { "tcg" };

    for round in 0..ROUNDS {
        let mut qmp = source.qmp();
        // The agent's pause: device state only, RAM stays in the file.
        let state = dir.join(format!("state-{round}"));
        let t = Instant::now();
        qmp.execute("stop", Value::Null).unwrap();
        qmp.execute("migrate-set-capabilities", ignore_shared(true))
            .unwrap();
        let uri = format!("exec:cat > '{}'", state.display());
        qmp.execute("migrate", json!({ "uri": uri })).unwrap();
        wait_migrated(&mut qmp);
        save_shared.0.push(ms(t));
        // Memory and disk as they were at the pause, for a restore that
        // runs while the source waits.
        let shared_files = [
            dir.join(format!("memory-{round}")),
            dir.join(format!("disk-shared-{round}")),
        ];
        copy_file(&memory, &shared_files[0]);
        copy_file(&overlay, &shared_files[1]);
        // QEMU saves a state once per stop: run on, then stop again.
        qmp.execute("cont", Value::Null).unwrap();
        std::thread::sleep(Duration::from_millis(200));

        // A full snapshot: RAM migrated into the file too.
        let full = dir.join(format!("full-{round}"));
        let t = Instant::now();
        qmp.execute("stop", Value::Null).unwrap();
        qmp.execute("migrate-set-capabilities", ignore_shared(false))
            .unwrap();
        let uri = format!("exec:cat > '{}'", full.display());
        qmp.execute("migrate", json!({ "uri": uri })).unwrap();
        wait_migrated(&mut qmp);
        save_full.0.push(ms(t));
        full_size
            .0
            .push(std::fs::metadata(&full).unwrap().len() as f64 / f64::from(1 << 20));
        let full_disk = dir.join(format!("disk-full-{round}"));
        copy_file(&overlay, &full_disk);
        drop(qmp);

        // Restores: QEMU start to the guest running again.
        for (shared, stats, rss) in [
            (true, &mut restore_shared, &mut rss_shared),
            (false, &mut restore_full, &mut rss_full),
        ] {
            let name = format!("restore-{round}-{shared}");
            let (ram, disk, from) = if shared {
                (Some(shared_files[0].as_path()), &shared_files[1], &state)
            } else {
                (None, &full_disk, &full)
            };
            let t = Instant::now();
            let (restored, started) = Qemu::start(&dir, &name, &image, disk, ram, true);
            start.0.push(started);
            let mut qmp = restored.qmp();
            qmp.execute("migrate-set-capabilities", ignore_shared(shared))
                .unwrap();
            let uri = format!("exec:cat '{}'", from.display());
            qmp.execute("migrate-incoming", json!({ "uri": uri }))
                .unwrap();
            wait_migrated(&mut qmp);
            qmp.execute("cont", Value::Null).unwrap();
            assert_eq!(qmp.status().unwrap(), "running");
            stats.0.push(ms(t));
            drop(qmp);
            std::thread::sleep(Duration::from_secs(1));
            rss.0.push(rss_mib(restored.child.id()));
            drop(restored);
        }
        for file in shared_files.iter().chain([&state, &full, &full_disk]) {
            let _ = std::fs::remove_file(file);
        }
        // The source runs on for the next round.
        source.qmp().execute("cont", Value::Null).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(source);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::io::stdout().flush();
    vec![
        format!(
            "QEMU {}, `-M microvm` with the agent runtime's flags, {accel}; guest: the image's \
             Debian kernel, initramfs and root file system (no NIC), 1 vCPU, 256 MiB, booted to \
             envd once and idle, then paused and restored {ROUNDS} times.\n",
            qemu_version()
        ),
        "| operation | unit | n | min | p50 | mean | max |".to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
        start.row("QEMU process start to QMP ready", "ms"),
        boot.row(
            "boot to envd listening (no NIC: includes init's 5 s wait for one)",
            "ms",
        ),
        save_shared.row(
            "pause: device state to a file, RAM stays in the shared memory file (agent's way)",
            "ms",
        ),
        save_full.row(
            "full snapshot: RAM and device state migrated to a file",
            "ms",
        ),
        full_size.row("full snapshot file", "MiB"),
        restore_shared.row(
            "restore, shared memory file: QEMU start to running (incoming migration)",
            "ms",
        ),
        restore_full.row(
            "restore, full snapshot: QEMU start to running (incoming migration)",
            "ms",
        ),
        rss_shared.row(
            "RSS of an idle restored QEMU (shared memory file), 1 s after",
            "MiB",
        ),
        rss_full.row(
            "RSS of an idle restored QEMU (full snapshot), 1 s after",
            "MiB",
        ),
    ]
}

fn qemu_version() -> String {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .nth(3)
        .unwrap_or("(unknown version)")
        .to_owned()
}
