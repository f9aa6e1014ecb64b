//! Snapshot headers: the map from every block of a device to zero or to a
//! block of a layer.
//!
//! A header is sorted, non-overlapping [`Extent`]s that cover the device
//! from block 0 to its last block, so a mostly-zero device is a few bytes
//! and one block is found by binary search. Encoded as one format version
//! byte, the postcard body and a CRC-32C of both (see `docs/layers.md`).
//! Nothing here depends on QEMU or on where the bytes are kept.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{HeaderId, LayerId};

/// The header format this program writes and the newest it reads.
pub const FORMAT_VERSION: u8 = 1;
/// Block size of memory devices: one page, the unit of userfaultfd and of
/// QEMU's dirty page log.
pub const MEMORY_BLOCK_SIZE: u32 = 4096;
/// Block size of disk devices: the default qcow2 cluster and dirty bitmap
/// granularity of QEMU, so dirty lists map onto blocks one to one.
pub const DISK_BLOCK_SIZE: u32 = 64 << 10;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Bytes of the CRC-32C at the end of an encoded header.
const CHECKSUM_LEN: usize = 4;

/// Checks that `block_size` is a power of two in the accepted range.
pub fn check_block_size(block_size: u32) -> Result<()> {
    let ok =
        block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size);
    ok.then_some(()).ok_or(Error::BlockSize { block_size })
}

/// A layer a header uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRef {
    /// The layer, which is the SHA-256 of its file.
    pub id: LayerId,
    /// Number of blocks in the file.
    pub blocks: u64,
}

/// Where the blocks of an extent come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// They are zero; nothing is stored.
    Zero,
    /// They are consecutive blocks of a layer.
    Layer {
        /// Index into the header's layer list.
        layer: u32,
        /// The layer block holding the extent's first block.
        first_block: u64,
    },
}

/// A run of consecutive device blocks with one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// The first device block.
    pub start: u64,
    /// Number of blocks, at least 1.
    pub len: u64,
    /// Where they come from.
    pub source: Source,
}

impl Extent {
    /// One past the last device block.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Where one device block is, as [`Header::resolve`] finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// The block is zero.
    Zero,
    /// The block is block `block` of layer `layer`.
    Layer {
        /// The layer.
        layer: LayerId,
        /// The block index within the layer file.
        block: u64,
    },
}

/// The snapshot of one device. Valid by construction: decoding and
/// building check every invariant (so it is not `Deserialize`: bytes go
/// through [`Header::decode`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Header {
    device_size: u64,
    block_size: u32,
    generation: u64,
    parent: Option<HeaderId>,
    layers: Vec<LayerRef>,
    extents: Vec<Extent>,
}

/// The body as decoded, before it is checked: the fields of [`Header`] in
/// the same order.
#[derive(Deserialize)]
struct Unchecked {
    device_size: u64,
    block_size: u32,
    generation: u64,
    parent: Option<HeaderId>,
    layers: Vec<LayerRef>,
    extents: Vec<Extent>,
}

impl From<Unchecked> for Header {
    fn from(u: Unchecked) -> Header {
        Header {
            device_size: u.device_size,
            block_size: u.block_size,
            generation: u.generation,
            parent: u.parent,
            layers: u.layers,
            extents: u.extents,
        }
    }
}

impl Header {
    /// A header from its parts, checked. `extents` must already be in the
    /// canonical form `merge` produces or at least valid.
    pub fn from_parts(
        device_size: u64,
        block_size: u32,
        generation: u64,
        parent: Option<HeaderId>,
        layers: Vec<LayerRef>,
        extents: Vec<Extent>,
    ) -> Result<Header> {
        let header = Header {
            device_size,
            block_size,
            generation,
            parent,
            layers,
            extents,
        };
        header.validate().map_err(|reason| Error::HeaderCorrupt {
            name: "a newly built header".to_owned(),
            reason,
        })?;
        Ok(header)
    }

    /// Size of the device in bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Size of a block in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks; the last may be partial.
    pub fn block_count(&self) -> u64 {
        self.device_size.div_ceil(u64::from(self.block_size))
    }

    /// 1 for a snapshot without parent, the parent's plus 1 otherwise.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The header this one was made from.
    pub fn parent(&self) -> Option<HeaderId> {
        self.parent
    }

    /// The layers the mapping uses, each once.
    pub fn layers(&self) -> &[LayerRef] {
        &self.layers
    }

