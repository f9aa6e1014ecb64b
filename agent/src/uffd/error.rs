//! Errors of the page server and of the handover protocol.
//!
//! Every message says which side is wrong (the VMM's message, the
//! descriptor, the snapshot, this machine) and, where someone can act on
//! it, what to do.

use std::path::PathBuf;

use crate::store;

/// `Result` with the page server's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the handover or while serving faults.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The handover socket failed.
    #[error("cannot {action} the handover socket: {source}")]
    Socket {
        /// What was being done, such as "read from".
        action: &'static str,
        /// What the system said.
        source: std::io::Error,
    },

    /// The peer did not send the whole message in time.
    #[error(
        "the handover message did not arrive within {seconds} s: the VMM must send it right \
         after connecting (docs/uffd.md)"
    )]
    Timeout {
        /// The receive timeout.
        seconds: u64,
    },

    /// The peer closed the socket in the middle of a message.
    #[error(
        "the handover socket was closed after {got} of {expected} bytes of a message: the VMM \
         exited or sent a short message"
    )]
    Closed {
        /// Bytes received.
        got: usize,
        /// Bytes the message needs.
        expected: usize,
    },

    /// A length prefix out of range.
    #[error(
        "a handover message announces {len} bytes of JSON; it must be 1 to {max}: the VMM \
         does not speak this protocol (docs/uffd.md)"
    )]
    MessageLength {
        /// The announced length.
        len: u32,
        /// The largest accepted.
        max: u32,
    },

    /// The JSON of a message is not what the protocol defines.
    #[error("the {what} is not valid ({reason}); see docs/uffd.md for its form")]
    Json {
        /// "handover message" or "answer of the agent".
        what: &'static str,
        /// What serde_json said.
        reason: String,
    },

    /// A message of a protocol version this agent does not know.
    #[error(
        "the handover message has protocol version {found} but this wrenn-agent speaks {known}: \
         use a VMM and an agent of the same release"
    )]
    Version {
        /// The version received.
        found: u32,
        /// The version spoken here.
        known: u32,
    },

    /// No descriptor came with the message.
    #[error(
        "the handover message carried no file descriptor: send the userfaultfd as SCM_RIGHTS \
         ancillary data with the first byte of the message"
    )]
    NoDescriptor,

    /// More than one descriptor came with the message.
    #[error(
        "the handover message carried {count} file descriptors; send exactly one, the \
         userfaultfd"
    )]
    TooManyDescriptors {
        /// How many arrived (all were closed).
        count: usize,
    },

    /// The descriptor received is not a userfaultfd.
    #[error("the descriptor of the handover is {target}, not a userfaultfd")]
    NotUserfaultfd {
        /// What `/proc/self/fd` says it is.
        target: String,
    },

    /// The userfaultfd was not set up with UFFDIO_API.
    #[error(
        "the userfaultfd of the handover is not initialized: the VMM must call UFFDIO_API \
         (and register its memory) before sending it"
    )]
    UffdNotReady,

    /// A region of the handover is not acceptable.
    #[error("region {index} of the handover {problem}")]
    Region {
        /// Its index in the message.
        index: usize,
        /// What is wrong, as the end of a sentence.
        problem: String,
    },

    /// Two regions overlap.
    #[error("regions {first} and {second} of the handover overlap in {space}")]
    Overlap {
        /// Index of one region.
        first: usize,
        /// Index of the other.
        second: usize,
        /// "host addresses" or "device offsets".
        space: &'static str,
    },

    /// The header cannot back a page server.
    #[error(
        "the snapshot has blocks of {block_size} bytes; the page server serves memory \
         snapshots, whose blocks are 4096-byte pages"
    )]
    NotMemory {
        /// The header's block size.
        block_size: u32,
    },

    /// The agent refused a handover (sending side).
    #[error("the agent refused the handover: {message}")]
    Refused {
        /// The agent's message.
        message: String,
    },

    /// A userfaultfd operation failed.
    #[error("userfaultfd {action} at {addr:#x} failed: {source}")]
    Uffd {
        /// "copy", "zeropage", "wake" or "read".
        action: &'static str,
        /// The page, 0 for reads.
        addr: u64,
        /// What the system said.
        source: std::io::Error,
    },

    /// A fault in memory the handover did not describe.
    #[error(
        "page fault at {addr:#x}, outside every region of the handover: the VMM registered \
         memory it did not describe, and this VM cannot continue"
    )]
    FaultOutsideRegions {
        /// The faulting page.
        addr: u64,
    },

    /// Reading the snapshot failed.
    #[error(transparent)]
    Store(#[from] store::Error),

    /// A prefetch file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    PrefetchIo {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },

    /// A prefetch file is damaged.
    #[error("prefetch list {path} is damaged ({reason}); delete it, it is written again")]
    PrefetchCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The poll, eventfd or thread machinery of the server failed.
    #[error("the page server cannot {action}: {source}")]
    Setup {
        /// What was being done.
        action: &'static str,
        /// What the system said.
        source: std::io::Error,
    },

    /// The server thread panicked (a bug).
    #[error("the page server thread panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// An [`Error::Socket`] for `action`.
    pub(crate) fn socket(action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Socket { action, source }
    }

    /// An [`Error::Setup`] for `action`.
    pub(crate) fn setup(action: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Setup { action, source }
    }

    /// An [`Error::Region`].
    pub(crate) fn region(index: usize, problem: impl Into<String>) -> Error {
        Error::Region {
            index,
            problem: problem.into(),
        }
    }
}

/// A nix error as the `std::io::Error` our variants carry.
pub(crate) fn errno(e: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}
