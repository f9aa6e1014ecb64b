//! The VM's lifecycle behind the control API: configure, start, pause,
//! resume, snapshot, load a snapshot, shut down. A `vcpus` thread runs the
//! machine ([`Machine::run_vcpus`]: a thread per vCPU); a pause sets a
//! flag and wakes it, and it kicks every vCPU out of `KVM_RUN`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::machine::{Exit, Machine, MachineConfig};
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

/// Where the VM is in its life, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    NotStarted,
    Running,
    Paused,
    /// The guest ended (reset, halt, triple fault) or failed.
    Exited(String),
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::NotStarted => "not_started",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Exited(_) => "exited",
        }
    }
}

type VcpuResult = (Machine, Result<Exit>);

enum State {
    NotStarted,
    Running {
        thread: JoinHandle<VcpuResult>,
        stop: Arc<AtomicBool>,
    },
    Paused(Box<Machine>),
    Exited(String),
}

/// Owns the VM; shared by the API's threads.
pub struct Controller {
    state: Mutex<State>,
    config: Mutex<MachineConfig>,
    boot: Mutex<Option<BootSource>>,
    /// Devices plugged in at start: drives then network interfaces, each
    /// in the order first configured (the root drive first).
    drives: Mutex<Vec<DriveConfig>>,
    nets: Mutex<Vec<NetConfig>>,
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
            state: Mutex::new(State::NotStarted),
            config: Mutex::new(MachineConfig {
                vcpus: 1,
                memory_mb: 128,
                track_dirty_pages: false,
            }),
            boot: Mutex::new(None),
            drives: Mutex::new(Vec::new()),
            nets: Mutex::new(Vec::new()),
            serial: SharedWriter(Arc::new(Mutex::new(serial))),
            ended,
            seccomp,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current phase; notices a guest that ended by itself.
    pub fn phase(&self) -> Phase {
        let mut state = self.state();
        if let State::Running { thread, .. } = &*state {
            if thread.is_finished() {
                let ended = std::mem::replace(&mut *state, State::NotStarted);
                *state = self.settle(ended);
            }
        }
        match &*state {
            State::NotStarted => Phase::NotStarted,
            State::Running { .. } => Phase::Running,
            State::Paused(_) => Phase::Paused,
            State::Exited(why) => Phase::Exited(why.clone()),
        }
    }

    fn not_started(&self, what: &str) -> Result<()> {
        match self.phase() {
            Phase::NotStarted => Ok(()),
            other => Err(Error::State(format!(
                "cannot {what}: the VM is {}; only a VM that has not started can be configured",
                other.as_str()
            ))),
        }
    }

