//! `layers` records: one per layer file of the snapshot store, keyed by
//! [`LayerId`].
//!
//! A layer is an immutable file of packed blocks, named by the SHA-256 of
//! its content. The record says how large it is, what it must hash to and
//! how many snapshot headers use it. The agent changes `refcount` in the
//! same write transaction that records who uses the layer and deletes the
//! file after a commit that left it at 0; this crate does not touch files.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::codec::{sealed::Upgrade, Record};
use crate::keys::LayerId;

/// One layer file (record version 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Length of the file in bytes: `blocks * block_size`.
    pub size_bytes: u64,
    /// Block size of the header that first recorded the layer, in bytes.
    pub block_size: u32,
    /// Number of blocks in the file.
    pub blocks: u64,
    /// SHA-256 of the file's content; the same as the key.
    pub sha256: [u8; 32],
    /// How many retained snapshot headers use the layer; at 0 the file may
    /// be deleted.
    pub refcount: u64,
    /// When it was first recorded, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

impl LayerRecord {
    /// The layer's id, which is its SHA-256.
    pub fn id(&self) -> LayerId {
        LayerId(self.sha256)
    }

    /// Whether no header uses the layer any more.
    pub fn is_unreferenced(&self) -> bool {
        self.refcount == 0
    }
}

impl Upgrade for LayerRecord {
    fn own_key(&self) -> Option<Cow<'_, [u8]>> {
        Some(Cow::Borrowed(&self.sha256))
    }
}

impl Record for LayerRecord {
    const DATABASE: &'static str = "layers";
    const CURRENT_VERSION: u8 = 1;
    type Key = LayerId;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::records::samples;

    #[test]
    fn round_trip() {
        let record = samples::layer();
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(decode::<LayerRecord>(&record.id(), &bytes).unwrap(), record);
        assert!(!record.is_unreferenced());
    }
}
