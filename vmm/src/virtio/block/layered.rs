//! A layered disk: the base is a snapshot header of the layer store, read
//! through [`wrenn_layers::Reader`] and never written; the guest's writes
//! go to an overlay, a sparse file the size of the device at the same
//! offsets.
//!
//! The overlay holds whole blocks of the header's block size (64 KiB for
//! disks): the first write to a block that does not cover all of it reads
//! the block from the base, patches it and writes it whole. So a block is
//! either all in the overlay, current, or all in the base, and the list of
//! written blocks is exactly the dirty list that
//! `LayerStore::snapshot_file(overlay, block_size, Some(base), Some(list))`
//! needs to snapshot the disk as a child of its base.
//!
//! A flush fsyncs the overlay, then replaces the list file beside it (see
//! [`wrenn_layers::WrittenBlocks`]): what the guest flushed survives a
//! crash; blocks first written after the last flush are not listed and
//! read from the base again, as if the writes never happened.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use wrenn_layers::{list_path, Reader, WrittenBlocks};

use super::disk::LayeredSource;
use super::SECTOR;
use crate::virtio::DeviceError;

/// An open layered disk.
pub(crate) struct LayeredDisk {
    base: Reader,
    /// `None` for a read-only disk whose overlay does not exist.
    overlay: Option<File>,
    overlay_path: PathBuf,
    list_path: PathBuf,
    block_size: u64,
    size: u64,
    /// One bit per block: set when the overlay holds it.
    written: Vec<u64>,
    /// Whether blocks were added since the list file was last written.
    list_stale: bool,
    /// One block, for read-modify-write.
    scratch: Vec<u8>,
}

impl LayeredDisk {
    /// Opens the base and the overlay (creating it, sized to the device,
    /// unless the drive is read-only). The written blocks are
    /// `overlay_blocks` on a restore, else the list file beside the
    /// overlay, else none.
    pub(crate) fn open(
        drive_id: &str,
        source: &LayeredSource,
        read_only: bool,
        overlay_blocks: Option<(u32, &[u64])>,
    ) -> Result<LayeredDisk, DeviceError> {
        let base_error = |source| DeviceError::LayeredBase {
            drive_id: drive_id.to_owned(),
            source,
        };
        let base = Reader::open(&source.header, &source.layers_dir).map_err(base_error)?;
        let size = base.size();
        let block_size = base.header().block_size();
        if !size.is_multiple_of(SECTOR) {
            return Err(DeviceError::DriveSize {
                drive_id: drive_id.to_owned(),
                path: source.header.clone(),
                len: size,
            });
        }
        let overlay_error = |problem: String| DeviceError::Overlay {
            drive_id: drive_id.to_owned(),
            path: source.overlay.clone(),
            problem,
        };
        let overlay = open_overlay(&source.overlay, read_only, size).map_err(overlay_error)?;
        let list_path = list_path(&source.overlay);
        let blocks = match overlay_blocks {
            Some((saved, _)) if saved != block_size => {
                return Err(overlay_error(format!(
                    "the snapshot counts its blocks in {saved} bytes but the base header {} \
                     has blocks of {block_size}: restore onto the base it was taken from",
                    source.header.display()
                )))
            }
            Some((_, blocks)) => blocks.to_vec(),
            None => match WrittenBlocks::load(&list_path).map_err(base_error)? {
                Some(list) if list.block_size != block_size || list.device_size != size => {
                    return Err(overlay_error(format!(
                        "its list {} was written for a device of {} bytes in blocks of {}, but \
                         the base is {size} bytes in blocks of {block_size}: give the overlay \
                         made from this base, or a new overlay path",
                        list_path.display(),
                        list.device_size,
                        list.block_size
                    )))
                }
                Some(list) => list.blocks,
                None => Vec::new(),
            },
        };
        if !blocks.is_empty() && overlay.is_none() {
            return Err(overlay_error(
                "is missing but its list names written blocks".into(),
            ));
        }
        let count = size.div_ceil(u64::from(block_size));
        if let Some(bad) = blocks.iter().find(|&&b| b >= count) {
            return Err(overlay_error(format!(
                "its written block {bad} is past the device's {count} blocks"
            )));
        }
        let mut disk = LayeredDisk {
            base,
            overlay,
            overlay_path: source.overlay.clone(),
            list_path,
            block_size: u64::from(block_size),
            size,
            written: vec![0; count.div_ceil(64) as usize],
            list_stale: false,
            scratch: Vec::new(),
        };
        for block in blocks {
            disk.mark(block);
        }
        // A restore starts from the snapshot's list: make the file say so.
        if overlay_blocks.is_some() && !read_only {
            disk.list_stale = true;
            disk.save_list().map_err(|e| overlay_error(e.to_string()))?;
        }
        Ok(disk)
    }

