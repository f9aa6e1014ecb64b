//! Prefetch lists: the memory pages a VM touched first after a restore,
//! recorded by the page server and kept in a small file, so that the next
//! restore of the same snapshot can place them before the guest asks.
//!
//! `<state dir>/prefetch/<header id>`:
//!
//! ```text
//! byte 0          format version, 1
//! bytes 1..n-4    device block indices, u64 little-endian each, in the order
//!                 they first faulted
//! bytes n-4..n    CRC-32C (Castagnoli) of bytes 0..n-4, little-endian
//! ```
//!
//! Written under a temporary name, fsynced, renamed, folder fsynced. When
//! to record and when to save is the caller's choice; this file only keeps
//! lists.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::store::HeaderId;

use super::error::{Error, Result};

/// The prefetch file format this program writes and reads.
pub const PREFETCH_VERSION: u8 = 1;
/// The most pages a list holds (1 GiB of memory); later faults are not
/// recorded, longer files are refused.
pub const MAX_PREFETCH: usize = 1 << 18;
/// Bytes of the CRC-32C at the end of a file.
const CHECKSUM_LEN: usize = 4;

/// `<state dir>/prefetch/<header id>`.
pub fn prefetch_path(state_dir: &Path, header: &HeaderId) -> PathBuf {
    state_dir.join("prefetch").join(header.to_string())
}

/// Writes `blocks` as the prefetch list of `header` (replacing any older
/// one) and returns the file's path.
pub fn save_prefetch(state_dir: &Path, header: &HeaderId, blocks: &[u64]) -> Result<PathBuf> {
    let path = prefetch_path(state_dir, header);
    let dir = state_dir.join("prefetch");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_error("create the folder", &dir))?;
    let temp = dir.join(temp_name());
    let result = write_synced(&temp, &encode(blocks))
        .and_then(|()| fs::rename(&temp, &path).map_err(io_error("rename into place", &temp)))
        .and_then(|()| {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("fsync the folder", &dir))
        });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| path)
}

/// Reads the prefetch list of `header`; `None` when there is none.
pub fn load_prefetch(state_dir: &Path, header: &HeaderId) -> Result<Option<Vec<u64>>> {
    let path = prefetch_path(state_dir, header);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", &path)(e)),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| Error::PrefetchCorrupt { path, reason })
}

/// The bytes of a prefetch file.
pub(crate) fn encode(blocks: &[u64]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + blocks.len() * 8 + CHECKSUM_LEN);
    bytes.push(PREFETCH_VERSION);
    for block in blocks {
        bytes.extend_from_slice(&block.to_le_bytes());
    }
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

/// The list in a prefetch file, or what is wrong with it.
pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Vec<u64>, String> {
    let Some((&version, _)) = bytes.split_first() else {
        return Err("it is empty".to_owned());
    };
    if version != PREFETCH_VERSION {
        return Err(format!(
            "format version {version}, but this wrenn-agent knows {PREFETCH_VERSION}"
        ));
    }
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
        return Err(format!("{} bytes is too short", bytes.len()));
    };
    let (body, stored) = bytes.split_at(body_len);
    let mut sum = [0u8; CHECKSUM_LEN];
    sum.copy_from_slice(stored);
    let (stored, computed) = (u32::from_le_bytes(sum), crc32c::crc32c(body));
    if stored != computed {
        return Err(format!(
            "its checksum says {stored:08x} but its content sums to {computed:08x}"
        ));
    }
    let list = &body[1..];
    if list.len() % 8 != 0 {
        return Err(format!(
            "{} bytes of blocks is not a multiple of 8",
            list.len()
        ));
    }
    if list.len() / 8 > MAX_PREFETCH {
        return Err(format!(
            "{} pages is more than the {MAX_PREFETCH} a list holds",
            list.len() / 8
        ));
    }
    Ok(list
        .chunks_exact(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect())
}

/// Pages faulted while a window is open, each once, in fault order.
#[derive(Debug)]
pub(crate) struct Recorder {
    until: Instant,
    seen: HashSet<u64>,
    blocks: Vec<u64>,
}

impl Recorder {
    /// A recorder whose window closes at `until`.
    pub(crate) fn new(until: Instant) -> Recorder {
        Recorder {
            until,
            seen: HashSet::new(),
            blocks: Vec::new(),
        }
    }

    /// Whether faults at `now` are still recorded.
    pub(crate) fn is_open(&self, now: Instant) -> bool {
        now < self.until && self.blocks.len() < MAX_PREFETCH
    }

    /// Records a fault on device block `block`.
    pub(crate) fn push(&mut self, block: u64) {
        if self.seen.insert(block) {
            self.blocks.push(block);
        }
    }

    /// The pages recorded so far.
    pub(crate) fn blocks(&self) -> &[u64] {
        &self.blocks
    }
}

/// Writes and fsyncs a new file, readable only by its owner.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("fsync", path))
}

/// A fresh temporary name in this process.
fn temp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(".tmp-{}-{n}", std::process::id())
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::PrefetchIo {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_and_the_bytes_are_pinned() {
        let bytes = encode(&[1, 0x0102_0304_0506_0708]);
        assert_eq!(bytes.len(), 1 + 16 + 4);
        assert_eq!(&bytes[..9], &[1, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[9..17], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(decode(&bytes).unwrap(), vec![1, 0x0102_0304_0506_0708]);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = encode(&[3, 5, 8]);
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged).is_err(), "byte {at}");
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&bytes[..3]).is_err());
    }

    #[test]
    fn the_recorder_keeps_first_faults_in_order() {
        let mut recorder = Recorder::new(Instant::now() + std::time::Duration::from_secs(60));
        for block in [7, 3, 7, 9, 3] {
            recorder.push(block);
        }
        assert_eq!(recorder.blocks(), &[7, 3, 9]);
        assert!(recorder.is_open(Instant::now()));
        assert!(!Recorder::new(Instant::now()).is_open(Instant::now()));
    }
}
