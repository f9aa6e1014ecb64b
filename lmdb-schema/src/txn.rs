//! Transactions and typed table views.
//!
//! [`ReadTxn`] and [`WriteTxn`] exist only inside the closures given to
//! [`Store::read`](crate::Store::read) and [`Store::write`](crate::Store::write).
//! Their accessors (`sandboxes()`, `slots()`, ...) return views that take
//! and return typed keys and records; the bytes stay in this module and in
//! `codec`/`keys`.
//!
//! Every LMDB error met by a write goes through [`WriteTxn::check`], which
//! notes `MDB_MAP_FULL` so that the store can grow the map and run the
//! closure again.
//!
//! Not for `meta` or `events`, which have their own views (see `meta`,
//! `events`), nor for the list of databases (see `schema`).

use std::marker::PhantomData;
use std::ops::{Bound, Range};
use std::sync::RwLockReadGuard;

use heed::types::Bytes;
use heed::{MdbError, PutFlags, WithoutTls};

use crate::codec::{self, Record};
use crate::error::{Error, Result};
use crate::keys::sealed::KeyBytes;
use crate::keys::{escape_key, SlotId};
use crate::records::SlotRecord;
use crate::schema::Databases;

/// An LMDB database handle with byte keys and values.
pub(crate) type Db<'e> = heed::Database<'e, Bytes, Bytes>;

/// A read-only snapshot of the store, valid for one [`Store::read`](crate::Store::read) call.
pub struct ReadTxn<'s> {
    pub(crate) txn: heed::RoTxn<'s, WithoutTls>,
    pub(crate) dbs: &'s Databases<'static>,
    /// The store's resize gate, held shared; declared last so that it is
    /// released after the transaction has ended.
    pub(crate) _gate: RwLockReadGuard<'s, ()>,
}

/// A write transaction, valid for one [`Store::write`](crate::Store::write) call.
///
/// Reads through it see its own uncommitted writes. Everything is committed
/// together when the closure returns `Ok`, and nothing when it returns `Err`.
pub struct WriteTxn<'s> {
    pub(crate) txn: heed::RwTxn<'s>,
    pub(crate) dbs: &'s Databases<'static>,
    /// Set when any operation failed with `MDB_MAP_FULL`.
    pub(crate) map_full: bool,
    /// The store's resize gate, held shared; declared last so that it is
    /// released after the transaction has ended.
    pub(crate) _gate: RwLockReadGuard<'s, ()>,
}

impl WriteTxn<'_> {
    /// Turns an LMDB result into ours, noting a full map for the retry loop.
    pub(crate) fn check<T>(
        &mut self,
        result: heed::Result<T>,
        action: impl FnOnce() -> String,
    ) -> Result<T> {
        result.map_err(|e| {
            if is_map_full(&e) {
                self.map_full = true;
            }
            Error::lmdb(action(), e)
        })
    }

    /// Writes raw bytes, bypassing the codec: for tests of damaged files.
    #[cfg(test)]
    pub(crate) fn put_raw(&mut self, db: Db<'static>, key: &[u8], value: &[u8]) -> Result<()> {
        let result = db.put(&mut self.txn, key, value);
        self.check(result, || "write raw bytes".to_owned())
    }
}

/// Whether an LMDB error says the map is full.
pub(crate) fn is_map_full(e: &heed::Error) -> bool {
    matches!(e, heed::Error::Mdb(MdbError::MapFull))
}

// ---------------------------------------------------------------------------
// Shared typed operations (used by every view)

/// Reads and decodes the record under `key`.
pub(crate) fn get<R: Record>(txn: &heed::RoTxn, db: Db<'_>, key: &R::Key) -> Result<Option<R>> {
    match db.get(txn, &key.to_bytes()) {
        Ok(Some(bytes)) => codec::decode(key, bytes).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(Error::lmdb(format!("read {key} from `{}`", R::DATABASE), e)),
    }
}

/// Whether a value exists under `key`, without decoding it.
fn contains<R: Record>(txn: &heed::RoTxn, db: Db<'_>, key: &R::Key) -> Result<bool> {
    db.get(txn, &key.to_bytes())
        .map(|value| value.is_some())
        .map_err(|e| Error::lmdb(format!("read {key} from `{}`", R::DATABASE), e))
}

