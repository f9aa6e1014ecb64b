//! `agent::network` against real namespaces, links and nftables. Needs root.
//!
//! There is no VM here, so each test that needs a guest puts a stand-in
//! where the VM would be: after `setup`, the slot's `tap0` is replaced by a
//! veth whose slot end is also called `tap0` (169.254.0.22/30) and whose
//! other end is `eth0` (169.254.0.21/30, default route via 169.254.0.22) in
//! a namespace of its own, `wrenn-test-guest-<n>`. From the slot
//! namespace's side that is what a guest is: another network stack one link
//! away, behind the same interface name the nft rules match, with the same
//! address and gateway. Servers and clients for the guest run on threads
//! that entered that namespace.
//!
//! "The outside" is another test namespace, `wrenn-test-out-<n>`, joined to
//! the root namespace by a veth (198.51.100.1/30 on the root side, .2 in
//! it). It knows no route to the transit range, so a guest can only get an
//! answer from it if both the slot and the root namespace masquerade.
//!
//! Slots 16000..=16383 are reserved for these tests. Every test removes what
//! it made through drop guards, also when it fails; the last test out
//! removes the shared root table and restores `net.ipv4.ip_forward` if no
//! slot is left on the machine.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use wrenn_agent::network::{self, NetError};

const ENVD_PORT: u16 = 49983;
/// How long a connection attempt or a reply may take before it counts as
/// blocked.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The root side and the far side of the "outside" link.
const OUTSIDE_ROOT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OUTSIDE_FAR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const OUTSIDE_PORT: u16 = 8080;
/// A stand-in for a cloud metadata server, in "the outside".
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

// ---------------------------------------------------------------- helpers

