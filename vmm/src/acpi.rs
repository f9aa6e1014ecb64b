//! ACPI tables that tell a Linux guest what the machine is made of: its
//! vCPUs and interrupt controllers (MADT), the serial port and the
//! virtio-mmio devices (DSDT), with no firmware to find them.
//!
//! The platform is *hardware-reduced* ACPI: no PM timer, PM1 or GPE blocks,
//! no SCI, no FACS. A microVM has none of that hardware, and the flag tells
//! Linux not to look for it (nor for the PIT and the 8259s, which the guest
//! then leaves alone). Not here: power management, CPU hotplug, PCI.
//!
//! Layout, in the BIOS area that the e820 map leaves out of RAM:
//!
//! | guest address | what |
//! |---|---|
//! | `0xe0000` | RSDP (revision 2), where Linux also scans for it |
//! | after it, 16-byte aligned | DSDT, MADT, FADT, XSDT (each after the tables it points to) |
//! | `0x100000` | end of the area (the kernel starts here) |
//!
//! The tables come from the `acpi_tables` crate, except the MADT entry it
//! has no type for (Local APIC NMI) and the MADT's flags field, which it
//! cannot set: the MADT is therefore assembled as a generic table (`Sdt`)
//! from the crate's Local APIC and IOAPIC entries plus the NMI's 6 bytes.

use std::ops::Range;

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::{SERIAL_IRQ, SERIAL_PORT};

/// Where the RSDP goes: the start of the area Linux scans for it.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The end of the tables' area (exclusive).
pub const AREA_END: u64 = 0x10_0000;
/// KVM's in-kernel IOAPIC: where it answers and how many pins it has
/// (GSIs 0 to 23, routed one to one to its pins by KVM's default routing).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const IOAPIC_PINS: u32 = 24;
/// Where every vCPU's local APIC answers.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The PIT's GSI under KVM's default routing (pin 0, not 2 as on PCs):
/// no device may take it.
const PIT_GSI: u32 = 0;
/// The `_HID` by which Linux's virtio-mmio driver finds its devices.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

const OEM_ID: [u8; 6] = *b"WRENN ";
const OEM_TABLE_ID: [u8; 8] = *b"WRENNVM ";
const OEM_REVISION: u32 = 1;
const HEADER_LEN: u32 = 36;
const TABLE_ALIGN: u64 = 16;
/// DSDT revision 2 and later: AML integers are 64 bits.
const DSDT_REVISION: u8 = 6;
/// MADT revision of ACPI 6.3 and later (the FADT is 6.5).
const MADT_REVISION: u8 = 5;
/// MADT header: local APIC address and flags after the common header.
const MADT_HEADER_LEN: u32 = HEADER_LEN + 8;
/// MADT flags: the two 8259s exist (KVM's irqchip has them).
const MADT_PCAT_COMPAT: u32 = 1;
const IOAPIC_ID: u8 = 0;
/// MADT entry type 4, Local APIC NMI.
const MADT_LAPIC_NMI: u8 = 4;
/// The Local APIC NMI entry's processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags: active high (polarity 01), edge triggered (trigger 01).
const NMI_FLAGS: u16 = 0b0101;
/// The NMI arrives on each local APIC's LINT1.
const NMI_LINT: u8 = 1;

/// FADT IA-PC boot architecture flags. Left clear: "legacy devices"
/// (no ISA devices beyond those in the DSDT) and "8042" (the VMM's i8042
/// only resets the machine: Linux should not probe a keyboard).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// No PCI bus, hence no MSI.
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
const IAPC_BOOT_ARCH: u16 =
    IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT;

/// One virtio-mmio device as the guest sees it: its registers and its
/// interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub addr: u64,
    pub len: u64,
    pub gsi: u32,
}

