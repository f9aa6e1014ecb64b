//! The handover protocol, both sides: a VMM gives the agent the
//! userfaultfd of a restored VM's memory and says where that memory lies.
//!
//! One frame each way on a connected Unix stream socket (`docs/uffd.md`):
//! a 4-byte little-endian length, then that many bytes of JSON. The VMM's
//! frame (the handover) carries the userfaultfd as `SCM_RIGHTS` ancillary
//! data on its first byte; the agent's frame (the answer) says whether it
//! took it. The VMM side is [`send`] and [`read_answer`]; the agent side is
//! [`receive`] and [`answer`]. Checking the regions against a snapshot is
//! `layout.rs`, not this file.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use userfaultfd::Uffd;

use super::error::{errno, Error, Result};

/// The protocol version this agent speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest JSON body of a frame.
pub const MAX_MESSAGE: u32 = 1 << 20;
/// How long either side waits for the other's frame.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most descriptors one Unix socket message can pass (the kernel's
/// `SCM_MAX_FD`): a control buffer of this size is never truncated, so
/// every descriptor that arrives is seen and closed if unwanted.
const SCM_MAX_FD: usize = 253;
/// What `/proc/self/fd/<n>` reads for a userfaultfd.
const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// One range of guest memory in the VMM's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Where the range starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where it starts in the memory device (the snapshot's bytes).
    pub offset: u64,
    /// The page size of the mapping (4096).
    pub page_size: u64,
}

/// The JSON body of a handover frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Handover {
    version: u32,
    regions: Vec<Region>,
}

/// The JSON body of an answer frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What [`receive`] got: the userfaultfd, non-blocking, and the regions as
/// sent (not yet checked against a snapshot).
#[derive(Debug)]
pub struct Received {
    /// The VM's userfaultfd.
    pub uffd: Uffd,
    /// The regions of the message.
    pub regions: Vec<Region>,
}

// ---------------------------------------------------------------------------
// VMM side

/// Sends the handover: `regions` and the userfaultfd `uffd`, which the VMM
/// has set up with `UFFDIO_API` and registered over those regions.
pub fn send(socket: &UnixStream, regions: &[Region], uffd: BorrowedFd<'_>) -> Result<()> {
    let body = serde_json::to_vec(&Handover {
        version: PROTOCOL_VERSION,
        regions: regions.to_vec(),
    })
    .map_err(|e| Error::Json {
        what: "handover message",
        reason: e.to_string(),
    })?;
    send_frame(socket, &body, &[uffd])
}

/// Waits for the agent's answer to a handover: `Ok` once it serves the
/// memory, [`Error::Refused`] with its reason otherwise.
pub fn read_answer(socket: &UnixStream) -> Result<()> {
    let (body, _descriptors) = with_timeout(socket, receive_frame)?;
    let answer: Answer = serde_json::from_slice(&body).map_err(|e| Error::Json {
        what: "answer of the agent",
        reason: e.to_string(),
    })?;
    match answer {
        Answer { ok: true, .. } => Ok(()),
        Answer { error, .. } => Err(Error::Refused {
            message: error.unwrap_or_else(|| "no reason given".to_owned()),
        }),
    }
}

