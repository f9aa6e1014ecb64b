//! The [`Persist`] trait: how one part of the machine becomes plain state
//! for a snapshot and is rebuilt from it.
//!
//! Implemented beside each part: the vCPUs and the VM's in-kernel chips
//! ([`crate::kvm_state`]), the serial port ([`crate::devices`]), the
//! virtio-mmio transport ([`crate::virtio::mmio`]) and the block and
//! network devices (`virtio/block/persist.rs`, `virtio/net/persist.rs`).
//! Each state is a plain serde structure; [`crate::snapshot`] puts them
//! together into the `vmstate` body.
//!
//! Not here: versions, headers and checksums of the file, and the frozen
//! layouts of older versions (see [`crate::snapshot::format`]). A `State`
//! type that is part of a released state version changes only with a new
//! version (docs/vmm.md, "Changing the VM state").

/// A part of the machine a snapshot saves and a restore rebuilds.
///
/// `'a` is the lifetime of what [`Persist::ConstructorArgs`] borrows (a
/// VM's file descriptor, a drive path to use instead of the saved one).
pub trait Persist<'a>: Sized {
    /// What a snapshot keeps of it.
    type State;
    /// What a restore needs besides the state: what cannot be in a file,
    /// such as file descriptors made by the new process, guest memory, or
    /// where the output goes.
    type ConstructorArgs;
    /// Why saving or restoring failed.
    type Error;

    /// Its state now. Fallible: for kernel objects it is read by ioctls.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// The part rebuilt from `args` and a saved `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