/// Why the tables could not be written.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("a machine needs at least one vCPU")]
    NoVcpus,
    #[error("virtio-mmio slot {index} has length 0; give each device its register window")]
    EmptySlot { index: usize },
    #[error(
        "virtio-mmio slot {index} ({addr:#x}, {len:#x} bytes) must lie below 4 GiB: ACPI's \
         Memory32Fixed cannot describe it"
    )]
    SlotAbove4G { index: usize, addr: u64, len: u64 },
    #[error("virtio-mmio slots {first} and {second} overlap; give each device its own window")]
    SlotsOverlap { first: usize, second: usize },
    #[error(
        "virtio-mmio slot {index} uses GSI {gsi}, which is not an IOAPIC pin (0 to {max})",
        max = IOAPIC_PINS - 1
    )]
    GsiOutOfRange { index: usize, gsi: u32 },
    #[error(
        "virtio-mmio slot {index} uses GSI {gsi}, which the PIT, the serial port or another \
         slot already has; interrupts are not shared"
    )]
    GsiTaken { index: usize, gsi: u32 },
    #[error(
        "the ACPI tables do not fit below {AREA_END:#x} (the {table} would end at {end:#x}); \
         declare fewer devices"
    )]
    NoRoom { table: &'static str, end: u64 },
    #[error(
        "cannot write the {table} at {addr:#x}: {reason}; guest memory must cover the first MiB"
    )]
    Memory {
        table: &'static str,
        addr: u64,
        reason: String,
    },
}

impl From<AcpiError> for crate::Error {
    fn from(e: AcpiError) -> crate::Error {
        crate::Error::Acpi(e.to_string())
    }
}

/// Writes the RSDP at [`RSDP_ADDR`] and the tables after it for `vcpus`
/// vCPUs (APIC ids 0 to `vcpus - 1`) and the virtio-mmio `devices` (device
/// `i` gets `_UID` `i`). Returns the guest range the tables occupy, which
/// the e820 map must keep out of RAM.
pub fn write_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioSlot],
) -> Result<Range<u64>, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    check_devices(devices)?;
    let mut area = Area {
        memory,
        next: RSDP_ADDR + Rsdp::len() as u64,
    };
    let dsdt = area.place("DSDT", &dsdt(devices))?;
    let madt = area.place("MADT", &madt(vcpus))?;
    let fadt = area.place("FADT", &fadt(dsdt))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = area.place("XSDT", &bytes(&xsdt))?;
    write(memory, "RSDP", RSDP_ADDR, &bytes(&Rsdp::new(OEM_ID, xsdt)))?;
    Ok(RSDP_ADDR..area.next)
}

fn check_devices(devices: &[MmioSlot]) -> Result<(), AcpiError> {
    let mut taken = vec![PIT_GSI, SERIAL_IRQ];
    for (index, slot) in devices.iter().enumerate() {
        if slot.len == 0 {
            return Err(AcpiError::EmptySlot { index });
        }
        let end = slot.addr.checked_add(slot.len);
        if end.is_none_or(|end| end > 1 << 32) || u32::try_from(slot.len).is_err() {
            return Err(AcpiError::SlotAbove4G {
                index,
                addr: slot.addr,
                len: slot.len,
            });
        }
        if slot.gsi >= IOAPIC_PINS {
            return Err(AcpiError::GsiOutOfRange {
                index,
                gsi: slot.gsi,
            });
        }
        if taken.contains(&slot.gsi) {
            return Err(AcpiError::GsiTaken {
                index,
                gsi: slot.gsi,
            });
        }
        taken.push(slot.gsi);
        let overlapping = devices[..index].iter().position(|other| {
            other.addr < slot.addr + slot.len && slot.addr < other.addr + other.len
        });
        if let Some(first) = overlapping {
            return Err(AcpiError::SlotsOverlap {
                first,
                second: index,
            });
        }
    }
    Ok(())
}

/// The tables' area: each table placed after the previous one, aligned.
struct Area<'a> {
    memory: &'a GuestMemoryMmap,
    next: u64,
}

