//! Building a child header from its parent's mapping and a diff.
//!
//! The diff lists, in block order, the blocks that became zero and the
//! blocks whose new content was appended to one new layer. The child's
//! mapping is the parent's with the diff laid over it, so every block
//! already points to its final source: reading never walks a chain.
//!
//! The result is canonical: adjacent extents that continue each other are
//! joined and layers are listed in order of first use, each once, and only
//! if used. Two ways to the same mapping therefore give the same bytes and
//! the same header id.

use std::collections::HashMap;

use wrenn_layers::LayerId;

use super::error::{Error, Result};
use super::FormatError;
use wrenn_layers::{Extent, Header, HeaderId, LayerRef, Source};

/// What the diff says about a run of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// They are zero now.
    Zero,
    /// They are the new layer's blocks from `first` on.
    Data { first: u64 },
}

/// A run of changed blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    change: Change,
}

impl Run {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The changed blocks of a snapshot, added in increasing block order.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    runs: Vec<Run>,
    data_blocks: u64,
}

impl Diff {
    /// An empty diff.
    pub(crate) fn new() -> Diff {
        Diff::default()
    }

    /// Number of blocks appended to the new layer so far.
    pub(crate) fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Blocks `start..start + len` are zero now.
    pub(crate) fn zero(&mut self, start: u64, len: u64) {
        if len > 0 {
            self.push(Run {
                start,
                len,
                change: Change::Zero,
            });
        }
    }

    /// Block `block` is the next block of the new layer.
    pub(crate) fn data(&mut self, block: u64) {
        let first = self.data_blocks;
        self.data_blocks += 1;
        self.push(Run {
            start: block,
            len: 1,
            change: Change::Data { first },
        });
    }

    fn push(&mut self, run: Run) {
        if let Some(last) = self.runs.last() {
            debug_assert!(last.end() <= run.start, "diff runs out of order");
        }
        if let Some(last) = self.runs.last_mut() {
            if last.end() == run.start && continues(last.change, last.len, run.change) {
                last.len += run.len;
                return;
            }
        }
        self.runs.push(run);
    }
}

/// Whether `next` continues a run of `len` blocks of `prev`.
fn continues(prev: Change, len: u64, next: Change) -> bool {
    match (prev, next) {
        (Change::Zero, Change::Zero) => true,
        (Change::Data { first }, Change::Data { first: next }) => first + len == next,
        _ => false,
    }
}

/// Where a piece of the child's mapping comes from, before layer indices
/// are assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Zero,
    Layer { layer: LayerRef, first_block: u64 },
}

/// Collects pieces in block order, joining those that continue each other
/// and numbering layers by first use.
struct Builder {
    extents: Vec<Extent>,
    layers: Vec<LayerRef>,
    index: HashMap<LayerId, u32>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            extents: Vec::new(),
            layers: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn push(&mut self, start: u64, len: u64, piece: Piece) {
        let source = match piece {
            Piece::Zero => Source::Zero,
            Piece::Layer { layer, first_block } => Source::Layer {
                layer: self.layer_index(layer),
                first_block,
            },
        };
        if let Some(last) = self.extents.last_mut() {
            if last.end() == start && joins(last.source, last.len, source) {
                last.len += len;
                return;
            }
        }
        self.extents.push(Extent { start, len, source });
    }

    fn layer_index(&mut self, layer: LayerRef) -> u32 {
        let next = self.layers.len() as u32;
        *self.index.entry(layer.id).or_insert_with(|| {
            self.layers.push(layer);
            next
        })
    }
}

/// Whether an extent of `source` continues one of `prev` that is `len` long.
fn joins(prev: Source, len: u64, source: Source) -> bool {
    match (prev, source) {
        (Source::Zero, Source::Zero) => true,
        (
            Source::Layer {
                layer: a,
                first_block,
            },
            Source::Layer {
                layer: b,
                first_block: next,
            },
        ) => a == b && first_block + len == next,
        _ => false,
    }
}

