//! What a snapshot keeps of a block device: its drive, the capacity the
//! guest was told (a restored disk must not be smaller) and, for a layered
//! disk, which blocks its overlay holds.

use serde::{Deserialize, Serialize};

use super::{Block, DriveConfig, DriveSource};
use crate::virtio::DeviceError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive_id: String,
    pub source: DriveSource,
    pub is_root_device: bool,
    pub read_only: bool,
    /// In 512-byte sectors.
    pub capacity: u64,
    /// A layered disk's written blocks when the snapshot was taken.
    pub overlay: Option<OverlayState>,
}

/// The blocks a layered disk's overlay holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayState {
    /// The base header's block size, which the indices count in.
    pub block_size: u32,
    /// Ascending block indices.
    pub blocks: Vec<u64>,
}

impl Block {
    pub(crate) fn save(&self) -> BlockState {
        BlockState {
            drive_id: self.config.drive_id.clone(),
            source: self.config.source.clone(),
            is_root_device: self.config.is_root_device,
            read_only: self.config.read_only,
            capacity: self.capacity,
            overlay: self
                .disk
                .overlay_blocks()
                .map(|(block_size, blocks)| OverlayState { block_size, blocks }),
        }
    }

    /// Reopens the drive, from `source` if given instead of the saved one.
    /// The guest keeps the capacity it was told; the disk may be larger. A
    /// layered disk starts from the saved written blocks (the overlay must
    /// be the one of the snapshot, or a copy of it) and writes them to its
    /// list file.
    pub(crate) fn restore(
        state: &BlockState,
        source: Option<&DriveSource>,
    ) -> Result<Block, DeviceError> {
        let source = source.unwrap_or(&state.source).clone();
        let overlay = match (&source, &state.overlay) {
            (DriveSource::Layered(_), Some(saved)) => Some(saved),
            _ => None,
        };
        let config = DriveConfig {
            drive_id: state.drive_id.clone(),
            source,
            is_root_device: state.is_root_device,
            read_only: state.read_only,
        };
        let blocks = overlay.map(|o| (o.block_size, o.blocks.as_slice()));
        let mut block = Block::open(config, Some(state.capacity), blocks)?;
        block.capacity = state.capacity;
        Ok(block)
    }
}
