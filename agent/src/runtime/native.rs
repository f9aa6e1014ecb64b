//! The native runtime: `wrenn-vmm`, our own KVM VMM, one process per
//! sandbox, driven over its control API on a Unix socket ([`VmmApi`]).
//!
//! The VMM is started inside the sandbox's network namespace (where `tap0`
//! waits for it) and double-forked, so it is never the agent's child and
//! survives an agent crash; the agent finds it again from the PID file and
//! the API socket in the sandbox's folder, as with QEMU.
//!
//! Disks: wrenn-vmm's virtio-blk serves raw files only, so each sandbox gets
//! its own raw copy of the base image ([`super::disk::copy_sparse`]: a
//! reflink where the file system can, else a copy that keeps holes), and a
//! snapshot stores the sandbox's raw disk.
//!
//! Memory: a running VM's memory is anonymous (or a private mapping of the
//! memory file it was restored from). A pause writes a full snapshot and
//! leaves its memory as the folder's memory file and its vCPU and device
//! state as the state file the Manager asked for; a restore loads both with
//! the VMM's `File` backend, which maps the memory file privately so pages
//! are read when the guest first touches them.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vmm_api::{
    paths, Action, BootSource, Drive, DriveOverride, DriveSource, MachineConfig, MemBackend,
    NetworkInterface, SnapshotCreate, SnapshotLoad, SnapshotType, VmPhase,
};

use vmm_api::state::{parse_header, FileVersion, StateSupport, StateVersion, HEADER_LEN};

use super::disk::copy_sparse;
use super::process;
use super::vmm_api::{CallError, VmmApi};
use super::{
    prepare, publish_state, stop_after_pause, DiskFormat, Runtime, RuntimeError, RuntimeKind,
    VmHandle, VmSpec, VmState, VmStateVersion, CONSOLE_LOG, MEMORY_FILE, PID_FILE,
};

/// Files of a VM inside its sandbox folder (and the shared ones above).
pub const API_SOCKET: &str = "vmm.sock";
/// The sandbox's raw disk.
pub const DISK: &str = "rootfs.raw";
/// A snapshot's disk: the sandbox's raw disk, copied.
pub const SNAPSHOT_DISK: &str = "disk.raw";
/// What the VMM itself says (its standard error), appended across starts.
pub const VMM_LOG: &str = "vmm.log";
/// Where a pause has the VMM write its snapshot before the files are moved
/// to their places.
const SAVE_DIR: &str = ".save";
/// A snapshot folder as the VMM reads it, made of links to the state and
/// memory files for the time of a restore.
const LOAD_DIR: &str = ".load";
/// The names the VMM gives the files of a snapshot folder.
const VMM_STATE_FILE: &str = "vmstate";
const VMM_MEMORY_FILE: &str = "memory";

/// The program, found next to the agent's executable or on `PATH`.
pub const VMM_BINARY: &str = "wrenn-vmm";
/// Device names, the same in every sandbox so that a snapshot restores in
/// any of them.
const ROOT_DRIVE: &str = "rootfs";
const NET_IFACE: &str = "eth0";
const TAP: &str = "tap0";
/// Locally administered, unicast.
const GUEST_MAC: &str = "02:77:72:00:00:01";
/// Kernel arguments every guest gets. QEMU's TSC workarounds for TCG are
/// not needed on KVM; `earlyprintk` shows the boot from its first line.
const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial reboot=k panic=-1 root=/dev/vda rw";

/// How long the VMM may take to serve its API after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long wrenn-vmm has to end after SIGTERM (it ends at once).
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Runs VMs with wrenn-vmm.
pub struct NativeRuntime {
    binary: PathBuf,
    /// The VM state versions the binary reads, from `wrenn-vmm
    /// --state-version --json`; `None` for a VMM too old to say.
    support: Option<StateSupport>,
}

/// The format byte of the `vmstate` files from before versioned headers.
const LEGACY_STATE_FORMAT: u8 = 4;

