//! virtio-blk on a raw disk image or a layered disk (`layered.rs`): read,
//! write, flush (fsync) and get-id; capacity in the configuration space;
//! read-only drives offer `VIRTIO_BLK_F_RO` and answer writes with
//! `VIRTIO_BLK_S_IOERR`. Where the bytes live is `disk.rs`; what a
//! snapshot keeps is `persist.rs`.
//!
//! A request is a 16-byte header (type, reserved, sector) the device
//! reads, then data, then one status byte the device writes. Requests it
//! cannot serve (outside the disk, a length that is not whole sectors, a
//! chain too short for a header) get an error status; a chain with no
//! writable byte at all is returned with nothing written.

pub mod disk;
mod layered;
pub mod persist;

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use self::disk::Disk;
pub use self::disk::{DriveSource, LayeredSource};
use super::DeviceError;

pub const SECTOR: u64 = 512;
/// Data moves between the file and guest memory in pieces of this size.
const CHUNK: usize = 64 << 10;

/// A drive as the API configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub drive_id: String,
    /// A raw disk image, or a base snapshot with an overlay.
    pub source: DriveSource,
    pub is_root_device: bool,
    pub read_only: bool,
}

/// Whether `config` would open: its files exist with the access they need
/// and the disk is whole sectors long (a layered disk's overlay is created
/// if missing).
pub fn check(config: &DriveConfig) -> Result<(), DeviceError> {
    Block::open(config.clone(), None, None).map(drop)
}

/// The block device.
pub(crate) struct Block {
    config: DriveConfig,
    disk: Disk,
    capacity: u64,
}

impl Block {
    /// Opens the drive; with `at_least` (a restore), refuses a disk
    /// smaller than that many sectors. `overlay_blocks`: see [`Disk::open`].
    pub(crate) fn open(
        config: DriveConfig,
        at_least: Option<u64>,
        overlay_blocks: Option<(u32, &[u64])>,
    ) -> Result<Block, DeviceError> {
        let disk = Disk::open(
            &config.drive_id,
            &config.source,
            config.read_only,
            overlay_blocks,
        )?;
        let len = disk.len().map_err(|source| DeviceError::OpenDrive {
            drive_id: config.drive_id.clone(),
            path: config.source.main_path().to_path_buf(),
            mode: "read",
            source,
        })?;
        let capacity = len / SECTOR;
        if let Some(saved) = at_least.filter(|&saved| capacity < saved) {
            return Err(DeviceError::DriveShrunk {
                drive_id: config.drive_id,
                path: config.source.main_path().to_path_buf(),
                saved,
                now: capacity,
            });
        }
        Ok(Block {
            config,
            disk,
            capacity,
        })
    }

    pub(crate) fn config(&self) -> &DriveConfig {
        &self.config
    }

    pub(crate) fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_BLK_F_FLUSH;
        if self.config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    /// `struct virtio_blk_config` up to `capacity`, all the guest needs
    /// without further features.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        self.capacity.to_le_bytes().to_vec()
    }

    /// Serves every request in the queue; returns whether any was.
    pub(crate) fn process_queue(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
        let mut served = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let written = match (
                Reader::new(memory, chain.clone()),
                Writer::new(memory, chain),
            ) {
                (reader, Ok(writer)) => self.serve(reader.ok(), writer),
                (_, Err(_)) => 0,
            };
            if queue.add_used(memory, head, written).is_err() {
                break;
            }
            served = true;
        }
        served
    }

    /// Runs one request; returns how many bytes it wrote into the chain.
    fn serve(&mut self, reader: Option<Reader<'_>>, mut writer: Writer<'_>) -> u32 {
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0;
        };
        let Ok(mut status_byte) = writer.split_at(data_len) else {
            return 0;
        };
        let status = match reader {
            Some(mut reader) => self.execute(&mut reader, &mut writer),
            None => VIRTIO_BLK_S_IOERR,
        };
        let status_written = status_byte.write_all(&[status as u8]).is_ok();
        (writer.bytes_written() + usize::from(status_written)) as u32
    }

    fn execute(&mut self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> u32 {
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..]);
        let sector = u64::from_le_bytes(sector);
        let done = match kind {
            VIRTIO_BLK_T_IN => self
                .range(sector, writer.available_bytes())
                .and_then(|offset| self.read(offset, writer)),
            VIRTIO_BLK_T_OUT if self.config.read_only => None,
            VIRTIO_BLK_T_OUT => self
                .range(sector, reader.available_bytes())
                .and_then(|offset| self.write(offset, reader)),
            VIRTIO_BLK_T_FLUSH => self.disk.flush().ok(),
            VIRTIO_BLK_T_GET_ID => self.write_id(writer),
            _ => return VIRTIO_BLK_S_UNSUPP,
        };
        match done {
            Some(()) => VIRTIO_BLK_S_OK,
            None => VIRTIO_BLK_S_IOERR,
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (len.is_multiple_of(SECTOR) && end <= self.capacity * SECTOR).then_some(offset)
    }

    fn read(&self, mut offset: u64, writer: &mut Writer<'_>) -> Option<()> {
        let mut buffer = vec![0u8; CHUNK.min(writer.available_bytes())];
        while writer.available_bytes() > 0 {
            let piece = &mut buffer[..CHUNK.min(writer.available_bytes())];
            self.disk.read_at(piece, offset).ok()?;
            writer.write_all(piece).ok()?;
            offset += piece.len() as u64;
        }
        Some(())
    }

    fn write(&mut self, mut offset: u64, reader: &mut Reader<'_>) -> Option<()> {
        let mut buffer = vec![0u8; CHUNK.min(reader.available_bytes())];
        while reader.available_bytes() > 0 {
            let piece = &mut buffer[..CHUNK.min(reader.available_bytes())];
            reader.read_exact(piece).ok()?;
            self.disk.write_at(piece, offset).ok()?;
            offset += piece.len() as u64;
        }
        Some(())
    }

    /// The drive id, cut or zero-padded to 20 bytes (as much as fits).
    fn write_id(&self, writer: &mut Writer<'_>) -> Option<()> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let bytes = self.config.drive_id.as_bytes();
        let n = bytes.len().min(id.len());
        id[..n].copy_from_slice(&bytes[..n]);
        let fits = id.len().min(writer.available_bytes());
        writer.write_all(&id[..fits]).ok()
    }
}
