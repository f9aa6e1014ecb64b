//! The QEMU runtime: `qemu-system-x86_64 -M microvm,acpi=on`, one daemonized
//! process per sandbox, driven over QMP.
//!
//! QEMU daemonizes itself (`-daemonize`), so a VM is never the agent's child
//! and survives an agent crash; the agent finds it again from the PID file and
//! the QMP socket in the sandbox's folder. The root disk is a qcow2 overlay on
//! the template's base image, so sandboxes share the base and write only
//! their own blocks. The VM is started inside the sandbox's network namespace,
//! where `tap0` waits for it.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::probe::Accel;
use super::process;
use super::qmp::Qmp;
use super::{
    prepare, publish_state, stop_after_pause, DiskFormat, Runtime, RuntimeError, RuntimeKind,
    VmHandle, VmSpec, VmState,
};
use crate::tools;

// The names every runtime shares, here too for callers that know QEMU.
pub use super::{CONSOLE_LOG, MEMORY_FILE, PID_FILE};

/// Files of a VM inside its sandbox folder (and those above). The memory
/// file is guest RAM that QEMU maps shared: it outlives the QEMU process, so
/// a pause only has to save device state, and a restore maps it lazily.
pub const OVERLAY: &str = "rootfs.qcow2";
pub const QMP_SOCKET: &str = "qmp.sock";
/// A snapshot's disk: the overlay flattened over the raw base image.
pub const SNAPSHOT_DISK: &str = "disk.qcow2";

/// Kernel arguments every guest gets. `tsc_early_khz` and `lpj` skip a TSC
/// calibration that hangs TCG boots under load.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw \
                            tsc_early_khz=2000000 lpj=8000000";
/// CPU model for TCG: `max` hung boots now and then; this one did not.
const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";
/// How long QEMU has to end after a QMP `quit`.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How long saving or loading the device state may take (it is small).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs VMs with QEMU, accelerated as the host allows.
pub struct QemuRuntime {
    binary: PathBuf,
    qemu_img: PathBuf,
    accel: Accel,
}

impl QemuRuntime {
    /// Runs `binary` (qemu-system-x86_64) and `qemu_img`.
    pub fn new(accel: Accel, binary: PathBuf, qemu_img: PathBuf) -> QemuRuntime {
        QemuRuntime {
            binary,
            qemu_img,
            accel,
        }
    }

    /// Finds QEMU's programs on `PATH`, or says which are missing and which
    /// package brings them.
    pub fn find(accel: Accel) -> Result<QemuRuntime, tools::MissingTools> {
        let [binary, qemu_img] = tools::require([tools::QEMU_SYSTEM, tools::QEMU_IMG])?;
        Ok(QemuRuntime::new(accel, binary, qemu_img))
    }