/// Sends one frame: the length, `body`, and `descriptors` on its first
/// byte. [`send`] is this with the handover's JSON; tests use it to send
/// malformed handovers.
pub fn send_frame(socket: &UnixStream, body: &[u8], descriptors: &[BorrowedFd<'_>]) -> Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len <= MAX_MESSAGE)
        .ok_or(Error::MessageLength {
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            max: MAX_MESSAGE,
        })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    let raw: Vec<RawFd> = descriptors.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let mut cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let mut sent = 0;
    while sent < frame.len() {
        let iov = [IoSlice::new(&frame[sent..])];
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => {
                sent += n;
                // The descriptors went with the first byte sent.
                cmsgs = &[];
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::socket("write to")(errno(e))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Agent side

/// Receives a handover: one frame with exactly one descriptor, which must be
/// an initialized userfaultfd. The descriptor is made non-blocking (a
/// userfaultfd polls only so). Waits at most [`RECEIVE_TIMEOUT`]. Every
/// descriptor that arrived is closed when this fails.
pub fn receive(socket: &UnixStream) -> Result<Received> {
    let (body, mut descriptors) = with_timeout(socket, receive_frame)?;
    let uffd = match descriptors.len() {
        0 => return Err(Error::NoDescriptor),
        1 => descriptors.remove(0),
        count => return Err(Error::TooManyDescriptors { count }),
    };
    let handover: Handover = serde_json::from_slice(&body).map_err(|e| Error::Json {
        what: "handover message",
        reason: e.to_string(),
    })?;
    if handover.version != PROTOCOL_VERSION {
        return Err(Error::Version {
            found: handover.version,
            known: PROTOCOL_VERSION,
        });
    }
    check_userfaultfd(&uffd)?;
    set_nonblocking(&uffd)?;
    check_initialized(&uffd)?;
    // SAFETY: the descriptor was just received, is owned here and nowhere
    // else in this process, and is a userfaultfd; `Uffd` takes it over.
    let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
    Ok(Received {
        uffd,
        regions: handover.regions,
    })
}

/// Answers a handover: `Ok(())` when the memory is being served, or the
/// error that refused it (its message is sent to the VMM).
pub fn answer(socket: &UnixStream, outcome: std::result::Result<(), &Error>) -> Result<()> {
    let answer = match outcome {
        Ok(()) => Answer {
            ok: true,
            error: None,
        },
        Err(e) => Answer {
            ok: false,
            error: Some(e.to_string()),
        },
    };
    let body = serde_json::to_vec(&answer).map_err(|e| Error::Json {
        what: "answer of the agent",
        reason: e.to_string(),
    })?;
    send_frame(socket, &body, &[])
}

/// Runs `read` with [`RECEIVE_TIMEOUT`] as the socket's receive timeout,
/// then puts back none.
fn with_timeout<T>(socket: &UnixStream, read: impl FnOnce(&UnixStream) -> Result<T>) -> Result<T> {
    socket
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .map_err(Error::socket("set a timeout on"))?;
    let result = read(socket);
    socket
        .set_read_timeout(None)
        .map_err(Error::socket("clear the timeout of"))?;
    result
}

/// Reads one frame and every descriptor that came with any of its bytes.
fn receive_frame(socket: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut descriptors = Vec::new();
    let mut prefix = [0u8; 4];
    receive_exact(socket, &mut prefix, &mut descriptors)?;
    let len = u32::from_le_bytes(prefix);
    if len == 0 || len > MAX_MESSAGE {
        return Err(Error::MessageLength {
            len,
            max: MAX_MESSAGE,
        });
    }
    let mut body = vec![0u8; len as usize];
    receive_exact(socket, &mut body, &mut descriptors)?;
    Ok((body, descriptors))
}

/// Fills `buf` from the socket, taking ownership of any descriptor passed
/// with the bytes (close-on-exec).
fn receive_exact(socket: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<()> {
    let mut got = 0;
    let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    while got < buf.len() {
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let message = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(message) => message,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(Error::Timeout {
                    seconds: RECEIVE_TIMEOUT.as_secs(),
                })
            }
            Err(e) => return Err(Error::socket("read from")(errno(e))),
        };
        // The buffer holds SCM_MAX_FD descriptors, so truncation means a
        // kernel that passes more: refuse rather than guess.
        let cmsgs = message
            .cmsgs()
            .map_err(|e| Error::socket("read descriptors from")(errno(e)))?;
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel has just installed these descriptors in
                // this process for us; nothing else knows their numbers.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if message.bytes == 0 {
            return Err(Error::Closed {
                got,
                expected: buf.len(),
            });
        }
        got += message.bytes;
    }
    Ok(())
}

/// Refuses a descriptor that is not a userfaultfd.
fn check_userfaultfd(fd: &OwnedFd) -> Result<()> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let target = std::fs::read_link(&link)
        .map_err(Error::setup("read /proc/self/fd to check the descriptor"))?;
    let target = target.to_string_lossy().into_owned();
    if target == UFFD_LINK {
        Ok(())
    } else {
        Err(Error::NotUserfaultfd { target })
    }
}

/// Sets `O_NONBLOCK` (shared with the VMM's copy, which does not read it).
fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let setup = |e| Error::setup("make the userfaultfd non-blocking")(errno(e));
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(setup)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(setup)?;
    Ok(())
}

/// A userfaultfd without `UFFDIO_API` polls as an error.
fn check_initialized(fd: &OwnedFd) -> Result<()> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO)
        .map_err(|e| Error::setup("poll the userfaultfd")(errno(e)))?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    if revents.contains(PollFlags::POLLERR) {
        return Err(Error::UffdNotReady);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_use_the_field_names_of_the_protocol() {
        let handover = Handover {
            version: 1,
            regions: vec![Region {
                base_host_virt_addr: 0x7f00_0000_0000,
                size: 8192,
                offset: 4096,
                page_size: 4096,
            }],
        };
        let json = serde_json::to_string(&handover).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"regions":[{"base_host_virt_addr":139637976727552,"size":8192,"offset":4096,"page_size":4096}]}"#
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"version":1,"regions":[],"extra":1}"#;
        assert!(serde_json::from_str::<Handover>(json).is_err());
        let json = r#"{"version":1,"regions":[{"base_host_virt_addr":0,"size":1,"offset":0,"page_size":4096,"x":1}]}"#;
        assert!(serde_json::from_str::<Handover>(json).is_err());
    }

    #[test]
    fn a_frame_round_trips_with_its_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        let (spare, _keep) = UnixStream::pair().unwrap();
        send_frame(&a, b"{}", &[spare.as_fd()]).unwrap();
        let (body, fds) = receive_frame(&b).unwrap();
        assert_eq!(body, b"{}");
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn a_descriptor_that_is_not_a_userfaultfd_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (spare, _keep) = UnixStream::pair().unwrap();
        let body = br#"{"version":1,"regions":[]}"#;
        send_frame(&a, body, &[spare.as_fd()]).unwrap();
        let err = receive(&b).unwrap_err();
        assert!(
            matches!(&err, Error::NotUserfaultfd { target } if target.starts_with("socket:")),
            "{err}"
        );
    }

    #[test]
    fn lengths_out_of_range_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(&0u32.to_le_bytes()).unwrap();
        let err = receive(&b).unwrap_err();
        assert!(matches!(err, Error::MessageLength { len: 0, .. }), "{err}");
        (&a).write_all(&(MAX_MESSAGE + 1).to_le_bytes()).unwrap();
        let err = receive(&b).unwrap_err();
        assert!(matches!(err, Error::MessageLength { .. }), "{err}");
    }

    #[test]
    fn a_short_frame_is_reported_as_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(&10u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{\"ve").unwrap();
        drop(a);
        let err = receive(&b).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Closed {
                    got: 4,
                    expected: 10
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn answers_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        answer(&a, Ok(())).unwrap();
        read_answer(&b).unwrap();
        answer(&a, Err(&Error::NoDescriptor)).unwrap();
        let err = read_answer(&b).unwrap_err();
        assert!(
            matches!(&err, Error::Refused { message } if message.contains("no file descriptor")),
            "{err}"
        );
    }
}
