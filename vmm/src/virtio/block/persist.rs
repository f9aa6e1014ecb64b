//! What a snapshot keeps of a block device: its drive, and the capacity
//! the guest was told (a restored disk must not be smaller).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Block, DriveConfig};
use crate::virtio::DeviceError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub drive_id: String,
    pub path: PathBuf,
    pub is_root_device: bool,
    pub read_only: bool,
    /// In 512-byte sectors.
    pub capacity: u64,
}

impl Block {
    pub(crate) fn save(&self) -> BlockState {
        BlockState {
            drive_id: self.config.drive_id.clone(),
            path: self.config.path.clone(),
            is_root_device: self.config.is_root_device,
            read_only: self.config.read_only,
            capacity: self.capacity,
        }
    }

    /// Reopens the drive, at `path` if given instead of the saved one. The
    /// guest keeps the capacity it was told; the file may be larger.
    pub(crate) fn restore(
        state: &BlockState,
        path: Option<&PathBuf>,
    ) -> Result<Block, DeviceError> {
        let config = DriveConfig {
            drive_id: state.drive_id.clone(),
            path: path.map_or(state.path.as_path(), Path::new).to_path_buf(),
            is_root_device: state.is_root_device,
            read_only: state.read_only,
        };
        let mut block = Block::open(config, Some(state.capacity))?;
        block.capacity = state.capacity;
        Ok(block)
    }
}