/// The parent a child is built from.
pub(crate) struct Parent<'h> {
    pub(crate) header: &'h Header,
    pub(crate) id: HeaderId,
}

/// Builds the child header: the parent's mapping (all zero without one)
/// with `diff` laid over it; data runs point into `new_layer`.
pub(crate) fn merge(
    parent: Option<Parent<'_>>,
    device_size: u64,
    block_size: u32,
    diff: &Diff,
    new_layer: Option<LayerRef>,
) -> Result<Header> {
    let layer_blocks = new_layer.map_or(0, |l| l.blocks);
    if layer_blocks != diff.data_blocks() {
        return Err(Error::Format(FormatError::HeaderCorrupt {
            name: "a newly built header".to_owned(),
            reason: format!(
                "the diff has {} data blocks but the new layer has {layer_blocks}",
                diff.data_blocks()
            ),
        }));
    }
    let blocks = device_size.div_ceil(u64::from(block_size));
    let base = match &parent {
        Some(p) => base_pieces(p.header),
        None => zero_pieces(blocks),
    };
    let mut builder = Builder::new();
    overlay(&base, &diff.runs, new_layer, &mut builder);
    let (generation, parent_id) = match parent {
        Some(p) => (p.header.generation() + 1, Some(p.id)),
        None => (1, None),
    };
    Ok(Header::from_parts(
        device_size,
        block_size,
        generation,
        parent_id,
        builder.layers,
        builder.extents,
    )?)
}

/// A base mapping: start, length and piece of every extent.
type Base = Vec<(u64, u64, Piece)>;

fn zero_pieces(blocks: u64) -> Base {
    if blocks == 0 {
        return Vec::new();
    }
    vec![(0, blocks, Piece::Zero)]
}

fn base_pieces(header: &Header) -> Base {
    let piece = |source| match source {
        Source::Zero => Piece::Zero,
        Source::Layer { layer, first_block } => Piece::Layer {
            layer: *header.layer(layer),
            first_block,
        },
    };
    header
        .extents()
        .iter()
        .map(|e| (e.start, e.len, piece(e.source)))
        .collect()
}

/// `piece` moved `by` blocks into its run.
fn advance(piece: Piece, by: u64) -> Piece {
    match piece {
        Piece::Zero => Piece::Zero,
        Piece::Layer { layer, first_block } => Piece::Layer {
            layer,
            first_block: first_block + by,
        },
    }
}

/// The piece a diff run stands for.
fn run_piece(run: &Run, new_layer: Option<LayerRef>) -> Piece {
    match (run.change, new_layer) {
        (Change::Data { first }, Some(layer)) => Piece::Layer {
            layer,
            first_block: first,
        },
        // `merge` checked that data runs come with a layer.
        _ => Piece::Zero,
    }
}

