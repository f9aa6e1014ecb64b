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
    /// The request needs the VM in another phase (HTTP 409).
    #[error("cannot {action}: the VM is {now}; {remedy}")]
    WrongState {
        /// What was asked, such as "pause the VM".
        action: &'static str,
        /// The phase it is in: "not started", "running", "paused", "exited".
        now: &'static str,
        /// What to do instead.
        remedy: &'static str,
    },
    /// `InstanceStart` before `PUT /boot-source` (HTTP 409).
    #[error("no boot source: PUT /boot-source first")]
    NoBootSource,
    /// The guest ended before (or while) the request was served (HTTP 409).
    #[error("the guest has already ended: {reason}; start another wrenn-vmm for a new VM")]
    GuestEnded { reason: String },
    /// An earlier request stopped halfway through a change of phase (a
    /// panic, a bug): nothing more can be done with this VM (HTTP 500).
    #[error("the VM is unusable: an earlier request failed halfway through; shut this wrenn-vmm down and start another")]
    Unusable,
    /// The flat program of `PUT /boot-source` cannot be read (HTTP 400).
    #[error("cannot read the program {path}: {source}; check program_path")]
    ReadProgram {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A snapshot could not be written and its file system is (nearly)
    /// full (HTTP 507).
    #[error("cannot write the snapshot into {dir}: its file system has {available} bytes free and the guest has {needed} bytes of memory; free space there or choose another snapshot_path ({source})")]
    SnapshotNoSpace {
        dir: std::path::PathBuf,
        available: u64,
        needed: u64,
        #[source]
        source: Box<Error>,
    },
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