    pub fn set_config(&self, config: MachineConfig) -> Result<()> {
        self.not_started("change the machine config")?;
        Machine::check(config)?;
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    pub fn config(&self) -> MachineConfig {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_boot(&self, boot: BootSource) -> Result<()> {
        self.not_started("change the boot source")?;
        *self.boot.lock().unwrap_or_else(PoisonError::into_inner) = Some(boot);
        Ok(())
    }

    /// Adds a drive, or replaces the one with the same id; the file must
    /// open (read-only drives need only read access), and only one drive
    /// may be the root device.
    pub fn set_drive(&self, config: DriveConfig) -> Result<()> {
        self.not_started("change drives")?;
        crate::virtio::block::check(&config)?;
        let mut drives = self.drives.lock().unwrap_or_else(PoisonError::into_inner);
        if config.is_root_device {
            if let Some(root) = drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != config.drive_id)
            {
                return Err(Error::Virtio(crate::virtio::DeviceError::SecondRoot {
                    root: root.drive_id.clone(),
                    drive_id: config.drive_id,
                }));
            }
        }
        match drives.iter_mut().find(|d| d.drive_id == config.drive_id) {
            Some(drive) => *drive = config,
            None => drives.push(config),
        }
        Ok(())
    }

    /// Adds a network interface, or replaces the one with the same id;
    /// its tap is opened at start.
    pub fn set_net(&self, config: NetConfig) -> Result<()> {
        self.not_started("change network interfaces")?;
        crate::virtio::net::check_tap_name(&config.iface_id, &config.tap_name)?;
        let mut nets = self.nets.lock().unwrap_or_else(PoisonError::into_inner);
        match nets.iter_mut().find(|n| n.iface_id == config.iface_id) {
            Some(net) => *net = config,
            None => nets.push(config),
        }
        Ok(())
    }

    fn serial(&self) -> Box<dyn std::io::Write + Send> {
        Box::new(self.serial.clone())
    }

    /// Builds the VM from the config and boot source and starts it.
    pub fn start(&self) -> Result<()> {
        self.not_started("start")?;
        let boot = self
            .boot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::State("no boot source: PUT /boot-source first".into()))?;
        let mut machine = Machine::new(self.config(), self.serial())?;
        let mut drives = self
            .drives
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // The root drive is the first device (vda).
        drives.sort_by_key(|d| !d.is_root_device);
        for drive in drives {
            machine.add_drive(drive)?;
        }
        let nets = self
            .nets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for net in nets {
            machine.add_net(net)?;
        }
        match &boot {
            BootSource::Program(path) => {
                let program = std::fs::read(path)
                    .map_err(|e| Error::Kernel(format!("cannot read {}: {e}", path.display())))?;
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
        self.run(machine)
    }

    /// Restores the snapshot in `dir`, with the drives named in `drives`
    /// at those paths; the VM is paused afterwards unless `resume`.
    pub fn load(
        &self,
        dir: &std::path::Path,
        memory: Memory,
        drives: &DriveOverrides,
        resume: bool,
    ) -> Result<()> {
        self.not_started("load a snapshot")?;
        let machine = match memory {
            Memory::From(from) => Machine::restore_with_drives(dir, from, self.serial(), drives)?,
            Memory::Served(socket) => {
                Machine::restore_served_with_drives(dir, &socket, self.serial(), drives)?
            }
        };
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = machine.config;
        if resume {
            self.run(machine)
        } else {
            *self.state() = State::Paused(Box::new(machine));
            Ok(())
        }
    }

    fn run(&self, mut machine: Machine) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let seccomp = self.seccomp;
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
        *self.state() = State::Running { thread, stop };
        Ok(())
    }

    /// What a finished vCPU thread leaves.
    fn settle(&self, state: State) -> State {
        let State::Running { thread, .. } = state else {
            return state;
        };
        match thread.join() {
            Ok((machine, Ok(Exit::Paused))) => match machine.virtio().stop() {
                Ok(()) => State::Paused(Box::new(machine)),
                Err(e) => State::Exited(e.to_string()),
            },
            Ok((_, Ok(exit))) => State::Exited(format!("{exit:?}")),
            Ok((_, Err(e))) => State::Exited(e.to_string()),
            Err(_) => State::Exited("the vCPU thread panicked".into()),
        }
    }

    /// Stops the vCPU where it is.
    pub fn pause(&self) -> Result<()> {
        let mut state = self.state();
        let State::Running { thread, stop } = &*state else {
            return Err(wrong(&state, "pause", "running"));
        };
        stop.store(true, Ordering::Release);
        // It kicks the vCPUs out of KVM_RUN and ends.
        thread.thread().unpark();
        let running = std::mem::replace(&mut *state, State::NotStarted);
        *state = self.settle(running);
        match &*state {
            State::Paused(_) => Ok(()),
            State::Exited(why) => Err(Error::State(format!("the guest ended first: {why}"))),
            _ => Err(Error::State("the vCPU did not stop".into())),
        }
    }

    pub fn resume(&self) -> Result<()> {
        let mut state = self.state();
        if !matches!(&*state, State::Paused(_)) {
            return Err(wrong(&state, "resume", "paused"));
        }
        let State::Paused(machine) = std::mem::replace(&mut *state, State::NotStarted) else {
            unreachable!("checked above");
        };
        drop(state);
        self.run(*machine)
    }

    /// Stops the guest for good, wherever it is, and frees its memory; the
    /// process then ends (`ended` hears it).
    pub fn shutdown(&self) -> Result<()> {
        let mut state = self.state();
        if let State::Running { thread, stop } = &*state {
            stop.store(true, Ordering::Release);
            thread.thread().unpark();
        }
        let now = std::mem::replace(&mut *state, State::NotStarted);
        if let State::Exited(why) = self.settle(now) {
            *state = State::Exited(why.clone());
            return Err(Error::State(format!("the guest has already ended: {why}")));
        }
        const WHY: &str = "shut down through the API";
        *state = State::Exited(WHY.into());
        let _ = self.ended.send(WHY.into());
        Ok(())
    }

    /// Saves the paused VM into `dir`: full, or only what changed since
    /// the last snapshot.
    pub fn snapshot(&self, dir: &std::path::Path, diff: bool) -> Result<()> {
        let state = self.state();
        let State::Paused(machine) = &*state else {
            return Err(wrong(&state, "snapshot", "paused"));
        };
        if diff {
            machine.save_diff(dir).map(drop)
        } else {
            machine.save(dir)
        }
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

fn wrong(state: &State, action: &str, wanted: &str) -> Error {
    let now = match state {
        State::NotStarted => "not started",
        State::Running { .. } => "running",
        State::Paused(_) => "paused",
        State::Exited(_) => "exited",
    };
    Error::State(format!(
        "cannot {action} the VM: it is {now}; only a {wanted} VM can be"
    ))
}
