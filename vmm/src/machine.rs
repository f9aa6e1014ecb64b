//! The VM: KVM file descriptors, guest memory, vCPUs, and the exit loop.
//!
//! The machine has the in-kernel irqchip (both PICs, the IOAPIC, a LAPIC per
//! vCPU) and PIT; guest memory is one anonymous mapping starting at guest
//! address 0. Each vCPU runs on its own thread (`vcpu0`, `vcpu1`, ...); the
//! thread that called [`Machine::run_until`] waits for them and stops them
//! all when one ends or a stop is asked. Their exits reach the shared
//! [`Devices`]: port I/O for the serial port and the i8042, MMIO for the
//! rest. The run ends when the guest resets, halts or triple-faults.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::devices::{Devices, PortWrite, SerialPort, SERIAL_IRQ};
use crate::error::{kvm_err, Error, Result};

pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEMORY_MB: u32 = 16;
/// Below the 32-bit MMIO hole: one memory region is enough.
pub const MAX_MEMORY_MB: u32 = 3 * 1024;
/// Where KVM keeps the TSS it needs for real mode (three pages), above the
/// guest's memory and below 4 GiB.
const TSS_ADDR: usize = 0xfffb_d000;

/// What a VM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mb: u32,
    /// Let KVM log the pages the guest writes, for diff snapshots (each
    /// page's first write after a snapshot then costs a fault in KVM).
    pub track_dirty_pages: bool,
}

/// Why the guest stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It asked the i8042 to reset the CPU: the usual way out.
    Reset,
    /// It halted with interrupts off (nothing can wake it).
    Halted,
    /// It triple-faulted.
    Shutdown,
    /// [`Machine::run_until`] was asked to stop: the vCPU is outside KVM
    /// with every pending I/O completed, ready to be saved or run on.
    Paused,
}

/// One VM.
pub struct Machine {
    // Field order is drop order: vCPUs and the VM before KVM itself, and
    // both before the memory they map.
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) vm: VmFd,
    pub(crate) kvm: Kvm,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) devices: Arc<Devices>,
    pub(crate) config: MachineConfig,
    /// The userfaultfd and page server connection of served memory: kept
    /// for the VM's life (closing the socket ends the server).
    pub(crate) page_server: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
    /// Whether guest memory is anonymous memory whose pages the process
    /// has never touched are zero (a fresh or a copied machine), so a full
    /// snapshot can skip them without reading them. Not so for a file
    /// mapping or memory a page server fills.
    pub(crate) untouched_pages_are_zero: bool,
}

