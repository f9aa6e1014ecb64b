//! The list of blocks written into an overlay: the file beside a layered
//! disk's overlay that says which of its blocks hold data (whole, current
//! blocks), so the overlay can be snapshotted as a child of its base with
//! `snapshot_file(overlay, block_size, Some(base), Some(blocks))`.
//!
//! The VMM writes it at every flush, through a temporary file that is
//! fsynced and renamed over the old list, then fsyncs the folder; so the
//! file on disk is always a whole list, the one of the last flush.
//!
//! Format, all little-endian (`docs/layers.md`, "Use by the VMM"):
//!
//! ```text
//! bytes 0..8     magic "wrnblk1\n"
//! bytes 8..12    block size (u32)
//! bytes 12..20   device size in bytes (u64)
//! bytes 20..28   count n (u64)
//! then n u64     block indices, strictly ascending, each below the block count
//! last 4 bytes   CRC-32C of everything before it
//! ```

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header::check_block_size;

/// The first bytes of a written-block list.
const MAGIC: &[u8; 8] = b"wrnblk1\n";
/// Bytes before the indices.
const PREFIX: usize = 28;

/// Which blocks of an overlay hold data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenBlocks {
    /// Bytes per block (the base header's).
    pub block_size: u32,
    /// Bytes of the device.
    pub device_size: u64,
    /// Block indices, ascending, no duplicates.
    pub blocks: Vec<u64>,
}

/// The list file of the overlay `overlay`: the same path with `.blocks`
/// added.
pub fn list_path(overlay: &Path) -> PathBuf {
    let mut name = OsString::from(overlay.as_os_str());
    name.push(".blocks");
    PathBuf::from(name)
}

impl WrittenBlocks {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(PREFIX + 8 * self.blocks.len() + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.block_size.to_le_bytes());
        bytes.extend_from_slice(&self.device_size.to_le_bytes());
        bytes.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for block in &self.blocks {
            bytes.extend_from_slice(&block.to_le_bytes());
        }
        let sum = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        bytes
    }

    /// Decodes and checks a list; `name` is only used in errors.
    pub fn decode(name: &Path, bytes: &[u8]) -> Result<WrittenBlocks> {
        let corrupt = |reason: String| Error::WrittenListCorrupt {
            path: name.to_path_buf(),
            reason,
        };
        if bytes.len() < PREFIX + 4 || &bytes[..8] != MAGIC {
            return Err(corrupt("it does not start with a list header".into()));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]);
        if stored != crc32c::crc32c(body) {
            return Err(corrupt("its checksum does not match".into()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let block_size = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
        check_block_size(block_size)?;
        let device_size = u64_at(12);
        let count = u64_at(20);
        if (body.len() - PREFIX) as u64 != count.saturating_mul(8) {
            return Err(corrupt(format!(
                "it says {count} blocks but holds another number"
            )));
        }
        let total = device_size.div_ceil(u64::from(block_size));
        let blocks: Vec<u64> = (0..count as usize)
            .map(|i| u64_at(PREFIX + 8 * i))
            .collect();
        let ascending = blocks.windows(2).all(|w| w[0] < w[1]);
        if !ascending || blocks.last().is_some_and(|&last| last >= total) {
            return Err(corrupt(format!(
                "its blocks are not ascending indices below {total}"
            )));
        }
        Ok(WrittenBlocks {
            block_size,
            device_size,
            blocks,
        })
    }

    /// Reads the list at `path`; `None` when there is no file.
    pub fn load(path: &Path) -> Result<Option<WrittenBlocks>> {
        match fs::read(path) {
            Ok(bytes) => WrittenBlocks::decode(path, &bytes).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read the written-block list", path)(e)),
        }
    }

    /// Replaces the list at `path` durably: a temporary file beside it is
    /// written and fsynced, renamed over `path`, and the folder fsynced.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut temp = OsString::from(path.as_os_str());
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(Error::io("create", &temp))?;
        file.write_all(&self.encode())
            .and_then(|()| file.sync_all())
            .map_err(Error::io("write", &temp))?;
        drop(file);
        fs::rename(&temp, path).map_err(Error::io("rename the written-block list to", path))?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("fsync the folder", dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WrittenBlocks {
        WrittenBlocks {
            block_size: 65536,
            device_size: 10 << 20,
            blocks: vec![0, 3, 159],
        }
    }

    #[test]
    fn a_list_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = list_path(&dir.path().join("disk.overlay"));
        assert!(path.ends_with("disk.overlay.blocks"));
        assert_eq!(WrittenBlocks::load(&path).unwrap(), None);
        sample().save(&path).unwrap();
        assert_eq!(WrittenBlocks::load(&path).unwrap(), Some(sample()));
        let empty = WrittenBlocks {
            blocks: vec![],
            ..sample()
        };
        empty.save(&path).unwrap();
        assert_eq!(WrittenBlocks::load(&path).unwrap(), Some(empty));
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x04;
            assert!(
                WrittenBlocks::decode(Path::new("l"), &bad).is_err(),
                "byte {i}"
            );
        }
        for len in 0..bytes.len() {
            assert!(WrittenBlocks::decode(Path::new("l"), &bytes[..len]).is_err());
        }
    }

    #[test]
    fn blocks_past_the_device_are_refused() {
        let list = WrittenBlocks {
            blocks: vec![160],
            ..sample()
        };
        let err = WrittenBlocks::decode(Path::new("l"), &list.encode()).unwrap_err();
        assert!(err.to_string().contains("below 160"), "{err}");
    }
}
