//! The owner of the VM: executes the API's [`VmmAction`]s one at a time.
//!
//! The VM is one value, [`Vm`], behind one lock that each action holds from
//! its first check to its last change, so two requests can never both find
//! the VM "not started" and both build one: the second waits and then finds
//! it running (HTTP 409). Its phases are different types: the pre-boot
//! configuration ([`PreBoot`]) exists only before start and is consumed by
//! `InstanceStart` or `snapshot/load`; a running VM is its `vcpus` thread
//! ([`Machine::run_vcpus`]: a thread per vCPU); a paused one is the
//! [`Machine`] itself. A pause sets a flag and wakes the `vcpus` thread,
//! which kicks every vCPU out of `KVM_RUN` and hands the machine back.
//!
//! What it is not: the parser ([`crate::request`]) or the HTTP server
//! ([`crate::api`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_api::{VmInfo, VmPhase};

use crate::error::{Error, Result};
use crate::machine::{Exit, Machine, MachineConfig};
use crate::request::VmmAction;
use crate::snapshot::MemoryFrom;
use crate::virtio::block::DriveConfig;
use crate::virtio::net::NetConfig;
use crate::virtio::DriveOverrides;

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A flat 64-bit program (tests, benchmarks).
    Program(PathBuf),
    /// A Linux kernel.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// Where a loaded snapshot's memory comes from.
#[derive(Debug, Clone)]
pub enum Memory {
    /// The snapshot's memory file.
    From(MemoryFrom),
    /// A page server on this Unix socket (userfaultfd).
    Served(PathBuf),
}

/// What an executed action answers.
#[derive(Debug)]
pub enum Outcome {
    /// Done; nothing to say (HTTP 204).
    Done,
    /// `GET /`.
    Info(VmInfo),
}

/// The configuration of a VM that has not started: set piece by piece
/// through the API, consumed when the VM is built.
#[derive(Debug, Clone)]
pub struct PreBoot {
    config: MachineConfig,
    boot: Option<BootSource>,
    /// Devices plugged in at start: drives then network interfaces, each
    /// in the order first configured (the root drive first).
    drives: Vec<DriveConfig>,
    nets: Vec<NetConfig>,
}

impl Default for PreBoot {
    fn default() -> PreBoot {
        PreBoot {
            config: MachineConfig {
                vcpus: 1,
                memory_mb: 128,
                track_dirty_pages: false,
            },
            boot: None,
            drives: Vec::new(),
            nets: Vec::new(),
        }
    }
}

impl PreBoot {
    fn set_config(&mut self, config: MachineConfig) -> Result<()> {
        Machine::check(config)?;
        self.config = config;
        Ok(())
    }

    /// Adds a drive, or replaces the one with the same id; the file must
    /// open (read-only drives need only read access), and only one drive
    /// may be the root device.
    fn set_drive(&mut self, config: DriveConfig) -> Result<()> {
        crate::virtio::block::check(&config)?;
        if config.is_root_device {
            if let Some(root) = self
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != config.drive_id)
            {
                return Err(Error::Virtio(crate::virtio::DeviceError::SecondRoot {
                    root: root.drive_id.clone(),
                    drive_id: config.drive_id,
                }));
            }
        }
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == config.drive_id)
        {
            Some(drive) => *drive = config,
            None => self.drives.push(config),
        }
        Ok(())
    }

    /// Adds a network interface, or replaces the one with the same id;
    /// its tap is opened at start.
    fn set_net(&mut self, config: NetConfig) {
        match self.nets.iter_mut().find(|n| n.iface_id == config.iface_id) {
            Some(net) => *net = config,
            None => self.nets.push(config),
        }
    }

    /// The machine this configuration describes, loaded and ready to run.
    fn build(&self, serial: Box<dyn std::io::Write + Send>) -> Result<Machine> {
        let boot = self.boot.as_ref().ok_or(Error::NoBootSource)?;
        let mut machine = Machine::new(self.config, serial)?;
        let mut drives = self.drives.clone();
        // The root drive is the first device (vda).
        drives.sort_by_key(|d| !d.is_root_device);
        for drive in drives {
            machine.add_drive(drive)?;
        }
        for net in &self.nets {
            machine.add_net(net.clone())?;
        }
        match boot {
            BootSource::Program(path) => {
                let program = std::fs::read(path).map_err(|source| Error::ReadProgram {
                    path: path.clone(),
                    source,
                })?;
                machine.load_program(&program)?;
            }
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let devices = machine.virtio().slots();
                machine.load_linux_with_devices(kernel, initrd.as_deref(), cmdline, &devices)?
            }
        }
        Ok(machine)
    }
}

