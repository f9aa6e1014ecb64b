//! Per-sandbox networking: one network namespace per slot, with the tap QEMU
//! attaches to, a veth pair to the root namespace and nftables NAT.
//!
//! Every guest has `169.254.0.21/30` with gateway `169.254.0.22` on its
//! `eth0`, whatever its slot, so a snapshot restores into any slot. For slot
//! `n` (`0..=16383`, allocated elsewhere) [`setup`] builds:
//!
//! ```text
//!  root namespace                    namespace wrenn-<n>                 guest
//!  wrenn-h<n> 10.200.B.1/30 <--veth--> veth0 10.200.B.2/30
//!  route 10.201.x.y via 10.200.B.2     tap0  169.254.0.22/30 <--QEMU--> eth0 169.254.0.21/30
//!  table inet wrenn-host (shared)      table inet wrenn: DNAT 10.201.x.y -> 169.254.0.21
//! ```
//!
//! where `10.200.B.0/30` is block `n` of `10.200.0.0/16` and
//! `10.201.x.y = 10.201.(n >> 8).(n & 0xff)`: the host reaches the guest's
//! envd at `10.201.x.y:49983`. See docs/networking.md for the rules and
//! [`addr`] for the arithmetic.
//!
//! The root namespace is the namespace of the caller's thread. Every call
//! blocks (netlink, `nft`, thread joins): from async code, call it through
//! `spawn_blocking`. Work inside a namespace, and all rtnetlink work, happens
//! on short-lived threads spawned for it, so no caller thread ever changes
//! namespace and none needs to be outside a tokio runtime. Two calls for the
//! same slot must not overlap; different slots are independent.

pub mod addr;
mod links;
mod netns;
mod nft;
mod sysctl;
mod tap;

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;

use thiserror::Error;
use tracing::{debug, info, warn};

pub use addr::{GATEWAY_IP, GUEST_IP, MAX_SLOT, NS_VETH_NAME, TAP_NAME};
pub use netns::NETNS_DIR;
pub use nft::{HOST_TABLE, SLOT_TABLE};

use addr::{SlotAddrs, LINK_PREFIX};
use links::Netlink;