    /// Bytes of the device.
    pub(crate) fn len(&self) -> u64 {
        self.size
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    /// The blocks the overlay holds, ascending.
    pub(crate) fn written(&self) -> Vec<u64> {
        let mut blocks = Vec::new();
        for (i, &word) in self.written.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                blocks.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        blocks
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&mut self, block: u64) {
        self.written[(block / 64) as usize] |= 1 << (block % 64);
    }

    /// Fills `buf` from `offset`: runs of written blocks from the overlay,
    /// the others from the base.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = self.check_range(offset, buf.len())?;
        let mut at = offset;
        while at < end {
            let block = at / self.block_size;
            let in_overlay = self.is_written(block);
            let mut next = block + 1;
            while next * self.block_size < end && self.is_written(next) == in_overlay {
                next += 1;
            }
            let to = (next * self.block_size).min(end);
            let dst = &mut buf[(at - offset) as usize..(to - offset) as usize];
            match (&self.overlay, in_overlay) {
                (Some(overlay), true) => overlay.read_exact_at(dst, at)?,
                _ => self.base.read_at(dst, at).map_err(io::Error::other)?,
            }
            at = to;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the overlay, completing blocks seen for
    /// the first time from the base.
    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.check_range(offset, buf.len())?;
        let Some(overlay) = self.overlay.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the drive is read-only",
            ));
        };
        let mut at = offset;
        while at < end {
            let block = at / self.block_size;
            let start = block * self.block_size;
            let stop = (start + self.block_size).min(self.size);
            let to = stop.min(end);
            let piece = &buf[(at - offset) as usize..(to - offset) as usize];
            if self.is_written(block) || (at == start && to == stop) {
                overlay.write_all_at(piece, at)?;
            } else {
                self.scratch.resize((stop - start) as usize, 0);
                self.base
                    .read_at(&mut self.scratch, start)
                    .map_err(io::Error::other)?;
                self.scratch[(at - start) as usize..(to - start) as usize].copy_from_slice(piece);
                overlay.write_all_at(&self.scratch, start)?;
            }
            if !self.is_written(block) {
                self.written[(block / 64) as usize] |= 1 << (block % 64);
                self.list_stale = true;
            }
            at = to;
        }
        Ok(())
    }

    /// Makes the overlay durable, then the list of its blocks.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if let Some(overlay) = &self.overlay {
            overlay.sync_data()?;
        }
        self.save_list()
    }

    /// Replaces the list file when blocks were added since it was written.
    fn save_list(&mut self) -> io::Result<()> {
        if !self.list_stale {
            return Ok(());
        }
        let list = WrittenBlocks {
            block_size: self.block_size as u32,
            device_size: self.size,
            blocks: self.written(),
        };
        list.save(&self.list_path).map_err(io::Error::other)?;
        self.list_stale = false;
        Ok(())
    }

    /// The end of `len` bytes at `offset`, if inside the device.
    fn check_range(&self, offset: u64, len: usize) -> io::Result<u64> {
        offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} are past the end of {} ({} bytes)",
                        self.overlay_path.display(),
                        self.size
                    ),
                )
            })
    }
}

