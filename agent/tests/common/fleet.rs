//! A test network for a fleet: a Linux bridge in the host namespace with an
//! address of its own, and N named network namespaces, each joined to the
//! bridge by a veth and holding one or more addresses of the bridge's /24.
//! Agents started in those namespaces (`Agent::start_in`) gossip with each
//! other as separate machines would, and the test reaches each one's API
//! through the bridge. A [`Partition`] drops UDP (gossip) between two
//! groups of namespaces with nftables, and heals when dropped.
//!
//! Dropping a [`FleetNet`] removes every namespace, veth, bridge and table it
//! made, on panics too. What a killed run left (its process is gone) is
//! removed by the next [`FleetNet::new`].
//!
//! Not for production networking: iproute2 and nft commands keep the
//! harness short (as `wrenn_tests::netns` does). The agent's own sandbox
//! networks use 10.200.0.0/16 and 10.201.0.0/16; ours live in 10.77.0.0/16.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of the namespaces: `wrenn-fleet-<pid>-<net>-<i>`.
const NETNS_PREFIX: &str = "wrenn-fleet-";
/// Prefix of the bridges: `wrenn-fb<k>`, `k` the third octet of its /24.
const BRIDGE_PREFIX: &str = "wrenn-fb";
/// The bridge's alias, followed by the owning test's PID: how a later run
/// tells a leftover bridge (dead owner) from a live one.
const OWNER_ALIAS: &str = "wrenn-fleet-test";
/// Host ends of the addresses in a namespace start at `.11`.
const FIRST_HOST: u32 = 11;

/// Nets made by this process, for unique names.
static NETS: AtomicU32 = AtomicU32::new(0);
/// Partitions made by this process, for unique table names.
static PARTITIONS: AtomicU32 = AtomicU32::new(0);

/// A bridge and the namespaces on it; removed on drop.
pub struct FleetNet {
    /// Third octet of `10.77.k.0/24`.
    k: u8,
    bridge: String,
    namespaces: Vec<Namespace>,
}

struct Namespace {
    name: String,
    /// The veth end on the bridge, in the host namespace.
    host_veth: String,
    addrs: Vec<Ipv4Addr>,
}

impl FleetNet {
    /// A bridge with `n` namespaces of one address each.
    pub fn new(n: usize) -> FleetNet {
        Self::with_addrs(n, 1)
    }