/// A failed networking step. Messages say which slot, which step, and what
/// to do where there is something to do.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("slot {slot} is out of range: slots are 0..={max}", max = addr::MAX_SLOT)]
    InvalidSlot { slot: u32 },
    #[error("slot {slot}: namespace {netns} does not exist: set the slot up first")]
    NoSuchSlot { slot: u32, netns: String },
    #[error("cannot prepare {path} for network namespaces: {source} (the agent must run as root)")]
    NetnsDir { path: String, source: io::Error },
    #[error(
        "cannot create network namespace {name}: {source} \
         (the agent needs CAP_SYS_ADMIN and CAP_NET_ADMIN: run it as root)"
    )]
    NetnsCreate { name: String, source: io::Error },
    #[error("cannot open network namespace {name} at /run/netns/{name}: {source}")]
    NetnsOpen { name: String, source: io::Error },
    #[error(
        "cannot enter network namespace {name}: {source} \
         (/run/netns/{name} may be a stale file; teardown of the slot removes it)"
    )]
    NetnsEnter { name: String, source: io::Error },
    #[error("cannot remove network namespace {name} at /run/netns/{name}: {source}")]
    NetnsRemove { name: String, source: io::Error },
    #[error("cannot list /run/netns: {source}")]
    NetnsList { source: io::Error },
    #[error("cannot start a thread for {what}: {source}")]
    Thread { what: String, source: io::Error },
    #[error("the thread for {what} panicked (see the panic message above)")]
    ThreadPanicked { what: String },
    #[error("{scope}: cannot start a tokio runtime for rtnetlink: {source}")]
    Runtime { scope: String, source: io::Error },
    #[error("{scope}: cannot open a netlink socket: {source}")]
    NetlinkSocket { scope: String, source: io::Error },
    #[error("{scope}: {action}: {source}")]
    Netlink {
        scope: String,
        action: String,
        source: rtnetlink::Error,
    },
    #[error("{scope}: link {name} is missing right after being created; is something else deleting wrenn links?")]
    LinkMissing { scope: String, name: String },
    #[error("/dev/net/tun missing: load the tun module (modprobe tun)")]
    TunMissing,
    #[error("slot {slot}: cannot create tap {name}: {step} failed: {source}")]
    Tap {
        slot: u32,
        name: String,
        step: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    NftMissing(#[from] crate::tools::Missing),
    #[error("{scope}: cannot run nft: {source}")]
    NftRun { scope: String, source: io::Error },
    #[error("{scope}: nft rejected the rules ({status}): {stderr}")]
    NftFailed {
        scope: String,
        status: String,
        stderr: String,
    },
    #[error("{scope}: cannot set sysctl {key} to {value}: {source}")]
    Sysctl {
        scope: String,
        key: String,
        value: String,
        source: io::Error,
    },
}

/// What [`setup`] built for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotNet {
    pub slot: u32,
    /// Namespace name (`wrenn-<n>`), pinned at `/run/netns/<netns>`; QEMU
    /// runs inside it.
    pub netns: String,
    /// The tap QEMU attaches to inside [`SlotNet::netns`]:
    /// `-netdev tap,id=net0,ifname=tap0,script=no,downscript=no`.
    pub tap: String,
    /// The veth end in the root namespace (`wrenn-h<n>`).
    pub host_veth: String,
    /// `10.201.x.y`: where the host reaches the guest.
    pub host_ip: Ipv4Addr,
    /// The guest's own address (the same in every slot).
    pub guest_ip: Ipv4Addr,
    /// The guest's gateway, on `tap0` (the same in every slot).
    pub gateway_ip: Ipv4Addr,
    /// Address of [`SlotNet::host_veth`].
    pub transit_host: Ipv4Addr,
    /// Address of `veth0` inside the namespace; the guest's traffic leaves
    /// the namespace with this source.
    pub transit_ns: Ipv4Addr,
    /// Whether the guest may open connections out of the namespace.
    pub internet: bool,
}

impl SlotNet {
    fn new(addrs: SlotAddrs, internet: bool) -> Self {
        SlotNet {
            slot: addrs.slot,
            netns: addrs.netns,
            tap: TAP_NAME.to_string(),
            host_veth: addrs.host_veth,
            host_ip: addrs.host_ip,
            guest_ip: GUEST_IP,
            gateway_ip: GATEWAY_IP,
            transit_host: addrs.transit_host,
            transit_ns: addrs.transit_ns,
            internet,
        }
    }

    /// Where the host dials the guest's `port` (envd: 49983).
    pub fn guest_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.host_ip, port)
    }
}

fn scope(slot: u32) -> String {
    format!("slot {slot}")
}

/// Prepares the root namespace, idempotently: sets `net.ipv4.ip_forward=1`
/// (needed for guests' internet traffic; logged when it changes) and
/// (re)creates the shared `inet wrenn-host` table. [`setup`] calls it too.
pub fn ensure_host() -> Result<(), NetError> {
    if sysctl::ensure("host", sysctl::IP_FORWARD, "1")? {
        info!("enabled net.ipv4.ip_forward in the root namespace");
    }
    nft::apply("host", &nft::host_script())?;
    debug!(table = HOST_TABLE, "root namespace table in place");
    Ok(())
}

/// Deletes the shared `inet wrenn-host` table if it exists (uninstall,
/// tests). Slots still set up lose internet access and their isolation from
/// each other and from the host, so call it only when none is left.
/// `net.ipv4.ip_forward` stays as it is.
pub fn remove_host() -> Result<(), NetError> {
    nft::delete_table("host", HOST_TABLE)?;
    info!(table = HOST_TABLE, "root namespace table removed");
    Ok(())
}

