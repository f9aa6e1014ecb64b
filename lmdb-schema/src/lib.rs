//! Every LMDB database of a Wrenn node: keys, versioned records, schema
//! version, migrations.
//!
//! All durable state of a node lives in one LMDB environment,
//! `<state dir>/state.lmdb`. This crate is the only code that knows its
//! layout; `docs/state.md` describes it for people.
//!
//! - [`Store`] opens the file (creating, checking and migrating it) and runs
//!   transactions: [`Store::read`] and [`Store::write`] take closures that
//!   get a [`ReadTxn`] or a [`WriteTxn`].
//! - Transactions hand out typed views, one per database:
//!   `meta()` ([`Meta`]), `sandboxes()`, `templates()`, `slots()`,
//!   `layers()` ([`Table`] / [`TableMut`]) and `events()` ([`Events`] /
//!   [`EventsMut`]).
//! - Keys: [`SandboxId`], [`TemplateName`], [`SlotId`], [`EventSeq`],
//!   [`LayerId`].
//! - Records: [`SandboxRecord`], [`TemplateRecord`], [`SlotRecord`],
//!   [`EventRecord`], [`LayerRecord`], each stored as a version byte and its
//!   postcard bytes.
//! - Errors: [`Error`], one variant per failure.
//!
//! ```no_run
//! use lmdb_schema::{SlotId, SlotRecord, Store, StoreOptions, SandboxId};
//!
//! # fn main() -> lmdb_schema::Result<()> {
//! let store = Store::open("/var/lib/wrenn", StoreOptions::new())?;
//! let sandbox = SandboxId::generate()?;
//! let slot = store.write(|txn| {
//!     let Some(slot) = txn.slots().first_free(0..256)? else {
//!         return Ok(None);
//!     };
//!     let record = SlotRecord { sandbox: sandbox.clone(), allocated_at_ms: 0 };
//!     txn.slots().put(&slot, &record)?;
//!     Ok(Some(slot))
//! })?;
//! assert_eq!(slot, Some(SlotId(0)));
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod codec;
mod error;
mod events;
mod keys;
mod meta;
mod records;
mod schema;
mod store;
mod txn;

pub use codec::Record;
pub use error::{Error, Result};
pub use events::{Events, EventsMut};
pub use keys::{EventSeq, Key, LayerId, SandboxId, SlotId, TemplateName};
pub use meta::{Meta, MetaMut, MAX_NODE_ID_LEN, MAX_SETTING_LEN, MAX_SETTING_NAME_LEN};
pub use records::{
    DiskFormat, EventRecord, LayerRecord, RuntimeKind, SandboxRecord, SandboxStatus, SlotRecord,
    TemplateKind, TemplateRecord, TimeoutAction, VmStateVersion, VmmProcess,
};
pub use schema::SCHEMA_VERSION;
pub use store::{Store, StoreOptions, FILE_NAME};
pub use txn::{Iter, ReadTxn, Table, TableMut, WriteTxn};
pub use wrenn_layers::HeaderId;