/// What `binary --state-version --json` says it reads; `None` when it
/// cannot say.
fn state_support(binary: &Path) -> Option<StateSupport> {
    let out = Command::new(binary)
        .args(["--state-version", "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Finds the wrenn-vmm binary: `configured` when set, else next to this
/// executable, else on `PATH`. The error says how to get one.
pub fn find_binary(configured: &Path) -> Result<PathBuf, String> {
    if !configured.as_os_str().is_empty() {
        return if configured.is_file() {
            Ok(configured.to_path_buf())
        } else {
            Err(format!(
                "runtime.vmm_binary is {}, which does not exist: build wrenn-vmm with \
                 `cargo build -p wrenn-vmm` (or `make build`), or clear the setting to use \
                 the one next to wrenn-agent",
                configured.display()
            ))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(VMM_BINARY)));
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(VMM_BINARY));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{VMM_BINARY} was found neither next to wrenn-agent nor on PATH: build it with \
             `cargo build -p wrenn-vmm` (or `make build`), or set runtime.vmm_binary"
            )
        })
}

impl NativeRuntime {
    pub fn new(binary: PathBuf) -> NativeRuntime {
        let support = state_support(&binary);
        match &support {
            Some(support) => tracing::info!(binary = %binary.display(), "wrenn-vmm {support}"),
            None => tracing::warn!(binary = %binary.display(),
                "wrenn-vmm does not say which VM state versions it reads (too old for \
                 --state-version --json); resumes are tried without checking first"),
        }
        NativeRuntime { binary, support }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The kernel to boot: the image's ELF `vmlinux` beside the bzImage
    /// when there is one (no decompressor to run), else the bzImage.
    pub fn kernel_for(spec: &VmSpec) -> PathBuf {
        let vmlinux = spec.kernel.with_file_name("vmlinux");
        if vmlinux.is_file() {
            vmlinux
        } else {
            spec.kernel.clone()
        }
    }

    /// The kernel command line for `spec`.
    pub fn cmdline(spec: &VmSpec) -> String {
        let mut cmdline = String::from(BASE_CMDLINE);
        if !spec.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.extra_cmdline);
        }
        cmdline
    }

    /// Starts wrenn-vmm inside the sandbox's namespace, not as our child,
    /// and waits until it serves its API.
    fn launch(&self, spec: &VmSpec) -> Result<VmHandle, RuntimeError> {
        let dir = &spec.dir;
        for stale in [PID_FILE, API_SOCKET] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let socket = dir.join(API_SOCKET);
        // A missing binary is the likelier mistake; say so before anything
        // else is prepared.
        if !self.binary.is_file() {
            return Err(RuntimeError::VmmSpawn {
                binary: self.binary.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let netns = process::open_netns(&spec.netns)?;
        let log_path = dir.join(VMM_LOG);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(prepare(&log_path))?;
        let (pid_read, pid_write) = cloexec_pipe().map_err(prepare(dir))?;
        let (netns_fd, pid_fd) = (netns.as_raw_fd(), pid_write.as_raw_fd());
        let mut command = Command::new(&self.binary);
        command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--serial-log")
            .arg(dir.join(CONSOLE_LOG))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // SAFETY: the closure runs in the forked child and makes only
        // async-signal-safe calls (setns, fork, write, _exit, setsid) on
        // descriptors that stay open until spawn returns. The child forks
        // again: the grandchild goes on to exec wrenn-vmm, the child sends
        // the grandchild's PID through the pipe and exits at once, so the VM
        // process is not ours to reap and outlives the agent.
        unsafe {
            command.pre_exec(move || {
                process::enter_netns(netns_fd)?;
                match libc::fork() {
                    -1 => Err(std::io::Error::last_os_error()),
                    0 => {
                        libc::setsid();
                        Ok(())
                    }
                    grandchild => {
                        let bytes = grandchild.to_ne_bytes();
                        let written = libc::write(pid_fd, bytes.as_ptr().cast(), bytes.len());
                        libc::_exit(if written == bytes.len() as isize {
                            0
                        } else {
                            1
                        })
                    }
                }
            });
        }
        // Returns once the grandchild has run exec (or failed to).
        let spawned = command.spawn();
        drop(pid_write);
        drop(netns);
        let mut child = spawned.map_err(|source| RuntimeError::VmmSpawn {
            binary: self.binary.clone(),
            source,
        })?;
        let _ = child.wait();
        let pid = read_pid(pid_read).ok_or_else(|| {
            RuntimeError::Start(format!("{VMM_BINARY} did not start; {}", log_tail(dir)))
        })?;
        let pid_file = dir.join(PID_FILE);
        std::fs::write(&pid_file, format!("{pid}\n")).map_err(prepare(&pid_file))?;
        let start_time_ticks = process::start_time_ticks(pid).ok_or_else(|| {
            RuntimeError::Start(format!(
                "{VMM_BINARY} (pid {pid}) exited right away; {}",
                log_tail(dir)
            ))
        })?;
        let handle = VmHandle {
            pid,
            start_time_ticks,
            control_socket: self.control_socket(dir),
        };
        self.wait_serving(&handle, dir)?;
        Ok(handle)
    }

    /// Waits for the API socket of a VMM just started.
    fn wait_serving(&self, handle: &VmHandle, dir: &Path) -> Result<(), RuntimeError> {
        let api = VmmApi::new(&handle.control_socket);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if api.is_up() {
                return Ok(());
            }
            if !process::is_same_process(handle.pid, handle.start_time_ticks) {
                return Err(RuntimeError::Start(format!(
                    "{VMM_BINARY} (pid {}) exited before serving its API; {}",
                    handle.pid,
                    log_tail(dir)
                )));
            }
            if Instant::now() >= deadline {
                let _ = self.stop(handle);
                return Err(RuntimeError::Start(format!(
                    "{VMM_BINARY} (pid {}) did not serve its API within {}s; {}",
                    handle.pid,
                    START_TIMEOUT.as_secs(),
                    log_tail(dir)
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Configures a new VM (machine, kernel, disk, network) and starts it.
    fn configure_and_start(&self, spec: &VmSpec, api: &VmmApi) -> Result<(), RuntimeError> {
        let vcpus = u8::try_from(spec.vcpus).map_err(|_| {
            RuntimeError::Start(format!(
                "{} vCPUs is more than wrenn-vmm runs (255)",
                spec.vcpus
            ))
        })?;
        api.put(
            paths::MACHINE_CONFIG,
            &MachineConfig {
                vcpu_count: vcpus,
                mem_size_mib: spec.memory_mb,
                track_dirty_pages: false,
            },
        )?;
        api.put(
            paths::BOOT_SOURCE,
            &BootSource::Kernel {
                kernel_image_path: Self::kernel_for(spec),
                initrd_path: Some(spec.initramfs.clone()),
                boot_args: Some(Self::cmdline(spec)),
            },
        )?;
        api.put(
            &paths::drive(ROOT_DRIVE),
            &Drive {
                drive_id: ROOT_DRIVE.into(),
                source: DriveSource::Raw(spec.dir.join(DISK)),
                is_root_device: true,
                is_read_only: false,
            },
        )
        .map_err(missing_device("a virtio-blk disk (PUT /drives)"))?;
        api.put(
            &paths::network_interface(NET_IFACE),
            &NetworkInterface {
                iface_id: NET_IFACE.into(),
                host_dev_name: TAP.into(),
                guest_mac: GUEST_MAC.into(),
            },
        )
        .map_err(missing_device(
            "a virtio-net interface (PUT /network-interfaces)",
        ))?;
        Ok(api.action(Action::InstanceStart)?)
    }

    /// The sandbox's own raw disk, copied from the template's.
    fn make_disk(&self, spec: &VmSpec) -> Result<(), RuntimeError> {
        if spec.base_format != DiskFormat::Raw {
            return Err(RuntimeError::Disk(format!(
                "the template's disk {} is {}, but the native runtime (wrenn-vmm) serves raw \
                 disks only: it is a snapshot taken by the QEMU runtime. Take the snapshot \
                 again on a node with runtime native, or run this node with runtime qemu",
                spec.base_rootfs.display(),
                spec.base_format
            )));
        }
        let disk = spec.dir.join(DISK);
        let started = Instant::now();
        let kind = copy_sparse(&spec.base_rootfs, &disk).map_err(|e| {
            RuntimeError::Disk(format!(
                "cannot copy the disk {} to {}: {e}",
                spec.base_rootfs.display(),
                disk.display()
            ))
        })?;
        tracing::debug!(sandbox = %spec.sandbox_id, copy = kind.as_str(),
            ms = started.elapsed().as_millis() as u64, "disk copied");
        Ok(())
    }

    /// Starts a VMM and has it load the state and memory in the folder.
    fn load(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError> {
        let disk = spec.dir.join(DISK);
        let memory = spec.dir.join(MEMORY_FILE);
        for (file, what) in [
            (&disk, "disk"),
            (&memory, "memory file"),
            (&state.to_path_buf(), "VM state"),
        ] {
            if !file.is_file() {
                return Err(RuntimeError::Start(format!(
                    "cannot restore sandbox {}: its {what} {} is missing",
                    spec.sandbox_id,
                    file.display()
                )));
            }
        }
        let load_dir = spec.dir.join(LOAD_DIR);
        let _ = std::fs::remove_dir_all(&load_dir);
        std::fs::create_dir(&load_dir).map_err(prepare(&load_dir))?;
        let linked = link_or_copy(state, &load_dir.join(VMM_STATE_FILE))
            .and_then(|()| link_or_copy(&memory, &load_dir.join(VMM_MEMORY_FILE)));
        let loaded = linked.and_then(|()| {
            let handle = self.launch(spec)?;
            let api = VmmApi::new(&handle.control_socket);
            let body = SnapshotLoad {
                snapshot_path: load_dir.clone(),
                mem_backend: MemBackend::File,
                drive_overrides: vec![DriveOverride {
                    drive_id: ROOT_DRIVE.into(),
                    source: DriveSource::Raw(disk.clone()),
                }],
                resume_vm: true,
            };
            match api.put(paths::SNAPSHOT_LOAD, &body) {
                Ok(()) => Ok(handle),
                Err(e) => {
                    let _ = self.stop(&handle);
                    Err(e.into())
                }
            }
        });
        // The VMM has read the state and mapped the memory: the links go.
        let _ = std::fs::remove_dir_all(&load_dir);
        loaded
    }
}

impl Runtime for NativeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Native
    }

    fn boot(&self, spec: &VmSpec) -> Result<VmHandle, RuntimeError> {
        std::fs::create_dir_all(&spec.dir).map_err(prepare(&spec.dir))?;
        self.make_disk(spec)?;
        let _ = std::fs::remove_file(spec.dir.join(MEMORY_FILE));
        let handle = self.launch(spec)?;
        match self.configure_and_start(spec, &VmmApi::new(&handle.control_socket)) {
            Ok(()) => Ok(handle),
            Err(e) => {
                let _ = self.stop(&handle);
                Err(e)
            }
        }
    }

    fn attach(&self, handle: &VmHandle) -> VmState {
        if !process::is_same_process(handle.pid, handle.start_time_ticks) {
            return VmState::Gone;
        }
        match VmmApi::new(&handle.control_socket)
            .info()
            .map(|info| info.phase)
        {
            Ok(VmPhase::Paused | VmPhase::NotStarted) => VmState::Paused,
            Ok(VmPhase::Exited { .. }) => VmState::Gone,
            Ok(VmPhase::Running) | Err(_) => VmState::Running,
        }
    }

    fn stop(&self, handle: &VmHandle) -> Result<(), RuntimeError> {
        let (pid, ticks) = (handle.pid, handle.start_time_ticks);
        process::stop_escalating(pid, ticks, TERM_GRACE, || {
            process::signal(pid, ticks, Signal::SIGTERM);
        })?;
        // A VMM ended by a signal leaves its socket behind.
        let _ = std::fs::remove_file(&handle.control_socket);
        Ok(())
    }

    fn pause_to(&self, handle: &VmHandle, state: &Path) -> Result<(), RuntimeError> {
        let dir = handle.control_socket.parent().ok_or_else(|| {
            RuntimeError::Vmm(format!(
                "{} is not in a sandbox folder",
                handle.control_socket.display()
            ))
        })?;
        if !process::is_same_process(handle.pid, handle.start_time_ticks) {
            return Err(RuntimeError::Vmm(format!(
                "the VM (pid {}) is gone: its state cannot be saved",
                handle.pid
            )));
        }
        let api = VmmApi::new(&handle.control_socket);
        let started = Instant::now();
        match api.info()?.phase {
            VmPhase::Running => api.action(Action::Pause)?,
            // An earlier pause (cut short by an agent crash) got this far.
            VmPhase::Paused => {}
            VmPhase::NotStarted => {
                return Err(RuntimeError::Vmm(
                    "the VM is not_started: there is nothing to save".into(),
                ))
            }
            VmPhase::Exited { reason } => {
                return Err(RuntimeError::Vmm(format!(
                    "the VM is exited ({reason}): there is nothing to save"
                )))
            }
        }
        let save_dir = dir.join(SAVE_DIR);
        let _ = std::fs::remove_dir_all(&save_dir);
        std::fs::create_dir(&save_dir).map_err(prepare(&save_dir))?;
        api.put(
            paths::SNAPSHOT_CREATE,
            &SnapshotCreate {
                snapshot_path: save_dir.clone(),
                snapshot_type: SnapshotType::Full,
            },
        )?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "VM state and memory saved"
        );
        // The VMM synced both files; the state is synced again because the
        // Manager takes its presence as "saved" after a crash.
        let (saved_state, saved_memory) = (
            save_dir.join(VMM_STATE_FILE),
            save_dir.join(VMM_MEMORY_FILE),
        );
        std::fs::rename(&saved_memory, dir.join(MEMORY_FILE)).map_err(prepare(&saved_memory))?;
        publish_state(&saved_state, state)?;
        let _ = std::fs::remove_dir_all(&save_dir);
        stop_after_pause(self, handle, started)
    }

    fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError> {
        self.load(spec, state)
    }

    fn restore_new(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError> {
        std::fs::create_dir_all(&spec.dir).map_err(prepare(&spec.dir))?;
        self.make_disk(spec)?;
        self.load(spec, state)
    }

    fn control_socket(&self, dir: &Path) -> PathBuf {
        dir.join(API_SOCKET)
    }

    fn sandbox_disk_file(&self) -> &'static str {
        DISK
    }

    fn snapshot_disk_file(&self) -> (&'static str, DiskFormat) {
        (SNAPSHOT_DISK, DiskFormat::Raw)
    }

    /// The version in the saved state's header; `None` for a file from
    /// before versioned headers, or one that cannot be read.
    fn state_version(&self, state: &Path) -> Option<VmStateVersion> {
        let mut start = Vec::with_capacity(HEADER_LEN);
        File::open(state)
            .and_then(|file| file.take(HEADER_LEN as u64).read_to_end(&mut start))
            .ok()?;
        match parse_header(&start, LEGACY_STATE_FORMAT) {
            Ok(FileVersion::Versioned(v)) => Some(VmStateVersion {
                major: v.major,
                minor: v.minor,
            }),
            _ => None,
        }
    }

    fn can_restore(&self, version: Option<VmStateVersion>) -> Result<(), String> {
        let (Some(support), Some(v)) = (self.support, version) else {
            return Ok(());
        };
        let found = FileVersion::Versioned(StateVersion {
            major: v.major,
            minor: v.minor,
        });
        support
            .check(found)
            .map_err(|why| format!("{} ({}): {why}", self.binary.display(), support))
    }

    /// A copy of the raw disk (reflinked or sparse).
    fn snapshot_disk(
        &self,
        sandbox_dir: &Path,
        _base_raw: &Path,
        dest: &Path,
    ) -> Result<(), RuntimeError> {
        let disk = sandbox_dir.join(DISK);
        copy_sparse(&disk, dest).map(drop).map_err(|e| {
            RuntimeError::Disk(format!(
                "cannot copy the disk {} to {}: {e}",
                disk.display(),
                dest.display()
            ))
        })
    }
}

/// A pipe whose ends close on exec.
fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The PID the forking child sent, once every writer has closed.
fn read_pid(pipe: OwnedFd) -> Option<u32> {
    let mut bytes = [0u8; 4];
    File::from(pipe).read_exact(&mut bytes).ok()?;
    u32::try_from(i32::from_ne_bytes(bytes))
        .ok()
        .filter(|p| *p > 0)
}

/// A hard link to `src` at `dst`, or a copy where a link cannot be made
/// (another file system).
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), RuntimeError> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map(drop).map_err(prepare(dst))
}

/// The last lines of the VMM's own log and of the guest's console, for
/// errors.
fn log_tail(dir: &Path) -> String {
    let tail = |file: &str| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    format!(
        "{VMM_LOG}: {:?}, {CONSOLE_LOG}: {:?}",
        tail(VMM_LOG),
        tail(CONSOLE_LOG)
    )
}

/// Says that a VMM without `what` is older than this agent.
fn missing_device(what: &'static str) -> impl Fn(CallError) -> RuntimeError {
    move |e| {
        if e.is_unknown_resource() {
            RuntimeError::Vmm(format!(
                "{e}; this wrenn-vmm cannot attach {what}: rebuild it from the same source as \
                 wrenn-agent (`cargo build -p wrenn-vmm`)"
            ))
        } else {
            e.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            sandbox_id: "sb-test".into(),
            vcpus: 1,
            memory_mb: 256,
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            base_rootfs: dir.join("rootfs.ext4"),
            base_format: DiskFormat::Raw,
            dir: dir.join("sandbox"),
            netns: "wrenn-none".into(),
            extra_cmdline: "wrenn.debug".into(),
        }
    }

    #[test]
    fn the_elf_vmlinux_is_booted_when_the_image_has_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = spec(dir.path());
        assert_eq!(NativeRuntime::kernel_for(&spec), dir.path().join("vmlinuz"));
        std::fs::write(dir.path().join("vmlinux"), b"ELF").expect("vmlinux");
        assert_eq!(NativeRuntime::kernel_for(&spec), dir.path().join("vmlinux"));
    }

    #[test]
    fn the_command_line_has_no_qemu_workarounds_and_ends_with_the_extra() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cmdline = NativeRuntime::cmdline(&spec(dir.path()));
        assert!(cmdline.starts_with("console=ttyS0"), "{cmdline}");
        assert!(cmdline.ends_with(" wrenn.debug"), "{cmdline}");
        assert!(!cmdline.contains("tsc_early_khz"), "{cmdline}");
    }

    #[test]
    fn a_qcow2_template_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spec = spec(dir.path());
        spec.base_format = DiskFormat::Qcow2;
        let runtime = NativeRuntime::new(PathBuf::from(VMM_BINARY));
        let err = runtime.make_disk(&spec).expect_err("qcow2").to_string();
        assert!(
            err.contains("QEMU") && err.contains("runtime qemu"),
            "{err}"
        );
    }

    #[test]
    fn a_configured_binary_that_is_missing_says_how_to_build_it() {
        let err = find_binary(Path::new("/nonexistent/wrenn-vmm")).expect_err("missing");
        assert!(err.contains("cargo build -p wrenn-vmm"), "{err}");
    }

    #[test]
    fn a_missing_vmm_binary_is_a_start_error_that_says_how_to_build_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = spec(dir.path());
        std::fs::create_dir_all(&spec.dir).expect("mkdir");
        // The namespace is missing too: the binary is checked first.
        let runtime = NativeRuntime::new(dir.path().join("no-such-wrenn-vmm"));
        let err = runtime.launch(&spec).expect_err("no binary").to_string();
        assert!(err.contains("cargo build -p wrenn-vmm"), "{err}");
    }

    #[test]
    fn the_state_version_is_read_from_the_header_and_checked_against_the_vmm() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("vmstate");
        let mut header = vmm_api::state::MAGIC.to_vec();
        header.extend_from_slice(&[1, 0, 3, 0, 0xde, 0xad]);
        std::fs::write(&state, &header).expect("write");
        let runtime = NativeRuntime {
            binary: PathBuf::from("wrenn-vmm"),
            support: Some(StateSupport {
                writes: StateVersion { major: 1, minor: 2 },
                legacy_format: 4,
            }),
        };
        let version = runtime.state_version(&state);
        assert_eq!(version, Some(VmStateVersion { major: 1, minor: 3 }));
        let why = runtime
            .can_restore(version)
            .expect_err("1.3 is newer than 1.2");
        assert!(why.contains("newer than this wrenn-vmm knows"), "{why}");
        assert_eq!(
            runtime.can_restore(Some(VmStateVersion { major: 1, minor: 0 })),
            Ok(())
        );
        // A file from before versioned headers has no version to record.
        std::fs::write(&state, [4u8, 0, 0]).expect("write");
        assert_eq!(runtime.state_version(&state), None);
        assert_eq!(runtime.can_restore(None), Ok(()));
    }

    #[test]
    fn a_vmm_that_cannot_say_its_versions_is_tried_without_a_check() {
        let runtime = NativeRuntime::new(PathBuf::from("/nonexistent/wrenn-vmm"));
        assert_eq!(
            runtime.can_restore(Some(VmStateVersion { major: 9, minor: 0 })),
            Ok(())
        );
    }
}
