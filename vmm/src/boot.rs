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

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

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
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP,
        rbp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
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
    fn page_tables_map_the_first_gib_one_to_one() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write_tables(&memory).unwrap();
        let pde: u64 = memory.read_obj(GuestAddress(PD_ADDR + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let pml4: u64 = memory.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
