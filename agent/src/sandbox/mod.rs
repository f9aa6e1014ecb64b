//! Sandboxes: the state machine that moves each sandbox between states,
//! writing its LMDB record before and after every step.
//!
//! - [`manager`]: create, destroy, timeouts, reconcile after a restart.
//! - [`recovery`]: what to do after a restart with a sandbox a previous
//!   agent left half done (a pure decision, table-tested).
//! - [`envd`]: the client for the guest agent inside each sandbox.
//! - [`templates`]: the base images a sandbox can boot from.
//! - [`snapshots`]: snapshot templates a sandbox can restore from.
//! - [`error`]: failures and the HTTP answers they get.

pub mod envd;
pub mod error;
pub mod manager;
pub mod recovery;
pub mod snapshots;
pub mod templates;

pub use error::SandboxError;
pub use manager::{CreateRequest, HostCapacity, Manager};
pub use snapshots::{LayerUsage, Snapshot, SnapshotRequest};
