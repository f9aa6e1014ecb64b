//! What a snapshot keeps of a block device: its drive, the capacity the
//! guest was told (a restored disk must not be smaller) and, for a layered
//! disk, which blocks its overlay holds.

use serde::{Deserialize, Serialize};

use super::{Block, DriveConfig, DriveSource};
use crate::persist::Persist;
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

impl<'a> Persist<'a> for Block {
    type State = BlockState;
    /// The drive to open instead of the saved one (a snapshot restored
    /// into another sandbox uses that sandbox's disk).
    type ConstructorArgs = Option<&'a DriveSource>;
    type Error = DeviceError;

    fn save(&self) -> Result<BlockState, DeviceError> {
        Ok(BlockState {
            drive_id: self.config.drive_id.clone(),
            source: self.config.source.clone(),
            is_root_device: self.config.is_root_device,
            read_only: self.config.read_only,
            capacity: self.capacity,
            overlay: self
                .disk
                .overlay_blocks()
                .map(|(block_size, blocks)| OverlayState { block_size, blocks }),
        })
    }

    /// Reopens the drive, from `source` if given instead of the saved one.
    /// The guest keeps the capacity it was told; the disk may be larger. A
    /// layered disk starts from the saved written blocks (the overlay must
    /// be the one of the snapshot, or a copy of it) and writes them to its
    /// list file.
    fn restore(source: Option<&'a DriveSource>, state: &BlockState) -> Result<Block, DeviceError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_drive(dir: &std::path::Path, name: &str, len: u64) -> DriveSource {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("a raw image");
        DriveSource::Raw { path }
    }

    #[test]
    fn a_block_device_restored_from_its_state_saves_the_same_state() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = DriveConfig {
            drive_id: "rootfs".into(),
            source: raw_drive(dir.path(), "disk.img", 64 << 10),
            is_root_device: true,
            read_only: false,
        };
        let block = Block::open(config, None, None).expect("opens");
        let saved = block.save().expect("saved");
        assert_eq!(saved.capacity, 128);
        drop(block);
        let restored = Block::restore(None, &saved).expect("restored");
        assert_eq!(restored.save().expect("saved again"), saved);
    }

    #[test]
    fn a_block_device_restored_onto_a_larger_disk_keeps_the_saved_capacity() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = DriveConfig {
            drive_id: "data".into(),
            source: raw_drive(dir.path(), "disk.img", 4096),
            is_root_device: false,
            read_only: true,
        };
        let saved = Block::open(config, None, None)
            .expect("opens")
            .save()
            .expect("saved");
        let larger = raw_drive(dir.path(), "copy.img", 8192);
        let restored = Block::restore(Some(&larger), &saved).expect("restored");
        let again = restored.save().expect("saved again");
        assert_eq!(again.source, larger);
        assert_eq!(again.capacity, 8);
        let smaller = raw_drive(dir.path(), "small.img", 512);
        let err = Block::restore(Some(&smaller), &saved)
            .err()
            .expect("refused");
        assert!(matches!(err, DeviceError::DriveShrunk { .. }), "{err}");
    }
}
