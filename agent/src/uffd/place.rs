//! Placing pages in the VMM's memory: `UFFDIO_COPY` and `UFFDIO_ZEROPAGE`
//! over a range of pages, and `UFFDIO_WAKE`.
//!
//! The ioctls (with the kernel's structures and numbers from
//! `userfaultfd-sys`) are made here rather than through the `userfaultfd` crate
//! because a range can be placed in part, and only the raw answer says how
//! far: the kernel places pages in order and stops at the first one it
//! cannot place, then reports the bytes placed before it (the ioctl fails
//! with `EAGAIN`), or, when it placed none, the reason (`EEXIST` when that
//! page is already there, `EAGAIN` while the address space is changing).
//! What the server does with each answer is in `server.rs`.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use userfaultfd_sys::{uffdio_copy, uffdio_range, uffdio_zeropage, UFFDIO_COPY, UFFDIO_ZEROPAGE};

/// What the kernel did with a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// This many bytes from the start of the range are placed and their
    /// waiters woken: all of it, or up to a page the kernel stopped at
    /// (ask again from there to learn why).
    Placed(u64),
    /// The first page is already there (`EEXIST`).
    Exists,
    /// Nothing placed: the address space is changing (`EAGAIN`); a remove,
    /// unmap or remap event is pending.
    Again,
    /// The range is not registered (`ENOENT`): unmapped meanwhile.
    Unregistered,
    /// The VM's address space is gone (`ESRCH`).
    Gone,
}

/// `UFFDIO_COPY` of `src` to `dst` (page-aligned, `src.len()` a multiple of
/// the page size), waking the waiters. Errors other than the answers of
/// [`Outcome`] are returned as they are.
pub(crate) fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> Result<Outcome, Errno> {
    let mut arg = uffdio_copy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `arg` is a valid uffdio_copy that outlives the call; the
    // kernel reads `src.len()` bytes of `src`, which we borrow for the call,
    // and writes only to pages of the registered range at `dst`, after
    // checking that they are registered and missing.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
    outcome(rc, arg.copy)
}

/// `UFFDIO_ZEROPAGE` of `len` bytes at `dst` (page-aligned), waking the
/// waiters.
pub(crate) fn zeropage(uffd: BorrowedFd<'_>, dst: u64, len: u64) -> Result<Outcome, Errno> {
    let mut arg = uffdio_zeropage {
        range: uffdio_range { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `arg` is a valid uffdio_zeropage that outlives the call; the
    // kernel maps its zero page only at registered, missing pages of the
    // range and writes no memory of this process but `arg`.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
    outcome(rc, arg.zeropage)
}

/// The answer of a copy or zeropage ioctl that returned `rc` and wrote
/// `done` (bytes placed or a negative errno).
fn outcome(rc: libc::c_int, done: i64) -> Result<Outcome, Errno> {
    if rc == 0 {
        // All placed: `done` is the whole length.
        return Ok(Outcome::Placed(done.max(0) as u64));
    }
    let e = Errno::last();
    if done > 0 {
        return Ok(Outcome::Placed(done as u64));
    }
    match e {
        Errno::EEXIST => Ok(Outcome::Exists),
        Errno::EAGAIN => Ok(Outcome::Again),
        Errno::ENOENT => Ok(Outcome::Unregistered),
        Errno::ESRCH => Ok(Outcome::Gone),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_those_of_the_kernel_header() {
        // <linux/userfaultfd.h>: _IOWR(0xAA, 3, struct uffdio_copy), 40
        // bytes, and _IOWR(0xAA, 4, struct uffdio_zeropage), 32 bytes.
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }

    #[test]
    fn partial_answers_are_read_as_bytes_placed() {
        assert_eq!(outcome(0, 8192), Ok(Outcome::Placed(8192)));
        Errno::EAGAIN.set();
        assert_eq!(outcome(-1, 4096), Ok(Outcome::Placed(4096)));
        Errno::EAGAIN.set();
        assert_eq!(outcome(-1, -11), Ok(Outcome::Again));
        Errno::EEXIST.set();
        assert_eq!(outcome(-1, -17), Ok(Outcome::Exists));
        Errno::ESRCH.set();
        assert_eq!(outcome(-1, 0), Ok(Outcome::Gone));
        Errno::EINVAL.set();
        assert_eq!(outcome(-1, -22), Err(Errno::EINVAL));
    }
}