/// Builds the network of `slot`, first removing whatever an earlier setup of
/// the same slot left. On failure, removes what it built and returns the
/// error.
pub fn setup(slot: u32, internet: bool) -> Result<SlotNet, NetError> {
    let addrs = SlotAddrs::new(slot)?;
    ensure_host()?;
    if remove_slot(&addrs)? {
        info!(slot, "removed leftovers of an earlier setup");
    }
    if let Err(error) = build(&addrs, internet) {
        warn!(slot, %error, "network setup failed; removing what was built");
        if let Err(cleanup) = remove_slot(&addrs) {
            warn!(slot, error = %cleanup, "cleanup after failed setup failed too");
        }
        return Err(error);
    }
    info!(slot, internet, host_ip = %addrs.host_ip, netns = %addrs.netns, "slot network set up");
    Ok(SlotNet::new(addrs, internet))
}

/// Removes the network of `slot`: host veth (and with it the namespace's
/// veth and the route to `10.201.x.y`), `tap0`, and the namespace (and with
/// it its nft table). Missing pieces are fine. The root-namespace table
/// stays: other slots share it.
pub fn teardown(slot: u32) -> Result<(), NetError> {
    let addrs = SlotAddrs::new(slot)?;
    let found = remove_slot(&addrs)?;
    info!(slot, found, "slot network torn down");
    Ok(())
}

/// Lets the guest of `slot` open connections out (`true`) or not. Turning
/// it off also cuts connections the guest opened while it was on.
pub fn set_internet(slot: u32, internet: bool) -> Result<(), NetError> {
    let addrs = SlotAddrs::new(slot)?;
    if !netns::exists(&addrs.netns) {
        return Err(NetError::NoSuchSlot {
            slot,
            netns: addrs.netns,
        });
    }
    let scope = scope(slot);
    netns::run_in(&addrs.netns, || {
        nft::apply(&scope, &nft::slot_script(&addrs, internet))
    })??;
    info!(slot, internet, "slot internet access set");
    Ok(())
}

/// Slots with a pinned namespace (`/run/netns/wrenn-<n>`) or a host veth
/// (`wrenn-h<n>`), sorted: what to tear down when the agent starts.
pub fn list_existing() -> Result<Vec<u32>, NetError> {
    let mut slots: BTreeSet<u32> = netns::list()?
        .iter()
        .filter_map(|name| addr::slot_of_netns(name))
        .collect();
    let links = netns::on_thread("host-links", || Netlink::open("host")?.link_names())??;
    slots.extend(
        links
            .iter()
            .filter_map(|name| addr::slot_of_host_veth(name)),
    );
    Ok(slots.into_iter().collect())
}

/// Runs `work` on a new thread inside the namespace of `slot` and returns
/// its result. A process spawned from `work` (QEMU, with
/// `std::process::Command`) starts in that namespace.
pub fn run_in_slot<T, F>(slot: u32, work: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let addrs = SlotAddrs::new(slot)?;
    if !netns::exists(&addrs.netns) {
        return Err(NetError::NoSuchSlot {
            slot,
            netns: addrs.netns,
        });
    }
    netns::run_in(&addrs.netns, work)
}

fn build(addrs: &SlotAddrs, internet: bool) -> Result<(), NetError> {
    let scope = scope(addrs.slot);
    netns::create(&addrs.netns)?;
    let ns_file = netns::open(&addrs.netns)?;

    // Root namespace: the veth pair, its namespace end made directly inside
    // the slot namespace; the host end's address; the route to 10.201.x.y.
    netns::on_thread("host-links", || -> Result<(), NetError> {
        let nl = Netlink::open(&scope)?;
        nl.add_veth_into(&addrs.host_veth, NS_VETH_NAME, ns_file.as_fd())?;
        let host = nl.require_link(&addrs.host_veth)?;
        nl.add_address(host, &addrs.host_veth, addrs.transit_host, LINK_PREFIX)?;
        nl.set_up(host, &addrs.host_veth)?;
        nl.add_route(addrs.host_ip, 32, addrs.transit_ns, host, &addrs.host_veth)
    })??;
    drop(ns_file);
    debug!(slot = addrs.slot, veth = %addrs.host_veth, "host end configured");

    netns::run_in(&addrs.netns, || {
        configure_namespace(addrs, internet, &scope)
    })??;
    Ok(())
}