type VcpuResult = (Machine, Result<Exit>);

/// A running VM: its `vcpus` thread, which hands the machine back when it
/// stops.
struct Running {
    thread: JoinHandle<VcpuResult>,
    stop: Arc<AtomicBool>,
    config: MachineConfig,
}

/// The VM in each phase of its life.
enum Vm {
    NotStarted(PreBoot),
    Running(Running),
    Paused(Box<Machine>),
    Exited {
        reason: String,
        config: MachineConfig,
    },
    /// Only between the two halves of a change of phase, under the lock:
    /// seen afterwards only if that change panicked.
    Unusable,
}

impl Vm {
    fn phase_name(&self) -> &'static str {
        match self {
            Vm::NotStarted(_) => "not started",
            Vm::Running(_) => "running",
            Vm::Paused(_) => "paused",
            Vm::Exited { .. } => "exited",
            Vm::Unusable => "unusable",
        }
    }

    fn info(&self) -> VmInfo {
        let (phase, config) = match self {
            Vm::NotStarted(pre) => (VmPhase::NotStarted, pre.config),
            Vm::Running(running) => (VmPhase::Running, running.config),
            Vm::Paused(machine) => (VmPhase::Paused, machine.config),
            Vm::Exited { reason, config } => (
                VmPhase::Exited {
                    reason: reason.clone(),
                },
                *config,
            ),
            Vm::Unusable => (
                VmPhase::Exited {
                    reason: Error::Unusable.to_string(),
                },
                PreBoot::default().config,
            ),
        };
        VmInfo {
            phase,
            vcpu_count: config.vcpus,
            mem_size_mib: config.memory_mb,
        }
    }

    fn config(&self) -> MachineConfig {
        let info = self.info();
        MachineConfig {
            vcpus: info.vcpu_count,
            memory_mb: info.mem_size_mib,
            track_dirty_pages: false,
        }
    }
}

/// Owns the VM; shared by the API's threads, which it serves one at a
/// time.
pub struct Controller {
    vm: Mutex<Vm>,
    serial: SharedWriter,
    /// Told once when the guest has ended on its own.
    ended: mpsc::Sender<String>,
    /// Whether vCPU threads install their seccomp filter.
    seccomp: bool,
}

impl Controller {
    /// A controller whose guest writes its serial output to `serial`;
    /// `ended` hears when the guest ends by itself.
    pub fn new(
        serial: Box<dyn std::io::Write + Send>,
        ended: mpsc::Sender<String>,
        seccomp: bool,
    ) -> Result<Controller> {
        // Before any seccomp filter: it needs rt_sigaction.
        crate::machine::install_kick_handler()?;
        Ok(Controller {
            vm: Mutex::new(Vm::NotStarted(PreBoot::default())),
            serial: SharedWriter(Arc::new(Mutex::new(serial))),
            ended,
            seccomp,
        })
    }