    /// The mapping, in block order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Number of blocks that are stored in layers (not zero).
    pub fn stored_blocks(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| matches!(e.source, Source::Layer { .. }))
            .map(|e| e.len)
            .sum()
    }

    /// The extent holding `block`; `None` past the end. O(log n).
    pub fn extent_of(&self, block: u64) -> Option<&Extent> {
        let after = self.extents.partition_point(|e| e.start <= block);
        let extent = self.extents.get(after.checked_sub(1)?)?;
        (block < extent.end()).then_some(extent)
    }

    /// Where `block` is; `None` past the end. One binary search.
    pub fn resolve(&self, block: u64) -> Option<Block> {
        let extent = self.extent_of(block)?;
        Some(match extent.source {
            Source::Zero => Block::Zero,
            Source::Layer { layer, first_block } => Block::Layer {
                layer: self.layer(layer).id,
                block: first_block + (block - extent.start),
            },
        })
    }

    /// The layer at `index` of the list. Every index a [`Source::Layer`]
    /// of this header names is in range (checked at construction); any
    /// other index panics.
    pub fn layer(&self, index: u32) -> &LayerRef {
        &self.layers[index as usize]
    }

    /// The header as bytes: version, postcard body, CRC-32C.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut bytes = postcard::to_extend(self, vec![FORMAT_VERSION])
            .map_err(|e| Error::HeaderEncode(e.to_string()))?;
        let checksum = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        Ok(bytes)
    }

    /// The id of the encoded header.
    pub fn id(&self) -> Result<HeaderId> {
        self.encode().map(|bytes| HeaderId::of(&bytes))
    }

    /// Decodes and checks a header; `name` (a file or an id) is only used
    /// in errors. The version is checked first, then the checksum, then
    /// the body and every invariant of the mapping.
    pub fn decode(name: &str, bytes: &[u8]) -> Result<Header> {
        let corrupt = |reason: String| Error::HeaderCorrupt {
            name: name.to_owned(),
            reason,
        };
        let version = *bytes.first().ok_or_else(|| corrupt("it is empty".into()))?;
        if version > FORMAT_VERSION {
            return Err(Error::HeaderTooNew {
                name: name.to_owned(),
                found: version,
                known: FORMAT_VERSION,
            });
        }
        if version == 0 {
            return Err(corrupt("format version 0 does not exist".into()));
        }
        let body_end = bytes
            .len()
            .checked_sub(CHECKSUM_LEN)
            .filter(|&end| end > 1)
            .ok_or_else(|| corrupt(format!("it is only {} bytes long", bytes.len())))?;
        check_sum(name, &bytes[..body_end], &bytes[body_end..])?;
        let (unchecked, rest) = postcard::take_from_bytes::<Unchecked>(&bytes[1..body_end])
            .map_err(|e| corrupt(e.to_string()))?;
        let header = Header::from(unchecked);
        if !rest.is_empty() {
            return Err(corrupt(format!(
                "{} bytes left over after the body",
                rest.len()
            )));
        }
        header.validate().map_err(corrupt)?;
        Ok(header)
    }

    /// Checks every invariant; `Err` says which one is broken.
    fn validate(&self) -> std::result::Result<(), String> {
        check_block_size(self.block_size).map_err(|e| e.to_string())?;
        if self.generation == 0 || (self.parent.is_some() && self.generation == 1) {
            return Err(format!(
                "generation {} does not fit its parent",
                self.generation
            ));
        }
        let mut seen = HashSet::with_capacity(self.layers.len());
        if let Some(dup) = self.layers.iter().find(|l| !seen.insert(l.id)) {
            return Err(format!("layer {} is listed twice", dup.id));
        }
        self.validate_extents()
    }

    /// Checks that the extents tile the device and point inside their layers.
    fn validate_extents(&self) -> std::result::Result<(), String> {
        let mut next = 0u64;
        for extent in &self.extents {
            if extent.start != next || extent.len == 0 {
                return Err(format!(
                    "extent at block {} (length {}) does not follow block {next}",
                    extent.start, extent.len
                ));
            }
            next = extent
                .start
                .checked_add(extent.len)
                .ok_or("an extent ends past 2^64 blocks")?;
            self.validate_source(extent)?;
        }
        let blocks = self.block_count();
        if next != blocks {
            return Err(format!("extents cover {next} blocks of {blocks}"));
        }
        Ok(())
    }

    /// Checks that a layer extent names a listed layer and stays inside it.
    fn validate_source(&self, extent: &Extent) -> std::result::Result<(), String> {
        let Source::Layer { layer, first_block } = extent.source else {
            return Ok(());
        };
        let Some(found) = self.layers.get(layer as usize) else {
            return Err(format!(
                "extent at block {} names layer index {layer} of {}",
                extent.start,
                self.layers.len()
            ));
        };
        match first_block.checked_add(extent.len) {
            Some(end) if end <= found.blocks => Ok(()),
            _ => Err(format!(
                "extent at block {} reads past the end of layer {} ({} blocks)",
                extent.start, found.id, found.blocks
            )),
        }
    }
}