impl Machine {
    /// Creates the VM with its memory, irqchip, PIT, vCPUs and serial port
    /// (writing to `serial_out`).
    pub fn new(config: MachineConfig, serial_out: Box<dyn Write + Send>) -> Result<Machine> {
        Self::check(config)?;
        let size = usize::try_from(config.memory_mb).unwrap_or(usize::MAX) << 20;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| Error::Memory(format!("cannot map {} MiB: {e}", config.memory_mb)))?;
        let mut machine = Self::with_memory(config, memory, serial_out)?;
        machine.untouched_pages_are_zero = true;
        Ok(machine)
    }

    pub(crate) fn check(config: MachineConfig) -> Result<()> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::Vcpus(config.vcpus));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&config.memory_mb) {
            return Err(Error::MemorySize(config.memory_mb));
        }
        Ok(())
    }

    /// [`Machine::new`] on guest memory the caller mapped (a snapshot's
    /// memory file, for example), which must be `config.memory_mb` long.
    pub(crate) fn with_memory(
        config: MachineConfig,
        memory: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Machine> {
        Self::check(config)?;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;

        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(e.to_string()))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if config.track_dirty_pages {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the mapping is owned by `memory`, which the Machine
            // keeps alive longer than the VM (field order), and it is not
            // unmapped or resized while the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("register guest memory"))?;
        }

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("list the supported CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu.set_cpuid2(&boot::vcpu_cpuid(&cpuid, id, config.vcpus))
                .map_err(kvm_err("set the CPUID"))?;
            boot::configure_vcpu(&vcpu)?;
            vcpus.push(vcpu);
        }

        let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&interrupt, SERIAL_IRQ)
            .map_err(kvm_err("connect the serial interrupt"))?;
        let virtio = crate::virtio::Devices::new(memory.clone());
        Ok(Machine {
            vcpus,
            vm,
            kvm,
            memory,
            devices: Arc::new(Devices::new(SerialPort::new(interrupt, serial_out), virtio)),
            config,
            page_server: None,
            untouched_pages_are_zero: false,
        })
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Indices of the 4 KiB pages the guest wrote since the last call (or
    /// since the VM started), from KVM's dirty log, which the call resets.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        if !self.config.track_dirty_pages {
            return Err(Error::Snapshot(
                "dirty pages are not tracked: create the machine with track_dirty_pages".into(),
            ));
        }
        let mut pages = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let bitmap = self
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("read the dirty log"))?;
            let first = region.start_addr().0 / 4096;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    pages.push(first + word_index as u64 * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        Ok(pages)
    }

    /// The VM's file descriptor.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Loads a flat 64-bit program at [`boot::PROGRAM_ADDR`] and points
    /// every vCPU at it, in long mode with the first GiB identity-mapped,
    /// each on its own stack ([`boot::STACK_PER_VCPU`] apart). The program
    /// tells the vCPUs apart by their APIC ID (CPUID leaf 1).
    pub fn load_program(&mut self, program: &[u8]) -> Result<()> {
        let end = boot::PROGRAM_ADDR + program.len() as u64;
        if end > self.memory.last_addr().0 {
            return Err(Error::ProgramTooLarge {
                len: program.len(),
                addr: boot::PROGRAM_ADDR,
            });
        }
        self.memory
            .write_slice(program, GuestAddress(boot::PROGRAM_ADDR))
            .map_err(|e| Error::Memory(format!("cannot load the program: {e}")))?;
        boot::write_tables(&self.memory)?;
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let sregs = vcpu
                .get_sregs()
                .map_err(kvm_err("read special registers"))?;
            vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(kvm_err("set special registers"))?;
            let stack = boot::STACK_TOP - index as u64 * boot::STACK_PER_VCPU;
            vcpu.set_regs(&boot::entry_regs_on(boot::PROGRAM_ADDR, stack))
                .map_err(kvm_err("set registers"))?;
            // Application processors wait for INIT and SIPI otherwise.
            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("set the MP state"))?;
        }
        Ok(())
    }

    /// Runs every vCPU (and the virtio devices' thread, without a seccomp
    /// filter) until the guest resets, halts or faults.
    pub fn run(&mut self) -> Result<Exit> {
        self.virtio().start(false)?;
        let exit = self.run_until(&AtomicBool::new(false));
        self.virtio().stop()?;
        exit
    }

    /// [`Machine::run`], also returning [`Exit::Paused`] soon after `stop`
    /// is set: every vCPU is then outside KVM with its pending I/O done.
    pub fn run_until(&mut self, stop: &AtomicBool) -> Result<Exit> {
        self.run_vcpus(stop, &|| Ok(()))
    }

    /// Runs each vCPU on its own thread, which first calls `setup` (to
    /// install its seccomp filter) and ends the run if that fails. This
    /// thread waits, waking every [`STOP_POLL`] or when unparked, and once
    /// a vCPU has ended or `stop` is set, stops the others by setting a
    /// flag and kicking them out of `KVM_RUN` with a signal. The result is
    /// the first vCPU's (by index) that did not pause, or [`Exit::Paused`].
    pub(crate) fn run_vcpus(
        &mut self,
        stop: &AtomicBool,
        setup: &(dyn Fn() -> Result<()> + Sync),
    ) -> Result<Exit> {
        install_kick_handler()?;
        let Machine { vcpus, devices, .. } = self;
        let devices: &Devices = devices;
        let halt = AtomicBool::new(false);
        let threads: Vec<AtomicU64> = vcpus.iter().map(|_| AtomicU64::new(0)).collect();
        let waiter = std::thread::current();
        let results = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut failed = None;
            for (index, vcpu) in vcpus.iter_mut().enumerate() {
                let (halt, thread, waiter) = (&halt, &threads[index], waiter.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn_scoped(scope, move || {
                        // SAFETY: pthread_self has no preconditions.
                        thread.store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
                        let result = setup().and_then(|()| run_vcpu(vcpu, devices, stop, halt));
                        halt.store(true, Ordering::Release);
                        waiter.unpark();
                        result
                    });
                match spawned {
                    Ok(handle) => handles.push(handle),
                    Err(e) => {
                        // Stop those already running, then report.
                        halt.store(true, Ordering::Release);
                        failed = Some(Error::Vcpu(format!("cannot start a vCPU thread: {e}")));
                        break;
                    }
                }
            }
            while !handles.iter().all(|h| h.is_finished()) {
                if stop.load(Ordering::Acquire) || halt.load(Ordering::Acquire) {
                    halt.store(true, Ordering::Release);
                    kick(&threads, &handles);
                    std::thread::park_timeout(Duration::from_micros(200));
                } else {
                    std::thread::park_timeout(STOP_POLL);
                }
            }
            let results: Vec<Result<Exit>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Vcpu("a vCPU thread panicked".into())))
                })
                .collect();
            match failed {
                Some(e) => Err(e),
                None => Ok(results),
            }
        });
        devices.flush();
        results?
            .into_iter()
            .find(|r| !matches!(r, Ok(Exit::Paused)))
            .unwrap_or(Ok(Exit::Paused))
    }
}

