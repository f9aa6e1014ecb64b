//! Snapshots of a paused [`Machine`]: the state of every vCPU and of the
//! in-kernel devices, and the guest memory.
//!
//! A snapshot is a folder with two or three files:
//!
//! - `vmstate`: byte 0 is the format version ([`FORMAT_VERSION`]), then the
//!   postcard encoding of [`VmState`], then a CRC-32C of everything before
//!   it (4 bytes, little-endian);
//! - `memory`: the guest memory as a raw file, guest address = file offset;
//!   in a full snapshot every page, zero pages left as holes; in a diff
//!   snapshot only the pages written since the previous snapshot;
//! - `dirty` (diff snapshots only): those pages' indices (4 KiB pages), each
//!   a little-endian u64, ascending.
//!
//! Restore order: VM, irqchip and PIT, memory, devices (the serial port,
//! then the virtio devices, reopening their files and taps),
//! vCPUs (each: special registers, registers, XSAVE, XCRs, MSRs, LAPIC, MP
//! state, events, debug registers), then the irqchip's and PIT's state and the KVM clock. The
//! memory file is mapped privately, so pages are read when the guest first
//! touches them and its writes never reach the snapshot.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

use crate::devices::DevicesState;
use crate::error::{kvm_err, Error, Result};
use crate::machine::{Machine, MachineConfig};
use crate::virtio::DriveOverrides;

/// The version byte of `vmstate`.
/// 2: the devices' state was added. 3: the virtio devices' too. 4: a
/// drive is a raw file or a layered disk, with its overlay's blocks.
pub const FORMAT_VERSION: u8 = 4;
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
pub const DIRTY_FILE: &str = "dirty";
const PAGE: usize = 4096;

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
}

/// The whole VM except its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vcpus_count: u8,
    pub memory_mb: u32,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// The serial port's registers and unread input.
    pub devices: DevicesState,
    /// The virtio devices, in slot order.
    pub virtio: Vec<crate::virtio::persist::DeviceState>,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryFrom {
    /// The snapshot's memory file, mapped privately: read on first touch.
    File,
    /// Read whole into anonymous memory before the VM runs.
    Copy,
}