    /// Executes one action, holding the VM for all of it.
    pub fn execute(&self, action: VmmAction) -> Result<Outcome> {
        let mut vm = self.lock();
        self.notice_end(&mut vm);
        match action {
            VmmAction::GetInfo => return Ok(Outcome::Info(vm.info())),
            VmmAction::SetMachineConfig(config) => {
                pre_boot(&mut vm, "change the machine config")?.set_config(config)?
            }
            VmmAction::SetBootSource(boot) => {
                pre_boot(&mut vm, "change the boot source")?.boot = Some(boot)
            }
            VmmAction::SetDrive(drive) => pre_boot(&mut vm, "change drives")?.set_drive(drive)?,
            VmmAction::SetNetworkInterface(net) => {
                pre_boot(&mut vm, "change network interfaces")?.set_net(net)
            }
            VmmAction::Start => self.start(&mut vm)?,
            VmmAction::LoadSnapshot {
                dir,
                memory,
                drives,
                resume,
            } => self.load(&mut vm, &dir, memory, &drives, resume)?,
            VmmAction::Pause => self.pause(&mut vm)?,
            VmmAction::Resume => self.resume(&mut vm)?,
            VmmAction::Shutdown => self.shutdown(&mut vm)?,
            VmmAction::CreateSnapshot { dir, diff } => snapshot(&vm, &dir, diff)?,
        }
        Ok(Outcome::Done)
    }

    fn lock(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guest that ended by itself leaves its `vcpus` thread finished:
    /// collect it.
    fn notice_end(&self, vm: &mut Vm) {
        if let Vm::Running(running) = vm {
            if running.thread.is_finished() {
                let Vm::Running(running) = std::mem::replace(vm, Vm::Unusable) else {
                    return;
                };
                *vm = settle(running);
            }
        }
    }

    fn serial(&self) -> Box<dyn std::io::Write + Send> {
        Box::new(self.serial.clone())
    }

    /// Builds the VM from its configuration and runs it; the configuration
    /// is kept if that fails, so the VMM stays usable.
    fn start(&self, vm: &mut Vm) -> Result<()> {
        let pre = pre_boot(vm, "start the VM")?;
        let machine = pre.build(self.serial())?;
        *vm = Vm::Running(self.run(machine)?);
        Ok(())
    }

    /// Restores the snapshot in `dir`, with the drives named in `drives`
    /// at those paths; the VM is paused afterwards unless `resume`.
    fn load(
        &self,
        vm: &mut Vm,
        dir: &Path,
        memory: Memory,
        drives: &DriveOverrides,
        resume: bool,
    ) -> Result<()> {
        pre_boot(vm, "load a snapshot")?;
        let machine = match memory {
            Memory::From(from) => Machine::restore_with_drives(dir, from, self.serial(), drives)?,
            Memory::Served(socket) => {
                Machine::restore_served_with_drives(dir, &socket, self.serial(), drives)?
            }
        };
        *vm = if resume {
            Vm::Running(self.run(machine)?)
        } else {
            Vm::Paused(Box::new(machine))
        };
        Ok(())
    }

    fn run(&self, mut machine: Machine) -> Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let seccomp = self.seccomp;
        let config = machine.config;
        // From this (API) thread, so that it inherits the VMM filter, not
        // the vCPU's.
        machine.virtio().start(seccomp)?;
        let thread = {
            let stop = Arc::clone(&stop);
            let ended = self.ended.clone();
            std::thread::Builder::new()
                .name("vcpus".into())
                .spawn(move || {
                    let setup = move || {
                        if seccomp {
                            crate::seccomp::install_vcpu_filter()
                        } else {
                            Ok(())
                        }
                    };
                    let result = machine.run_vcpus(&stop, &setup);
                    match &result {
                        Ok(Exit::Paused) => {}
                        Ok(exit) => {
                            let _ = ended.send(format!("{exit:?}"));
                        }
                        Err(e) => {
                            let _ = ended.send(e.to_string());
                        }
                    }
                    (machine, result)
                })
                .map_err(|e| Error::Vcpu(format!("cannot start the vCPU thread: {e}")))?
        };
        Ok(Running {
            thread,
            stop,
            config,
        })
    }

    /// Stops the vCPUs where they are.
    fn pause(&self, vm: &mut Vm) -> Result<()> {
        if !matches!(vm, Vm::Running(_)) {
            return Err(wrong(vm, "pause the VM", "only a running VM can be paused"));
        }
        let Vm::Running(running) = std::mem::replace(vm, Vm::Unusable) else {
            return Err(Error::Unusable);
        };
        stop(&running);
        *vm = settle(running);
        match vm {
            Vm::Paused(_) => Ok(()),
            Vm::Exited { reason, .. } => Err(Error::GuestEnded {
                reason: reason.clone(),
            }),
            _ => Err(Error::Unusable),
        }
    }

