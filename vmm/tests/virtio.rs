//! virtio-mmio devices driven by small guest programs in real KVM VMs: a
//! block device on a file (read, write, flush, id, errors, read-only), a
//! network device on a real tap in its own network namespace, and a
//! snapshot between block requests that resumes in a new VM. Needs
//! /dev/kvm; says so and passes without.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, run_for, Console};
use wrenn_vmm::virtio::block::{DriveConfig, DriveSource};
use wrenn_vmm::{Exit, Machine, MachineConfig, MemoryFrom};

const CONFIG: MachineConfig = MachineConfig {
    vcpus: 1,
    memory_mb: 16,
    track_dirty_pages: false,
};
/// What the test writes into sector 0 for the guest to read.
const SECTOR_0: &[u8] = b"wrenn-sector-0!!";

/// A 1 MiB disk whose sector 0 starts with [`SECTOR_0`] and carries a
/// known word pattern after it.
fn disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    let mut sector = vec![0u8; 512];
    sector[..16].copy_from_slice(SECTOR_0);
    for (i, byte) in sector.iter_mut().enumerate().skip(16) {
        *byte = (i * 13) as u8;
    }
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    file.write_all_at(&sector, 0).unwrap();
    path
}

fn sum_words(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .fold(0, u64::wrapping_add)
}

fn drive(path: &Path, read_only: bool) -> DriveConfig {
    DriveConfig {
        drive_id: "rootfs".into(),
        source: DriveSource::Raw {
            path: path.to_path_buf(),
        },
        is_root_device: true,
        read_only,
    }
}

fn blk_expected(read_only: bool) -> String {
    let mut sector = vec![0u8; 512];
    sector[..16].copy_from_slice(SECTOR_0);
    for (i, byte) in sector.iter_mut().enumerate().skip(16) {
        *byte = (i * 13) as u8;
    }
    format!(
        "capacity {:016x}\nwrite {}\nread 00 {} {:016x}\nflush 00\nid 00 rootfs\nrange 01\ninterrupts yes\n",
        (1u64 << 20) / 512,
        if read_only { "01" } else { "00" },
        std::str::from_utf8(SECTOR_0).unwrap(),
        sum_words(&sector)
    )
}

#[test]
fn a_guest_reads_and_writes_a_file_backed_disk_through_virtio_blk() {
    if !kvm_or_skip("virtio-blk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let console = Console::default();
    let mut machine = Machine::new(CONFIG, Box::new(console.clone())).unwrap();
    let slot = machine.add_drive(drive(&path, false)).unwrap();
    assert_eq!((slot.addr, slot.gsi), (0xd000_0000, 5));
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_VIRTIO_BLK")).unwrap())
        .unwrap();
    let (_machine, exit) = run_for(machine, Duration::from_secs(60));
    assert_eq!((exit, console.text()), (Exit::Reset, blk_expected(false)));
    let mut written = vec![0u8; 512];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut written, 512)
        .unwrap();
    let pattern: Vec<u8> = (0..512).map(|i| (3 + 7 * i) as u8).collect();
    assert_eq!(written, pattern, "sector 1 on the host");
}

#[test]
fn a_read_only_drive_refuses_writes_with_an_io_error() {
    if !kvm_or_skip("virtio-blk read-only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let before = std::fs::read(&path).unwrap();
    let console = Console::default();
    let mut machine = Machine::new(CONFIG, Box::new(console.clone())).unwrap();
    machine.add_drive(drive(&path, true)).unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_VIRTIO_BLK")).unwrap())
        .unwrap();
    let (_machine, exit) = run_for(machine, Duration::from_secs(60));
    assert_eq!((exit, console.text()), (Exit::Reset, blk_expected(true)));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the disk is unchanged"
    );
}

