//! The fleet: nodes that share one manifest (`fleet.toml`) and know each
//! other by gossip, with no central database (`docs/fleet.md`). Without a
//! manifest a node runs alone.

pub mod gossip;
pub mod manifest;

pub use gossip::{Gossip, Member};
pub use manifest::Manifest;
