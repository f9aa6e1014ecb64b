//! Where a drive's bytes live: a raw image file, or a layered disk (a base
//! snapshot in the layer store with the guest's writes in an overlay).
//! The virtio request handling in `mod.rs` sees only [`Disk`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::layered::LayeredDisk;
use super::SECTOR;
use crate::virtio::DeviceError;

/// Where a drive's bytes come from, as the API configures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriveSource {
    /// A raw disk image, read and written in place.
    Raw {
        /// The image file.
        path: PathBuf,
    },
    /// A base snapshot of the layer store plus an overlay of the guest's
    /// writes.
    Layered(LayeredSource),
}

/// The files of a layered disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayeredSource {
    /// The base: a header file of the layer store (`<state dir>/headers/<id>`).
    pub header: PathBuf,
    /// The folder of its layer files (`<state dir>/layers`).
    pub layers_dir: PathBuf,
    /// The sandbox's overlay: a sparse file the size of the device; its
    /// written-block list is the same path with `.blocks` added.
    pub overlay: PathBuf,
}

impl DriveSource {
    /// The file named in errors about the drive as a whole: the image, or
    /// the base header.
    pub fn main_path(&self) -> &std::path::Path {
        match self {
            DriveSource::Raw { path } => path,
            DriveSource::Layered(layered) => &layered.header,
        }
    }
}

/// An open drive.
pub(crate) enum Disk {
    Raw(File),
    Layered(Box<LayeredDisk>),
}

impl Disk {
    /// Opens `source` for `drive_id`; `overlay_blocks` (a restore) are the
    /// block size and blocks a layered disk's overlay held when the
    /// snapshot was taken.
    pub(crate) fn open(
        drive_id: &str,
        source: &DriveSource,
        read_only: bool,
        overlay_blocks: Option<(u32, &[u64])>,
    ) -> Result<Disk, DeviceError> {
        match source {
            DriveSource::Raw { path } => open_raw(drive_id, path, read_only).map(Disk::Raw),
            DriveSource::Layered(layered) => {
                LayeredDisk::open(drive_id, layered, read_only, overlay_blocks)
                    .map(|disk| Disk::Layered(Box::new(disk)))
            }
        }
    }

    /// Bytes of the device.
    pub(crate) fn len(&self) -> io::Result<u64> {
        match self {
            Disk::Raw(file) => file.metadata().map(|m| m.len()),
            Disk::Layered(disk) => Ok(disk.len()),
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Disk::Raw(file) => file.read_exact_at(buf, offset),
            Disk::Layered(disk) => disk.read_at(buf, offset),
        }
    }

    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Disk::Raw(file) => file.write_all_at(buf, offset),
            Disk::Layered(disk) => disk.write_at(buf, offset),
        }
    }

    /// Makes every completed write durable.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self {
            Disk::Raw(file) => file.sync_all(),
            Disk::Layered(disk) => disk.flush(),
        }
    }

    /// The blocks a layered disk's overlay holds, with its block size.
    pub(crate) fn overlay_blocks(&self) -> Option<(u32, Vec<u64>)> {
        match self {
            Disk::Raw(_) => None,
            Disk::Layered(disk) => Some((disk.block_size(), disk.written())),
        }
    }
}

/// Opens a raw image and checks that it is whole sectors.
fn open_raw(drive_id: &str, path: &PathBuf, read_only: bool) -> Result<File, DeviceError> {
    let mode = if read_only { "read" } else { "read and write" };
    let failed = |source| DeviceError::OpenDrive {
        drive_id: drive_id.to_owned(),
        path: path.clone(),
        mode,
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(failed)?;
    let len = file.metadata().map_err(failed)?.len();
    if len == 0 || !len.is_multiple_of(SECTOR) {
        return Err(DeviceError::DriveSize {
            drive_id: drive_id.to_owned(),
            path: path.clone(),
            len,
        });
    }
    Ok(file)
}