#[test]
fn a_missing_or_odd_sized_disk_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut machine = Machine::new(CONFIG, Box::new(std::io::sink())).unwrap();
    let err = machine
        .add_drive(drive(&dir.path().join("absent.raw"), false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absent.raw") && err.contains("rootfs"),
        "{err}"
    );
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, [0u8; 700]).unwrap();
    let err = machine
        .add_drive(drive(&odd, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("512-byte sectors"), "{err}");
}

/// Sum of every word `virtio_blk_many` writes: word i of sector s is
/// s << 32 | i, for sectors 2 to 129.
fn many_sum() -> u64 {
    (2u64..130)
        .flat_map(|s| (0u64..64).map(move |i| s << 32 | i))
        .fold(0, u64::wrapping_add)
}

#[test]
fn block_requests_resume_after_a_snapshot_taken_between_them() {
    if !kvm_or_skip("virtio-blk snapshot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let mut machine = Machine::new(CONFIG, Box::new(std::io::sink())).unwrap();
    machine.add_drive(drive(&path, false)).unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_VIRTIO_BLK_MANY")).unwrap())
        .unwrap();

    // Stop the guest once it has written sector 20 (of 2 to 129).
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, path) = (Arc::clone(&stop), path.clone());
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).unwrap();
            let mut word = [0u8; 8];
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                file.read_exact_at(&mut word, 20 * 512).unwrap();
                if u64::from_le_bytes(word) == 20 << 32 || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            stop.store(true, Ordering::Release);
        })
    };
    machine.virtio().start(false).unwrap();
    let exit = machine.run_until(&stop).unwrap();
    machine.virtio().stop().unwrap();
    watcher.join().unwrap();
    assert_eq!(exit, Exit::Paused, "the guest finished before the stop");
    let snapshot = dir.path().join("snapshot");
    machine.save(&snapshot).unwrap();
    let saved = machine.virtio().save().unwrap();
    drop(machine);
    let next_avail = saved[0].transport.queues[0].next_avail;
    assert!(
        (19..128).contains(&next_avail),
        "stopped after {next_avail} requests"
    );

    // The restored device starts where the saved one stopped.
    let console = Console::default();
    let restored =
        Machine::restore(&snapshot, MemoryFrom::Copy, Box::new(console.clone())).unwrap();
    assert_eq!(restored.virtio().save().unwrap(), saved);
    let (_restored, exit) = run_for(restored, Duration::from_secs(60));
    assert_eq!(
        (exit, console.text()),
        (Exit::Reset, format!("wrote 128 sum {:016x}\n", many_sum()))
    );
    let disk = std::fs::read(&path).unwrap();
    for s in 2u64..130 {
        let first = u64::from_le_bytes(disk[s as usize * 512..][..8].try_into().unwrap());
        assert_eq!(first, s << 32, "sector {s}");
    }
}