/// Everything inside the slot namespace; runs on a thread inside it.
fn configure_namespace(addrs: &SlotAddrs, internet: bool, scope: &str) -> Result<(), NetError> {
    // Forwarding between veth0 and tap0: new namespaces start with it off.
    sysctl::ensure(scope, sysctl::IP_FORWARD, "1")?;
    tap::create_persistent(addrs.slot, TAP_NAME)?;

    let nl = Netlink::open(scope)?;
    let lo = nl.require_link("lo")?;
    nl.set_up(lo, "lo")?;
    let tap = nl.require_link(TAP_NAME)?;
    nl.add_address(tap, TAP_NAME, GATEWAY_IP, LINK_PREFIX)?;
    nl.set_up(tap, TAP_NAME)?;
    let veth = nl.require_link(NS_VETH_NAME)?;
    nl.add_address(veth, NS_VETH_NAME, addrs.transit_ns, LINK_PREFIX)?;
    nl.set_up(veth, NS_VETH_NAME)?;
    nl.add_route(
        Ipv4Addr::UNSPECIFIED,
        0,
        addrs.transit_host,
        veth,
        NS_VETH_NAME,
    )?;
    drop(nl);

    nft::apply(scope, &nft::slot_script(addrs, internet))?;
    debug!(slot = addrs.slot, internet, "namespace configured");
    Ok(())
}

/// Removes every piece of a slot that exists; returns whether any did. Goes
/// on past a failed step so that one broken piece does not keep the others
/// alive, and returns the first error.
fn remove_slot(addrs: &SlotAddrs) -> Result<bool, NetError> {
    let scope = scope(addrs.slot);
    let mut found = false;
    let mut first_error: Option<NetError> = None;
    let mut note = |result: Result<(), NetError>| {
        if let Err(error) = result {
            warn!(slot = addrs.slot, %error, "teardown step failed");
            first_error.get_or_insert(error);
        }
    };

    if netns::exists(&addrs.netns) {
        found = true;
        // Delete tap0 explicitly: a process still inside (a QEMU that did
        // not exit) would keep the namespace, and the device, alive.
        let tap = netns::run_in(&addrs.netns, || -> Result<bool, NetError> {
            Netlink::open(&scope)?.delete_link(TAP_NAME)
        });
        match tap {
            Ok(result) => note(result.map(drop)),
            // Not a namespace (a stale file): removing the file is all.
            Err(NetError::NetnsEnter { .. }) => {}
            Err(error) => note(Err(error)),
        }
    }

    let veth = netns::on_thread("host-links", || -> Result<bool, NetError> {
        Netlink::open(&scope)?.delete_link(&addrs.host_veth)
    });
    match veth.and_then(|deleted| deleted) {
        Ok(deleted) => found |= deleted,
        Err(error) => note(Err(error)),
    }

    note(netns::remove(&addrs.netns));
    match first_error {
        Some(error) => Err(error),
        None => Ok(found),
    }
}

/// The network operations the sandbox lifecycle needs, behind a small trait
/// so that lifecycle and recovery can be tested with a fake; [`HostNetwork`]
/// is the real one.
pub trait SlotNetwork: Send + Sync {
    /// Prepares the root namespace ([`ensure_host`]).
    fn ensure_host(&self) -> Result<(), NetError>;
    /// Builds the network of `slot` and returns the name of its namespace
    /// ([`setup`]).
    fn setup(&self, slot: u32, internet: bool) -> Result<String, NetError>;
    /// Removes the network of `slot` ([`teardown`]).
    fn teardown(&self, slot: u32) -> Result<(), NetError>;
    /// The slots that have a network now ([`list_existing`]).
    fn existing(&self) -> Result<Vec<u32>, NetError>;
}

/// Namespaces, links and nftables of this host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNetwork;

impl SlotNetwork for HostNetwork {
    fn ensure_host(&self) -> Result<(), NetError> {
        ensure_host()
    }

    fn setup(&self, slot: u32, internet: bool) -> Result<String, NetError> {
        setup(slot, internet).map(|net| net.netns)
    }

    fn teardown(&self, slot: u32) -> Result<(), NetError> {
        teardown(slot)
    }

    fn existing(&self) -> Result<Vec<u32>, NetError> {
        list_existing()
    }
}