    /// A bridge with `n` namespaces of `per_ns` addresses each (several
    /// agents per namespace, each on its own address).
    pub fn with_addrs(n: usize, per_ns: usize) -> FleetNet {
        let total = n * per_ns;
        assert!(
            n >= 1 && per_ns >= 1 && total <= (254 - FIRST_HOST) as usize,
            "a fleet net holds 1 to {} addresses in all, not {n} namespaces x {per_ns}",
            254 - FIRST_HOST
        );
        remove_leftovers();
        let pid = std::process::id();
        let id = NETS.fetch_add(1, Ordering::Relaxed);
        let (k, bridge) = claim_bridge(pid, id);
        let mut net = FleetNet {
            k,
            bridge,
            namespaces: Vec::new(),
        };
        // From here on, a failure panics and `net`'s drop removes what was
        // made so far.
        let gateway = format!("{}/24", net.gateway());
        must(ip(&["addr", "add", &gateway, "dev", &net.bridge]));
        must(ip(&["link", "set", &net.bridge, "up"]));
        for i in 0..n {
            let name = format!("{NETNS_PREFIX}{pid}-{id}-{i}");
            let host_veth = format!("wrenn-f{k}-{i}");
            // Our names never repeat within a process: one that exists was
            // left by a dead process that had our PID.
            if Path::new("/run/netns").join(&name).exists() {
                remove_netns(&name);
            }
            must(ip(&["netns", "add", &name]));
            let addrs: Vec<Ipv4Addr> = (0..per_ns)
                .map(|j| net.host_addr(FIRST_HOST + (i * per_ns + j) as u32))
                .collect();
            net.namespaces.push(Namespace {
                name: name.clone(),
                host_veth: host_veth.clone(),
                addrs: addrs.clone(),
            });
            must(ip(&["-n", &name, "link", "set", "lo", "up"]));
            must(ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ]));
            must(ip(&[
                "link",
                "set",
                &host_veth,
                "master",
                &net.bridge,
                "up",
            ]));
            for addr in &addrs {
                let cidr = format!("{addr}/24");
                must(ip(&["-n", &name, "addr", "add", &cidr, "dev", "eth0"]));
            }
            must(ip(&["-n", &name, "link", "set", "eth0", "up"]));
        }
        net
    }

    /// The bridge's own address (the host's, `.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.host_addr(1)
    }

    /// The first address of namespace `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.addrs(i)[0]
    }

    /// Every address of namespace `i`.
    pub fn addrs(&self, i: usize) -> &[Ipv4Addr] {
        &self.ns(i).addrs
    }

    /// The name of namespace `i` (under /run/netns).
    pub fn netns(&self, i: usize) -> &str {
        &self.ns(i).name
    }

    /// How many namespaces there are.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    /// Drops UDP between the addresses of namespaces `a` and those of `b`,
    /// both ways, until the [`Partition`] is healed or dropped. TCP (the
    /// API) is untouched, so the test still sees both sides.
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Partition<'_> {
        assert!(
            !a.is_empty() && !b.is_empty() && a.iter().all(|i| !b.contains(i)),
            "a partition needs two non-empty, disjoint groups of namespaces, not {a:?} and {b:?}"
        );
        let set = |group: &[usize]| {
            group
                .iter()
                .flat_map(|i| self.addrs(*i).iter().map(Ipv4Addr::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (a_set, b_set) = (set(a), set(b));
        let table = format!(
            "wrenn-fleet-cut-{}",
            PARTITIONS.fetch_add(1, Ordering::Relaxed)
        );
        // Dropped where it arrives, in every namespace of either group: a
        // sender sees no error (an output drop would fail its sendto with
        // EPERM), exactly as with a cut link.
        let script = format!(
            "table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tmeta l4proto udp ip saddr {{ {a_set} }} ip daddr {{ {b_set} }} drop\n\
             \t\tmeta l4proto udp ip saddr {{ {b_set} }} ip daddr {{ {a_set} }} drop\n\
             \t}}\n\
             }}\n"
        );
        let mut partition = Partition {
            net: self,
            table,
            namespaces: Vec::new(),
        };
        for i in a.iter().chain(b) {
            let name = self.netns(*i).to_owned();
            must(nft_script(&name, &partition.table, &script));
            partition.namespaces.push(name);
        }
        partition
    }

    fn ns(&self, i: usize) -> &Namespace {
        self.namespaces.get(i).unwrap_or_else(|| {
            panic!(
                "no namespace {i}: this fleet net has {}",
                self.namespaces.len()
            )
        })
    }

    fn host_addr(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.k, host as u8)
    }
}

impl Drop for FleetNet {
    fn drop(&mut self) {
        let mut failures = Vec::new();
        // The veth first: deleting one end deletes the pair at once, while
        // a deleted namespace lets go of its links later, in the background
        // (and never while a process still runs inside it). Its nft tables
        // go with it.
        for ns in &self.namespaces {
            let veth = Path::new("/sys/class/net").join(&ns.host_veth);
            if veth.exists() {
                if let Err(e) = ip(&["link", "delete", &ns.host_veth]) {
                    failures.push(e);
                }
            }
            if let Err(e) = ip(&["netns", "delete", &ns.name]) {
                failures.push(e);
            }
        }
        if let Err(e) = ip(&["link", "delete", &self.bridge]) {
            failures.push(e);
        }
        report(failures, "remove the fleet test network");
    }
}

/// UDP dropped between two groups of namespaces; healed on drop.
pub struct Partition<'a> {
    net: &'a FleetNet,
    table: String,
    /// Namespaces holding the table.
    namespaces: Vec<String>,
}

impl Partition<'_> {
    /// Removes the drop rules now.
    pub fn heal(self) {
        drop(self);
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        let failures: Vec<String> = self
            .namespaces
            .iter()
            .filter_map(|ns| {
                nft(ns, &["delete", "table", "inet", &self.table])
                    .err()
                    .map(|e| format!("{e} (fleet net 10.77.{}.0/24)", self.net.k))
            })
            .collect();
        report(failures, "heal a partition");
    }
}

