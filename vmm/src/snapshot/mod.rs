//! Snapshots of a paused [`Machine`]: the state of every vCPU and of the
//! in-kernel devices, and the guest memory.
//!
//! A snapshot is a folder with two or three files:
//!
//! - `vmstate`: a versioned header, the postcard encoding of [`VmState`]
//!   and a CRC-32C ([`format`] has the layout and the compatibility rule;
//!   [`legacy`] reads the files of format 4, before the header);
//! - `memory`: the guest memory as a raw file, guest address = file offset;
//!   in a full snapshot every page, zero pages left as holes; in a diff
//!   snapshot only the pages written since the previous snapshot;
//! - `dirty` (diff snapshots only): those pages' indices (4 KiB pages), each
//!   a little-endian u64, ascending.
//!
//! Each part of the machine saves and restores itself ([`Persist`]).
//! Restore order: VM, irqchip and PIT, memory, devices (the serial port,
//! then the virtio devices, reopening their files and taps), vCPUs (each:
//! special registers, registers, XSAVE, XCRs, MSRs, LAPIC, MP state,
//! events, debug registers), then the irqchip's and PIT's state and the
//! KVM clock. The memory file is mapped privately, so pages are read when
//! the guest first touches them and its writes never reach the snapshot.

pub mod format;
pub(crate) mod legacy;
pub mod state;

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

pub use self::format::{
    check_version, probe, read_version, supported_versions, FileVersion, StateFileError,
    StateVersion, VersionError, LEGACY_FORMAT, MAGIC, STATE_VERSION,
};
pub use self::state::{MachineShape, VmState};
pub use crate::kvm_state::{VcpuState, VmChipsState};

use crate::error::{kvm_err, Error, Result};
use crate::kvm_state::{KvmChips, KvmVcpu};
use crate::machine::{Machine, MachineConfig};
use crate::persist::Persist;
use crate::virtio::DriveOverrides;

pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
pub const DIRTY_FILE: &str = "dirty";
const PAGE: usize = 4096;

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
        let bytes = format::encode(&self.capture()?)?;
        write_synced(&dir.join(STATE_FILE), |file| file.write_all(&bytes))
    }

    /// Every part's state, in restore order.
    fn capture(&self) -> Result<VmState> {
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list the MSRs"))?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|fd| KvmVcpu::new(fd, msr_list.as_slice()).save())
            .collect::<Result<Vec<_>>>()?;
        Ok(VmState {
            machine: MachineShape {
                vcpus: self.config.vcpus,
                memory_mb: self.config.memory_mb,
            },
            vcpus,
            chips: KvmChips::new(&self.vm).save()?,
            serial: self.devices.save_serial()?,
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
        machine.devices.restore_serial(&state.serial)?;
        machine
            .virtio()
            .restore(&machine.vm, &state.virtio, drives)?;
        let msr_list = machine
            .kvm
            .get_msr_index_list()
            .map_err(kvm_err("list the MSRs"))?;
        for (fd, saved) in machine.vcpus.iter().zip(&state.vcpus) {
            KvmVcpu::restore(KvmVcpu::new(fd, msr_list.as_slice()), saved)?;
        }
        KvmChips::restore(&machine.vm, &state.chips)?;
        Ok(machine)
    }
}

/// Reads and checks `vmstate` (of any version this VMM reads, upgraded);
/// returns it with the machine it describes.
fn read_state(path: &Path) -> Result<(VmState, MachineConfig)> {
    let bytes = fs::read(path).map_err(|source| StateFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let (state, _version) = format::decode(path, &bytes)?;
    let config = state.config();
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
