//! nftables rules: the per-slot `inet wrenn` table and the shared root
//! namespace `inet wrenn-host` table.
//!
//! Rules are written as nft scripts and fed to `nft -f -`. A script is one
//! kernel transaction: each one first deletes the table it defines (after an
//! `add table`, so the delete cannot fail) and then defines it whole, so
//! applying it is atomic and idempotent, and concurrent applications simply
//! serialise. nft runs in the network namespace of the thread that spawns it
//! (a child inherits that thread's namespaces), so slot scripts are applied
//! from a thread inside the slot namespace.
//!
//! Why the `nft` binary rather than a crate: the `nftables` crate also runs
//! the `nft` binary (it only swaps this text for JSON), and the netlink-level
//! crates need a hand-built expression per rule. A text script is what an
//! operator reads in `nft list ruleset` and in docs/networking.md, and nft's
//! own error messages point at the faulty line.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use super::addr::{
    SlotAddrs, GUEST_IP, HOST_VETH_PREFIX, NS_VETH_NAME, TAP_NAME, TRANSIT_NET, TRANSIT_PREFIX,
};
use super::NetError;
use crate::tools;

/// The table inside every slot namespace (family `inet`).
pub const SLOT_TABLE: &str = "wrenn";
/// The table in the root namespace shared by all slots (family `inet`).
pub const HOST_TABLE: &str = "wrenn-host";

/// The per-slot table.
///
/// - prerouting: traffic from the host for `10.201.x.y` is DNATed to the
///   guest (every port); conntrack rewrites the replies back.
/// - postrouting (internet only): the guest's traffic leaving through
///   `veth0` is masqueraded to the namespace's transit address, which the
///   root namespace routes.
/// - forward, policy drop: connections the host opened to the guest (those
///   DNATed above) pass both ways; with internet, the guest may also open
///   connections out of `veth0` and get their replies. Without, everything
///   else from `tap0` is dropped, including packets of connections opened
///   while internet was on.
/// - input: the guest may ping its gateway but not open connections to the
///   namespace itself, where QEMU runs (a TCP monitor would be reachable).
pub fn slot_script(addrs: &SlotAddrs, internet: bool) -> String {
    let host_ip = addrs.host_ip;
    let (masquerade, outbound) = if internet {
        (
            format!(
                "\n        oifname \"{NS_VETH_NAME}\" ip saddr {GUEST_IP} masquerade"
            ),
            format!(
                "\n        iifname \"{TAP_NAME}\" oifname \"{NS_VETH_NAME}\" ip saddr {GUEST_IP} accept\
                 \n        iifname \"{NS_VETH_NAME}\" oifname \"{TAP_NAME}\" ct state established,related accept"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "add table inet {SLOT_TABLE}
delete table inet {SLOT_TABLE}
table inet {SLOT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname \"{NS_VETH_NAME}\" ip daddr {host_ip} dnat ip to {GUEST_IP}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;{masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname \"{NS_VETH_NAME}\" oifname \"{TAP_NAME}\" ip daddr {GUEST_IP} ct status dnat accept
        iifname \"{TAP_NAME}\" oifname \"{NS_VETH_NAME}\" ip saddr {GUEST_IP} ct status dnat accept{outbound}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"{TAP_NAME}\" ct state established,related accept
        iifname \"{TAP_NAME}\" ip protocol icmp accept
        iifname \"{TAP_NAME}\" drop
    }}
}}
"
    )
}