/// A network namespace with one tap in it, both removed when dropped.
struct NetNs {
    name: String,
    tap: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// `wrenn-test-<pid>` with an up tap in it, IPv6 off so the host
    /// sends the guest nothing of its own.
    fn create() -> Result<NetNs, String> {
        let pid = std::process::id();
        let name = format!("wrenn-test-{pid}");
        ip(&["netns", "add", &name])?;
        let netns = NetNs {
            name,
            tap: format!("wtap{}", pid % 1_000_000),
        };
        let n = netns.name.as_str();
        let sysctl = "net.ipv6.conf.default.disable_ipv6=1";
        ip(&["netns", "exec", n, "sysctl", "-qw", sysctl])?;
        ip(&["-n", n, "tuntap", "add", "dev", &netns.tap, "mode", "tap"])?;
        ip(&["-n", n, "link", "set", &netns.tap, "up"])?;
        Ok(netns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.name, "link", "del", &self.tap]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const ETHERTYPE: u16 = 0x88b5;

/// In a thread that entered `netns`: waits for the guest's frame on
/// `tap`, answers it until `done` (a host's transmit to a tap can be
/// dropped, as on a wire), and returns it. `ready` hears when the socket
/// is bound.
fn answer_guest_frame(
    netns: &str,
    tap: &str,
    ready: std::sync::mpsc::Sender<()>,
    done: &AtomicBool,
) -> Result<Vec<u8>, String> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).map_err(|e| e.to_string())?;
    // SAFETY: setns on a namespace file we hold open; it changes only
    // this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    let protocol = ETHERTYPE.to_be();
    // SAFETY: plain socket call; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: a NUL-terminated name that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {tap} in {netns}"));
    }
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: addr is a sockaddr_ll of `len` bytes.
    if unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(format!("bind: {}", std::io::Error::last_os_error()));
    }
    let timeout = libc::timeval {
        tv_sec: 60,
        tv_usec: 0,
    };
    // SAFETY: a timeval that outlives the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let _ = ready.send(());
    let mut frame = vec![0u8; 2048];
    // SAFETY: the buffer is writable for its length.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            frame.as_mut_ptr().cast(),
            frame.len(),
            0,
        )
    };
    if got < 0 {
        return Err(format!("recv: {}", std::io::Error::last_os_error()));
    }
    frame.truncate(got as usize);

    let mut reply = Vec::new();
    reply.extend_from_slice(&GUEST_MAC);
    reply.extend_from_slice(&HOST_MAC);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(b"hello from the host");
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::Acquire) && Instant::now() < deadline {
        // SAFETY: the reply and addr outlive the call.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                reply.as_ptr().cast(),
                reply.len(),
                0,
                (&raw const addr).cast(),
                len,
            )
        };
        if sent != reply.len() as isize {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(frame)
}

