//! What can go wrong in the VMM, each with what to do about it.

use thiserror::Error;

/// A VMM failure.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0}; is KVM loaded and are you allowed to use it (root, or the kvm group)?")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the program ({len} bytes) does not fit in guest memory at {addr:#x}; give the VM more memory")]
    ProgramTooLarge { len: usize, addr: u64 },
    #[error("vcpus is {0}: it must be between 1 and {max}", max = crate::machine::MAX_VCPUS)]
    Vcpus(u8),
    #[error("memory_mb is {0}: it must be between {min} and {max}", min = crate::machine::MIN_MEMORY_MB, max = crate::machine::MAX_MEMORY_MB)]
    MemorySize(u32),
    #[error("the guest stopped on an instruction KVM cannot run here (KVM_EXIT_INTERNAL_ERROR, suberror {0}); under PVM this is expected for some instructions")]
    Internal(u32),
    #[error("KVM could not enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
    #[error("serial port: {0}")]
    Serial(String),
    #[error("kernel: {0}")]
    Kernel(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("seccomp: {0}; the VMM does not run a guest without its filters")]
    Seccomp(String),
    #[error("{0}")]
    State(String),
    #[error("vCPU: {0}")]
    Vcpu(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("snapshot: {0}")]
    StateFile(#[from] crate::snapshot::StateFileError),
    #[error("virtio device: {0}")]
    Virtio(#[from] crate::virtio::DeviceError),
    #[error("cannot make an event descriptor: {0}")]
    EventFd(std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Maps a KVM ioctl error to [`Error::Kvm`] naming the step.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
