//! The `events` database: an append-only audit log.
//!
//! [`EventsMut::append`] hands out the next sequence number, one more than
//! the last one ever handed out (kept in `meta` as `events.last_seq`, so
//! trimming every event does not make numbers repeat). Keys are big-endian,
//! so iteration is in append order. Events are never rewritten; old ones
//! are dropped with [`EventsMut::trim_before`].
//!
//! Not for anything the agent must read back to recover: events are for
//! people and for the control plane's log.

use std::ops::Bound;

use heed::PutFlags;

use crate::error::{Error, Result};
use crate::keys::escape_key;
use crate::keys::sealed::KeyBytes;
use crate::keys::EventSeq;
use crate::meta::Meta;
use crate::records::EventRecord;
use crate::txn::{self, Db, Iter, ReadTxn, WriteTxn};

/// Read access to `events`.
pub struct Events<'t> {
    txn: &'t heed::RoTxn<'t>,
    db: Db<'static>,
    meta: Meta<'t>,
}

impl<'t> Events<'t> {
    /// The event `seq`, if it exists (it may have been trimmed).
    pub fn get(&self, seq: EventSeq) -> Result<Option<EventRecord>> {
        txn::get(self.txn, self.db, &seq)
    }

    /// All events, oldest first.
    pub fn iter(&self) -> Result<Iter<'t, EventRecord>> {
        txn::range(self.txn, self.db, Bound::Unbounded, Bound::Unbounded)
    }

    /// The events after `seq` (not including it), oldest first. Pass the
    /// last sequence number a reader has seen to get only what is new;
    /// `EventSeq(0)` gives everything.
    pub fn after(&self, seq: EventSeq) -> Result<Iter<'t, EventRecord>> {
        let start = seq.to_bytes();
        txn::range(self.txn, self.db, Bound::Excluded(&start), Bound::Unbounded)
    }

    /// The last sequence number handed out, even if that event was trimmed;
    /// `None` before the first append.
    pub fn last_seq(&self) -> Result<Option<EventSeq>> {
        let recorded = self.meta.last_event_seq()?;
        let newest = self
            .db
            .last(self.txn)
            .map_err(|e| Error::lmdb("read the last entry of `events`", e))?;
        let newest = match newest {
            None => None,
            Some((key, _)) => {
                Some(
                    EventSeq::from_bytes(key).map_err(|reason| Error::CorruptKey {
                        database: "events",
                        key: escape_key(key),
                        reason,
                    })?,
                )
            }
        };
        Ok(recorded.map(EventSeq).max(newest))
    }

    /// Number of events kept.
    pub fn len(&self) -> Result<u64> {
        txn::len::<EventRecord>(self.txn, self.db)
    }

    /// Whether no events are kept.
    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|n| n == 0)
    }
}

/// Read and append access to `events`. The read methods are those of [`Events`].
pub struct EventsMut<'t, 's> {
    txn: &'t mut WriteTxn<'s>,
}

impl EventsMut<'_, '_> {
    fn view(&self) -> Events<'_> {
        events(&self.txn.txn, self.txn.dbs.events, self.txn.dbs.meta)
    }

    /// The event `seq`, if it exists.
    pub fn get(&self, seq: EventSeq) -> Result<Option<EventRecord>> {
        self.view().get(seq)
    }

    /// All events, oldest first.
    pub fn iter(&self) -> Result<Iter<'_, EventRecord>> {
        self.view().iter()
    }

    /// The events after `seq` (not including it), oldest first.
    pub fn after(&self, seq: EventSeq) -> Result<Iter<'_, EventRecord>> {
        self.view().after(seq)
    }

    /// The last sequence number handed out, even if that event was trimmed.
    pub fn last_seq(&self) -> Result<Option<EventSeq>> {
        self.view().last_seq()
    }

    /// Number of events kept.
    pub fn len(&self) -> Result<u64> {
        self.view().len()
    }

    /// Whether no events are kept.
    pub fn is_empty(&self) -> Result<bool> {
        self.view().is_empty()
    }

    /// Adds `event` at the end of the log and returns its sequence number:
    /// one more than the last one handed out, starting at 1.
    pub fn append(&mut self, event: &EventRecord) -> Result<EventSeq> {
        let last = self.last_seq()?.map_or(0, |seq| seq.0);
        let next = EventSeq(last.checked_add(1).ok_or(Error::EventSeqExhausted(last))?);
        let db = self.txn.dbs.events;
        // APPEND: LMDB refuses (rather than misplaces) a key that is not the largest.
        txn::put(self.txn, db, &next, event, PutFlags::APPEND)?;
        self.txn.meta().set_last_event_seq(next.0)?;
        Ok(next)
    }

    /// Removes every event before `seq` (not including it) and returns how
    /// many there were. `trim_before(EventSeq(last - n + 1))` keeps the newest `n`.
    pub fn trim_before(&mut self, seq: EventSeq) -> Result<u64> {
        let end = seq.to_bytes();
        let db = self.txn.dbs.events;
        let result = db.delete_range(
            &mut self.txn.txn,
            &(Bound::Unbounded, Bound::Excluded(&*end)),
        );
        let removed = self
            .txn
            .check(result, || format!("trim `events` before {seq}"))?;
        Ok(u64::try_from(removed).unwrap_or(u64::MAX))
    }
}

fn events<'t>(txn: &'t heed::RoTxn<'t>, db: Db<'static>, meta_db: Db<'static>) -> Events<'t> {
    Events {
        txn,
        db,
        meta: Meta::new(txn, meta_db),
    }
}

impl<'s> ReadTxn<'s> {
    /// The `events` database: the audit log.
    pub fn events(&self) -> Events<'_> {
        events(&self.txn, self.dbs.events, self.dbs.meta)
    }
}

impl<'s> WriteTxn<'s> {
    /// The `events` database: the audit log.
    pub fn events(&mut self) -> EventsMut<'_, 's> {
        EventsMut { txn: self }
    }
}