/// Creates a free bridge `wrenn-fb<k>` for this process: creating the
/// link is the claim, so two test processes never share a /24. The search
/// starts from the PID and a counter so that parallel runs rarely try the
/// same `k` first.
fn claim_bridge(pid: u32, id: u32) -> (u8, String) {
    let alias = format!("{OWNER_ALIAS} {pid}");
    let start = (pid.wrapping_mul(7) + id.wrapping_mul(31)) % 250;
    for step in 0..250 {
        // k in 1..=250: 10.77.0.0/24 stays free for other uses.
        let k = ((start + step) % 250 + 1) as u8;
        let bridge = format!("{BRIDGE_PREFIX}{k}");
        if Path::new("/sys/class/net").join(&bridge).exists() {
            continue;
        }
        if ip(&["link", "add", "name", &bridge, "type", "bridge"]).is_ok() {
            // The kernel ignores an alias given to `link add`. Until it is
            // set, a leftover sweep elsewhere skips this bridge.
            must(ip(&["link", "set", &bridge, "alias", &alias]));
            return (k, bridge);
        }
    }
    panic!(
        "no free /24 in 10.77.0.0/16 for a fleet test network: every {BRIDGE_PREFIX}1..250 \
         bridge exists (see `ip link show type bridge`; delete leftovers with `ip link delete`)"
    );
}

/// Removes what runs of this harness left when their process died: their
/// namespaces (killing, by PID, the agents still inside them) and bridges.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner.filter(|pid| !alive(*pid)) {
            remove_netns(&name);
            remove_agent_dirs(pid);
        }
    }
    let Ok(links) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for link in links.flatten() {
        let name = link.file_name().to_string_lossy().into_owned();
        if !name.starts_with(BRIDGE_PREFIX) {
            continue;
        }
        let alias = std::fs::read_to_string(link.path().join("ifalias")).unwrap_or_default();
        let owner = alias
            .trim()
            .strip_prefix(OWNER_ALIAS)
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if owner.is_some_and(|pid| !alive(pid)) {
            let _ = ip(&["link", "delete", &name]);
        }
    }
}

/// Deletes a leftover namespace, first killing the processes in it (agents
/// of a test that was killed) by PID.
fn remove_netns(name: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    if let Err(e) = ip(&["netns", "delete", name]) {
        eprintln!("warning: cannot remove the leftover namespace {name}: {e}");
    }
}

/// Removes the state folders of the agents of dead test process `pid`
/// (`Agent`'s `wrenn-agent-test-<pid>-<n>`), whose agents were just killed.
fn remove_agent_dirs(pid: u32) {
    let prefix = format!("wrenn-agent-test-{pid}-");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Panics with `what` and the failures, unless already panicking (a second
/// panic would abort the test binary and hide the first): then it warns.
fn report(failures: Vec<String>, what: &str) {
    if failures.is_empty() {
        return;
    }
    let message = format!("cannot {what}:\n  {}", failures.join("\n  "));
    if std::thread::panicking() {
        eprintln!("warning: {message}");
    } else {
        panic!("{message}");
    }
}

fn must(result: Result<(), String>) {
    if let Err(e) = result {
        panic!("fleet test network: {e}");
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args), "ip", &args.join(" "))
}

/// Runs `nft ARGS` inside namespace `ns`.
fn nft(ns: &str, args: &[&str]) -> Result<(), String> {
    run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("nft")
            .args(args),
        "nft",
        &format!("{} (in {ns})", args.join(" ")),
    )
}

/// Applies an nft script inside namespace `ns` (one transaction).
fn nft_script(ns: &str, table: &str, script: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("{table}-{ns}.nft"));
    std::fs::write(&path, script).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let file = path.to_string_lossy().into_owned();
    let applied = nft(ns, &["-f", &file]);
    let _ = std::fs::remove_file(&path);
    applied.map_err(|e| format!("{e}\nscript:\n{script}"))
}

fn run(command: &mut Command, program: &str, shown: &str) -> Result<(), String> {
    let out = command.stdin(Stdio::null()).output().map_err(|e| {
        format!("cannot run {program} (install iproute2, nftables and util-linux): {e}")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
