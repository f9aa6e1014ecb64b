//! `wrenn-vmm`: Wrenn's KVM microVM monitor, one process per sandbox.
//!
//! - [`acpi`]: the ACPI tables that describe the machine to Linux.
//! - [`api`]: the control API's HTTP side on a Unix socket.
//! - [`request`]: the API's parser: a request becomes a [`request::VmmAction`].
//! - [`controller`]: the owner of the VM, which executes actions one at a
//!   time; the vCPU thread.
//! - [`machine`]: the VM: KVM file descriptors, guest memory, vCPUs, the
//!   exit loop and the port I/O it dispatches.
//! - [`boot`]: the 64-bit entry state (GDT, identity page tables, control
//!   registers) a guest program or kernel starts in.
//! - [`devices`]: the legacy devices: 8250 serial, i8042 reset.
//! - [`linux`]: loading a Linux kernel, its command line and initramfs.
//! - [`snapshot`]: saving a paused machine and restoring it; the versioned
//!   `vmstate` file ([`snapshot::format`]).
//! - [`persist`]: the [`persist::Persist`] trait each saved part implements.
//! - [`kvm_state`]: the vCPUs' and the VM's in-kernel state.
//! - [`virtio`]: virtio-mmio block and network devices and the thread that
//!   serves their queues.
//! - [`seccomp`]: the system call filters of the VMM and vCPU threads.
//! - [`uffd`]: guest memory placed by a page server over userfaultfd.
//! - [`error`]: failures and what to do about them.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod controller;
pub mod devices;
pub mod error;
pub mod kvm_state;
pub mod linux;
pub mod machine;
pub mod persist;
pub mod request;
pub mod seccomp;
pub mod snapshot;
pub mod uffd;
pub mod virtio;

pub use error::{Error, Result};
pub use machine::{Exit, Machine, MachineConfig};
pub use snapshot::MemoryFrom;