#[test]
fn a_guest_frame_reaches_the_tap_and_the_answer_reaches_the_guest() {
    if !kvm_or_skip("virtio-net") {
        return;
    }
    let netns = match NetNs::create() {
        Ok(netns) => netns,
        Err(e) => {
            panic!("cannot make a network namespace with a tap (root and iproute2 needed): {e}")
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = common::Vmm::start_with(dir.path(), "net", &["ip", "netns", "exec", &netns.name]);
    let (ready, bound) = std::sync::mpsc::channel();
    let done = Arc::new(AtomicBool::new(false));
    let peer = {
        let (name, tap, done) = (netns.name.clone(), netns.tap.clone(), Arc::clone(&done));
        std::thread::spawn(move || answer_guest_frame(&name, &tap, ready, &done))
    };
    bound
        .recv_timeout(Duration::from_secs(10))
        .expect("the packet socket is bound");
    let (status, body) = vmm.put(
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": netns.tap, "guest_mac": "06:00:ac:10:00:02"}),
    );
    assert_eq!(status, 204, "{body}");
    let program = serde_json::json!({"program_path": env!("WRENN_GUEST_VIRTIO_NET")});
    assert_eq!(vmm.put("/boot-source", program).0, 204);
    let (status, body) = vmm.put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    assert_eq!(status, 204, "{body}");

    let exited = vmm.wait();
    done.store(true, Ordering::Release);
    let frame = peer.join().unwrap().expect("the guest's frame");
    assert!(exited.success());
    assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
    assert_eq!(&frame[6..12], &GUEST_MAC, "from the guest's MAC");
    assert_eq!(&frame[12..14], &ETHERTYPE.to_be_bytes());
    assert_eq!(&frame[14..], b"wrenn guest frame");
    assert_eq!(
        vmm.serial(),
        "mac 06:00:ac:10:00:02\nsent\ngot hello from the host\ninterrupts yes\n"
    );
    drop(vmm);
    drop(netns);
}

/// Name and seccomp filter count of each thread of process `pid`.
fn thread_filters(pid: u32) -> Vec<(String, String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    threads
}

#[test]
fn a_drive_configured_through_the_api_survives_a_snapshot_loaded_onto_another_disk() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let first = common::Vmm::start(dir.path(), "first");
    let drive = |id: &str, path: &Path| json!({"drive_id": id, "path_on_host": path, "is_root_device": true, "is_read_only": false});
    // Bad input first: each a 400 that says what is wrong.
    let cases = [
        (
            "/drives/rootfs",
            drive("rootfs", &dir.path().join("absent.raw")),
            "cannot open",
        ),
        ("/drives/other", drive("rootfs", &path), "must be the same"),
        ("/drives/bad.id", drive("bad.id", &path), "letters, digits"),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:zz:00:00:01"}),
            "not a MAC address",
        ),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}),
            "unicast",
        ),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "a/b", "guest_mac": "06:00:00:00:00:01"}),
            "tap name",
        ),
    ];
    for (resource, body, words) in cases {
        let (status, answer) = first.put(resource, body);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            status == 400 && message.contains(words),
            "{resource}: {status} {answer}"
        );
    }
    if !kvm_or_skip("virtio-blk through the API") {
        return;
    }
    let (status, body) = first.put("/drives/rootfs", drive("rootfs", &path));
    assert_eq!(status, 204, "{body}");
    let program = json!({"program_path": env!("WRENN_GUEST_VIRTIO_BLK_MANY")});
    assert_eq!(first.put("/boot-source", program).0, 204);
    let (status, body) = first.put("/actions", json!({"action_type": "InstanceStart"}));
    assert_eq!(status, 204, "{body}");
    let (status, _) = first.put("/drives/rootfs", drive("rootfs", &path));
    assert_eq!(status, 409, "drives are set before start");

    // Pause once sector 20 is written.
    let file = std::fs::File::open(&path).unwrap();
    let mut word = [0u8; 8];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The devices thread runs under its own filter on top of the VMM's.
        let threads = thread_filters(first.child.id());
        assert!(
            threads.iter().all(|(_, mode, _)| mode == "2"),
            "{threads:?}"
        );
        file.read_exact_at(&mut word, 20 * 512).unwrap();
        if u64::from_le_bytes(word) == 20 << 32 {
            assert!(
                threads
                    .iter()
                    .any(|(name, _, filters)| name == "devices" && filters == "2"),
                "{threads:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "sector 20 was never written");
        std::thread::sleep(Duration::from_micros(500));
    }
    let (status, body) = first.put("/actions", json!({"action_type": "Pause"}));
    assert_eq!(status, 204, "{body}");
    let snapshot = dir.path().join("snapshot");
    let (status, body) = first.put("/snapshot/create", json!({"snapshot_path": snapshot}));
    assert_eq!(status, 204, "{body}");
    drop(first);

    // Another sandbox: a copy of the disk, named at load time.
    let copy = dir.path().join("copy.raw");
    std::fs::copy(&path, &copy).unwrap();
    let mut second = common::Vmm::start(dir.path(), "second");
    let (status, answer) = second.put(
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "drive_overrides": [{"drive_id": "nope", "path_on_host": copy}]}),
    );
    assert!(
        status == 400 && answer.to_string().contains("nope"),
        "{answer}"
    );
    let (status, body) = second.put(
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "resume_vm": true,
               "drive_overrides": [{"drive_id": "rootfs", "path_on_host": copy}]}),
    );
    assert_eq!(status, 204, "{body}");
    assert!(second.wait().success());
    assert_eq!(
        second.serial(),
        format!("wrote 128 sum {:016x}\n", many_sum())
    );
    let copied = std::fs::read(&copy).unwrap();
    let original = std::fs::read(&path).unwrap();
    for s in 2usize..130 {
        let first = u64::from_le_bytes(copied[s * 512..][..8].try_into().unwrap());
        assert_eq!(first, (s as u64) << 32, "sector {s} of the copy");
    }
    assert_eq!(
        &original[129 * 512..130 * 512],
        &[0u8; 512],
        "the original was left alone"
    );
}