/// How often a waiting [`Machine::run_until`] looks at its stop flag when
/// nobody unparks it.
pub const STOP_POLL: Duration = Duration::from_millis(20);

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal, once per process; its
/// default action would end the process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Vcpu(format!("cannot install the vCPU kick signal: {e}")));
    });
    result
}

/// Signals every vCPU thread that has started and not finished.
fn kick<T>(threads: &[AtomicU64], handles: &[std::thread::ScopedJoinHandle<'_, T>]) {
    for (thread, handle) in threads.iter().zip(handles) {
        let id = thread.load(Ordering::Acquire);
        if id != 0 && !handle.is_finished() {
            // SAFETY: the thread is scoped and not yet joined, so its
            // pthread_t is valid; the signal's handler does nothing.
            unsafe { libc::pthread_kill(id as libc::pthread_t, kick_signal()) };
        }
    }
}

/// One vCPU's exit loop.
fn run_vcpu(
    vcpu: &mut VcpuFd,
    devices: &Devices,
    stop: &AtomicBool,
    halt: &AtomicBool,
) -> Result<Exit> {
    loop {
        if stop.load(Ordering::Acquire) || halt.load(Ordering::Acquire) {
            complete_pending_io(vcpu)?;
            return Ok(Exit::Paused);
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(kvm_err("run a vCPU")(e)),
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                if devices.port_write(port, data)? == PortWrite::Reset {
                    return Ok(Exit::Reset);
                }
            }
            VcpuExit::IoIn(port, data) => devices.port_read(port, data),
            VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
            VcpuExit::Hlt => return Ok(Exit::Halted),
            VcpuExit::Shutdown => return Ok(Exit::Shutdown),
            VcpuExit::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR, the `internal`
                // member is the one KVM filled in.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Err(Error::Internal(suberror));
            }
            VcpuExit::FailEntry(reason, _) => return Err(Error::FailEntry(reason)),
            other => return Err(Error::UnexpectedExit(format!("{other:?}"))),
        }
    }
}

/// Lets KVM finish the instruction behind the last exit (the I/O it
/// reported) without running the guest on, so that the saved registers are
/// those after it: `KVM_RUN` with `immediate_exit` set.
fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<()> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(exit) => Err(Error::UnexpectedExit(format!(
            "{exit:?} while completing I/O before a pause"
        ))),
        Err(e) => Err(kvm_err("complete pending I/O")(e)),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.devices.flush();
    }
}
