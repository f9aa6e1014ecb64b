//! The fleet: nodes that share one manifest (`fleet.toml`) and know each
//! other by gossip, with no central database (`docs/fleet.md`). Without a
//! manifest a node runs alone.

pub mod caller;
pub mod gossip;
pub mod manifest;
pub mod view;

pub use caller::Caller;
pub use gossip::{Gossip, Member};
pub use manifest::Manifest;
