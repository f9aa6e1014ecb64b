//! Errors of the layer format and of reading a device through a header.
//!
//! Every message names the file or header concerned and, where a person
//! can do something about it, what.

use std::path::PathBuf;

use crate::id::LayerId;

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong decoding a header or reading through one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A header was written by a newer program.
    #[error(
        "{name} has header format version {found} but this program reads up to {known}: \
         upgrade wrenn-agent and wrenn-vmm"
    )]
    HeaderTooNew {
        /// The header file or id.
        name: String,
        /// The version byte found.
        found: u8,
        /// The newest version this program knows.
        known: u8,
    },

    /// A header's checksum does not match its content.
    #[error(
        "{name} is damaged: its checksum says {stored:08x} but its content sums to \
         {computed:08x}; restore the file from a backup or a peer, or take the snapshot again"
    )]
    HeaderChecksum {
        /// The header file or id.
        name: String,
        /// The CRC-32C stored in the header.
        stored: u32,
        /// The CRC-32C of what precedes it.
        computed: u32,
    },

    /// A header's checksum matches but its content is not a valid header.
    #[error(
        "{name} is not a valid snapshot header ({reason}); restore the file from a backup or \
         a peer, or take the snapshot again"
    )]
    HeaderCorrupt {
        /// The header file or id.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A header could not be serialized (a bug: headers are plain data).
    #[error("cannot encode a snapshot header: {0}")]
    HeaderEncode(String),

    /// An unsupported block size was asked for.
    #[error(
        "block size {block_size} is not supported: use a power of two from 4096 to 1048576 \
         bytes (4096 for memory, 65536 for disks)"
    )]
    BlockSize {
        /// The block size asked for.
        block_size: u32,
    },

    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, such as "read the layer".
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },

    /// A layer file that a header needs is gone.
    #[error(
        "layer {id} is used by a snapshot but {path} is missing: restore the file from a peer \
         or a backup, or drop the snapshots that use it"
    )]
    LayerMissing {
        /// The layer.
        id: LayerId,
        /// Where its file should be.
        path: PathBuf,
    },

    /// A layer file is shorter than the header says.
    #[error(
        "layer {id} is damaged: {path} ends before block {block} that a snapshot uses; \
         restore the file from a peer or a backup"
    )]
    LayerShort {
        /// The layer.
        id: LayerId,
        /// Its file.
        path: PathBuf,
        /// The layer block that could not be read whole.
        block: u64,
    },

    /// A written-block list file is damaged.
    #[error(
        "written-block list {path} is damaged ({reason}); the overlay beside it cannot be \
         trusted: start the disk from its base again, or restore the pair from a snapshot"
    )]
    WrittenListCorrupt {
        /// The list file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A read past the end of the device.
    #[error("bytes {offset}..{end} are past the end of the device, which is {size} bytes")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// One past the last byte asked for.
        end: u64,
        /// Bytes of the device.
        size: u64,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}