/// Number of entries.
pub(crate) fn len<R: Record>(txn: &heed::RoTxn, db: Db<'_>) -> Result<u64> {
    db.len(txn)
        .map_err(|e| Error::lmdb(format!("count the entries of `{}`", R::DATABASE), e))
}

/// Iterates over the keys between `start` and `end`, in key byte order.
pub(crate) fn range<'t, R: Record>(
    txn: &'t heed::RoTxn,
    db: Db<'_>,
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
) -> Result<Iter<'t, R>> {
    db.range(txn, &(start, end))
        .map(|inner| Iter {
            inner,
            _record: PhantomData,
        })
        .map_err(|e| Error::lmdb(format!("iterate over `{}`", R::DATABASE), e))
}

/// Encodes and stores `record` under `key`, with LMDB `flags`.
pub(crate) fn put<R: Record>(
    w: &mut WriteTxn<'_>,
    db: Db<'_>,
    key: &R::Key,
    record: &R,
    flags: PutFlags,
) -> Result<()> {
    let key_bytes = key.to_bytes();
    if let Some(own) = record.own_key() {
        if own != key_bytes {
            return Err(Error::KeyMismatch {
                database: R::DATABASE,
                key: escape_key(&key_bytes),
                record_key: escape_key(&own),
            });
        }
    }
    let value = codec::encode(record)?;
    let result = db.put_with_flags(&mut w.txn, flags, &key_bytes, &value);
    w.check(result, || format!("write {key} to `{}`", R::DATABASE))
}

/// Removes the entry under `key`; `true` when there was one.
pub(crate) fn delete<R: Record>(w: &mut WriteTxn<'_>, db: Db<'_>, key: &R::Key) -> Result<bool> {
    let result = db.delete(&mut w.txn, &key.to_bytes());
    w.check(result, || format!("delete {key} from `{}`", R::DATABASE))
}

// ---------------------------------------------------------------------------
// Iterator

/// Entries of a table in key order, decoded as they are read.
///
/// A damaged entry is an `Err` item; iteration can go on past it.
pub struct Iter<'t, R: Record> {
    inner: heed::RoRange<'t, Bytes, Bytes>,
    _record: PhantomData<fn() -> R>,
}

impl<R: Record> Iterator for Iter<'_, R> {
    type Item = Result<(R::Key, R)>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next()?;
        Some(
            item.map_err(|e| Error::lmdb(format!("iterate over `{}`", R::DATABASE), e))
                .and_then(|(key_bytes, value)| {
                    let key =
                        R::Key::from_bytes(key_bytes).map_err(|reason| Error::CorruptKey {
                            database: R::DATABASE,
                            key: escape_key(key_bytes),
                            reason,
                        })?;
                    let record = codec::decode::<R>(&key, value)?;
                    Ok((key, record))
                }),
        )
    }
}

// ---------------------------------------------------------------------------
// Plain tables

/// Read access to one key → record database.
pub struct Table<'t, R: Record> {
    txn: &'t heed::RoTxn<'t>,
    db: Db<'static>,
    _record: PhantomData<fn() -> R>,
}

impl<'t, R: Record> Table<'t, R> {
    pub(crate) fn new(txn: &'t heed::RoTxn<'t>, db: Db<'static>) -> Self {
        Table {
            txn,
            db,
            _record: PhantomData,
        }
    }

    /// The record under `key`, if any.
    pub fn get(&self, key: &R::Key) -> Result<Option<R>> {
        get(self.txn, self.db, key)
    }

    /// Whether there is a record under `key` (without decoding it).
    pub fn contains(&self, key: &R::Key) -> Result<bool> {
        contains::<R>(self.txn, self.db, key)
    }

    /// Number of records.
    pub fn len(&self) -> Result<u64> {
        len::<R>(self.txn, self.db)
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|n| n == 0)
    }

    /// All records in key order.
    pub fn iter(&self) -> Result<Iter<'t, R>> {
        range(self.txn, self.db, Bound::Unbounded, Bound::Unbounded)
    }
}