/// The root namespace table, the same for every slot.
///
/// - postrouting: the transit range leaving through anything but a slot veth
///   (the default route's interface, whichever it is now) is masqueraded.
/// - forward: slot to slot is dropped; slot to link-local (cloud metadata
///   services) is dropped; slot to anywhere else is accepted; towards a slot
///   only replies pass, so nothing outside the host reaches a guest even with
///   forwarding on.
/// - input: a guest may not open connections to the host itself (the agent's
///   API, other services); replies to the host's own connections (to envd)
///   pass.
///
/// Accepting here does not override another table's drop (a Docker host's
/// FORWARD policy, say): such a host needs its own accept rules.
pub fn host_script() -> String {
    let veths = format!("{HOST_VETH_PREFIX}*");
    format!(
        "add table inet {HOST_TABLE}
delete table inet {HOST_TABLE}
table inet {HOST_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {TRANSIT_NET}/{TRANSIT_PREFIX} oifname != \"{veths}\" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"{veths}\" oifname \"{veths}\" drop
        iifname \"{veths}\" ip daddr 169.254.0.0/16 drop
        iifname \"{veths}\" accept
        oifname \"{veths}\" ct state established,related accept
        oifname \"{veths}\" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"{veths}\" ct state established,related accept
        iifname \"{veths}\" drop
    }}
}}
"
    )
}

/// Applies `script` with `nft -f -` in the current thread's namespace.
/// `scope` ("slot 5", "host") goes into errors.
pub fn apply(scope: &str, script: &str) -> Result<(), NetError> {
    let nft = tools::NFT.find()?;
    let spawn_error = |source: io::Error| NetError::NftRun {
        scope: scope.to_string(),
        source,
    };
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetError::NftMissing(tools::Missing { tool: tools::NFT }),
            _ => spawn_error(e),
        })?;
    // Scripts are a few hundred bytes: the pipe takes them whole before nft
    // writes anything, so writing first and reading after cannot deadlock.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(script.as_bytes()),
        None => Ok(()),
    };
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(NetError::NftFailed {
            scope: scope.to_string(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    written.map_err(spawn_error)
}

/// Deletes the `inet` table `table` if it exists.
pub fn delete_table(scope: &str, table: &str) -> Result<(), NetError> {
    apply(
        scope,
        &format!("add table inet {table}\ndelete table inet {table}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body of `chain name { ... }` in `script`.
    fn chain<'a>(script: &'a str, name: &str) -> &'a str {
        let start = script.find(&format!("chain {name} {{")).unwrap();
        let end = start + script[start..].find('}').unwrap();
        &script[start..end]
    }

    #[test]
    fn slot_script_dnats_the_slot_address_to_the_guest() {
        let addrs = SlotAddrs::new(300).unwrap();
        let script = slot_script(&addrs, false);
        assert!(script.contains("iifname \"veth0\" ip daddr 10.201.1.44 dnat ip to 169.254.0.21"));
        assert!(script.starts_with("add table inet wrenn\ndelete table inet wrenn\n"));
    }

    #[test]
    fn without_internet_nothing_the_guest_opens_is_forwarded() {
        let script = slot_script(&SlotAddrs::new(1).unwrap(), false);
        assert!(!script.contains("masquerade"));
        assert!(script.contains("policy drop;"));
        // Every forward accept from tap0 is tied to a host-initiated
        // (DNATed) flow.
        let forward = chain(&script, "forward");
        for line in forward.lines().filter(|l| l.contains("iifname \"tap0\"")) {
            assert!(line.contains("ct status dnat accept"), "{line}");
        }
        assert!(!forward.contains("established,related"));
        assert!(chain(&script, "input").contains("iifname \"tap0\" drop"));
    }

    #[test]
    fn with_internet_the_guest_is_masqueraded_out_of_veth0() {
        let script = slot_script(&SlotAddrs::new(1).unwrap(), true);
        assert!(script.contains("oifname \"veth0\" ip saddr 169.254.0.21 masquerade"));
        assert!(script.contains("iifname \"tap0\" oifname \"veth0\" ip saddr 169.254.0.21 accept"));
    }

    #[test]
    fn host_script_masquerades_the_transit_range_and_isolates_slots() {
        let script = host_script();
        assert!(script.contains("ip saddr 10.200.0.0/16 oifname != \"wrenn-h*\" masquerade"));
        assert!(script.contains("iifname \"wrenn-h*\" oifname \"wrenn-h*\" drop"));
        let forward_to_slot = script.find("oifname \"wrenn-h*\" ct state").unwrap();
        let drop_to_slot = script.find("\n        oifname \"wrenn-h*\" drop").unwrap();
        assert!(forward_to_slot < drop_to_slot);
    }
}