/// Compares the stored CRC-32C with the one of `covered`.
fn check_sum(name: &str, covered: &[u8], stored: &[u8]) -> Result<()> {
    let stored = <[u8; CHECKSUM_LEN]>::try_from(stored)
        .map(u32::from_le_bytes)
        .map_err(|_| Error::HeaderCorrupt {
            name: name.to_owned(),
            reason: "the checksum is cut short".into(),
        })?;
    let computed = crc32c::crc32c(covered);
    if stored == computed {
        return Ok(());
    }
    Err(Error::HeaderChecksum {
        name: name.to_owned(),
        stored,
        computed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8, blocks: u64) -> LayerRef {
        LayerRef {
            id: LayerId([n; 32]),
            blocks,
        }
    }

    fn sample() -> Header {
        Header::from_parts(
            10 * 4096,
            4096,
            2,
            Some(HeaderId([7; 32])),
            vec![layer(1, 4), layer(2, 2)],
            vec![
                Extent {
                    start: 0,
                    len: 3,
                    source: Source::Zero,
                },
                Extent {
                    start: 3,
                    len: 4,
                    source: Source::Layer {
                        layer: 0,
                        first_block: 0,
                    },
                },
                Extent {
                    start: 7,
                    len: 2,
                    source: Source::Layer {
                        layer: 1,
                        first_block: 0,
                    },
                },
                Extent {
                    start: 9,
                    len: 1,
                    source: Source::Zero,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_and_lookup() {
        let header = sample();
        let bytes = header.encode().unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(Header::decode("t", &bytes).unwrap(), header);
        assert_eq!(header.resolve(0), Some(Block::Zero));
        assert_eq!(
            header.resolve(4),
            Some(Block::Layer {
                layer: LayerId([1; 32]),
                block: 1
            })
        );
        assert_eq!(
            header.resolve(8),
            Some(Block::Layer {
                layer: LayerId([2; 32]),
                block: 1
            })
        );
        assert_eq!(header.resolve(9), Some(Block::Zero));
        assert_eq!(header.resolve(10), None);
        assert_eq!(header.stored_blocks(), 6);
    }

    #[test]
    fn a_zero_512_mib_device_is_a_few_bytes() {
        let blocks = (512u64 << 20) / 4096;
        let extents = vec![Extent {
            start: 0,
            len: blocks,
            source: Source::Zero,
        }];
        let header = Header::from_parts(512 << 20, 4096, 1, None, vec![], extents).unwrap();
        let bytes = header.encode().unwrap();
        assert!(bytes.len() < 24, "{} bytes", bytes.len());
    }

    #[test]
    fn every_flipped_byte_is_an_error_not_a_panic() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(Header::decode("t", &bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(Header::decode("t", &bytes[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn invalid_mappings_are_refused_even_with_a_good_checksum() {
        let mut header = sample();
        header.extents[1].len = 5; // overlaps the next extent, reads past layer 0
        let mut bytes = postcard::to_extend(&header, vec![FORMAT_VERSION]).unwrap();
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        let err = Header::decode("h", &bytes).unwrap_err();
        assert!(matches!(err, Error::HeaderCorrupt { .. }), "{err}");
    }

    /// Format version 1 is frozen: these bytes are in `docs/layers.md` and
    /// were computed independently of this code. A failure here means the
    /// format changed without a new version.
    #[test]
    fn version_1_bytes_are_frozen() {
        let blocks = (512u64 << 20) / 4096;
        let zero = Header::from_parts(
            512 << 20,
            4096,
            1,
            None,
            vec![],
            vec![Extent {
                start: 0,
                len: blocks,
                source: Source::Zero,
            }],
        )
        .unwrap();
        assert_eq!(
            hex::encode(zero.encode().unwrap()),
            "018080808002802001000001008080080029e9b858"
        );
        let child = Header::from_parts(
            8 * 4096,
            4096,
            2,
            Some(HeaderId([0x11; 32])),
            vec![layer(0x22, 3)],
            vec![
                Extent {
                    start: 0,
                    len: 2,
                    source: Source::Zero,
                },
                Extent {
                    start: 2,
                    len: 3,
                    source: Source::Layer {
                        layer: 0,
                        first_block: 0,
                    },
                },
                Extent {
                    start: 5,
                    len: 3,
                    source: Source::Zero,
                },
            ],
        )
        .unwrap();
        // version, size, block size, generation, parent, layers, extents, CRC-32C
        let golden = format!(
            "01 808002 8020 02 01{} 01{}03 03 000200 0203010000 050300 6729766b",
            "11".repeat(32),
            "22".repeat(32),
        )
        .replace(' ', "");
        assert_eq!(hex::encode(child.encode().unwrap()), golden);
        assert_eq!(
            Header::decode("golden", &hex::decode(&golden).unwrap()).unwrap(),
            child
        );
    }

    #[test]
    fn block_sizes_are_powers_of_two_in_range() {
        for ok in [4096, 65536, 1 << 20] {
            check_block_size(ok).unwrap();
        }
        for bad in [0, 512, 4095, 12288, 2 << 20] {
            assert!(check_block_size(bad).is_err(), "{bad}");
        }
    }
}
