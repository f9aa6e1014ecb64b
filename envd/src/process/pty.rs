//! Pseudo-terminals: opening a master/slave pair (close-on-exec from the
//! start, so no other child inherits them) and setting the window size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Terminal size in character cells, as the wire crate defines it.
pub use envd_api::PtySize;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};

/// Rejects zero sizes, which terminals cannot have.
pub fn validate(size: PtySize) -> Result<PtySize, String> {
    if size.cols == 0 || size.rows == 0 {
        return Err(format!(
            "terminal size {}x{} is invalid; cols and rows must be between 1 and 65535",
            size.cols, size.rows
        ));
    }
    Ok(size)
}

/// A new terminal: the master stays in envd, the slave goes to the child.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: File,
}

/// Opens a terminal pair of the given size. Both ends are close-on-exec.
pub fn open(size: PtySize) -> io::Result<Pty> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = posix_openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname_r(&master)?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)?;
    let master = OwnedFd::from(master);
    resize(master.as_fd(), size)?;
    Ok(Pty { master, slave })
}

/// Sets the window size (the child gets SIGWINCH).
pub fn resize(master: BorrowedFd<'_>, size: PtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer; the fd
    // is borrowed, so it stays open for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes reads and writes on `fd` return EAGAIN instead of blocking.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let current = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(current | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FdFlag;

    #[test]
    fn both_ends_are_close_on_exec() {
        let pty = open(PtySize { cols: 80, rows: 24 }).expect("open pty");
        for fd in [pty.master.as_fd(), pty.slave.as_fd()] {
            let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap_or(0));
            assert!(flags.contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn zero_sizes_are_rejected() {
        assert!(validate(PtySize { cols: 0, rows: 24 }).is_err());
        assert!(validate(PtySize { cols: 80, rows: 24 }).is_ok());
    }
}
