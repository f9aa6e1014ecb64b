//! A tap device opened through `/dev/net/tun`: frames with a 12-byte
//! virtio-net header in front (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), the
//! same header a VERSION_1 driver puts on its buffers, so frames pass
//! between tap and queues unchanged. Non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The virtio-net header with `num_buffers` (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;

pub(crate) struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to the tap `name` (creating it if it does not exist and
    /// the VMM may).
    pub(crate) fn open(name: &str) -> std::io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tap { file })
    }

    /// One frame (header first); `WouldBlock` when there is none.
    pub(crate) fn read(&self, buffer: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buffer)
    }

    /// Sends one frame (header first).
    pub(crate) fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
