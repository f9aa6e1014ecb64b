//! Processes started through the API: planning, spawning (pipes or PTY),
//! output buffering and streaming, stdin, signals and the registry.

pub mod api;
mod events;
mod launch;
mod output;
mod pty;
mod registry;
mod signal;
mod spawn;
mod spec;
mod stdin;

pub use registry::Registry;
pub use spec::expand_home;
