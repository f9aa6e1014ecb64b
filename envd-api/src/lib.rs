//! The contract between envd (the guest agent inside every sandbox) and its
//! clients: the JSON bodies of envd's HTTP API as Rust types, used by the
//! server to read and write them and by every client to do the same, so the
//! two sides cannot drift apart. `docs/envd-api.md` describes the API.
//!
//! - [`process`]: `POST /processes` ([`StartRequest`]) and the NDJSON
//!   [`Event`]s of a process stream.
//! - [`system`]: `/health` and `POST /init` ([`InitRequest`]).
//! - [`files`]: the entries `/fs/stat` and `/fs/list` report.
//! - [`error`]: the error body every failure carries.
//! - `client` (feature `client`): the one blocking client for envd.
//!
//! This crate holds no server logic: envd still checks a request (turns a
//! [`StartRequest`] into its launch plan) before acting on it.

pub mod error;
pub mod files;
pub mod process;
pub mod system;

#[cfg(feature = "client")]
pub mod client;

pub use error::{ErrorBody, ErrorDetail};
pub use files::{EntryInfo, EntryKind, Listing};
pub use process::{Encoding, Event, OutputData, PtySize, StartRequest, Started};
pub use system::{Health, InitRequest, InitResponse};

/// envd's TCP port in every guest.
pub const PORT: u16 = 49983;
