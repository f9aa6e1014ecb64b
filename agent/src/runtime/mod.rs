//! Runtimes: the programs that run a sandbox's VM.
//!
//! A [`Runtime`] boots a VM from a [`VmSpec`], finds it again after the agent
//! restarts ([`Runtime::attach`]), and stops it. It knows nothing of LMDB, the
//! API or networking: the sandbox layer hands it a ready network namespace
//! and a folder, and records the [`VmHandle`] it gets back.
//!
//! - [`native`]: `wrenn-vmm`, our own VMM, on hardware KVM; driven over
//!   its HTTP API ([`vmm_api`]); raw disks ([`disk`]).
//! - [`qemu`]: `qemu-system-x86_64 -M microvm`, KVM where the host has
//!   hardware virtualization, TCG elsewhere; driven over QMP ([`qmp`]).
//! - [`probe`]: what this host offers and which runtime to use, and why.
//! - [`process`]: VM processes by PID, without being their parent.

pub mod disk;
pub mod native;
pub mod probe;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod vmm_api;

use std::path::{Path, PathBuf};

pub use lmdb_schema::{DiskFormat, RuntimeKind, VmStateVersion};
use thiserror::Error;

// Files every runtime keeps in a sandbox's folder.

/// The guest's serial console.
pub const CONSOLE_LOG: &str = "console.log";
/// The VM process's PID, for finding it again when no record names it.
pub const PID_FILE: &str = "vmm.pid";
/// Guest RAM as a file. QEMU maps it shared while the VM runs; wrenn-vmm
/// writes it when pausing. Either way, once a VM is paused this file holds
/// its memory, and a restore finds it here.
pub const MEMORY_FILE: &str = "memory";

/// Everything a runtime needs to boot one sandbox VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The sandbox this VM belongs to; used in logs and the VM's name.
    pub sandbox_id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The template's root file system; never written.
    pub base_rootfs: PathBuf,
    /// Its format: raw for a base image and a native snapshot's disk,
    /// qcow2 for a QEMU snapshot's disk.
    pub base_format: DiskFormat,
    /// The sandbox's own folder: disk, sockets, console log.
    pub dir: PathBuf,
    /// Network namespace holding `tap0`, entered before the VM starts.
    pub netns: String,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
}

/// How to find a running VM again: its process and its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHandle {
    pub pid: u32,
    /// The process's start time in clock ticks since boot, from
    /// `/proc/PID/stat`: a recycled PID has another.
    pub start_time_ticks: u64,
    pub control_socket: PathBuf,
}

/// What a VM is doing, as far as its runtime can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    /// The process is gone (or is another process now).
    Gone,
}

/// Resource use of one VM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    pub rss_bytes: u64,
    pub cpu_time_ms: u64,
}

/// A runtime failure, with what to do about it.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("qemu-img failed: {0}")]
    QemuImg(String),
    #[error("cannot start QEMU: {0}; is qemu-system-x86 installed? (`make deps`)")]
    Spawn(std::io::Error),
    #[error("QEMU refused to start the VM: {0}")]
    Start(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("saving or loading the VM state failed: {0}")]
    Migration(String),
    #[error("VM process {pid} did not exit after SIGKILL")]
    Unkillable { pid: u32 },
    #[error("{0}")]
    Disk(String),
    #[error("cannot start wrenn-vmm ({binary}): {source}; build it with `cargo build -p wrenn-vmm` (or `make build`)")]
    VmmSpawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("wrenn-vmm: {0}")]
    Vmm(String),
}

/// A way of running sandbox VMs.
pub trait Runtime: Send + Sync {
    /// Which runtime this is; records store it.
    fn kind(&self) -> RuntimeKind;

    /// Short name, as reported by `GET /v1/node`.
    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Boots a VM; it is starting (not yet serving) when this returns.
    fn boot(&self, spec: &VmSpec) -> Result<VmHandle, RuntimeError>;

    /// Finds a VM started earlier, possibly by a previous agent process.
    fn attach(&self, handle: &VmHandle) -> VmState;

