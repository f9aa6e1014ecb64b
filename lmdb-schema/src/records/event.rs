//! `events` records: the node's append-only audit log, keyed by
//! [`EventSeq`].
//!
//! Events are added with [`EventsMut::append`](crate::EventsMut::append),
//! which assigns the sequence number; they are never changed, only trimmed
//! from the old end.

use serde::{Deserialize, Serialize};

use crate::codec::{sealed::Upgrade, Record};
use crate::keys::{EventSeq, SandboxId};

/// One audit event (record version 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When it happened, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The sandbox it concerns, if any.
    pub sandbox: Option<SandboxId>,
    /// What happened, such as `sandbox.paused`.
    pub kind: String,
    /// Free-form detail for people.
    pub detail: String,
}

impl Upgrade for EventRecord {}

impl Record for EventRecord {
    const DATABASE: &'static str = "events";
    const CURRENT_VERSION: u8 = 1;
    type Key = EventSeq;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::records::samples;

    #[test]
    fn round_trip() {
        let record = samples::event();
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(decode::<EventRecord>(&EventSeq(1), &bytes).unwrap(), record);
    }
}