impl Area<'_> {
    fn place(&mut self, table: &'static str, data: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + data.len() as u64;
        if end > AREA_END {
            return Err(AcpiError::NoRoom { table, end });
        }
        write(self.memory, table, addr, data)?;
        self.next = end;
        Ok(addr)
    }
}

fn write(
    memory: &GuestMemoryMmap,
    table: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), AcpiError> {
    memory
        .write_slice(data, GuestAddress(addr))
        .map_err(|e| AcpiError::Memory {
            table,
            addr,
            reason: e.to_string(),
        })
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut data = Vec::new();
    table.to_aml_bytes(&mut data);
    data
}

/// The FADT: hardware-reduced, pointing at the DSDT.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        // No power or sleep button, fixed or otherwise.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    bytes(&fadt.finalize())
}

/// The MADT: a local APIC per vCPU, the IOAPIC (GSI base 0), and NMIs on
/// every local APIC's LINT1. No interrupt source overrides: KVM's default
/// routing sends ISA IRQ n to IOAPIC pin n (the PIT included), which is
/// what Linux assumes without one.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(HEADER_LEN as usize, LAPIC_ADDR);
    madt.write_u32(HEADER_LEN as usize + 4, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        madt.append_slice(&bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&bytes(&IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0)));
    let [flags_low, flags_high] = NMI_FLAGS.to_le_bytes();
    madt.append_slice(&[
        MADT_LAPIC_NMI,
        6,
        ALL_PROCESSORS,
        flags_low,
        flags_high,
        NMI_LINT,
    ]);
    madt.as_slice().to_vec()
}

/// The DSDT: under `\_SB`, COM1 and one `LNRO0005` device per slot.
fn dsdt(devices: &[MmioSlot]) -> Vec<u8> {
    let mut children = serial_device();
    for (index, slot) in devices.iter().enumerate() {
        children.extend(mmio_device(index, slot));
    }
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&Scope::raw(Path::new("\\_SB_"), children));
    dsdt.as_slice().to_vec()
}

fn serial_device() -> Vec<u8> {
    let ports = IO::new(SERIAL_PORT, SERIAL_PORT, 0, 8);
    let interrupt = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let resources = ResourceTemplate::new(vec![&ports, &interrupt]);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &0u32);
    let crs = Name::new(Path::new("_CRS"), &resources);
    bytes(&Device::new(Path::new("COM1"), vec![&hid, &uid, &crs]))
}

