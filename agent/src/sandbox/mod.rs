//! Sandboxes: the state machine that moves each sandbox between states,
//! writing its LMDB record before and after every step.
//!
//! - [`manager`]: the [`Manager`], create, destroy, timeouts, and the
//!   steps every operation shares; the rest of it is split by job:
//!   - [`spec`]: a create request checked, and the VM spec of a record;
//!   - [`boot`]: waiting for the guest's envd, and reaching it;
//!   - [`pause`]: pause and resume;
//!   - [`node`]: recovery at start, the timeout reaper, shutdown;
//! - [`recovery`]: what to do after a restart with a sandbox a previous
//!   agent left half done (a pure decision, table-tested).
//! - `undo`: the undo list each step fills as it acquires resources.
//! - [`registry`]: records, busy claims, network slots, the event log.
//! - [`envd`]: the client for the guest agent inside each sandbox.
//! - [`templates`]: the base images a sandbox can boot from.
//! - [`snapshots`]: snapshot templates a sandbox can restore from.
//! - [`bundle`]: a snapshot as it travels to another node, and its import.
//! - [`moving`]: a paused sandbox moved to another node (a drain).
//! - [`warm`]: warm templates, snapshots of a base template made ready in
//!   the background, that its sandboxes are created from.
//! - [`error`]: failures and the HTTP answers they get.

pub mod boot;
pub mod bundle;
pub mod envd;
pub mod error;
pub mod manager;
pub mod metrics;
pub mod moving;
pub mod node;
pub mod pause;
pub mod recovery;
pub mod registry;
pub mod snapshots;
pub mod spec;
pub mod templates;
pub mod timings;
mod undo;
pub mod warm;

pub use bundle::Bundle;
pub use error::SandboxError;
pub use manager::{Manager, Parts};
pub use snapshots::{LayerUsage, Snapshot, SnapshotRequest};
pub use spec::{CreateRequest, HostCapacity};
pub use warm::{is_warm_name, WarmState};
