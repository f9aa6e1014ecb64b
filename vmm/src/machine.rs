//! The VM: KVM file descriptors, guest memory, vCPUs, and the exit loop.
//!
//! The machine has the in-kernel irqchip (both PICs, the IOAPIC, a LAPIC per
//! vCPU) and PIT; guest memory is one anonymous mapping starting at guest
//! address 0. The exit loop serves port I/O for the serial port and the
//! i8042 and ends when the guest resets, halts or triple-faults.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::devices::{self, I8042Write, SerialPort, SERIAL_IRQ, SERIAL_PORTS};
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
    serial: SerialPort,
    pub(crate) config: MachineConfig,
    /// The userfaultfd and page server connection of served memory: kept
    /// for the VM's life (closing the socket ends the server).
    pub(crate) page_server: Option<(userfaultfd::Uffd, std::os::unix::net::UnixStream)>,
}

impl Machine {
    /// Creates the VM with its memory, irqchip, PIT, vCPUs and serial port
    /// (writing to `serial_out`).
    pub fn new(config: MachineConfig, serial_out: Box<dyn Write + Send>) -> Result<Machine> {
        Self::check(config)?;
        let size = usize::try_from(config.memory_mb).unwrap_or(usize::MAX) << 20;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| Error::Memory(format!("cannot map {} MiB: {e}", config.memory_mb)))?;
        Self::with_memory(config, memory, serial_out)
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
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set the CPUID"))?;
            vcpus.push(vcpu);
        }

        let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&interrupt, SERIAL_IRQ)
            .map_err(kvm_err("connect the serial interrupt"))?;
        Ok(Machine {
            vcpus,
            vm,
            kvm,
            memory,
            serial: SerialPort::new(interrupt, serial_out),
            config,
            page_server: None,
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

    /// Loads a flat 64-bit program at [`boot::PROGRAM_ADDR`] and points the
    /// first vCPU at it, in long mode with the first GiB identity-mapped.
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
        let vcpu = &self.vcpus[0];
        let sregs = vcpu
            .get_sregs()
            .map_err(kvm_err("read special registers"))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err("set special registers"))?;
        vcpu.set_regs(&boot::entry_regs(boot::PROGRAM_ADDR))
            .map_err(kvm_err("set registers"))?;
        Ok(())
    }

    /// Runs the first vCPU until the guest resets, halts or faults.
    pub fn run(&mut self) -> Result<Exit> {
        self.run_until(&AtomicBool::new(false))
    }

    /// [`Machine::run`], also returning [`Exit::Paused`] at the first exit
    /// to the VMM after `stop` is set (the guest's port I/O exits often).
    pub fn run_until(&mut self, stop: &AtomicBool) -> Result<Exit> {
        let exit = self.run_vcpu(0, stop);
        self.serial.flush();
        exit
    }

    fn run_vcpu(&mut self, index: usize, stop: &AtomicBool) -> Result<Exit> {
        let Machine { vcpus, serial, .. } = self;
        let vcpu = &mut vcpus[index];
        loop {
            if stop.load(Ordering::Acquire) {
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
                    let value = data.first().copied().unwrap_or(0);
                    if SERIAL_PORTS.contains(&port) {
                        serial.write(port, value)?;
                    } else if (port == devices::I8042_COMMAND || port == devices::I8042_DATA)
                        && devices::i8042_write(port, value) == I8042Write::Reset
                    {
                        return Ok(Exit::Reset);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    let value = if SERIAL_PORTS.contains(&port) {
                        serial.read(port)
                    } else if port == devices::I8042_COMMAND || port == devices::I8042_DATA {
                        devices::i8042_read(port)
                    } else {
                        0xff
                    };
                    data.fill(value);
                }
                VcpuExit::MmioRead(_, data) => data.fill(0xff),
                VcpuExit::MmioWrite(..) => {}
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
        self.serial.flush();
    }
}
