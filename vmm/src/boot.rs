//! The 64-bit entry state: a flat GDT, identity-mapped page tables for the
//! first GiB (2 MiB pages), and control registers for long mode with paging.
//! A guest program (or, later, a Linux kernel's 64-bit entry) starts with
//! these already in place, so it needs no real-mode or protected-mode code.
//!
//! Guest physical layout below 1 MiB:
//!
//! | address | what |
//! |---|---|
//! | `0x500` | GDT: null, code64, data, TSS |
//! | `0x9000` | PML4 |
//! | `0xa000` | PDPT |
//! | `0xb000` | page directory: 512 entries of 2 MiB |
//! | below `0x8_0000` | the initial stack (grows down from `STACK_TOP`) |

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{kvm_err, Error, Result};

pub const GDT_ADDR: u64 = 0x500;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x8_0000;
/// Where a guest program is loaded and entered.
pub const PROGRAM_ADDR: u64 = 0x10_0000;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// GDT entries: flags and access bytes for base 0, limit 0xfffff.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b), // code: present, ring 0, executable, readable; L=1, G=1
    gdt_entry(0xc093), // data: present, ring 0, writable; D/B=1, G=1
    gdt_entry(0x808b), // TSS: present, busy 64-bit TSS; G=1
];

const fn gdt_entry(flags: u16) -> u64 {
    let (base, limit) = (0u64, 0xfffffu64);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page table entry bits: present, writable, 2 MiB page.
const PTE_PRESENT_RW: u64 = 0b11;
const PDE_HUGE: u64 = 1 << 7;

/// Writes the GDT and the page tables into guest memory.
pub fn write_tables(memory: &GuestMemoryMmap) -> Result<()> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("cannot write boot tables at {addr:#x}: {e}")))
    };
    for (i, entry) in GDT.iter().enumerate() {
        write(*entry, GDT_ADDR + 8 * i as u64)?;
    }
    write(PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR)?;
    write(PD_ADDR | PTE_PRESENT_RW, PDPT_ADDR)?;
    for i in 0..512u64 {
        write((i << 21) | PTE_PRESENT_RW | PDE_HUGE, PD_ADDR + 8 * i)?;
    }
    Ok(())
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit mode with the tables of [`write_tables`].
/// CR0 is set whole (KVM's reset value has CD and NW set).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(CODE_SELECTOR, GDT[1]);
    let data = segment(DATA_SELECTOR, GDT[2]);
    let mut tss = segment(TSS_SELECTOR, GDT[3]);
    tss.limit = 0xfffff;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers to enter at `entry` with the initial stack.
pub fn entry_regs(entry: u64) -> kvm_regs {
    entry_regs_on(entry, STACK_TOP)
}

/// Each vCPU a guest program starts on gets this much of the stack area,
/// vCPU 0 at the top.
pub const STACK_PER_VCPU: u64 = 0x2000;

/// General registers to enter at `entry` with the stack at `stack`.
pub fn entry_regs_on(entry: u64, stack: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rflags: 0x2,
        ..Default::default()
    }
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_HTT: u32 = 1 << 28;

/// The CPUID of vCPU `index` of `count`: what KVM supports, with this
/// vCPU's initial APIC ID, the number of logical processors, and the
/// hypervisor bit. Linux numbers CPUs and builds its topology from these;
/// KVM passes the supported set through without filling them in.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0xffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= CPUID_HYPERVISOR;
                if count > 1 {
                    entry.edx |= CPUID_HTT;
                } else {
                    entry.edx &= !CPUID_HTT;
                }
            }
            // Extended topology: EDX is the x2APIC ID on every sub-leaf.
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// MSRs a vCPU starts with, set on purpose rather than left to KVM's reset
/// values: the system-call entry points empty, the TSC at 0, fast strings
/// on, and the MTRRs enabled with write-back as the default memory type.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// LAPIC register offsets of the local interrupt pins and their delivery
/// modes.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// Sets a new vCPU's boot MSRs and its LAPIC's local interrupt pins: LINT0
/// takes the PIC's interrupts (ExtINT), LINT1 is the NMI, as on a PC.
pub fn configure_vcpu(vcpu: &VcpuFd) -> Result<()> {
    set_msrs(vcpu, BOOT_MSRS, |index| {
        Error::Vcpu(format!("KVM refused boot MSR {index:#x}"))
    })?;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("read the LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = lapic_register(&lapic.regs, offset);
        let value = (value & !(0b111 << 8)) | (mode << 8);
        set_lapic_register(&mut lapic.regs, offset, value);
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("set the LAPIC"))
}

/// Sets each (index, value) of `msrs` on `vcpu`; `refused` names the first
/// MSR KVM did not take.
pub(crate) fn set_msrs(
    vcpu: &VcpuFd,
    msrs: &[(u32, u64)],
    refused: impl FnOnce(u32) -> Error,
) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let list = Msrs::from_entries(&entries)
        .map_err(|e| Error::Vcpu(format!("cannot list {} MSRs: {e:?}", entries.len())))?;
    let set = vcpu.set_msrs(&list).map_err(kvm_err("set MSRs"))?;
    match entries.get(set) {
        Some(entry) => Err(refused(entry.index)),
        None => Ok(()),
    }
}

fn lapic_register(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_register(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = byte as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_are_the_usual_flat_ones() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_their_entries() {
        let code = segment(CODE_SELECTOR, GDT[1]);
        assert_eq!((code.l, code.db, code.present, code.type_), (1, 0, 1, 0xb));
        let data = segment(DATA_SELECTOR, GDT[2]);
        assert_eq!((data.l, data.db, data.s, data.type_), (0, 1, 1, 3));
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_and_the_cpu_count() {
        let supported = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                edx: CPUID_HTT,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let cpuid = vcpu_cpuid(&supported, 3, 4);
        let leaf1 = &cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx, 0x0304_0800);
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & CPUID_HTT, 0);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
        assert_eq!(
            vcpu_cpuid(&supported, 0, 1).as_slice()[0].edx & CPUID_HTT,
            0
        );
    }

    #[test]
    fn lapic_registers_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_register(&mut regs, APIC_LVT_LINT1, 0x0001_0400);
        assert_eq!(lapic_register(&regs, APIC_LVT_LINT1), 0x0001_0400);
        assert_eq!(lapic_register(&regs, APIC_LVT_LINT0), 0);
    }

    #[test]
    fn page_tables_map_the_first_gib_one_to_one() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&memory).unwrap();
        let pde: u64 = memory.read_obj(GuestAddress(PD_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