    fn resume(&self, vm: &mut Vm) -> Result<()> {
        if !matches!(vm, Vm::Paused(_)) {
            return Err(wrong(
                vm,
                "resume the VM",
                "only a paused VM can be resumed",
            ));
        }
        let Vm::Paused(machine) = std::mem::replace(vm, Vm::Unusable) else {
            return Err(Error::Unusable);
        };
        let config = machine.config;
        match self.run(*machine) {
            Ok(running) => {
                *vm = Vm::Running(running);
                Ok(())
            }
            Err(e) => {
                *vm = Vm::Exited {
                    reason: format!("could not resume: {e}"),
                    config,
                };
                Err(e)
            }
        }
    }

    /// Stops the guest for good, wherever it is, and frees its memory; the
    /// process then ends (`ended` hears it).
    fn shutdown(&self, vm: &mut Vm) -> Result<()> {
        if let Vm::Exited { reason, .. } = vm {
            return Err(Error::GuestEnded {
                reason: reason.clone(),
            });
        }
        let config = vm.config();
        if let Vm::Running(running) = std::mem::replace(vm, Vm::Unusable) {
            stop(&running);
            if let Vm::Exited { reason, config } = settle(running) {
                *vm = Vm::Exited {
                    reason: reason.clone(),
                    config,
                };
                return Err(Error::GuestEnded { reason });
            }
        }
        const WHY: &str = "shut down through the API";
        *vm = Vm::Exited {
            reason: WHY.into(),
            config,
        };
        let _ = self.ended.send(WHY.into());
        Ok(())
    }
}

/// The pre-boot configuration, if the VM has not started.
fn pre_boot<'a>(vm: &'a mut Vm, action: &'static str) -> Result<&'a mut PreBoot> {
    match vm {
        Vm::NotStarted(pre) => Ok(pre),
        Vm::Unusable => Err(Error::Unusable),
        other => Err(wrong(
            other,
            action,
            "only a VM that has not started can be configured, started or loaded; start \
             another wrenn-vmm for another VM",
        )),
    }
}

/// Saves the paused VM into `dir`: full, or only what changed since the
/// last snapshot.
fn snapshot(vm: &Vm, dir: &Path, diff: bool) -> Result<()> {
    let Vm::Paused(machine) = vm else {
        return Err(wrong(
            vm,
            "snapshot the VM",
            "only a paused VM can be saved: PUT /actions Pause first",
        ));
    };
    let saved = if diff {
        machine.save_diff(dir).map(drop)
    } else {
        machine.save(dir)
    };
    saved.map_err(|e| out_of_space(dir, u64::from(machine.config.memory_mb) << 20, e))
}

/// `error`, or [`Error::SnapshotNoSpace`] when the file system of `dir`
/// has less room than the guest's memory: the snapshot failed for want of
/// space.
fn out_of_space(dir: &Path, needed: u64, error: Error) -> Error {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    match free_bytes(existing) {
        Some(available) if available < needed => Error::SnapshotNoSpace {
            dir: dir.to_path_buf(),
            available,
            needed,
            source: Box::new(error),
        },
        _ => error,
    }
}