    /// Stops the VM and waits until its process is gone. Stopping a VM
    /// that is already gone succeeds.
    fn stop(&self, handle: &VmHandle) -> Result<(), RuntimeError>;

    /// Freezes the VM, writes its device and CPU state to `state` and ends
    /// its process. Guest memory and the disk stay in the sandbox folder
    /// (the memory file and the overlay), so [`Runtime::restore`] with the
    /// same spec brings back every process and file as it was.
    fn pause_to(&self, handle: &VmHandle, state: &Path) -> Result<(), RuntimeError>;

    /// Starts a VM from a state written by [`Runtime::pause_to`] and lets it
    /// run on from where it stopped.
    fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError>;

    /// Starts a new VM from a snapshot: a fresh disk overlay on
    /// `spec.base_rootfs`, the memory file already in the sandbox folder,
    /// devices and CPUs from `state`.
    fn restore_new(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError>;

    /// CPU and memory use of the VM's process (every runtime runs a VM as
    /// one process).
    fn stats(&self, handle: &VmHandle) -> Option<VmStats> {
        if process::is_same_process(handle.pid, handle.start_time_ticks) {
            process::stats(handle.pid)
        } else {
            None
        }
    }

    /// The control socket a VM of the sandbox folder `dir` serves.
    fn control_socket(&self, dir: &Path) -> PathBuf;

    /// The name of a sandbox's own disk in its folder (`rootfs.qcow2`,
    /// `rootfs.raw`).
    fn sandbox_disk_file(&self) -> &'static str {
        "rootfs.qcow2"
    }

    /// The name a snapshot gives its copy of the disk (`disk.qcow2`,
    /// `disk.raw`), and the disk's format, which the snapshot's record
    /// stores.
    fn snapshot_disk_file(&self) -> (&'static str, DiskFormat);

    /// The version of the VM state file `state` that [`Runtime::pause_to`]
    /// wrote, for the record; `None` when the runtime has no versions of
    /// its own (QEMU) or the file says none.
    fn state_version(&self, state: &Path) -> Option<VmStateVersion> {
        let _ = state;
        None
    }

    /// Whether this runtime can restore a VM state of `version`, or why
    /// not. `None` (not recorded) is tried.
    fn can_restore(&self, version: Option<VmStateVersion>) -> Result<(), String> {
        let _ = version;
        Ok(())
    }

    /// Writes the disk of the paused sandbox in `sandbox_dir` to `dest` as
    /// a snapshot's disk (not synced: the caller syncs the snapshot).
    /// `base_raw` is the raw base image the sandbox's disk started from.
    fn snapshot_disk(
        &self,
        sandbox_dir: &Path,
        base_raw: &Path,
        dest: &Path,
    ) -> Result<(), RuntimeError>;

    /// Makes a snapshot disk fetched from another node, `disk`, rest on
    /// this node's copy of its base image, `base_raw` (the same image,
    /// maybe at another path). A disk that rests on nothing is left as it
    /// is.
    fn adopt_disk(&self, disk: &Path, base_raw: &Path) -> Result<(), RuntimeError> {
        let _ = (disk, base_raw);
        Ok(())
    }
}

/// Puts a saved VM state in place: `written` is fsynced, renamed to
/// `state` and the folder fsynced, so after a crash `state` is either
/// absent or whole (recovery takes its presence as "saved").
pub(crate) fn publish_state(written: &Path, state: &Path) -> Result<(), RuntimeError> {
    std::fs::File::open(written)
        .and_then(|f| f.sync_all())
        .map_err(prepare(written))?;
    std::fs::rename(written, state).map_err(prepare(state))?;
    if let Some(dir) = state.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(prepare(dir))?;
    }
    Ok(())
}

/// The last step of a pause: the VM process is ended, and how long the
/// whole pause took is logged.
pub(crate) fn stop_after_pause(
    runtime: &dyn Runtime,
    handle: &VmHandle,
    started: std::time::Instant,
) -> Result<(), RuntimeError> {
    let stopped = runtime.stop(handle);
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(ms, "VM process ended");
    stopped
}

/// Maps an I/O error on `path` to a [`RuntimeError::Prepare`].
pub(crate) fn prepare(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}
