//! Writing a request body into a child's stdin (a pipe or the PTY master).
//!
//! The descriptor is non-blocking: envd waits for room with `poll` and gives
//! up when the child has not read anything for `STALL_TIMEOUT`, so a child
//! that never reads its input cannot pin an envd thread forever.

use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long a write may wait for the child to make room.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why writing stopped early. Each variant says how much got through.
#[derive(Debug)]
pub enum StdinError {
    /// The child closed its end (EPIPE, or the terminal went away).
    Closed { written: u64 },
    /// The child did not read for `STALL_TIMEOUT`.
    Stalled { written: u64 },
    /// Reading the request body failed.
    Body { written: u64, error: io::Error },
    /// Writing failed for another reason.
    Io { written: u64, error: io::Error },
}

/// Copies all of `body` into `fd`; returns the number of bytes written.
pub fn copy_body(fd: BorrowedFd<'_>, body: &mut dyn Read) -> Result<u64, StdinError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(StdinError::Body { written, error }),
        };
        write_all(fd, &buf[..n], &mut written)?;
    }
}

/// Writes `data` completely, waiting for room as needed.
pub fn write_all(fd: BorrowedFd<'_>, mut data: &[u8], written: &mut u64) -> Result<(), StdinError> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => {
                data = &data[n..];
                *written += n as u64;
            }
            Err(nix::errno::Errno::EAGAIN) => wait_writable(fd, *written)?,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::EIO) => {
                return Err(StdinError::Closed { written: *written })
            }
            Err(errno) => {
                return Err(StdinError::Io {
                    written: *written,
                    error: io::Error::from_raw_os_error(errno as i32),
                })
            }
        }
    }
    Ok(())
}

fn wait_writable(fd: BorrowedFd<'_>, written: u64) -> Result<(), StdinError> {
    let timeout = PollTimeout::try_from(STALL_TIMEOUT).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match poll(&mut fds, timeout) {
        Ok(0) => Err(StdinError::Stalled { written }),
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)
                && !revents.contains(PollFlags::POLLOUT)
            {
                return Err(StdinError::Closed { written });
            }
            Ok(())
        }
        Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(StdinError::Io {
            written,
            error: io::Error::from_raw_os_error(errno as i32),
        }),
    }
}