/// The bytes an unprivileged writer may still use on `path`'s file system.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the call to fill.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a NUL-terminated path and `stat` a valid, writable
    // statvfs, both alive for the call.
    if unsafe { libc::statvfs(name.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Asks the `vcpus` thread to stop the vCPUs and hand the machine back.
fn stop(running: &Running) {
    running.stop.store(true, Ordering::Release);
    // It kicks the vCPUs out of KVM_RUN and ends.
    running.thread.thread().unpark();
}

/// What a stopping (or stopped) `vcpus` thread leaves.
fn settle(running: Running) -> Vm {
    let config = running.config;
    let exited = |reason: String| Vm::Exited { reason, config };
    match running.thread.join() {
        Ok((machine, Ok(Exit::Paused))) => match machine.virtio().stop() {
            Ok(()) => Vm::Paused(Box::new(machine)),
            Err(e) => exited(e.to_string()),
        },
        Ok((_, Ok(exit))) => exited(format!("{exit:?}")),
        Ok((_, Err(e))) => exited(e.to_string()),
        Err(_) => exited("the vCPU thread panicked".into()),
    }
}

fn wrong(vm: &Vm, action: &'static str, remedy: &'static str) -> Error {
    if matches!(vm, Vm::Unusable) {
        return Error::Unusable;
    }
    Error::WrongState {
        action,
        now: vm.phase_name(),
        remedy,
    }
}

/// The serial output, shared by every machine this controller makes (one
/// runs at a time; a failed start leaves it usable).
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<Box<dyn std::io::Write + Send>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (Controller, mpsc::Receiver<String>) {
        let (ended, heard) = mpsc::channel();
        let controller = Controller::new(Box::new(std::io::sink()), ended, false).expect("new");
        (controller, heard)
    }

    fn info(controller: &Controller) -> VmInfo {
        match controller.execute(VmmAction::GetInfo) {
            Ok(Outcome::Info(info)) => info,
            other => panic!("GET /: {other:?}"),
        }
    }

    #[test]
    fn a_vm_that_has_not_started_takes_configuration_and_refuses_running_actions() {
        let (controller, _) = controller();
        let config = MachineConfig {
            vcpus: 2,
            memory_mb: 64,
            track_dirty_pages: false,
        };
        controller
            .execute(VmmAction::SetMachineConfig(config))
            .expect("config");
        let now = info(&controller);
        assert_eq!(
            (now.phase, now.vcpu_count, now.mem_size_mib),
            (VmPhase::NotStarted, 2, 64)
        );
        let bad = MachineConfig { vcpus: 0, ..config };
        assert!(matches!(
            controller.execute(VmmAction::SetMachineConfig(bad)),
            Err(Error::Vcpus(0))
        ));
        assert!(matches!(
            controller.execute(VmmAction::Start),
            Err(Error::NoBootSource)
        ));
        for action in [VmmAction::Pause, VmmAction::Resume] {
            let err = controller.execute(action).expect_err("not running");
            assert!(
                matches!(
                    err,
                    Error::WrongState {
                        now: "not started",
                        ..
                    }
                ),
                "{err}"
            );
        }
        let snapshot = VmmAction::CreateSnapshot {
            dir: "/nonexistent".into(),
            diff: false,
        };
        let err = controller.execute(snapshot).expect_err("not paused");
        assert!(err.to_string().contains("Pause first"), "{err}");
        assert_eq!(info(&controller).phase, VmPhase::NotStarted);
    }

    #[test]
    fn shutdown_ends_a_vm_for_good_and_configuring_after_it_is_a_conflict() {
        let (controller, heard) = controller();
        controller.execute(VmmAction::Shutdown).expect("shutdown");
        assert_eq!(heard.try_recv().as_deref(), Ok("shut down through the API"));
        assert!(matches!(
            info(&controller).phase,
            VmPhase::Exited { reason } if reason == "shut down through the API"
        ));
        let boot = VmmAction::SetBootSource(BootSource::Program("/p".into()));
        let err = controller.execute(boot).expect_err("exited");
        assert!(
            matches!(err, Error::WrongState { now: "exited", .. }),
            "{err}"
        );
        assert!(matches!(
            controller.execute(VmmAction::Shutdown),
            Err(Error::GuestEnded { .. })
        ));
    }

    #[test]
    fn a_failed_snapshot_on_a_file_system_without_room_is_no_space_with_its_cause() {
        let dir = std::env::temp_dir().join("wrenn-vmm-no-such-snapshot-folder");
        let cause = || Error::Snapshot("the memory file: write failed".into());
        // No file system has u64::MAX bytes free: the failure is for want
        // of room, and says so with the original error as its source.
        let err = out_of_space(&dir, u64::MAX, cause());
        assert!(
            matches!(
                &err,
                Error::SnapshotNoSpace {
                    needed: u64::MAX,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("free space there"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        // With room to spare the original error stands.
        assert!(matches!(out_of_space(&dir, 0, cause()), Error::Snapshot(_)));
    }
}
