//! The address plan: everything that follows from a slot number.
//!
//! Every guest sees the same link (`169.254.0.21/30`, gateway `169.254.0.22`),
//! so a snapshot restores into any slot. What differs per slot `n`
//! (`0..=MAX_SLOT`):
//!
//! - the namespace `wrenn-<n>` and the host veth end `wrenn-h<n>`;
//! - the transit /30 between the root namespace and the slot namespace: block
//!   `n` of `10.200.0.0/16`, host end `.1`, namespace end `.2` of the block
//!   (16384 blocks of 4 addresses fill the /16 exactly);
//! - the host-reachable address `10.201.(n >> 8).(n & 0xff)`, which the slot
//!   namespace DNATs to the guest.
//!
//! Pure arithmetic and name parsing; nothing here touches the system.

use std::net::Ipv4Addr;

use super::NetError;

/// Highest slot number: 16384 transit /30 blocks fill 10.200.0.0/16.
pub const MAX_SLOT: u32 = 16383;

/// The guest's own address on its `eth0`, the same in every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The gateway the guest uses: `tap0` inside the slot namespace.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Prefix length of the guest link and of every transit link.
pub const LINK_PREFIX: u8 = 30;

/// The transit range all slot veths are carved from.
pub const TRANSIT_NET: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Prefix length of [`TRANSIT_NET`].
pub const TRANSIT_PREFIX: u8 = 16;
/// The range the host-reachable per-slot addresses come from.
pub const HOST_NET: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
/// Prefix length of [`HOST_NET`].
pub const HOST_PREFIX: u8 = 16;

/// The tap device QEMU attaches to, inside the slot namespace.
pub const TAP_NAME: &str = "tap0";
/// The slot namespace's end of the veth pair.
pub const NS_VETH_NAME: &str = "veth0";
/// Prefix of every slot namespace name.
pub const NETNS_PREFIX: &str = "wrenn-";
/// Prefix of every host veth end; the root-namespace nft rules match it.
pub const HOST_VETH_PREFIX: &str = "wrenn-h";

/// Names and addresses of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddrs {
    pub slot: u32,
    /// `wrenn-<n>`, under `/run/netns`.
    pub netns: String,
    /// `wrenn-h<n>`, the veth end in the root namespace.
    pub host_veth: String,
    /// Address of `wrenn-h<n>` (first host of the transit block).
    pub transit_host: Ipv4Addr,
    /// Address of `veth0` in the slot namespace (second host of the block).
    pub transit_ns: Ipv4Addr,
    /// `10.201.x.y`: what the host dials to reach the guest.
    pub host_ip: Ipv4Addr,
}

impl SlotAddrs {
    /// The plan for `slot`, or [`NetError::InvalidSlot`] past [`MAX_SLOT`].
    pub fn new(slot: u32) -> Result<Self, NetError> {
        if slot > MAX_SLOT {
            return Err(NetError::InvalidSlot { slot });
        }
        let block = u32::from(TRANSIT_NET) + slot * 4;
        let host_ip = u32::from(HOST_NET) | slot;
        Ok(SlotAddrs {
            slot,
            netns: netns_name(slot),
            host_veth: format!("{HOST_VETH_PREFIX}{slot}"),
            transit_host: Ipv4Addr::from(block + 1),
            transit_ns: Ipv4Addr::from(block + 2),
            host_ip: Ipv4Addr::from(host_ip),
        })
    }
}

/// `wrenn-<slot>`.
pub fn netns_name(slot: u32) -> String {
    format!("{NETNS_PREFIX}{slot}")
}

/// The slot of a namespace name `wrenn-<n>`, if it is one.
pub fn slot_of_netns(name: &str) -> Option<u32> {
    parse_slot(name.strip_prefix(NETNS_PREFIX)?)
}

/// The slot of a host veth name `wrenn-h<n>`, if it is one.
pub fn slot_of_host_veth(name: &str) -> Option<u32> {
    parse_slot(name.strip_prefix(HOST_VETH_PREFIX)?)
}

/// A slot number written the way this module writes it: decimal digits, no
/// sign, no leading zero, in range. Anything else is someone else's name.
fn parse_slot(digits: &str) -> Option<u32> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok().filter(|slot| *slot <= MAX_SLOT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_slot_gets_the_first_block() {
        let a = SlotAddrs::new(0).unwrap();
        assert_eq!(a.netns, "wrenn-0");
        assert_eq!(a.host_veth, "wrenn-h0");
        assert_eq!(a.transit_host, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.transit_ns, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 201, 0, 0));
    }

    #[test]
    fn blocks_cross_octet_boundaries() {
        let a = SlotAddrs::new(64).unwrap();
        assert_eq!(a.transit_host, Ipv4Addr::new(10, 200, 1, 1));
        assert_eq!(a.transit_ns, Ipv4Addr::new(10, 200, 1, 2));
        let a = SlotAddrs::new(300).unwrap();
        assert_eq!(a.transit_host, Ipv4Addr::new(10, 200, 4, 177));
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 201, 1, 44));
    }

    #[test]
    fn last_slot_fills_the_transit_range_exactly() {
        let a = SlotAddrs::new(MAX_SLOT).unwrap();
        assert_eq!(a.transit_host, Ipv4Addr::new(10, 200, 255, 253));
        assert_eq!(a.transit_ns, Ipv4Addr::new(10, 200, 255, 254));
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 201, 63, 255));
        assert_eq!(a.host_veth.len(), 12, "must fit IFNAMSIZ (15)");
    }

    #[test]
    fn slots_past_the_range_are_rejected() {
        let err = SlotAddrs::new(MAX_SLOT + 1).unwrap_err();
        assert!(matches!(err, NetError::InvalidSlot { slot: 16384 }));
        assert_eq!(
            err.to_string(),
            "slot 16384 is out of range: slots are 0..=16383"
        );
    }

    #[test]
    fn no_two_slots_share_an_address() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..=MAX_SLOT {
            let a = SlotAddrs::new(slot).unwrap();
            assert!(seen.insert(a.transit_host));
            assert!(seen.insert(a.transit_ns));
            assert!(seen.insert(a.host_ip));
            let block = u32::from(a.transit_host) & !3;
            assert_eq!(block, u32::from(TRANSIT_NET) + slot * 4);
            assert_eq!(u32::from(a.host_ip) >> 16, u32::from(HOST_NET) >> 16);
            assert_eq!(u32::from(a.transit_ns) >> 16, u32::from(TRANSIT_NET) >> 16);
        }
    }

    #[test]
    fn names_parse_back_to_their_slot() {
        for slot in [0, 7, 255, 16000, MAX_SLOT] {
            let a = SlotAddrs::new(slot).unwrap();
            assert_eq!(slot_of_netns(&a.netns), Some(slot));
            assert_eq!(slot_of_host_veth(&a.host_veth), Some(slot));
        }
    }

    #[test]
    fn foreign_names_are_not_slots() {
        for name in [
            "wrenn-",
            "wrenn-05",
            "wrenn-+5",
            "wrenn-16384",
            "wrenn-test-1-2",
            "wrenn-test-guest-16000",
            "wrenn-h3",
            "wrenn-99999999999999999999",
            "other-3",
        ] {
            assert_eq!(slot_of_netns(name), None, "{name}");
        }
        for name in [
            "wrenn-h",
            "wrenn-h01",
            "wrenn-hx",
            "wrenn-3",
            "wrenn-h16384",
        ] {
            assert_eq!(slot_of_host_veth(name), None, "{name}");
        }
    }
}
