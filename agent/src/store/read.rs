//! Reading snapshots: blocks for the page server, ranges for comparisons,
//! and whole devices materialized as sparse raw files.
//!
//! Every read goes from a header straight to the layers (one lookup per
//! block, no chain). Zero blocks are filled in memory without I/O; layer
//! blocks are gathered into one batch per call, adjacent blocks of a layer
//! joined into one operation.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::error::{Error, Result};
use super::io::Op;
use super::layer::{read_error, OP_BYTES};
use super::LayerStore;
use wrenn_layers::{Header, Source};

/// Bytes gathered per batch of `materialize`.
const BATCH_BYTES: usize = 8 << 20;

/// A read from a layer file into a buffer.
#[derive(Clone, Debug)]
struct Piece {
    /// Index into the header's layer list.
    layer: u32,
    /// Byte offset in the layer file.
    offset: u64,
    /// Bytes of the buffer.
    dst: Range<usize>,
}

/// The layer reads of one batch.
#[derive(Default)]
struct Plan {
    pieces: Vec<Piece>,
}

impl Plan {
    /// Adds a read, joined to the previous one when both the layer bytes and
    /// the buffer bytes follow on.
    fn push(&mut self, layer: u32, offset: u64, dst: Range<usize>) {
        if let Some(last) = self.pieces.last_mut() {
            let follows = last.layer == layer
                && last.dst.end == dst.start
                && last.offset + last.dst.len() as u64 == offset
                && last.dst.len() + dst.len() <= OP_BYTES;
            if follows {
                last.dst.end = dst.end;
                return;
            }
        }
        self.pieces.push(Piece { layer, offset, dst });
    }

    fn bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.dst.len()).sum()
    }
}

impl LayerStore {
    /// Reads device blocks `blocks` of `header` into `out`, one block after
    /// the other (`out` is `blocks.len() * block_size` bytes). Zero blocks
    /// are filled without I/O. What the userfaultfd page server calls.
    pub fn read_blocks(&self, header: &Header, blocks: &[u64], out: &mut [u8]) -> Result<()> {
        let bs = header.block_size() as usize;
        let expected = blocks.len() * bs;
        if out.len() != expected {
            return Err(Error::BufferSize {
                blocks: blocks.len(),
                block_size: header.block_size(),
                expected,
                actual: out.len(),
            });
        }
        let mut plan = Plan::default();
        for (slot, &block) in blocks.iter().enumerate() {
            let extent = header.extent_of(block).ok_or(Error::BlockOutOfRange {
                block,
                blocks: header.block_count(),
            })?;
            let dst = slot * bs..(slot + 1) * bs;
            match extent.source {
                Source::Zero => out[dst].fill(0),
                Source::Layer { layer, first_block } => {
                    let offset = (first_block + (block - extent.start)) * bs as u64;
                    plan.push(layer, offset, dst);
                }
            }
        }
        self.run_plan(header, &plan, out)
    }

    /// Reads device blocks `range` of `header` into `out`
    /// (`range.len() * block_size` bytes).
    pub(crate) fn read_range(
        &self,
        header: &Header,
        range: Range<u64>,
        out: &mut [u8],
    ) -> Result<()> {
        let bs = u64::from(header.block_size());
        let first = header.extents().partition_point(|e| e.end() <= range.start);
        let mut plan = Plan::default();
        for extent in header.extents()[first..]
            .iter()
            .take_while(|e| e.start < range.end)
        {
            let from = extent.start.max(range.start);
            let to = extent.end().min(range.end);
            let dst = ((from - range.start) * bs) as usize..((to - range.start) * bs) as usize;
            match extent.source {
                Source::Zero => out[dst].fill(0),
                Source::Layer { layer, first_block } => {
                    let base = (first_block + from - extent.start) * bs;
                    for part in split(dst.clone()) {
                        plan.push(layer, base + (part.start - dst.start) as u64, part);
                    }
                }
            }
        }
        self.run_plan(header, &plan, out)
    }

    /// Runs the reads of `plan` into `out` in one batch.
    fn run_plan(&self, header: &Header, plan: &Plan, out: &mut [u8]) -> Result<()> {
        let files = self.plan_files(header, plan)?;
        let ops: Vec<Op<'_>> = plan
            .pieces
            .iter()
            .zip(&files)
            .map(|(p, file)| Op {
                file,
                offset: p.offset,
                range: p.dst.clone(),
            })
            .collect();
        self.io.read(&ops, out).map_err(|e| {
            let layer = plan.pieces[e.op].layer;
            read_error(self.layer_path(&header.layer(layer).id))(e.source)
        })
    }