/// `check_devices` has made sure the window fits in 32 bits and that there
/// are fewer than 24 slots (one GSI each), so the name has 4 characters.
fn mmio_device(index: usize, slot: &MmioSlot) -> Vec<u8> {
    let window = Memory32Fixed::new(true, slot.addr as u32, slot.len as u32);
    let interrupt = Interrupt::new(true, true, false, false, slot.gsi);
    let resources = ResourceTemplate::new(vec![&window, &interrupt]);
    let hid = Name::new(Path::new("_HID"), &VIRTIO_MMIO_HID);
    let uid = Name::new(Path::new("_UID"), &(index as u32));
    let crs = Name::new(Path::new("_CRS"), &resources);
    let name = format!("V{index:03X}");
    bytes(&Device::new(Path::new(&name), vec![&hid, &uid, &crs]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn slots(n: usize) -> Vec<MmioSlot> {
        (0..n)
            .map(|i| MmioSlot {
                addr: 0xd000_0000 + i as u64 * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    fn read(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        memory.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    fn u32_at(data: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
    }

    fn u64_at(data: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(data[at..at + 8].try_into().unwrap())
    }

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Reads the table at `addr`, checking its length field and checksum.
    fn table(memory: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(memory, addr, HEADER_LEN as usize);
        assert_eq!(&header[..4], signature, "signature at {addr:#x}");
        let data = read(memory, addr, u32_at(&header, 4) as usize);
        assert_eq!(
            sum(&data),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        data
    }

    struct Tables {
        range: Range<u64>,
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Follows the pointers from the RSDP as a guest would.
    fn parse(vcpus: u8, devices: &[MmioSlot]) -> Tables {
        let memory = memory();
        let range = write_tables(&memory, vcpus, devices).unwrap();
        let rsdp = read(&memory, RSDP_ADDR, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        let xsdt = table(&memory, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8, "XSDT has two entries");
        let fadt = table(&memory, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&memory, u64_at(&xsdt, 44), b"APIC");
        let dsdt = table(&memory, u64_at(&fadt, 140), b"DSDT");
        for addr in [
            u64_at(&rsdp, 24),
            u64_at(&xsdt, 36),
            u64_at(&xsdt, 44),
            u64_at(&fadt, 140),
        ] {
            assert!(
                range.contains(&addr) && addr % TABLE_ALIGN == 0,
                "{addr:#x}"
            );
        }
        Tables {
            range,
            xsdt,
            fadt,
            madt,
            dsdt,
        }
    }

    /// The MADT's entries as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = MADT_HEADER_LEN as usize;
        while at < madt.len() {
            let len = madt[at + 1] as usize;
            assert!(len >= 2 && at + len <= madt.len(), "MADT entry at {at}");
            entries.push((madt[at], madt[at..at + len].to_vec()));
            at += len;
        }
        entries
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn tables_sit_in_the_bios_area_with_the_rsdp_first() {
        let tables = parse(2, &slots(3));
        assert_eq!(tables.range.start, RSDP_ADDR);
        assert!(tables.range.end <= AREA_END);
        assert_eq!(tables.xsdt[8], 1, "XSDT revision");
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt_by_its_64_bit_field() {
        let tables = parse(1, &[]);
        let fadt = &tables.fadt;
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
        assert_eq!(fadt[8], 6, "FADT major version");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT field unused");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch, IAPC_BOOT_ARCH);
        assert_eq!(boot_arch & 0b11, 0, "no legacy devices, no 8042");
        assert_eq!(u32_at(fadt, 56), 0, "no PM1a event block");
        assert_eq!(u32_at(fadt, 76), 0, "no PM timer block");
    }

    #[test]
    fn madt_has_a_local_apic_per_vcpu_the_ioapic_and_an_nmi_on_lint1() {
        for vcpus in 2..=4u8 {
            let madt = parse(vcpus, &[]).madt;
            assert_eq!(madt[8], MADT_REVISION);
            assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
            assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
            let entries = madt_entries(&madt);
            let lapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 0).collect();
            assert_eq!(lapics.len(), vcpus as usize);
            for (i, (_, entry)) in lapics.iter().enumerate() {
                assert_eq!(entry.len(), 8);
                assert_eq!((entry[2], entry[3]), (i as u8, i as u8), "UID, APIC id");
                assert_eq!(u32_at(entry, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|(t, _)| *t == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let ioapic = &ioapics[0].1;
            assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDR);
            assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
            let nmis: Vec<_> = entries.iter().filter(|(t, _)| *t == 4).collect();
            assert_eq!(nmis.len(), 1);
            assert_eq!(nmis[0].1, [4, 6, 0xff, 5, 0, 1]);
            assert!(
                entries.iter().all(|(t, _)| [0, 1, 4].contains(t)),
                "no overrides"
            );
        }
    }

    #[test]
    fn dsdt_declares_com1_and_each_virtio_mmio_slot() {
        for n in [0, 1, 3, 8] {
            let devices = slots(n);
            let dsdt = parse(1, &devices).dsdt;
            assert_eq!(dsdt[8], DSDT_REVISION);
            assert_eq!(count(&dsdt, VIRTIO_MMIO_HID.as_bytes()), n);
            assert_eq!(count(&dsdt, b"COM1"), 1);
            // PNP0501 as an EISA id: "PNP" compressed, then 0x0501.
            assert_eq!(count(&dsdt, &[0x41, 0xd0, 0x05, 0x01]), 1);
            // The serial port's I/O descriptor and IRQ 4.
            assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 0, 8]), 1);
            assert_eq!(count(&dsdt, &[0x89, 6, 0, 0b0011, 1, 4, 0, 0, 0]), 1);
            for (i, slot) in devices.iter().enumerate() {
                let mut window = vec![0x86, 9, 0, 1];
                window.extend((slot.addr as u32).to_le_bytes());
                window.extend((slot.len as u32).to_le_bytes());
                assert_eq!(count(&dsdt, &window), 1, "Memory32Fixed of slot {i}");
                let mut irq = vec![0x89, 6, 0, 0b0011, 1];
                irq.extend(slot.gsi.to_le_bytes());
                assert_eq!(
                    count(&dsdt, &irq),
                    1,
                    "edge, active high, exclusive GSI of slot {i}"
                );
                assert_eq!(count(&dsdt, format!("V{i:03X}").as_bytes()), 1);
            }
        }
    }

    #[test]
    fn device_uids_are_their_slot_index() {
        let dsdt = parse(1, &slots(3)).dsdt;
        // Name(_UID, i): NameOp, "_UID", then Zero, One or BytePrefix i.
        assert_eq!(count(&dsdt, b"\x08_UID\x00"), 2, "COM1 and slot 0");
        assert_eq!(count(&dsdt, b"\x08_UID\x01"), 1);
        assert_eq!(count(&dsdt, b"\x08_UID\x0a\x02"), 1);
    }

    #[test]
    fn bad_slots_are_refused_with_the_reason() {
        let memory = memory();
        let ok = slots(2);
        let cases = [
            (
                MmioSlot { len: 0, ..ok[1] },
                AcpiError::EmptySlot { index: 1 },
            ),
            (
                MmioSlot {
                    addr: 0xffff_f800,
                    ..ok[1]
                },
                AcpiError::SlotAbove4G {
                    index: 1,
                    addr: 0xffff_f800,
                    len: 0x1000,
                },
            ),
            (
                MmioSlot { gsi: 24, ..ok[1] },
                AcpiError::GsiOutOfRange { index: 1, gsi: 24 },
            ),
            (
                MmioSlot { gsi: 5, ..ok[1] },
                AcpiError::GsiTaken { index: 1, gsi: 5 },
            ),
            (
                MmioSlot { gsi: 4, ..ok[1] },
                AcpiError::GsiTaken { index: 1, gsi: 4 },
            ),
            (
                MmioSlot { gsi: 0, ..ok[1] },
                AcpiError::GsiTaken { index: 1, gsi: 0 },
            ),
            (
                MmioSlot {
                    addr: ok[0].addr + 0x800,
                    ..ok[1]
                },
                AcpiError::SlotsOverlap {
                    first: 0,
                    second: 1,
                },
            ),
        ];
        for (bad, error) in cases {
            assert_eq!(write_tables(&memory, 1, &[ok[0], bad]), Err(error));
        }
        assert_eq!(write_tables(&memory, 0, &[]), Err(AcpiError::NoVcpus));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            write_tables(&small, 1, &[]),
            Err(AcpiError::Memory { .. })
        ));
    }

    #[test]
    fn the_largest_machine_fits() {
        let devices: Vec<_> = (0..IOAPIC_PINS - 2)
            .map(|i| MmioSlot {
                addr: 0xd000_0000 + u64::from(i) * 0x1000,
                len: 0x1000,
                gsi: if i < 3 { i + 1 } else { i + 2 },
            })
            .collect();
        let tables = parse(u8::MAX, &devices);
        assert_eq!(madt_entries(&tables.madt).len(), 255 + 2);
        assert_eq!(
            count(&tables.dsdt, VIRTIO_MMIO_HID.as_bytes()),
            devices.len()
        );
    }
}
