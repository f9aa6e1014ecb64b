//! Harness for Wrenn's end-to-end tests: real QEMU guests in network
//! namespaces of their own, and a client for the guest agent envd.
//!
//! - [`netns`]: namespaces with a tap device, removed on drop.
//! - [`guest`]: boots the guest image under QEMU microvm, kills it on drop.
//! - [`envd`]: talks to envd over HTTP.

pub mod envd;
pub mod guest;
pub mod netns;
