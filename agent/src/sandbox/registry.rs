//! The sandboxes of this node as LMDB records, and who is working on each:
//! lookups, saves, busy claims (one operation per sandbox at a time),
//! network slot allocation and the event log, inside the caller's
//! transaction where a step needs several writes to land together.
//!
//! Not here: what any step does to a VM or a network (see
//! [`super::manager`]).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use lmdb_schema::{
    EventRecord, SandboxId, SandboxRecord, SandboxStatus, SlotId, SlotRecord, Store, WriteTxn,
};

use super::error::SandboxError;
use crate::clock::Clock;

/// Prefix of the `meta` settings that mark sandboxes paused by a shutdown.
pub(super) const RESUME_MARK: &str = "resume.";

/// Records, claims and slots of this node's sandboxes.
pub struct Registry {
    store: Arc<Store>,
    /// Sandboxes with an operation in flight; a second one is refused.
    busy: Mutex<HashSet<SandboxId>>,
    /// The network slots this node may use.
    slots: Range<u32>,
    clock: Arc<dyn Clock>,
}

/// Marks a sandbox busy for as long as it lives.
pub struct BusyGuard<'a> {
    registry: &'a Registry,
    id: SandboxId,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.registry
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Registry {
    pub fn new(store: Arc<Store>, slots: Range<u32>, clock: Arc<dyn Clock>) -> Registry {
        Registry {
            store,
            busy: Mutex::new(HashSet::new()),
            slots,
            clock,
        }
    }

    /// The time, from the injected clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The network slots this node may use.
    pub fn slots(&self) -> Range<u32> {
        self.slots.clone()
    }

    /// Claims `id` for one operation; a second claim is refused until the
    /// guard is dropped.
    pub fn claim(&self, id: &SandboxId) -> Result<BusyGuard<'_>, SandboxError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(id.clone()) {
            return Err(SandboxError::Busy(id.to_string()));
        }
        Ok(BusyGuard {
            registry: self,
            id: id.clone(),
        })
    }

    /// Claims `id` for `action`, which needs it to be in `wanted` state.
    pub fn claim_in(
        &self,
        id: &SandboxId,
        wanted: SandboxStatus,
        action: &'static str,
    ) -> Result<(BusyGuard<'_>, SandboxRecord), SandboxError> {
        let busy = self.claim(id)?;
        let record = self.get(id)?;
        if record.status != wanted {
            return Err(SandboxError::WrongState {
                id: id.to_string(),
                status: record.status.as_str(),
                wanted: wanted.as_str(),
                action,
            });
        }
        Ok((busy, record))
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        self.store
            .read(|txn| txn.sandboxes().get(id))?
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>, SandboxError> {
        Ok(self
            .store
            .read(|txn| txn.sandboxes().iter()?.map(|r| r.map(|(_, v)| v)).collect())?)
    }

    /// Writes `record`, stamped with the time.
    pub fn save(&self, record: &SandboxRecord) -> Result<(), SandboxError> {
        let mut record = record.clone();
        record.updated_at_ms = self.now_ms();
        self.store
            .write(|txn| txn.sandboxes().put(&record.id, &record))?;
        Ok(())
    }
}

/// Takes the lowest free slot of `range` for `id`, at `at_ms`.
pub(super) fn allocate_slot(
    txn: &mut WriteTxn<'_>,
    range: Range<u32>,
    id: &SandboxId,
    at_ms: u64,
) -> Result<SlotId, SandboxError> {
    let slot = txn.slots().first_free(range.clone())?.ok_or_else(|| {
        SandboxError::Capacity(format!(
            "all {} network slots are in use: destroy or pause a sandbox, or raise network.slots",
            range.len()
        ))
    })?;
    txn.slots().put(
        &slot,
        &SlotRecord {
            sandbox: id.clone(),
            allocated_at_ms: at_ms,
        },
    )?;
    Ok(slot)
}

/// Frees `slot` if `id` holds it.
pub(super) fn free_slot(
    txn: &mut WriteTxn<'_>,
    slot: SlotId,
    id: &SandboxId,
) -> Result<(), SandboxError> {
    let holder = txn.slots().get(&slot)?;
    if holder.is_some_and(|h| &h.sandbox == id) {
        txn.slots().delete(&slot)?;
    }
    Ok(())
}

/// Appends an event about `id`, at `at_ms`, to the log.
pub(super) fn log_event(
    txn: &mut WriteTxn<'_>,
    id: &SandboxId,
    kind: &str,
    detail: &str,
    at_ms: u64,
) -> Result<(), SandboxError> {
    txn.events().append(&EventRecord {
        at_ms,
        sandbox: Some(id.clone()),
        kind: kind.to_owned(),
        detail: detail.to_owned(),
    })?;
    Ok(())
}

/// The `meta` setting that marks `id` for a resume at the next start.
pub(super) fn resume_mark(id: &SandboxId) -> String {
    format!("{RESUME_MARK}{id}")
}
