//! The persistent tap device QEMU attaches to.
//!
//! The kernel creates tun/tap devices only through `/dev/net/tun` and the
//! `TUNSETIFF` ioctl, not through rtnetlink. `TUNSETPERSIST` keeps the device
//! after our file descriptor closes, so QEMU, started later inside the same
//! namespace, attaches to it by name with
//! `-netdev tap,ifname=tap0,script=no,downscript=no`.
//!
//! The device is single-queue and owned by root: QEMU must run as root and
//! must not ask for `queues=` > 1 (TUNSETIFF refuses a multi-queue attach to
//! a single-queue device). The device lives in the namespace of the thread
//! that creates it, so call [`create_persistent`] from a thread inside the
//! slot namespace. Addresses and link state are set afterwards over
//! rtnetlink, and rtnetlink also deletes it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::NetError;

const TUN_PATH: &str = "/dev/net/tun";

/// Creates the persistent tap `name` (`IFF_TAP | IFF_NO_PI`) in the current
/// thread's network namespace. Attaches to it instead if it exists already
/// with the same flags.
pub fn create_persistent(slot: u32, name: &str) -> Result<(), NetError> {
    let tap_error = |step: &'static str, source: io::Error| NetError::Tap {
        slot,
        name: name.to_string(),
        step,
        source,
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => NetError::TunMissing,
            _ => tap_error("opening /dev/net/tun", e),
        })?;

    // SAFETY: `ifreq` is plain old data (a name array and a union of
    // integers, sockaddrs and a pointer), for which all-zero bytes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    // One byte stays zero: the name is NUL-terminated.
    if bytes.is_empty() || bytes.len() >= request.ifr_name.len() || bytes.contains(&0) {
        return Err(tap_error(
            "checking the name",
            io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"),
        ));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;

    // SAFETY: `tun` is an open /dev/net/tun descriptor for the whole call,
    // and TUNSETIFF reads and writes one `struct ifreq`, which `request` is
    // (libc's definition matches the kernel's layout).
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(tap_error("TUNSETIFF", io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value (an integer, non-zero
    // to keep the device), on the descriptor TUNSETIFF just attached.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(tap_error("TUNSETPERSIST", io::Error::last_os_error()));
    }
    // Closing the descriptor detaches it; the persistent device stays.
    drop(tun);
    Ok(())
}
