//! Errors of the layer store.
//!
//! Every message names the file, layer or header concerned and, where a
//! person can do something about it, what.

use std::path::PathBuf;

use wrenn_layers::{HeaderId, LayerId};

/// `Result` with the store's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the layer store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, such as "read the device".
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },

    /// The LMDB state failed.
    #[error(transparent)]
    Db(#[from] lmdb_schema::Error),

    /// A header could not be decoded or built, or a block size is not
    /// supported: see [`FormatError`](wrenn_layers::Error).
    #[error(transparent)]
    Format(#[from] wrenn_layers::Error),

    /// A header file's content does not hash to its name.
    #[error(
        "header file {path} is damaged: its content hashes to {actual}, not to its name; \
         restore it from a backup or a peer"
    )]
    HeaderIdMismatch {
        /// The header file.
        path: PathBuf,
        /// The SHA-256 of what is in it.
        actual: HeaderId,
    },

    /// A device does not have the geometry of the parent snapshot given for it.
    #[error(
        "{path} is {size} bytes in blocks of {block_size}, but the parent snapshot is \
         {parent_size} bytes in blocks of {parent_block_size}: pass the parent taken from this \
         device, or snapshot it without a parent"
    )]
    ParentMismatch {
        /// The device file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The block size asked for.
        block_size: u32,
        /// The parent header's device size.
        parent_size: u64,
        /// The parent header's block size.
        parent_block_size: u32,
    },

    /// A block index past the end of the device.
    #[error("block {block} is past the end of the device, which has {blocks} blocks")]
    BlockOutOfRange {
        /// The index asked for.
        block: u64,
        /// The number of blocks of the device.
        blocks: u64,
    },

    /// The output buffer of a block read has the wrong length.
    #[error(
        "reading {blocks} blocks of {block_size} bytes needs a buffer of {expected} bytes, \
         not {actual}"
    )]
    BufferSize {
        /// Number of blocks asked for.
        blocks: usize,
        /// The header's block size.
        block_size: u32,
        /// The length needed.
        expected: usize,
        /// The length given.
        actual: usize,
    },

    /// A layer file is not what its record says.
    #[error(
        "layer {id} is damaged: {path} {problem}; restore the file from a peer or a backup, or \
         drop the snapshots that use it"
    )]
    LayerCorrupt {
        /// The layer.
        id: LayerId,
        /// Its file.
        path: PathBuf,
        /// What is wrong, such as "hashes to ...".
        problem: String,
    },

    /// A layer has no record in LMDB.
    #[error("layer {id} has no record in the `layers` database: no retained header uses it")]
    LayerUnknown {
        /// The layer.
        id: LayerId,
    },

    /// A header was released more often than retained.
    #[error(
        "layer {id} was released more often than it was retained (its record is {state}): \
         a header was released twice or never retained"
    )]
    RefcountUnderflow {
        /// The layer.
        id: LayerId,
        /// "missing" or "at refcount 0".
        state: &'static str,
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
