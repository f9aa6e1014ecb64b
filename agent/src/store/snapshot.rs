//! Taking a snapshot of a device file: find the blocks that differ from the
//! parent (or from zero), store the non-zero ones in one new layer, merge.
//!
//! Without a dirty list the whole device is compared, but holes found with
//! `SEEK_DATA`/`SEEK_HOLE` are never read: a hole is zero, which only
//! matters where the parent has data. With a dirty list only those blocks
//! are read; all others keep the parent's mapping.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::error::{Error, Result};
use super::io::Op;
use super::layer::{LayerWriter, OP_BYTES};
use super::merge::{merge, Diff, Parent};
use super::LayerStore;
use wrenn_layers::{check_block_size, Header, Source};

/// Bytes of the device read per batch.
const WINDOW_BYTES: usize = 8 << 20;
/// Zeros to compare blocks with.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Whether every byte of `bytes` is zero.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(ZEROS.len())
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

impl LayerStore {
    /// Snapshots the device file `device` in blocks of `block_size`.
    ///
    /// Without `dirty`, every block is compared with what `parent` resolves
    /// to (zero without a parent) and only the changed, non-zero blocks are
    /// written, to one new layer. With `dirty` (block indices, any order),
    /// only those blocks are read and stored; the rest inherit from the
    /// parent. Blocks that are zero become zero extents, never layer data.
    ///
    /// The new layer is protected from garbage collection until
    /// [`settle`](LayerStore::settle): retain the header, commit, settle.
    pub fn snapshot_file(
        &self,
        device: &Path,
        block_size: u32,
        parent: Option<&Header>,
        dirty: Option<&[u64]>,
    ) -> Result<Header> {
        check_block_size(block_size)?;
        let file = File::open(device).map_err(Error::io("open the device", device))?;
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(Error::io("measure the device", device))?;
        check_parent(device, size, block_size, parent)?;
        let mut scan = Scan::new(self, &file, device, size, block_size, parent);
        match dirty {
            Some(blocks) => scan.dirty(blocks)?,
            None => scan.full()?,
        }
        let Scan { diff, writer, .. } = scan;
        let layer = writer.finish()?;
        let parent = match parent {
            Some(header) => Some(Parent {
                header,
                id: header.id()?,
            }),
            None => None,
        };
        merge(parent, size, block_size, &diff, layer)
    }
}

/// Refuses a parent of another device geometry.
fn check_parent(device: &Path, size: u64, block_size: u32, parent: Option<&Header>) -> Result<()> {
    match parent {
        Some(p) if p.device_size() != size || p.block_size() != block_size => {
            Err(Error::ParentMismatch {
                path: device.to_owned(),
                size,
                block_size,
                parent_size: p.device_size(),
                parent_block_size: p.block_size(),
            })
        }
        _ => Ok(()),
    }
}

/// One snapshot in progress.
struct Scan<'a> {
    store: &'a LayerStore,
    file: &'a File,
    path: &'a Path,
    size: u64,
    bs: usize,
    blocks: u64,
    parent: Option<&'a Header>,
    diff: Diff,
    writer: LayerWriter<'a>,
    device_buf: Vec<u8>,
    parent_buf: Vec<u8>,
}