    /// The open layer file of every piece of `plan`.
    fn plan_files(&self, header: &Header, plan: &Plan) -> Result<Vec<Arc<File>>> {
        let mut opened: Vec<Option<Arc<File>>> = vec![None; header.layers().len()];
        let mut files = Vec::with_capacity(plan.pieces.len());
        for piece in &plan.pieces {
            let slot = &mut opened[piece.layer as usize];
            let file = match slot {
                Some(file) => Arc::clone(file),
                None => {
                    let file = self.open_layer(&header.layer(piece.layer).id)?;
                    *slot = Some(Arc::clone(&file));
                    file
                }
            };
            files.push(file);
        }
        Ok(files)
    }

    /// Writes the device `header` describes to `out` as a sparse raw file:
    /// created or truncated, sized, layer extents written, zero extents
    /// left as holes, then fsynced.
    pub fn materialize(&self, header: &Header, out: &Path) -> Result<()> {
        self.materialize_with(header, out, true)
    }

    /// [`materialize`](LayerStore::materialize), without the fsync when
    /// `sync` is false: for a working copy that can be written again from
    /// the layers after a crash, such as a VM's memory file.
    pub fn materialize_with(&self, header: &Header, out: &Path, sync: bool) -> Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(out)
            .map_err(Error::io("create", out))?;
        file.set_len(header.device_size())
            .map_err(Error::io("size", out))?;
        let mut batch = Batch {
            plan: Plan::default(),
            dst: Vec::new(),
        };
        let mut buf = vec![0u8; BATCH_BYTES];
        for extent in header.extents() {
            let Source::Layer { layer, first_block } = extent.source else {
                continue;
            };
            self.queue_extent(
                header,
                extent.start,
                extent.len,
                layer,
                first_block,
                &mut batch,
                &mut buf,
                &file,
                out,
            )?;
        }
        self.flush_batch(header, &mut batch, &mut buf, &file, out)?;
        if sync {
            file.sync_all().map_err(Error::io("fsync", out))?;
        }
        Ok(())
    }

    /// Adds one layer extent to the batch, flushing whenever it is full.
    #[allow(clippy::too_many_arguments)]
    fn queue_extent(
        &self,
        header: &Header,
        start: u64,
        len: u64,
        layer: u32,
        first_block: u64,
        batch: &mut Batch,
        buf: &mut [u8],
        file: &File,
        out: &Path,
    ) -> Result<()> {
        let bs = u64::from(header.block_size());
        let device_end = header.device_size();
        let mut done = 0u64;
        while done < len {
            let room = (BATCH_BYTES - batch.plan.bytes()) as u64 / bs;
            if room == 0 {
                self.flush_batch(header, batch, buf, file, out)?;
                continue;
            }
            let take = room.min(len - done).min(OP_BYTES as u64 / bs);
            let at = batch.plan.bytes();
            let device_offset = (start + done) * bs;
            let bytes = (take * bs).min(device_end - device_offset) as usize;
            batch.plan.pieces.push(Piece {
                layer,
                offset: (first_block + done) * bs,
                dst: at..at + bytes,
            });
            batch.dst.push(device_offset);
            done += take;
        }
        Ok(())
    }

    /// Reads the batch's layer bytes, writes them to the output, empties it.
    fn flush_batch(
        &self,
        header: &Header,
        batch: &mut Batch,
        buf: &mut [u8],
        file: &File,
        out: &Path,
    ) -> Result<()> {
        if batch.plan.pieces.is_empty() {
            return Ok(());
        }
        self.run_plan(header, &batch.plan, buf)?;
        let writes: Vec<Op<'_>> = batch
            .plan
            .pieces
            .iter()
            .zip(&batch.dst)
            .map(|(p, &offset)| Op {
                file,
                offset,
                range: p.dst.clone(),
            })
            .collect();
        self.io
            .write(&writes, buf)
            .map_err(|e| Error::io("write", out)(e.source))?;
        batch.plan.pieces.clear();
        batch.dst.clear();
        Ok(())
    }
}

/// Layer reads of `materialize` with the device offset each one goes to.
struct Batch {
    plan: Plan,
    dst: Vec<u64>,
}

/// Cuts a buffer range into operations of at most [`OP_BYTES`].
fn split(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range
        .clone()
        .step_by(OP_BYTES)
        .map(move |start| start..(start + OP_BYTES).min(end))
}
