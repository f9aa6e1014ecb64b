//! Where guest memory lies: the regions of a handover, checked against the
//! snapshot, as a map from the VMM's addresses to device blocks and back.
//!
//! The map follows the VMM's address space as the kernel reports changes
//! (`UFFD_EVENT_UNMAP`, `UFFD_EVENT_REMAP`); it knows nothing of faults or
//! of how pages are placed (`server.rs`).

use std::ops::Range;

use crate::store::{Header, MEMORY_BLOCK_SIZE};

use super::error::{Error, Result};
use super::handover::Region;

/// Bytes of a page, which is one block of a memory snapshot.
pub(crate) const PAGE: u64 = MEMORY_BLOCK_SIZE as u64;

/// Pages of the VMM's address space backed by consecutive device blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// Host address of the first page.
    pub(crate) host: u64,
    /// Device block of the first page.
    pub(crate) block: u64,
    /// Number of pages.
    pub(crate) pages: u64,
}

impl Span {
    /// The host address just past the last page.
    pub(crate) fn end(&self) -> u64 {
        self.host + self.pages * PAGE
    }

    /// Whether `next` starts where this one ends, in host addresses and in
    /// device blocks alike.
    pub(crate) fn followed_by(&self, next: &Span) -> bool {
        next.host == self.end() && next.block == self.block + self.pages
    }
}

/// A range of the VMM's address space backed by consecutive device bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    /// First host address.
    host: u64,
    /// Bytes, a multiple of [`PAGE`].
    len: u64,
    /// Device byte at `host`.
    offset: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.host + self.len
    }
}

/// The VMM's guest memory, sorted by host address, no two pieces
/// overlapping in host addresses or in device offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pieces: Vec<Piece>,
}

impl Layout {
    /// Checks `regions` against the snapshot `header` and builds the map:
    /// 4 KiB pages, everything page-aligned, each region inside the device,
    /// none overlapping another in host addresses or device offsets.
    pub(crate) fn new(regions: &[Region], header: &Header) -> Result<Layout> {
        if header.block_size() != MEMORY_BLOCK_SIZE {
            return Err(Error::NotMemory {
                block_size: header.block_size(),
            });
        }
        if regions.is_empty() {
            return Err(Error::region(
                0,
                "is missing: a handover lists at least one region",
            ));
        }
        for (index, region) in regions.iter().enumerate() {
            check_region(index, region, header.device_size())?;
        }
        check_disjoint(regions, |r| r.base_host_virt_addr, "host addresses")?;
        check_disjoint(regions, |r| r.offset, "device offsets")?;
        let mut pieces: Vec<Piece> = regions
            .iter()
            .map(|r| Piece {
                host: r.base_host_virt_addr,
                len: r.size,
                offset: r.offset,
            })
            .collect();
        pieces.sort_by_key(|p| p.host);
        Ok(Layout { pieces })
    }

    /// The device block behind the page at `addr`; `None` outside the map.
    pub(crate) fn device_block(&self, addr: u64) -> Option<u64> {
        let piece = self.piece_at(addr)?;
        Some((piece.offset + (addr - piece.host)) / PAGE)
    }

    /// The window of `pages` pages (a power of two) around the page at
    /// `addr`: aligned to `pages` device blocks and cut to the piece that
    /// maps `addr`, so that it is contiguous in both spaces. `None` outside
    /// the map.
    pub(crate) fn window(&self, addr: u64, pages: u64) -> Option<Span> {
        let piece = self.piece_at(addr)?;
        let block = (piece.offset + (addr / PAGE * PAGE - piece.host)) / PAGE;
        let (piece_first, piece_end) = (piece.offset / PAGE, (piece.offset + piece.len) / PAGE);
        let first = (block / pages * pages).max(piece_first);
        let end = (block / pages * pages).saturating_add(pages).min(piece_end);
        Some(Span {
            host: piece.host + (first * PAGE - piece.offset),
            block: first,
            pages: end - first,
        })
    }

    /// The host address of device block `block`; `None` when no piece maps
    /// it.
    pub(crate) fn host_addr(&self, block: u64) -> Option<u64> {
        let offset = block.checked_mul(PAGE)?;
        self.pieces
            .iter()
            .find(|p| (p.offset..p.offset + p.len).contains(&offset))
            .map(|p| p.host + (offset - p.offset))
    }