/// Runs `ip` with `args`; panics with its stderr on failure.
fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ip` with `args`; whether it succeeded (for probes and cleanup).
fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `nft list tables` in the root namespace, or inside `netns`.
fn nft_tables(netns: Option<&str>) -> String {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let output = command
        .args(["list", "tables"])
        .output()
        .expect("running nft");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn netns_names() -> Vec<String> {
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests build network namespaces: run them as root"
    );
}

/// Runs `work` on a thread inside the namespace pinned at /run/netns/`name`.
fn in_netns<T: Send + 'static>(name: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{name}")).expect("opening namespace");
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        work()
    })
    .join()
    .expect("namespace thread panicked")
}

/// Connects to `target` from the root namespace (`None`) or from `netns`.
/// The socket belongs to that namespace for its whole life.
fn connect(netns: Option<&str>, target: SocketAddrV4) -> io::Result<TcpStream> {
    let dial = move || {
        let stream = TcpStream::connect_timeout(&target.into(), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        Ok(stream)
    };
    match netns {
        Some(ns) => in_netns(ns, dial),
        None => dial(),
    }
}

/// One request/reply on an open connection: the server's "<tag> <peer ip>".
fn ask(stream: &mut TcpStream) -> io::Result<String> {
    stream.write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_string())
}

/// Connects and asks once.
fn exchange(netns: Option<&str>, target: SocketAddrV4) -> io::Result<String> {
    ask(&mut connect(netns, target)?)
}

/// A TCP server on a thread inside a namespace: answers every line with
/// "<tag> <peer ip>". Stops when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(netns: Option<&str>, addr: SocketAddrV4, tag: &str) -> Server {
        let file = netns.map(|ns| File::open(format!("/run/netns/{ns}")).expect("opening ns"));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let tag = tag.to_string();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Some(file) = file {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let listener = TcpListener::bind(addr).expect("binding the test server");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let connections: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let tag = tag.clone();
                        let handle = std::thread::spawn(move || serve(stream, &tag, peer.ip()));
                        connections.lock().unwrap().push(handle);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            for handle in connections.into_inner().unwrap() {
                let _ = handle.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("test server did not start");
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve(stream: TcpStream, tag: &str, peer: std::net::IpAddr) {
    let _ = stream.set_nonblocking(false);
    // Bounded, so a connection the test left open cannot hold the thread.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if (&stream)
            .write_all(format!("{tag} {peer}\n").as_bytes())
            .is_err()
        {
            break;
        }
        line.clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Held by every test that sets up slots. The last one out removes the
/// shared root table and restores `net.ipv4.ip_forward`, unless slots
/// remain on the machine (a real agent's).
struct HostUse;

/// (tests inside, ip_forward before the first one came in)
static HOST_USERS: Mutex<(usize, Option<String>)> = Mutex::new((0, None));
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl HostUse {
    fn enter() -> HostUse {
        require_root();
        let mut users = HOST_USERS.lock().unwrap_or_else(|p| p.into_inner());
        if users.0 == 0 {
            users.1 = std::fs::read_to_string(IP_FORWARD).ok();
        }
        users.0 += 1;
        HostUse
    }
}

impl Drop for HostUse {
    fn drop(&mut self) {
        let mut users = HOST_USERS.lock().unwrap_or_else(|p| p.into_inner());
        users.0 -= 1;
        if users.0 > 0 || !matches!(network::list_existing(), Ok(slots) if slots.is_empty()) {
            return;
        }
        if let Err(e) = network::remove_host() {
            eprintln!("cleanup: removing the host table: {e}");
        }
        if let Some(value) = users.1.take() {
            let _ = std::fs::write(IP_FORWARD, value.trim());
        }
    }
}

/// Tears down a slot, and whatever test namespaces and root links were
/// made around it, when dropped.
struct SlotGuard {
    slot: u32,
    netns: Vec<String>,
    links: Vec<String>,
}

impl SlotGuard {
    fn new(slot: u32) -> SlotGuard {
        SlotGuard {
            slot,
            netns: Vec::new(),
            links: Vec::new(),
        }
    }

    /// Swaps the slot's tap0 for a veth to a stand-in guest namespace (see
    /// the file docs); returns that namespace's name.
    fn attach_guest(&mut self) -> String {
        let slot_ns = format!("wrenn-{}", self.slot);
        let guest = format!("wrenn-test-guest-{}", self.slot);
        ip_ok(&["netns", "del", &guest]);
        ip(&["netns", "add", &guest]);
        self.netns.push(guest.clone());
        ip(&["-n", &slot_ns, "link", "del", "tap0"]);
        ip(&[
            "-n", &slot_ns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns",
            &guest,
        ]);
        ip(&[
            "-n",
            &slot_ns,
            "addr",
            "add",
            "169.254.0.22/30",
            "dev",
            "tap0",
        ]);
        ip(&["-n", &slot_ns, "link", "set", "tap0", "up"]);
        ip(&["-n", &guest, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &guest,
            "addr",
            "add",
            "169.254.0.21/30",
            "dev",
            "eth0",
        ]);
        ip(&["-n", &guest, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &guest,
            "route",
            "add",
            "default",
            "via",
            "169.254.0.22",
        ]);
        guest
    }

    /// Makes "the outside": a namespace behind a veth from the root
    /// namespace; returns its name.
    fn attach_outside(&mut self) -> String {
        let outside = format!("wrenn-test-out-{}", self.slot);
        let root_end = format!("wto{}", self.slot);
        ip_ok(&["netns", "del", &outside]);
        ip_ok(&["link", "del", &root_end]);
        ip(&["netns", "add", &outside]);
        self.netns.push(outside.clone());
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", "eth0", "netns", &outside,
        ]);
        self.links.push(root_end.clone());
        ip(&[
            "addr",
            "add",
            &format!("{OUTSIDE_ROOT}/30"),
            "dev",
            &root_end,
        ]);
        ip(&["link", "set", &root_end, "up"]);
        ip(&[
            "-n",
            &outside,
            "addr",
            "add",
            &format!("{OUTSIDE_FAR}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &outside, "link", "set", "eth0", "up"]);
        outside
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Err(e) = network::teardown(self.slot) {
            eprintln!("cleanup: teardown of slot {}: {e}", self.slot);
        }
        for link in &self.links {
            ip_ok(&["link", "del", link]);
        }
        for ns in &self.netns {
            ip_ok(&["netns", "del", ns]);
        }
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn setup_builds_every_piece_and_teardown_removes_every_one() {
    let _host = HostUse::enter();
    let slot = 16001;
    let _guard = SlotGuard::new(slot);

    let net = network::setup(slot, false).expect("setup");
    // 16001 = 62 * 256 + 129; its transit block is 4 * 16001 = 64004
    // addresses into 10.200.0.0/16, i.e. 10.200.250.4/30.
    assert_eq!(net.netns, "wrenn-16001");
    assert_eq!(net.host_veth, "wrenn-h16001");
    assert_eq!(net.host_ip, Ipv4Addr::new(10, 201, 62, 129));
    assert_eq!(net.transit_host, Ipv4Addr::new(10, 200, 250, 5));
    assert_eq!(net.transit_ns, Ipv4Addr::new(10, 200, 250, 6));
    assert_eq!(net.guest_addr(ENVD_PORT).to_string(), "10.201.62.129:49983");

    // A second setup of the same slot replaces the first.
    let again = network::setup(slot, false).expect("second setup");
    assert_eq!(again, net);

    let ns = net.netns.as_str();
    assert!(netns_names().iter().any(|n| n == ns));
    let tap = ip(&["-n", ns, "-d", "link", "show", "tap0"]);
    assert!(tap.contains("tun type tap"), "{tap}");
    assert!(tap.contains("persist on"), "{tap}");
    let tap_addr = ip(&["-n", ns, "-4", "addr", "show", "dev", "tap0"]);
    assert!(tap_addr.contains("inet 169.254.0.22/30"), "{tap_addr}");
    let veth = ip(&["-n", ns, "-d", "addr", "show", "dev", "veth0"]);
    assert!(
        veth.contains("veth") && veth.contains("inet 10.200.250.6/30"),
        "{veth}"
    );
    let lo = ip(&["-n", ns, "link", "show", "lo"]);
    assert!(lo.contains("UP"), "{lo}");
    let host_end = ip(&["-d", "addr", "show", "dev", "wrenn-h16001"]);
    assert!(
        host_end.contains("veth") && host_end.contains("inet 10.200.250.5/30"),
        "{host_end}"
    );
    let route = ip(&["route", "show", "10.201.62.129"]);
    assert!(
        route.contains("via 10.200.250.6 dev wrenn-h16001"),
        "{route}"
    );
    let default = ip(&["-n", ns, "route", "show", "default"]);
    assert!(default.contains("via 10.200.250.5 dev veth0"), "{default}");
    assert!(nft_tables(Some(ns)).contains("table inet wrenn\n"));
    assert!(nft_tables(None).contains("table inet wrenn-host"));
    let forward = in_netns(ns, || std::fs::read_to_string(IP_FORWARD).unwrap());
    assert_eq!(forward.trim(), "1", "forwarding inside the slot namespace");

    network::teardown(slot).expect("teardown");
    assert!(!netns_names().iter().any(|n| n == ns));
    assert!(!std::path::Path::new("/run/netns/wrenn-16001").exists());
    assert!(!ip_ok(&["link", "show", "wrenn-h16001"]));
    assert!(!ip(&["link", "show"]).contains("wrenn-h16001"));
    assert_eq!(ip(&["route", "show", "10.201.62.129"]).trim(), "");
    assert!(!nft_tables(None).contains("table inet wrenn\n"));
    network::teardown(slot).expect("second teardown");
}

#[test]
fn host_reaches_the_guest_and_the_internet_flag_controls_only_outbound() {
    let _host = HostUse::enter();
    // 16128 = 63 * 256: its host address ends in .0, which must work too.
    let slot = 16128;
    let mut guard = SlotGuard::new(slot);
    let net = network::setup(slot, false).expect("setup");
    assert_eq!(net.host_ip, Ipv4Addr::new(10, 201, 63, 0));
    let guest = guard.attach_guest();
    let outside = guard.attach_outside();
    let _envd = Server::start(
        Some(&guest),
        SocketAddrV4::new(network::GUEST_IP, ENVD_PORT),
        "guest",
    );
    let _far = Server::start(
        Some(&outside),
        SocketAddrV4::new(OUTSIDE_FAR, OUTSIDE_PORT),
        "outside",
    );
    let envd = net.guest_addr(ENVD_PORT);
    let far = SocketAddrV4::new(OUTSIDE_FAR, OUTSIDE_PORT);
    // The guest sees the host's transit address: the way in is DNAT only.
    let from_host = format!("guest {}", net.transit_host);

    // internet=false: the host gets in, the guest does not get out.
    assert_eq!(exchange(None, envd).expect("host to envd"), from_host);
    let blocked = exchange(Some(&guest), far);
    assert!(blocked.is_err(), "guest reached the outside: {blocked:?}");

    // On: out it goes, masqueraded by the slot and then by the root namespace.
    network::set_internet(slot, true).expect("internet on");
    assert_eq!(
        exchange(Some(&guest), far).expect("guest to outside"),
        format!("outside {OUTSIDE_ROOT}")
    );
    assert_eq!(exchange(None, envd).expect("host to envd"), from_host);

    // Off again: an open connection dies too, the host still gets in.
    let mut open = connect(Some(&guest), far).expect("guest connects out");
    assert_eq!(
        ask(&mut open).expect("first reply"),
        format!("outside {OUTSIDE_ROOT}")
    );
    network::set_internet(slot, false).expect("internet off");
    let cut = ask(&mut open);
    assert!(
        cut.is_err(),
        "open connection survived internet=false: {cut:?}"
    );
    assert!(exchange(Some(&guest), far).is_err());
    assert_eq!(exchange(None, envd).expect("host to envd"), from_host);

    // And on once more.
    network::set_internet(slot, true).expect("internet on again");
    assert!(exchange(Some(&guest), far).is_ok());

    // The slot namespace itself (where QEMU runs) takes no connections from
    // the guest, though it answers on its own addresses.
    let gateway_service = SocketAddrV4::new(network::GATEWAY_IP, 18080);
    let _gateway = Server::start(Some(&net.netns), gateway_service, "slot");
    assert!(
        exchange(Some(&net.netns), gateway_service).is_ok(),
        "the slot service is up"
    );
    let inward = exchange(Some(&guest), gateway_service);
    assert!(
        inward.is_err(),
        "guest reached its slot namespace: {inward:?}"
    );

    // Nothing beyond the host reaches a guest, even one that knows the way
    // (a neighbour routing 10.201.0.0/16 through this host).
    ip(&[
        "-n",
        &outside,
        "route",
        "add",
        "10.201.0.0/16",
        "via",
        &OUTSIDE_ROOT.to_string(),
    ]);
    let intruder = exchange(Some(&outside), envd);
    assert!(intruder.is_err(), "the outside reached envd: {intruder:?}");

    // Link-local services beyond the host (a cloud's metadata server) are
    // off limits to guests, though the host itself reaches them.
    ip(&[
        "-n",
        &outside,
        "addr",
        "add",
        &format!("{METADATA}/32"),
        "dev",
        "lo",
    ]);
    ip(&[
        "route",
        "add",
        &format!("{METADATA}/32"),
        "via",
        &OUTSIDE_FAR.to_string(),
    ]);
    let metadata = SocketAddrV4::new(METADATA, OUTSIDE_PORT);
    let _metadata = Server::start(Some(&outside), metadata, "metadata");
    assert!(
        exchange(None, metadata).is_ok(),
        "the host reaches the metadata stand-in"
    );
    let leak = exchange(Some(&guest), metadata);
    assert!(
        leak.is_err(),
        "guest reached a link-local service: {leak:?}"
    );
}

#[test]
fn two_slots_are_isolated_and_tearing_one_down_leaves_the_other_working() {
    let _host = HostUse::enter();
    let (slot_a, slot_b) = (16300, 16301);
    let mut guard_a = SlotGuard::new(slot_a);
    let mut guard_b = SlotGuard::new(slot_b);
    let a = network::setup(slot_a, true).expect("setup a");
    let b = network::setup(slot_b, true).expect("setup b");
    assert_ne!(a.host_ip, b.host_ip);
    assert_ne!(a.transit_host, b.transit_host);
    let guest_a = guard_a.attach_guest();
    let guest_b = guard_b.attach_guest();
    let envd_at = SocketAddrV4::new(network::GUEST_IP, ENVD_PORT);
    let _envd_a = Server::start(Some(&guest_a), envd_at, "a");
    let _envd_b = Server::start(Some(&guest_b), envd_at, "b");
    // A service of the host itself, on slot A's host end.
    let host_service = SocketAddrV4::new(a.transit_host, 18080);
    let _host_server = Server::start(None, host_service, "host");

    let a_envd = a.guest_addr(ENVD_PORT);
    let b_envd = b.guest_addr(ENVD_PORT);
    assert!(exchange(None, a_envd).expect("host to a").starts_with("a "));
    assert!(exchange(None, b_envd).expect("host to b").starts_with("b "));
    assert!(
        exchange(None, host_service).is_ok(),
        "the host service is up"
    );

    // Even with internet on, guest A reaches neither guest B nor the host.
    let to_b = exchange(Some(&guest_a), b_envd);
    assert!(to_b.is_err(), "guest a reached guest b: {to_b:?}");
    let to_host = exchange(Some(&guest_a), host_service);
    assert!(to_host.is_err(), "guest a reached the host: {to_host:?}");

    network::teardown(slot_a).expect("teardown a");
    assert!(exchange(None, a_envd).is_err());
    assert!(exchange(None, b_envd)
        .expect("host to b after a went")
        .starts_with("b "));
}

#[test]
fn list_existing_reports_slots_left_behind_until_they_are_torn_down() {
    let _host = HostUse::enter();
    let _full = SlotGuard::new(16383);
    let _netns_only = SlotGuard::new(16382);
    let _veth_only = SlotGuard::new(16381);

    // A complete slot whose teardown was skipped...
    network::setup(16383, false).expect("setup");
    // ...a namespace left by a setup that died early...
    ip(&["netns", "add", "wrenn-16382"]);
    // ...and a lone host veth.
    ip(&[
        "link",
        "add",
        "wrenn-h16381",
        "type",
        "veth",
        "peer",
        "name",
        "wrenn-tp16381",
    ]);

    let found = network::list_existing().expect("list");
    for slot in [16381, 16382, 16383] {
        assert!(found.contains(&slot), "{slot} missing from {found:?}");
    }

    for slot in [16381, 16382, 16383] {
        network::teardown(slot).expect("teardown");
    }
    let found = network::list_existing().expect("list");
    assert!(
        !found.iter().any(|s| (16381..=16383).contains(s)),
        "{found:?}"
    );
    assert!(!ip(&["link", "show"]).contains("wrenn-tp16381"));
}

#[test]
fn slots_beyond_the_address_plan_are_refused_before_touching_anything() {
    let err = network::setup(16384, true).unwrap_err();
    assert!(
        matches!(err, NetError::InvalidSlot { slot: 16384 }),
        "{err}"
    );
    assert!(!std::path::Path::new("/run/netns/wrenn-16384").exists());
    assert!(matches!(
        network::teardown(20000),
        Err(NetError::InvalidSlot { .. })
    ));
    assert!(matches!(
        network::set_internet(16002, true),
        Err(NetError::NoSuchSlot { slot: 16002, .. })
    ));
}