/// Opens the overlay; a writable one is created and sized to the device
/// when missing or empty. `Err` says what is wrong.
fn open_overlay(path: &PathBuf, read_only: bool, size: u64) -> Result<Option<File>, String> {
    let opened = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .create(!read_only)
        .truncate(false)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if read_only && e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot be opened ({e}); give a path in a folder the VMM may write to"
            ))
        }
    };
    let len = file
        .metadata()
        .map_err(|e| format!("cannot be measured ({e})"))?
        .len();
    if len == 0 && !read_only {
        file.set_len(size)
            .map_err(|e| format!("cannot be sized to {size} bytes ({e})"))?;
    } else if len != size {
        return Err(format!(
            "is {len} bytes but the base is {size} bytes: give the overlay made from this base, \
             or a new overlay path"
        ));
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use wrenn_layers::{Extent, Header, LayerId, LayerRef, Source};

    use super::*;

    const BS: u64 = 64 << 10;
    /// 3.5 blocks: the last block is partial.
    const SIZE: u64 = 3 * BS + BS / 2;

    /// A base of blocks 0 and 2..3.5 from one layer (block 1 zero), each
    /// byte a function of its device offset; returns the source and the
    /// device's bytes.
    fn base(dir: &Path) -> (LayeredSource, Vec<u8>) {
        let byte = |i: u64| (i % 251) as u8 + 1;
        let mut device: Vec<u8> = (0..SIZE).map(byte).collect();
        device[BS as usize..2 * BS as usize].fill(0);
        let mut layer = device[..BS as usize].to_vec();
        layer.extend_from_slice(&device[2 * BS as usize..]);
        layer.resize(3 * BS as usize, 0);
        let id = LayerId::of(&layer);
        let layers_dir = dir.join("layers");
        fs::create_dir(&layers_dir).unwrap();
        fs::write(layers_dir.join(id.to_string()), &layer).unwrap();
        let extent = |start, len, source| Extent { start, len, source };
        let header = Header::from_parts(
            SIZE,
            BS as u32,
            1,
            None,
            vec![LayerRef { id, blocks: 3 }],
            vec![
                extent(
                    0,
                    1,
                    Source::Layer {
                        layer: 0,
                        first_block: 0,
                    },
                ),
                extent(1, 1, Source::Zero),
                extent(
                    2,
                    2,
                    Source::Layer {
                        layer: 0,
                        first_block: 1,
                    },
                ),
            ],
        )
        .unwrap();
        let header_path = dir.join("base.header");
        fs::write(&header_path, header.encode().unwrap()).unwrap();
        let source = LayeredSource {
            header: header_path,
            layers_dir,
            overlay: dir.join("disk.overlay"),
        };
        (source, device)
    }

    fn read_all(disk: &LayeredDisk) -> Vec<u8> {
        let mut out = vec![0u8; SIZE as usize];
        disk.read_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn an_unwritten_disk_reads_as_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let (source, device) = base(dir.path());
        let disk = LayeredDisk::open("d", &source, false, None).unwrap();
        assert_eq!(disk.len(), SIZE);
        assert_eq!(read_all(&disk), device);
        assert_eq!(fs::metadata(&source.overlay).unwrap().len(), SIZE);
        let mut odd = vec![0u8; 1000];
        disk.read_at(&mut odd, BS - 300).unwrap();
        assert_eq!(odd, device[(BS - 300) as usize..(BS + 700) as usize]);
    }

    #[test]
    fn a_partial_write_puts_the_whole_block_in_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (source, mut device) = base(dir.path());
        let layer = fs::read_dir(&source.layers_dir).unwrap().next().unwrap();
        let layer_before = fs::read(layer.unwrap().path()).unwrap();
        let mut disk = LayeredDisk::open("d", &source, false, None).unwrap();

        // One sector in the middle of block 2, one across blocks 0 and 1,
        // and the partial last block.
        let writes: [(u64, usize); 3] = [(2 * BS + 4096, 512), (BS - 512, 1024), (3 * BS, 512)];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            let data = vec![0xa0 + i as u8; len];
            disk.write_at(&data, offset).unwrap();
            device[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        assert_eq!(read_all(&disk), device);
        assert_eq!(disk.written(), [0, 1, 2, 3]);

        // Each written block is whole in the overlay: base bytes around the
        // write, at the device's offsets.
        let overlay = fs::read(&source.overlay).unwrap();
        assert_eq!(overlay, device);
        let layer = fs::read_dir(&source.layers_dir).unwrap().next().unwrap();
        assert_eq!(fs::read(layer.unwrap().path()).unwrap(), layer_before);

        // A second write to a written block goes straight to the overlay.
        disk.write_at(&[7; 512], 2 * BS).unwrap();
        device[2 * BS as usize..2 * BS as usize + 512].fill(7);
        assert_eq!(read_all(&disk), device);
    }

    #[test]
    fn a_flush_lists_the_written_blocks_and_unflushed_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (source, device) = base(dir.path());
        let list = list_path(&source.overlay);
        let mut disk = LayeredDisk::open("d", &source, false, None).unwrap();
        disk.write_at(&[1; 512], 2 * BS).unwrap();
        disk.flush().unwrap();
        let saved = WrittenBlocks::load(&list).unwrap().unwrap();
        assert_eq!(saved.blocks, [2]);
        assert_eq!((saved.block_size, saved.device_size), (BS as u32, SIZE));

        // Written after the flush, then the process dies: block 0 is not
        // listed, so it reads from the base again; block 2 kept its write.
        disk.write_at(&[9; 512], 0).unwrap();
        drop(disk);
        let disk = LayeredDisk::open("d", &source, false, None).unwrap();
        let mut expected = device.clone();
        expected[2 * BS as usize..2 * BS as usize + 512].fill(1);
        assert_eq!(read_all(&disk), expected);
        assert_eq!(disk.written(), [2]);
    }

    #[test]
    fn a_restore_starts_from_the_saved_blocks_and_rewrites_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let (source, _) = base(dir.path());
        let mut disk = LayeredDisk::open("d", &source, false, None).unwrap();
        disk.write_at(&[5; 512], BS).unwrap();
        let saved = disk.written();
        drop(disk);
        let disk = LayeredDisk::open("d", &source, false, Some((BS as u32, &saved))).unwrap();
        let mut sector = [0u8; 512];
        disk.read_at(&mut sector, BS).unwrap();
        assert_eq!(sector, [5; 512]);
        let list = WrittenBlocks::load(&list_path(&source.overlay)).unwrap();
        assert_eq!(list.unwrap().blocks, [1]);

        let err = LayeredDisk::open("d", &source, false, Some((4096, &saved)))
            .err()
            .unwrap();
        assert!(err.to_string().contains("restore onto the base"), "{err}");
    }

    #[test]
    fn a_read_only_disk_needs_no_overlay_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (source, device) = base(dir.path());
        let mut disk = LayeredDisk::open("d", &source, true, None).unwrap();
        assert!(!source.overlay.exists());
        assert_eq!(read_all(&disk), device);
        assert!(disk.write_at(&[0; 512], 0).is_err());
        assert!(disk.read_at(&mut [0; 512], SIZE).is_err());
    }

    #[test]
    fn bad_bases_and_overlays_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (source, _) = base(dir.path());
        fs::write(&source.overlay, [0; 512]).unwrap();
        let err = LayeredDisk::open("d", &source, false, None).err().unwrap();
        assert!(err.to_string().contains("new overlay path"), "{err}");

        let missing = LayeredSource {
            header: dir.path().join("nope"),
            ..source.clone()
        };
        let err = LayeredDisk::open("d", &missing, false, None).err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("nope") && msg.contains("header_path must be"),
            "{msg}"
        );

        let mut bytes = fs::read(&source.header).unwrap();
        bytes[3] ^= 1;
        fs::write(&source.header, bytes).unwrap();
        let err = LayeredDisk::open("d", &source, false, None).err().unwrap();
        assert!(err.to_string().contains("is damaged"), "{err}");
    }
}