    /// The device blocks behind host addresses `start..end`, as runs.
    pub(crate) fn device_blocks(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let (start, end) = (start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
        self.pieces
            .iter()
            .filter(|p| p.host < end && start < p.end())
            .map(|p| {
                let from = start.max(p.host);
                let to = end.min(p.end());
                let first = (p.offset + (from - p.host)) / PAGE;
                first..first + (to - from) / PAGE
            })
            .collect()
    }

    /// Forgets host addresses `start..end` (the VMM unmapped them).
    pub(crate) fn unmap(&mut self, start: u64, end: u64) {
        self.cut(start, end);
    }

    /// Moves the pieces in `from..from + len` to `to` (the VMM called
    /// `mremap`); whatever was mapped at the destination is gone.
    pub(crate) fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.cut(from, from.saturating_add(len));
        self.cut(to, to.saturating_add(len));
        self.pieces.extend(moved.into_iter().map(|p| Piece {
            host: to + (p.host - from),
            ..p
        }));
        self.pieces.sort_by_key(|p| p.host);
    }

    /// Whether no memory is mapped any more.
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Removes host addresses `start..end` (page-aligned outwards) from the
    /// map and returns the parts removed.
    fn cut(&mut self, start: u64, end: u64) -> Vec<Piece> {
        let (start, end) = (start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
        let mut kept = Vec::with_capacity(self.pieces.len() + 1);
        let mut removed = Vec::new();
        for p in self.pieces.drain(..) {
            if p.end() <= start || end <= p.host {
                kept.push(p);
                continue;
            }
            let from = start.max(p.host);
            let to = end.min(p.end());
            if p.host < from {
                kept.push(Piece {
                    len: from - p.host,
                    ..p
                });
            }
            removed.push(Piece {
                host: from,
                len: to - from,
                offset: p.offset + (from - p.host),
            });
            if to < p.end() {
                kept.push(Piece {
                    host: to,
                    len: p.end() - to,
                    offset: p.offset + (to - p.host),
                });
            }
        }
        self.pieces = kept;
        removed
    }

    fn piece_at(&self, addr: u64) -> Option<&Piece> {
        let after = self.pieces.partition_point(|p| p.host <= addr);
        let piece = self.pieces.get(after.checked_sub(1)?)?;
        (addr < piece.end()).then_some(piece)
    }
}

/// One region alone: page size, alignment, inside the device.
fn check_region(index: usize, r: &Region, device_size: u64) -> Result<()> {
    if r.page_size != PAGE {
        return Err(Error::region(
            index,
            format!(
                "has page_size {}; the page server serves {PAGE}-byte pages only \
                 (no huge pages)",
                r.page_size
            ),
        ));
    }
    if r.size == 0 {
        return Err(Error::region(index, "is empty (size 0)"));
    }
    for (field, value) in [
        ("base_host_virt_addr", r.base_host_virt_addr),
        ("size", r.size),
        ("offset", r.offset),
    ] {
        if value % PAGE != 0 {
            return Err(Error::region(
                index,
                format!("has {field} {value:#x}, which is not a multiple of its page size {PAGE}"),
            ));
        }
    }
    if r.base_host_virt_addr.checked_add(r.size).is_none() {
        return Err(Error::region(
            index,
            "ends past the end of the address space",
        ));
    }
    match r.offset.checked_add(r.size) {
        Some(end) if end <= device_size => Ok(()),
        _ => Err(Error::region(
            index,
            format!(
                "covers device bytes {}..{}, past the end of the snapshot's {device_size} \
                 bytes: the VM's memory does not match this snapshot",
                r.offset,
                r.offset.saturating_add(r.size)
            ),
        )),
    }
}

/// Refuses two regions whose ranges (starting at `start`, of `size` bytes)
/// overlap.
fn check_disjoint(
    regions: &[Region],
    start: impl Fn(&Region) -> u64,
    space: &'static str,
) -> Result<()> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| start(&regions[i]));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if start(&regions[a]) + regions[a].size > start(&regions[b]) {
            return Err(Error::Overlap {
                first: a.min(b),
                second: a.max(b),
                space,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Extent, Source};

    fn header(device_size: u64) -> Header {
        let blocks = device_size.div_ceil(PAGE);
        Header::from_parts(
            device_size,
            MEMORY_BLOCK_SIZE,
            1,
            None,
            Vec::new(),
            vec![Extent {
                start: 0,
                len: blocks,
                source: Source::Zero,
            }],
        )
        .unwrap()
    }

    fn region(host: u64, size: u64, offset: u64) -> Region {
        Region {
            base_host_virt_addr: host,
            size,
            offset,
            page_size: PAGE,
        }
    }

    #[test]
    fn addresses_map_to_blocks_and_back() {
        let layout = Layout::new(
            &[region(0x10_0000, 0x4000, 0x8000), region(0x1000, 0x2000, 0)],
            &header(0x10000),
        )
        .unwrap();
        assert_eq!(layout.device_block(0x1000), Some(0));
        assert_eq!(layout.device_block(0x2000), Some(1));
        assert_eq!(layout.device_block(0x3000), None);
        assert_eq!(layout.device_block(0x10_3000), Some(11));
        assert_eq!(layout.host_addr(11), Some(0x10_3000));
        assert_eq!(layout.host_addr(2), None);
        assert_eq!(layout.device_blocks(0x1800, 0x10_2000), vec![0..2, 8..10]);
    }

    #[test]
    fn windows_are_aligned_in_device_blocks_and_stay_in_their_piece() {
        // Device blocks 8..12 at 0x10_0000, blocks 0..2 at 0x1000.
        let layout = Layout::new(
            &[region(0x10_0000, 0x4000, 0x8000), region(0x1000, 0x2000, 0)],
            &header(0x10000),
        )
        .unwrap();
        let span = |host, block, pages| Span { host, block, pages };
        assert_eq!(layout.window(0x10_2fff, 4), Some(span(0x10_0000, 8, 4)));
        assert_eq!(layout.window(0x10_2000, 2), Some(span(0x10_2000, 10, 2)));
        assert_eq!(layout.window(0x10_3000, 16), Some(span(0x10_0000, 8, 4)));
        assert_eq!(layout.window(0x2000, 8), Some(span(0x1000, 0, 2)));
        assert_eq!(layout.window(0x10_1000, 1), Some(span(0x10_1000, 9, 1)));
        assert_eq!(layout.window(0x3000, 8), None);
        assert!(span(0x1000, 0, 1).followed_by(&span(0x2000, 1, 1)));
        assert!(!span(0x1000, 0, 1).followed_by(&span(0x2000, 5, 1)));
    }

    #[test]
    fn bad_regions_are_refused_with_their_index() {
        let h = header(0x10000);
        let cases = [
            (vec![], "at least one region"),
            (vec![region(0x1001, 0x1000, 0)], "not a multiple"),
            (vec![region(0x1000, 0x1800, 0)], "size 0x1800"),
            (vec![region(0x1000, 0x1000, 0x800)], "offset 0x800"),
            (
                vec![region(0x1000, 0x1000, 0x10000)],
                "past the end of the snapshot",
            ),
            (vec![region(0x1000, 0, 0)], "empty"),
            (vec![region(u64::MAX - 0xfff, 0x2000, 0)], "address space"),
        ];
        for (regions, text) in cases {
            let err = Layout::new(&regions, &h).unwrap_err().to_string();
            assert!(err.contains(text), "{err:?} should say {text:?}");
        }
        let mut huge = region(0, 0x20_0000, 0);
        huge.page_size = 0x20_0000;
        let err = Layout::new(&[huge], &header(0x40_0000)).unwrap_err();
        assert!(err.to_string().contains("no huge pages"), "{err}");
    }

    #[test]
    fn overlaps_are_refused_in_both_spaces() {
        let h = header(0x10000);
        let err = Layout::new(
            &[region(0x1000, 0x2000, 0), region(0x2000, 0x1000, 0x4000)],
            &h,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::Overlap {
                first: 0,
                second: 1,
                space: "host addresses"
            }
        ));
        let err = Layout::new(
            &[region(0x1000, 0x2000, 0), region(0x9000, 0x1000, 0x1000)],
            &h,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::Overlap {
                space: "device offsets",
                ..
            }
        ));
    }

    #[test]
    fn a_disk_snapshot_is_refused() {
        let h = Header::from_parts(
            0x10000,
            0x10000,
            1,
            None,
            Vec::new(),
            vec![Extent {
                start: 0,
                len: 1,
                source: Source::Zero,
            }],
        )
        .unwrap();
        let err = Layout::new(&[region(0, 0x1000, 0)], &h).unwrap_err();
        assert!(matches!(
            err,
            Error::NotMemory {
                block_size: 0x10000
            }
        ));
    }

    #[test]
    fn unmap_and_remap_follow_the_address_space() {
        let mut layout = Layout::new(&[region(0x10000, 0x8000, 0)], &header(0x8000)).unwrap();
        layout.unmap(0x12000, 0x13000);
        assert_eq!(layout.device_block(0x12000), None);
        assert_eq!(layout.device_block(0x13000), Some(3));
        layout.remap(0x13000, 0x40000, 0x2000);
        assert_eq!(layout.device_block(0x13000), None);
        assert_eq!(layout.device_block(0x40000), Some(3));
        assert_eq!(layout.device_block(0x41000), Some(4));
        assert_eq!(layout.host_addr(4), Some(0x41000));
        assert_eq!(layout.device_block(0x15000), Some(5));
        layout.unmap(0, u64::MAX / 2);
        assert!(layout.is_empty());
    }
}
