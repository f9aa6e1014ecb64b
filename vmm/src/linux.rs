//! Loading a Linux kernel for the 64-bit boot protocol: a bzImage (or an
//! ELF vmlinux) placed by linux-loader, the command line, an optional
//! initramfs, the ACPI tables, and the zero page (boot parameters with the
//! e820 map and the RSDP's address); the first vCPU enters the kernel's
//! 64-bit entry in long mode with `rsi` pointing at the zero page.
//!
//! | guest address | what |
//! |---|---|
//! | `0x7000` | zero page (`boot_params`) |
//! | `0x20000` | command line (at most 4 KiB) |
//! | `0xe0000` | ACPI tables, RSDP first (see [`crate::acpi`]) |
//! | `0x100000` | the kernel |
//! | below the end of memory | the initramfs, page aligned |

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::acpi::{self, MmioSlot};
use crate::boot;
use crate::error::{kvm_err, Error, Result};
use crate::machine::Machine;

pub const ZERO_PAGE: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
const HIGH_MEMORY: u64 = 0x10_0000;
/// Where conventional memory ends (the EBDA starts).
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
/// ACPI data: the tables live there, so Linux does not use it as RAM.
const E820_ACPI: u32 = 3;
/// The bzImage's 64-bit entry is this far into the protected-mode kernel.
const BZIMAGE_ENTRY_64: u64 = 0x200;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PAGE: u64 = 4096;

impl Machine {
    /// Loads `kernel` (bzImage or ELF), `initrd` and `cmdline`, writes the
    /// ACPI tables for a machine without virtio devices, and points the
    /// first vCPU at the kernel's 64-bit entry.
    pub fn load_linux(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
    ) -> Result<()> {
        self.load_linux_with_devices(kernel, initrd, cmdline, &[])
    }

    /// [`Machine::load_linux`] with the virtio-mmio `devices` declared in
    /// the ACPI tables (device `i` as `_UID` `i`).
    pub fn load_linux_with_devices(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        devices: &[MmioSlot],
    ) -> Result<()> {
        let memory = &self.memory;
        let tables = acpi::write_tables(memory, self.config.vcpus, devices)?;
        let mut image = File::open(kernel).map_err(|e| load_error(kernel, e))?;
        let loaded = BzImage::load(memory, None, &mut image, Some(GuestAddress(HIGH_MEMORY)));
        let (loaded, entry) = match loaded {
            Ok(result) => (result, result.kernel_load.0 + BZIMAGE_ENTRY_64),
            Err(bz_error) => {
                let result = Elf::load(memory, None, &mut image, Some(GuestAddress(HIGH_MEMORY)))
                    .map_err(|elf_error| {
                    Error::Kernel(format!(
                        "{} is neither a bzImage ({bz_error}) nor an ELF kernel ({elf_error})",
                        kernel.display()
                    ))
                })?;
                (result, result.kernel_load.0)
            }
        };

        let mut line =
            Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Kernel(format!("command line: {e}")))?;
        line.insert_str(cmdline)
            .map_err(|e| Error::Kernel(format!("command line {cmdline:?}: {e}")))?;
        load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &line)
            .map_err(|e| Error::Kernel(format!("cannot place the command line: {e}")))?;

        let mut params = boot_params::default();
        if let Some(header) = loaded.setup_header {
            params.hdr = header;
        } else {
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
        params.hdr.type_of_loader = 0xff;
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        params.hdr.cmdline_size = cmdline.len() as u32 + 1;

        let memory_end = memory.last_addr().0 + 1;
        if let Some(path) = initrd {
            let data = std::fs::read(path).map_err(|e| load_error(path, e))?;
            let max = u64::from(params.hdr.initrd_addr_max).max(0x37ff_ffff) + 1;
            let top = memory_end.min(max);
            let start = top
                .checked_sub(data.len() as u64)
                .map(|a| a & !(PAGE - 1))
                .filter(|&a| a >= loaded.kernel_end)
                .ok_or_else(|| {
                    Error::Kernel(format!(
                        "the initramfs ({} bytes) does not fit above the kernel; give the VM more \
                         memory",
                        data.len()
                    ))
                })?;
            memory
                .write_slice(&data, GuestAddress(start))
                .map_err(|e| Error::Memory(format!("cannot load the initramfs: {e}")))?;
            params.hdr.ramdisk_image = start as u32;
            params.hdr.ramdisk_size = data.len() as u32;
        }

        params.acpi_rsdp_addr = tables.start;
        let e820 = [
            (0, EBDA_START, E820_RAM),
            (
                tables.start,
                (tables.end - tables.start).next_multiple_of(PAGE),
                E820_ACPI,
            ),
            (HIGH_MEMORY, memory_end - HIGH_MEMORY, E820_RAM),
        ];
        for (i, (addr, size, r#type)) in e820.into_iter().enumerate() {
            params.e820_table[i] = boot_e820_entry { addr, size, r#type };
        }
        params.e820_entries = e820.len() as u8;
        LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(
            &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
            memory,
        )
        .map_err(|e| Error::Kernel(format!("cannot write the boot parameters: {e}")))?;

        boot::write_tables(memory)?;
        let vcpu = &self.vcpus[0];
        let sregs = vcpu
            .get_sregs()
            .map_err(kvm_err("read special registers"))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err("set special registers"))?;
        let mut regs = boot::entry_regs(entry);
        regs.rsi = ZERO_PAGE;
        vcpu.set_regs(&regs).map_err(kvm_err("set registers"))?;
        Ok(())
    }
}

fn load_error(path: &Path, e: std::io::Error) -> Error {
    Error::Kernel(format!("cannot read {}: {e}", path.display()))
}