/// Walks the base and the runs together, both in block order.
fn overlay(base: &Base, runs: &[Run], new_layer: Option<LayerRef>, out: &mut Builder) {
    let mut runs = runs.iter().peekable();
    for &(start, len, piece) in base {
        let end = start + len;
        let mut at = start;
        while at < end {
            // Runs that ended before `at` were already laid down.
            while runs.next_if(|r| r.end() <= at).is_some() {}
            match runs.peek() {
                Some(run) if run.start <= at => {
                    let stop = run.end().min(end);
                    let piece = advance(run_piece(run, new_layer), at - run.start);
                    out.push(at, stop - at, piece);
                    at = stop;
                }
                next => {
                    let stop = next.map_or(end, |r| r.start.min(end));
                    out.push(at, stop - at, advance(piece, at - start));
                    at = stop;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_layers::Block;

    const BS: u32 = 4096;

    fn layer(n: u8, blocks: u64) -> LayerRef {
        LayerRef {
            id: LayerId([n; 32]),
            blocks,
        }
    }

    fn root(blocks: u64, data: &[u64], l: LayerRef) -> Header {
        let mut diff = Diff::new();
        for &b in data {
            diff.data(b);
        }
        merge(None, blocks * u64::from(BS), BS, &diff, Some(l)).unwrap()
    }

    #[test]
    fn a_root_without_changes_is_one_zero_extent() {
        let header = merge(None, 100 * 4096, BS, &Diff::new(), None).unwrap();
        assert_eq!(header.extents().len(), 1);
        assert!(header.layers().is_empty());
        assert_eq!(header.generation(), 1);
    }

    #[test]
    fn consecutive_data_blocks_become_one_extent() {
        let header = root(10, &[2, 3, 4, 7], layer(1, 4));
        // zero 0..2, layer 2..5, zero 5..7, layer 7..8, zero 8..10
        assert_eq!(header.extents().len(), 5);
        assert_eq!(
            header.resolve(4),
            Some(Block::Layer {
                layer: LayerId([1; 32]),
                block: 2
            })
        );
        assert_eq!(
            header.resolve(7),
            Some(Block::Layer {
                layer: LayerId([1; 32]),
                block: 3
            })
        );
    }

    #[test]
    fn a_child_points_every_block_to_its_final_source() {
        let l1 = layer(1, 6);
        let parent = root(8, &[0, 1, 2, 3, 4, 5], l1);
        let pid = parent.id().unwrap();
        // Block 1 becomes zero, blocks 3 and 4 get new data.
        let mut diff = Diff::new();
        diff.zero(1, 1);
        diff.data(3);
        diff.data(4);
        let l2 = layer(2, 2);
        let child = merge(
            Some(Parent {
                header: &parent,
                id: pid,
            }),
            8 * 4096,
            BS,
            &diff,
            Some(l2),
        )
        .unwrap();
        assert_eq!(child.generation(), 2);
        assert_eq!(child.parent(), Some(pid));
        let want = [
            Block::Layer {
                layer: l1.id,
                block: 0,
            },
            Block::Zero,
            Block::Layer {
                layer: l1.id,
                block: 2,
            },
            Block::Layer {
                layer: l2.id,
                block: 0,
            },
            Block::Layer {
                layer: l2.id,
                block: 1,
            },
            Block::Layer {
                layer: l1.id,
                block: 5,
            },
            Block::Zero,
            Block::Zero,
        ];
        for (b, want) in want.iter().enumerate() {
            assert_eq!(child.resolve(b as u64).as_ref(), Some(want), "block {b}");
        }
    }

    #[test]
    fn layers_no_longer_used_are_dropped_and_zeros_coalesce() {
        let parent = root(4, &[1, 2], layer(1, 2));
        let mut diff = Diff::new();
        diff.zero(1, 2);
        let child = merge(
            Some(Parent {
                header: &parent,
                id: parent.id().unwrap(),
            }),
            4 * 4096,
            BS,
            &diff,
            None,
        )
        .unwrap();
        assert!(child.layers().is_empty());
        assert_eq!(
            child.extents(),
            &[Extent {
                start: 0,
                len: 4,
                source: Source::Zero
            }]
        );
    }

    #[test]
    fn a_new_layer_equal_to_an_old_one_is_listed_once() {
        let l1 = layer(1, 1);
        let parent = root(4, &[0], l1);
        let mut diff = Diff::new();
        diff.data(2);
        let child = merge(
            Some(Parent {
                header: &parent,
                id: parent.id().unwrap(),
            }),
            4 * 4096,
            BS,
            &diff,
            Some(l1),
        )
        .unwrap();
        assert_eq!(child.layers(), &[l1]);
    }

    #[test]
    fn a_partial_last_block_counts() {
        let header = merge(None, 4096 * 3 + 1, BS, &Diff::new(), None).unwrap();
        assert_eq!(header.block_count(), 4);
        assert_eq!(header.extents()[0].len, 4);
    }
}