    /// Arguments for `spec`, without the binary; `incoming` waits for a
    /// saved state instead of booting.
    pub fn arguments(&self, spec: &VmSpec, incoming: bool) -> Vec<String> {
        let dir = &spec.dir;
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", TCG_CPU),
        };
        let name = format!("wrenn-{}", spec.sandbox_id);
        let mut cmdline = String::from(BASE_CMDLINE);
        if !spec.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.extra_cmdline);
        }
        let args = [
            "-name",
            &format!("{name},process={name}"),
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=on,memory-backend=mem0",
            "-object",
            &format!(
                "memory-backend-file,id=mem0,size={}M,mem-path={},share=on",
                spec.memory_mb,
                path(&dir.join(MEMORY_FILE))
            ),
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            &spec.vcpus.to_string(),
            "-m",
            &format!("{}M", spec.memory_mb),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-daemonize",
            "-pidfile",
            &path(&dir.join(PID_FILE)),
            "-qmp",
            &format!("unix:{},server=on,wait=off", path(&dir.join(QMP_SOCKET))),
            "-chardev",
            &format!("file,id=con0,path={}", path(&dir.join(CONSOLE_LOG))),
            "-serial",
            "chardev:con0",
            "-kernel",
            &path(&spec.kernel),
            "-initrd",
            &path(&spec.initramfs),
            "-append",
            &cmdline,
            "-drive",
            &format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                path(&dir.join(OVERLAY))
            ),
            "-device",
            "virtio-blk-device,drive=root",
            "-netdev",
            "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if incoming {
            args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        }
        args
    }

    /// Starts QEMU inside the sandbox's namespace; it daemonizes once the
    /// VM is set up.
    fn launch(&self, spec: &VmSpec, incoming: bool) -> Result<VmHandle, RuntimeError> {
        for stale in [PID_FILE, QMP_SOCKET] {
            let _ = std::fs::remove_file(spec.dir.join(stale));
        }
        let netns = process::open_netns(&spec.netns)?;
        let netns_fd = netns.as_raw_fd();
        let mut command = Command::new(&self.binary);
        command
            .args(self.arguments(spec, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes async-signal-safe system calls
        // (setns, setsid) on a descriptor that stays open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                process::enter_netns(netns_fd)?;
                libc::setsid();
                Ok(())
            });
        }
        // With -daemonize, the process we start exits once the VM runs (or
        // failed to start), leaving the VM process detached from the agent.
        let out = command.output().map_err(RuntimeError::Spawn)?;
        drop(netns);
        if !out.status.success() {
            return Err(RuntimeError::Start(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        let pid = Self::read_pid(&spec.dir)?;
        let start_time_ticks = process::start_time_ticks(pid)
            .ok_or_else(|| RuntimeError::Start(format!("QEMU (pid {pid}) exited right away")))?;
        Ok(VmHandle {
            pid,
            start_time_ticks,
            control_socket: spec.dir.join(QMP_SOCKET),
        })
    }

    fn create_overlay(&self, spec: &VmSpec) -> Result<(), RuntimeError> {
        let overlay = spec.dir.join(OVERLAY);
        let _ = std::fs::remove_file(&overlay);
        let out = Command::new(&self.qemu_img)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                spec.base_format.as_str(),
                "-b",
            ])
            .arg(&spec.base_rootfs)
            .arg(&overlay)
            .output()
            .map_err(|e| RuntimeError::QemuImg(format!("cannot run qemu-img: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::QemuImg(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }

    fn read_pid(dir: &Path) -> Result<u32, RuntimeError> {
        let file = dir.join(PID_FILE);
        let text = std::fs::read_to_string(&file).map_err(prepare(&file))?;
        text.trim()
            .parse()
            .map_err(|_| RuntimeError::Start(format!("{} holds no PID: {text:?}", file.display())))
    }
}

impl Runtime for QemuRuntime {
    fn boot(&self, spec: &VmSpec) -> Result<VmHandle, RuntimeError> {
        std::fs::create_dir_all(&spec.dir).map_err(prepare(&spec.dir))?;
        self.create_overlay(spec)?;
        let _ = std::fs::remove_file(spec.dir.join(MEMORY_FILE));
        self.launch(spec, false)
    }

    fn pause_to(&self, handle: &VmHandle, state: &Path) -> Result<(), RuntimeError> {
        let mut qmp = Qmp::connect(&handle.control_socket)?;
        let partial = state.with_extension("partial");
        let started = Instant::now();
        // "postmigrate": an earlier pause (cut short by an agent crash)
        // already saved the state; QEMU refuses to save it twice.
        let saved_before = qmp.status()? == "postmigrate";
        if !saved_before {
            qmp.execute("stop", Value::Null)?;
            qmp.execute("migrate-set-capabilities", ignore_shared())?;
            let uri = format!("exec:cat > '{}'", partial.display());
            qmp.execute("migrate", json!({ "uri": uri }))?;
            wait_migration(&mut qmp)?;
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            saved_before,
            "VM state saved"
        );
        if saved_before && !partial.exists() && state.is_file() {
            // Renamed into place before the crash: only the VM is left to end.
            drop(qmp);
            return self.stop(handle);
        }
        // QEMU serves one QMP client at a time: `stop` below connects anew.
        drop(qmp);
        publish_state(&partial, state)?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "VM state synced");
        stop_after_pause(self, handle, started)
    }

    fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError> {
        let handle = self.launch(spec, true)?;
        let resumed = Qmp::connect(&handle.control_socket).and_then(|mut qmp| {
            qmp.execute("migrate-set-capabilities", ignore_shared())?;
            let uri = format!("exec:cat '{}'", state.display());
            qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
            wait_migration(&mut qmp)?;
            qmp.execute("cont", Value::Null)?;
            Ok(())
        });
        match resumed {
            Ok(()) => Ok(handle),
            Err(e) => {
                let _ = self.stop(&handle);
                Err(e)
            }
        }
    }

    fn restore_new(&self, spec: &VmSpec, state: &Path) -> Result<VmHandle, RuntimeError> {
        std::fs::create_dir_all(&spec.dir).map_err(prepare(&spec.dir))?;
        self.create_overlay(spec)?;
        self.restore(spec, state)
    }

    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Qemu
    }

    fn attach(&self, handle: &VmHandle) -> VmState {
        if !process::is_same_process(handle.pid, handle.start_time_ticks) {
            return VmState::Gone;
        }
        match Qmp::connect(&handle.control_socket).and_then(|mut q| q.status()) {
            Ok(status) if status == "paused" || status == "prelaunch" => VmState::Paused,
            Ok(status) if status == "shutdown" => VmState::Gone,
            _ => VmState::Running,
        }
    }

    fn stop(&self, handle: &VmHandle) -> Result<(), RuntimeError> {
        process::stop_escalating(handle.pid, handle.start_time_ticks, QUIT_GRACE, || {
            if let Ok(mut qmp) = Qmp::connect(&handle.control_socket) {
                let _ = qmp.execute("quit", serde_json::Value::Null);
            }
        })
    }

    fn control_socket(&self, dir: &Path) -> PathBuf {
        dir.join(QMP_SOCKET)
    }

    fn sandbox_disk_file(&self) -> &'static str {
        OVERLAY
    }

    fn snapshot_disk_file(&self) -> (&'static str, DiskFormat) {
        (SNAPSHOT_DISK, DiskFormat::Qcow2)
    }

    /// The overlay flattened into one qcow2 file over the raw base image, so
    /// snapshots of sandboxes made from snapshots never chain.
    fn snapshot_disk(
        &self,
        sandbox_dir: &Path,
        base_raw: &Path,
        dest: &Path,
    ) -> Result<(), RuntimeError> {
        let out = Command::new(&self.qemu_img)
            .args(["convert", "-q", "-O", "qcow2", "-F", "raw", "-B"])
            .arg(base_raw)
            .arg(sandbox_dir.join(OVERLAY))
            .arg(dest)
            .output()
            .map_err(|e| RuntimeError::QemuImg(format!("cannot run qemu-img: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::QemuImg(format!(
                "could not copy the disk in {}: {}",
                sandbox_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn adopt_disk(&self, disk: &Path, base_raw: &Path) -> Result<(), RuntimeError> {
        rebase(&self.qemu_img, disk, base_raw)
    }
}

/// Points the backing file of a fetched snapshot disk at this node's base
/// image: an unsafe rebase, which rewrites the name only (the image is the
/// same; the caller checked its checksum).
pub(crate) fn rebase(qemu_img: &Path, disk: &Path, base_raw: &Path) -> Result<(), RuntimeError> {
    let out = Command::new(qemu_img)
        .args(["rebase", "-q", "-u", "-F", "raw", "-b"])
        .arg(base_raw)
        .arg(disk)
        .output()
        .map_err(|e| RuntimeError::QemuImg(format!("cannot run qemu-img: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::QemuImg(format!(
            "could not point {} at {}: {}",
            disk.display(),
            base_raw.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// QMP arguments that keep shared memory (the memory file) out of a saved
/// state: only devices and CPUs are written.
fn ignore_shared() -> Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Polls `query-migrate` until the state is saved or loaded.
fn wait_migration(qmp: &mut Qmp) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    while Instant::now() < deadline {
        let info = qmp.execute("query-migrate", Value::Null)?;
        match info["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info["error-desc"].as_str().unwrap_or("no reason given");
                return Err(RuntimeError::Migration(why.to_owned()));
            }
            // An incoming migration may report nothing at all; the VM
            // then waits paused once it has loaded.
            None if info.as_object().is_some_and(|o| o.is_empty()) && qmp.status()? == "paused" => {
                return Ok(());
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(RuntimeError::Migration(format!(
        "not finished after {}s",
        MIGRATION_TIMEOUT.as_secs()
    )))
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