impl Machine {
    /// A machine restored from the VM state in `dir`, its memory placed
    /// page by page by the page server listening on `page_server` (the
    /// memory file in `dir`, if any, is not read).
    pub fn restore_served(
        dir: &Path,
        page_server: &Path,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Machine> {
        Self::restore_served_with_drives(dir, page_server, serial_out, &DriveOverrides::new())
    }

    /// [`Machine::restore_served`], opening the drives named in `drives`
    /// at the paths given there instead of the snapshot's.
    pub fn restore_served_with_drives(
        dir: &Path,
        page_server: &Path,
        serial_out: Box<dyn Write + Send>,
        drives: &DriveOverrides,
    ) -> Result<Machine> {
        let (state, config) = read_state(&dir.join(STATE_FILE))?;
        let served = crate::uffd::serve_memory(config.memory_mb, page_server)?;
        let crate::uffd::ServedMemory {
            memory,
            _uffd,
            _socket,
        } = served;
        let mut machine = Self::restore_into(state, config, memory, serial_out, drives)?;
        machine.page_server = Some((_uffd, _socket));
        Ok(machine)
    }
}

impl Machine {
    /// Saves a paused machine (after [`Machine::run_until`] returned
    /// [`crate::Exit::Paused`]) into `dir`, which is created: a full
    /// snapshot. With dirty pages tracked, the next diff snapshot is
    /// relative to this one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.config.track_dirty_pages {
            self.take_dirty_pages()?;
        }
        self.save_state(dir)?;
        write_synced(&dir.join(MEMORY_FILE), |file| self.write_memory(file))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }

    /// Saves only what changed since the previous snapshot (full or diff)
    /// of this machine into `dir`; returns the pages written. Restore with
    /// [`Machine::restore_chain`], the full snapshot first.
    pub fn save_diff(&self, dir: &Path) -> Result<Vec<u64>> {
        let pages = self.take_dirty_pages()?;
        self.save_state(dir)?;
        let size = u64::from(self.config.memory_mb) << 20;
        write_synced(&dir.join(MEMORY_FILE), |file| {
            file.set_len(size)?;
            let mut page = vec![0u8; PAGE];
            for &index in &pages {
                let offset = index * PAGE as u64;
                self.memory
                    .read_slice(&mut page, GuestAddress(offset))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                file.write_all_at(&page, offset)?;
            }
            Ok(())
        })?;
        write_synced(&dir.join(DIRTY_FILE), |file| {
            let bytes: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
            file.write_all(&bytes)
        })?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(pages)
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let state = self.capture()?;
        let mut bytes = postcard::to_extend(&state, vec![FORMAT_VERSION])
            .map_err(|e| Error::Snapshot(format!("cannot encode the VM state: {e}")))?;
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        write_synced(&dir.join(STATE_FILE), |file| file.write_all(&bytes))
    }

    fn capture(&self) -> Result<VmState> {
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list the MSRs"))?;
        let mut vcpus = Vec::new();
        for vcpu in &self.vcpus {
            let entries: Vec<kvm_msr_entry> = msr_list
                .as_slice()
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Snapshot(format!("too many MSRs: {e:?}")))?;
            let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
            if read != entries.len() {
                let failed = entries[read].index;
                return Err(Error::Snapshot(format!(
                    "KVM lists MSR {failed:#x} but cannot read it"
                )));
            }
            vcpus.push(VcpuState {
                regs: vcpu.get_regs().map_err(kvm_err("read registers"))?,
                sregs: vcpu
                    .get_sregs()
                    .map_err(kvm_err("read special registers"))?,
                xsave: vcpu.get_xsave().map_err(kvm_err("read XSAVE state"))?,
                xcrs: vcpu.get_xcrs().map_err(kvm_err("read XCRs"))?,
                msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
                lapic: vcpu.get_lapic().map_err(kvm_err("read the LAPIC"))?,
                mp_state: vcpu.get_mp_state().map_err(kvm_err("read the MP state"))?,
                events: vcpu
                    .get_vcpu_events()
                    .map_err(kvm_err("read vCPU events"))?,
                debug_regs: vcpu
                    .get_debug_regs()
                    .map_err(kvm_err("read debug registers"))?,
            });
        }
        let chip = |id| -> Result<kvm_irqchip> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(kvm_err("read the irqchip"))?;
            Ok(chip)
        };
        Ok(VmState {
            vcpus_count: self.config.vcpus,
            memory_mb: self.config.memory_mb,
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: self.vm.get_clock().map_err(kvm_err("read the KVM clock"))?,
            devices: self.devices.state(),
            virtio: self.virtio().save()?,
        })
    }

    /// Writes guest memory to `file`, leaving holes for zero pages. Where
    /// untouched pages are known to be zero, chunks the process has never
    /// touched (per `/proc/self/pagemap`) are skipped without reading them:
    /// reading them would fault in every page of an idle guest.
    fn write_memory(&self, file: &mut File) -> std::io::Result<()> {
        const CHUNK: usize = 2 << 20;
        let size = u64::from(self.config.memory_mb) << 20;
        file.set_len(size)?;
        let touched = if self.untouched_pages_are_zero {
            Some(TouchedPages::open()?)
        } else {
            None
        };
        let mut chunk = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < size {
            let len = CHUNK.min((size - offset) as usize);
            if let Some(touched) = &touched {
                let host = self
                    .memory
                    .get_host_address(GuestAddress(offset))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                if !touched.any(host as usize, len)? {
                    offset += len as u64;
                    continue;
                }
            }
            let chunk = &mut chunk[..len];
            self.memory
                .read_slice(chunk, GuestAddress(offset))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // Runs of non-zero pages become one write each.
            let mut run: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                let zero = page.iter().all(|&b| b == 0);
                match (zero, run) {
                    (false, None) => run = Some(i),
                    (true, Some(first)) => {
                        file.write_all_at(
                            &chunk[first * PAGE..i * PAGE],
                            offset + (first * PAGE) as u64,
                        )?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(first) = run {
                file.write_all_at(&chunk[first * PAGE..], offset + (first * PAGE) as u64)?;
            }
            offset += len as u64;
        }
        Ok(())
    }

    /// A machine restored from the snapshot in `dir`, paused where it was
    /// saved: [`Machine::run`] continues the guest.
    pub fn restore(
        dir: &Path,
        memory_from: MemoryFrom,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Machine> {
        Self::restore_with_drives(dir, memory_from, serial_out, &DriveOverrides::new())
    }

    /// [`Machine::restore`], opening the drives named in `drives` at the
    /// paths given there instead of the snapshot's (a snapshot restored
    /// into another sandbox uses that sandbox's disk).
    pub fn restore_with_drives(
        dir: &Path,
        memory_from: MemoryFrom,
        serial_out: Box<dyn Write + Send>,
        drives: &DriveOverrides,
    ) -> Result<Machine> {
        let (state, config) = read_state(&dir.join(STATE_FILE))?;
        let memory = map_memory(&dir.join(MEMORY_FILE), config.memory_mb, memory_from)?;
        let mut machine = Self::restore_into(state, config, memory, serial_out, drives)?;
        machine.untouched_pages_are_zero = memory_from == MemoryFrom::Copy;
        Ok(machine)
    }

    /// A machine restored from a full snapshot and the diff snapshots taken
    /// after it, oldest first: the memory is the full snapshot's with each
    /// diff's pages laid over it, the VM state the last snapshot's.
    pub fn restore_chain(dirs: &[&Path], serial_out: Box<dyn Write + Send>) -> Result<Machine> {
        let (base, diffs) = dirs
            .split_first()
            .ok_or_else(|| Error::Snapshot("no snapshot to restore".into()))?;
        let last = diffs.last().copied().unwrap_or(base);
        let (state, config) = read_state(&last.join(STATE_FILE))?;
        let memory = map_memory(&base.join(MEMORY_FILE), config.memory_mb, MemoryFrom::Copy)?;
        for diff in diffs {
            let listed = fs::read(diff.join(DIRTY_FILE)).map_err(io(diff))?;
            if listed.len() % 8 != 0 {
                return Err(Error::Snapshot(format!(
                    "{} is damaged: its length is not a multiple of 8",
                    diff.join(DIRTY_FILE).display()
                )));
            }
            let file = File::open(diff.join(MEMORY_FILE)).map_err(io(diff))?;
            let mut page = vec![0u8; PAGE];
            for chunk in listed.chunks_exact(8) {
                let index = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
                let offset = index * PAGE as u64;
                if offset + PAGE as u64 > u64::from(config.memory_mb) << 20 {
                    return Err(Error::Snapshot(format!(
                        "{} names page {index}, beyond the VM's memory",
                        diff.display()
                    )));
                }
                file.read_exact_at(&mut page, offset).map_err(io(diff))?;
                memory
                    .write_slice(&page, GuestAddress(offset))
                    .map_err(|e| Error::Memory(e.to_string()))?;
            }
        }
        let mut machine =
            Self::restore_into(state, config, memory, serial_out, &DriveOverrides::new())?;
        machine.untouched_pages_are_zero = true;
        Ok(machine)
    }

    fn restore_into(
        state: VmState,
        config: MachineConfig,
        memory: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
        drives: &DriveOverrides,
    ) -> Result<Machine> {
        let machine = Machine::with_memory(config, memory, serial_out)?;
        machine.devices.restore(&state.devices)?;
        machine
            .virtio()
            .restore(&machine.vm, &state.virtio, drives)?;
        for (vcpu, saved) in machine.vcpus.iter().zip(&state.vcpus) {
            vcpu.set_sregs(&saved.sregs)
                .map_err(kvm_err("set special registers"))?;
            vcpu.set_regs(&saved.regs)
                .map_err(kvm_err("set registers"))?;
            // SAFETY: the XSAVE area was read from a vCPU of this host's
            // KVM and is handed back unchanged.
            unsafe { vcpu.set_xsave(&saved.xsave) }.map_err(kvm_err("set XSAVE state"))?;
            vcpu.set_xcrs(&saved.xcrs).map_err(kvm_err("set XCRs"))?;
            crate::boot::set_msrs(vcpu, &saved.msrs, |index| {
                Error::Snapshot(format!("KVM refused MSR {index:#x} from the snapshot"))
            })?;
            vcpu.set_lapic(&saved.lapic)
                .map_err(kvm_err("set the LAPIC"))?;
            vcpu.set_mp_state(saved.mp_state)
                .map_err(kvm_err("set the MP state"))?;
            vcpu.set_vcpu_events(&saved.events)
                .map_err(kvm_err("set vCPU events"))?;
            vcpu.set_debug_regs(&saved.debug_regs)
                .map_err(kvm_err("set debug registers"))?;
        }
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            machine
                .vm
                .set_irqchip(chip)
                .map_err(kvm_err("set the irqchip"))?;
        }
        machine
            .vm
            .set_pit2(&state.pit)
            .map_err(kvm_err("set the PIT"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        machine
            .vm
            .set_clock(&clock)
            .map_err(kvm_err("set the KVM clock"))?;
        Ok(machine)
    }
}

/// Reads and checks `vmstate`; returns it with the machine it describes.
fn read_state(path: &Path) -> Result<(VmState, MachineConfig)> {
    let bytes = fs::read(path).map_err(io(path))?;
    let damaged = |why: &str| Error::Snapshot(format!("{} {why}", path.display()));
    if bytes.len() < 5 {
        return Err(damaged("is too short to be a VM state"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(damaged("is damaged: its checksum does not match"));
    }
    if body[0] != FORMAT_VERSION {
        return Err(damaged(&format!(
            "has format version {} but this wrenn-vmm knows {FORMAT_VERSION}: use a wrenn-vmm \
             of the same version",
            body[0]
        )));
    }
    let state: VmState = postcard::from_bytes(&body[1..])
        .map_err(|e| damaged(&format!("cannot be decoded: {e}")))?;
    if state.vcpus.len() != usize::from(state.vcpus_count) {
        return Err(damaged(&format!(
            "holds {} vCPUs but says {}",
            state.vcpus.len(),
            state.vcpus_count
        )));
    }
    let config = MachineConfig {
        vcpus: state.vcpus_count,
        memory_mb: state.memory_mb,
        track_dirty_pages: false,
    };
    Ok((state, config))
}

fn map_memory(path: &Path, memory_mb: u32, from: MemoryFrom) -> Result<GuestMemoryMmap> {
    let size = usize::try_from(memory_mb).unwrap_or(usize::MAX) << 20;
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    if len != size as u64 {
        return Err(Error::Snapshot(format!(
            "{} is {len} bytes, but the VM has {memory_mb} MiB",
            path.display()
        )));
    }
    match from {
        MemoryFrom::File => {
            let region = MmapRegionBuilder::new(size)
                .with_file_offset(FileOffset::new(file, 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::Memory(format!("cannot map {}: {e}", path.display())))?;
            let region = GuestRegionMmap::new(region, GuestAddress(0))
                .ok_or_else(|| Error::Memory("the memory region overflows".into()))?;
            GuestMemoryMmap::from_regions(vec![region]).map_err(|e| Error::Memory(format!("{e}")))
        }
        MemoryFrom::Copy => {
            let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
                .map_err(|e| Error::Memory(format!("cannot map {memory_mb} MiB: {e}")))?;
            // Only the file's data is read: its holes are zero, as fresh
            // anonymous memory already is, and stay untouched (no RSS).
            let mut file = file;
            for (start, end) in data_ranges(&file, size as u64).map_err(io(path))? {
                file.seek(SeekFrom::Start(start)).map_err(io(path))?;
                memory
                    .read_exact_volatile_from(
                        GuestAddress(start),
                        &mut file,
                        (end - start) as usize,
                    )
                    .map_err(|e| Error::Memory(format!("cannot read {}: {e}", path.display())))?;
            }
            Ok(memory)
        }
    }
}

/// The ranges of `file` (of `len` bytes) that hold data, by `SEEK_DATA` and
/// `SEEK_HOLE` (a file system that does not track holes reports the whole
/// file as data).
fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor `file` keeps open; no memory is
        // passed.
        let at = unsafe { libc::lseek64(file.as_raw_fd(), offset as i64, whence) };
        match at {
            -1 => match std::io::Error::last_os_error() {
                // No data at or after `offset`.
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
            at => Ok(Some(at as u64)),
        }
    };
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < len {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end > start {
            ranges.push((start, end));
        }
        offset = end.max(start + 1);
    }
    Ok(ranges)
}

/// This process's page table as `/proc/self/pagemap` shows it: one u64 per
/// virtual page, bit 63 set if the page is in memory, bit 62 if swapped.
struct TouchedPages(File);

impl TouchedPages {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;

    fn open() -> std::io::Result<TouchedPages> {
        File::open("/proc/self/pagemap").map(TouchedPages)
    }

    /// Whether any page of `[addr, addr + len)` is in memory or swapped.
    fn any(&self, addr: usize, len: usize) -> std::io::Result<bool> {
        let pages = len.div_ceil(PAGE);
        let mut entries = vec![0u8; pages * 8];
        self.0
            .read_exact_at(&mut entries, (addr / PAGE * 8) as u64)?;
        Ok(entries.chunks_exact(8).any(|e| {
            let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
            entry & (Self::PRESENT | Self::SWAPPED) != 0
        }))
    }
}

/// Writes a file through a temporary name, fsyncs it and renames it.
fn write_synced(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let temp = path.with_extension("partial");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io(&temp))?;
    write(&mut file)
        .and_then(|()| file.sync_all())
        .map_err(io(&temp))?;
    fs::rename(&temp, path).map_err(io(path))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Snapshot(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_are_the_written_parts_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.write_all_at(&[2u8; 8192], 1 << 20).unwrap();
        file.sync_all().unwrap();
        let ranges = data_ranges(&file, 4 << 20).unwrap();
        // File systems may round to their allocation unit, never less.
        assert!(ranges.len() >= 2, "{ranges:?}");
        let covers = |at: u64| ranges.iter().any(|&(s, e)| s <= at && at < e);
        assert!(covers(0) && covers(4095));
        assert!(covers(1 << 20) && covers((1 << 20) + 8191));
        assert!(!covers(3 << 20), "the tail is a hole: {ranges:?}");
        assert!(ranges.iter().all(|&(s, e)| s < e && e <= 4 << 20));
    }
}
