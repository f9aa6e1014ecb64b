//! `slots` records: which sandbox holds a network slot, keyed by [`SlotId`].
//!
//! A slot exists in this database exactly while it is allocated; the
//! lowest free one is found with
//! [`Table::first_free`](crate::Table::first_free).

use serde::{Deserialize, Serialize};

use crate::codec::{sealed::Upgrade, Record};
use crate::keys::{SandboxId, SlotId};

/// An allocated network slot (record version 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The sandbox holding it.
    pub sandbox: SandboxId,
    /// When it was allocated, milliseconds since the Unix epoch.
    pub allocated_at_ms: u64,
}

impl Upgrade for SlotRecord {}

impl Record for SlotRecord {
    const DATABASE: &'static str = "slots";
    const CURRENT_VERSION: u8 = 1;
    type Key = SlotId;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::records::samples;

    #[test]
    fn round_trip() {
        let record = samples::slot();
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(decode::<SlotRecord>(&SlotId(3), &bytes).unwrap(), record);
    }
}
