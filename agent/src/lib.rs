//! The Wrenn node agent.
//!
//! - [`api`]: the HTTP API (`docs/api.md`).
//! - [`clock`]: wall-clock milliseconds, as records store them.
//! - [`config`]: embedded default, TOML file, environment, flags.
//! - [`network`]: per-sandbox network namespaces, links, addresses, NAT.
//! - [`sandbox`]: sandbox lifecycle and the client for the guest's envd.
//! - [`runtime`]: the programs that run sandbox VMs: QEMU, and `wrenn-vmm`
//!   (the native runtime).
//! - [`tools`]: the external programs the node runs, checked at start.
//! - [`store`]: snapshot headers and content-addressed layers (`docs/layers.md`).
//! - [`uffd`]: the userfaultfd page server that restores VM memory from the
//!   store (`docs/uffd.md`).

pub mod api;
pub mod clock;
pub mod config;
pub mod fleet;
pub mod network;
pub mod runtime;
pub mod sandbox;
pub mod store;
pub mod tools;
pub mod uffd;