/// Read and write access to one key → record database.
///
/// The read methods are those of [`Table`].
pub struct TableMut<'t, 's, R: Record> {
    txn: &'t mut WriteTxn<'s>,
    db: Db<'static>,
    _record: PhantomData<fn() -> R>,
}

impl<'t, 's, R: Record> TableMut<'t, 's, R> {
    pub(crate) fn new(txn: &'t mut WriteTxn<'s>, db: Db<'static>) -> Self {
        TableMut {
            txn,
            db,
            _record: PhantomData,
        }
    }

    fn view(&self) -> Table<'_, R> {
        Table::new(&self.txn.txn, self.db)
    }

    /// The record under `key`, if any.
    pub fn get(&self, key: &R::Key) -> Result<Option<R>> {
        self.view().get(key)
    }

    /// Whether there is a record under `key` (without decoding it).
    pub fn contains(&self, key: &R::Key) -> Result<bool> {
        self.view().contains(key)
    }

    /// Number of records.
    pub fn len(&self) -> Result<u64> {
        self.view().len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> Result<bool> {
        self.view().is_empty()
    }

    /// All records in key order.
    pub fn iter(&self) -> Result<Iter<'_, R>> {
        range(&self.txn.txn, self.db, Bound::Unbounded, Bound::Unbounded)
    }

    /// Stores `record` under `key`, replacing any record there.
    ///
    /// A record that carries its own key (a sandbox's `id`, a template's
    /// `name`) must be written under that key: anything else is
    /// [`Error::KeyMismatch`].
    pub fn put(&mut self, key: &R::Key, record: &R) -> Result<()> {
        put(self.txn, self.db, key, record, PutFlags::empty())
    }

    /// Removes the record under `key`; `true` when there was one.
    pub fn delete(&mut self, key: &R::Key) -> Result<bool> {
        delete::<R>(self.txn, self.db, key)
    }
}

// ---------------------------------------------------------------------------
// Slots

/// The lowest slot in `range` without an entry in `db`.
fn first_free(txn: &heed::RoTxn, db: Db<'_>, slots: Range<u32>) -> Result<Option<SlotId>> {
    if slots.is_empty() {
        return Ok(None);
    }
    let (first, end) = (SlotId(slots.start), SlotId(slots.end));
    let (start, end) = (first.to_bytes(), end.to_bytes());
    let entries = range::<SlotRecord>(txn, db, Bound::Included(&start), Bound::Excluded(&end))?;
    let mut candidate = slots.start;
    // Keys come in numeric order; the first gap is the answer. The values
    // are not decoded: a slot with an entry is taken whatever it says.
    for entry in entries.inner {
        let (key_bytes, _) = entry.map_err(|e| Error::lmdb("iterate over `slots`", e))?;
        let SlotId(taken) = SlotId::from_bytes(key_bytes).map_err(|reason| Error::CorruptKey {
            database: "slots",
            key: escape_key(key_bytes),
            reason,
        })?;
        if taken > candidate {
            break;
        }
        // taken == candidate (keys are unique and start at or after it).
        match candidate.checked_add(1) {
            Some(next) => candidate = next,
            None => return Ok(None),
        }
    }
    Ok((candidate < slots.end).then_some(SlotId(candidate)))
}

impl Table<'_, SlotRecord> {
    /// The lowest slot in `slots` (such as `0..n`) that nobody holds, or
    /// `None` when all are taken. Used in a write transaction, the answer
    /// stays true until that transaction puts a record under it.
    pub fn first_free(&self, slots: Range<u32>) -> Result<Option<SlotId>> {
        first_free(self.txn, self.db, slots)
    }
}

impl TableMut<'_, '_, SlotRecord> {
    /// The lowest slot in `slots` (such as `0..n`) that nobody holds, or
    /// `None` when all are taken; put a [`SlotRecord`] under it in this
    /// transaction to allocate it.
    pub fn first_free(&self, slots: Range<u32>) -> Result<Option<SlotId>> {
        first_free(&self.txn.txn, self.db, slots)
    }
}