impl<'a> Scan<'a> {
    fn new(
        store: &'a LayerStore,
        file: &'a File,
        path: &'a Path,
        size: u64,
        block_size: u32,
        parent: Option<&'a Header>,
    ) -> Scan<'a> {
        let bs = block_size as usize;
        let window = WINDOW_BYTES.max(bs);
        Scan {
            store,
            file,
            path,
            size,
            bs,
            blocks: size.div_ceil(u64::from(block_size)),
            parent,
            diff: Diff::new(),
            writer: store.layer_writer(block_size),
            device_buf: vec![0; window],
            parent_buf: if parent.is_some() {
                vec![0; window]
            } else {
                Vec::new()
            },
        }
    }

    /// Blocks per read window.
    fn window_blocks(&self) -> u64 {
        (self.device_buf.len() / self.bs) as u64
    }

    /// Compares every block; holes are not read.
    fn full(&mut self) -> Result<()> {
        let segments = data_segments(self.file, self.path, self.size, self.bs as u64)?;
        let mut at = 0;
        for segment in segments {
            self.hole(at..segment.start);
            self.data(segment.clone())?;
            at = segment.end;
        }
        self.hole(at..self.blocks);
        Ok(())
    }

    /// Blocks in a hole of the device are zero: a change only where the
    /// parent has layer data.
    fn hole(&mut self, range: Range<u64>) {
        let Some(parent) = self.parent else { return };
        if range.is_empty() {
            return;
        }
        let first = parent.extents().partition_point(|e| e.end() <= range.start);
        for extent in parent.extents()[first..]
            .iter()
            .take_while(|e| e.start < range.end)
        {
            if let Source::Layer { .. } = extent.source {
                let from = extent.start.max(range.start);
                let to = extent.end().min(range.end);
                self.diff.zero(from, to - from);
            }
        }
    }

    /// Reads blocks with data window by window and compares each.
    fn data(&mut self, range: Range<u64>) -> Result<()> {
        let step = self.window_blocks();
        let mut start = range.start;
        while start < range.end {
            let end = (start + step).min(range.end);
            self.read_device(&[(start, end - start)])?;
            if let Some(parent) = self.parent {
                let bytes = ((end - start) as usize) * self.bs;
                self.store
                    .read_range(parent, start..end, &mut self.parent_buf[..bytes])?;
            }
            for block in start..end {
                self.compare(block, ((block - start) as usize) * self.bs)?;
            }
            start = end;
        }
        Ok(())
    }

    /// Records block `block`, read at `at` in the buffers, if it changed.
    fn compare(&mut self, block: u64, at: usize) -> Result<()> {
        let now = &self.device_buf[at..at + self.bs];
        let zero = is_zero(now);
        let unchanged = match self.parent {
            Some(_) => now == &self.parent_buf[at..at + self.bs],
            None => zero,
        };
        if unchanged {
            return Ok(());
        }
        self.record(block, at, zero)
    }

    /// Adds block `block` (at `at` in the device buffer) to the diff.
    fn record(&mut self, block: u64, at: usize, zero: bool) -> Result<()> {
        if zero {
            self.diff.zero(block, 1);
            return Ok(());
        }
        self.writer.append(&self.device_buf[at..at + self.bs])?;
        self.diff.data(block);
        Ok(())
    }

    /// Reads only the blocks listed.
    fn dirty(&mut self, blocks: &[u64]) -> Result<()> {
        let mut blocks = blocks.to_vec();
        blocks.sort_unstable();
        blocks.dedup();
        if let Some(&last) = blocks.last().filter(|&&b| b >= self.blocks) {
            return Err(Error::BlockOutOfRange {
                block: last,
                blocks: self.blocks,
            });
        }
        let per_window = self.window_blocks() as usize;
        for chunk in blocks.chunks(per_window) {
            self.read_device(&runs(chunk))?;
            for (slot, &block) in chunk.iter().enumerate() {
                let at = slot * self.bs;
                let zero = is_zero(&self.device_buf[at..at + self.bs]);
                self.record(block, at, zero)?;
            }
        }
        Ok(())
    }

    /// Reads runs of (first block, count) into the device buffer one after
    /// the other. The part of a last, partial block past the end of the
    /// device reads as zero.
    fn read_device(&mut self, runs: &[(u64, u64)]) -> Result<()> {
        let bs = self.bs as u64;
        let mut ops = Vec::new();
        let mut slot = 0usize;
        for &(first, count) in runs {
            let offset = first * bs;
            let bytes = (count * bs).min(self.size - offset) as usize;
            let room = (count * bs) as usize;
            self.device_buf[slot + bytes..slot + room].fill(0);
            for start in (0..bytes).step_by(OP_BYTES) {
                let end = (start + OP_BYTES).min(bytes);
                ops.push(Op {
                    file: self.file,
                    offset: offset + start as u64,
                    range: slot + start..slot + end,
                });
            }
            slot += room;
        }
        self.store
            .io
            .read(&ops, &mut self.device_buf)
            .map_err(|e| Error::io("read the device", self.path)(e.source))
    }
}

/// Sorted, distinct blocks as runs of (first block, count).
fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &block in blocks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == block => *count += 1,
            _ => runs.push((block, 1)),
        }
    }
    runs
}

/// The block ranges of `file` that hold data, sorted and disjoint, from
/// `SEEK_DATA`/`SEEK_HOLE`. A file system or device without them is all
/// data.
fn data_segments(file: &File, path: &Path, size: u64, bs: u64) -> Result<Vec<Range<u64>>> {
    let mut segments: Vec<Range<u64>> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, pos, libc::SEEK_DATA) {
            Ok(start) => start,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                segments.clear();
                add_segment(&mut segments, 0..size.div_ceil(bs));
                return Ok(segments);
            }
            Err(e) => return Err(Error::io("find the data of", path)(e)),
        };
        let end = match seek(file, start, libc::SEEK_HOLE) {
            Ok(end) => end.min(size),
            Err(_) => size,
        };
        add_segment(&mut segments, start / bs..end.div_ceil(bs));
        pos = end.max(start + 1);
    }
    Ok(segments)
}

/// Appends a block range, joining it to the last one when they touch.
fn add_segment(segments: &mut Vec<Range<u64>>, range: Range<u64>) {
    if let Some(last) = segments.last_mut() {
        if range.start <= last.end {
            last.end = last.end.max(range.end);
            return;
        }
    }
    segments.push(range);
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek only reads its arguments; the descriptor is owned by
    // `file`, which is borrowed for the call. Positional I/O elsewhere does
    // not depend on the file position it moves.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    u64::try_from(found).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_consecutive_blocks() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), [(1, 3), (7, 1), (9, 2)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn zero_check_covers_every_byte() {
        let mut block = vec![0u8; 200_000];
        assert!(is_zero(&block));
        block[199_999] = 1;
        assert!(!is_zero(&block));
    }

    #[test]
    fn segments_that_touch_are_joined() {
        let mut segments = Vec::new();
        add_segment(&mut segments, 0..2);
        add_segment(&mut segments, 1..3);
        add_segment(&mut segments, 5..6);
        assert_eq!(segments, [0..3, 5..6]);
    }
}
