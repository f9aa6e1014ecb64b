//! The snapshot layer format of Wrenn, shared by the agent (which writes
//! snapshots into its layer store) and the VMM (which serves a disk from
//! one). Byte-by-byte description: `docs/layers.md`.
//!
//! - [`LayerId`], [`HeaderId`] (`id.rs`): the SHA-256 names of layer and
//!   header files.
//! - [`Header`] (`header.rs`): the map from every block of a device to zero
//!   or to a block of a layer; encode, decode (every invariant checked),
//!   lookup.
//! - [`Reader`] (`reader.rs`): any byte range of a header's device, read
//!   with `pread` from the layer files.
//! - [`WrittenBlocks`] (`written.rs`): the list of blocks a layered disk
//!   wrote into its overlay, kept in a file beside the overlay.
//! - [`Error`] (`error.rs`).
//!
//! Not here: writing layers, reference counts, garbage collection (the
//! agent's `store`). This crate has no LMDB, no io_uring, no async.

mod error;
mod header;
mod id;
mod reader;
mod written;

pub use error::{Error, Result};
pub use header::{
    check_block_size, Block, Extent, Header, LayerRef, Source, DISK_BLOCK_SIZE, FORMAT_VERSION,
    MAX_BLOCK_SIZE, MEMORY_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use id::{parse_hex32, HeaderId, InvalidId, LayerId};
pub use reader::Reader;
pub use written::{list_path, WrittenBlocks};
