//! The store: opening the environment, running transactions, growing the map.
//!
//! The environment is one file, `<dir>/state.lmdb` (LMDB's `NO_SUB_DIR`
//! layout), with LMDB's lock file `<dir>/state.lmdb-lock` next to it. Sync
//! semantics are LMDB's defaults: a committed write is on disk when
//! `write` returns.
//!
//! Every transaction of this process holds `gate` shared for its whole
//! life; growing the map takes it exclusively, so LMDB's rule that no
//! transaction is open while the map is resized holds. Transactions only
//! exist inside the closures given to [`Store::read`] and [`Store::write`],
//! which is what makes the gate complete.
//!
//! Not for the list of databases or the migrations (see `schema`).

use std::cell::Cell;
use std::fmt;
use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use heed::{CompactionOption, EnvFlags, MdbError, WithoutTls};

use crate::error::{Error, Result};
use crate::schema::{self, Databases, Schema};
use crate::txn::{is_map_full, ReadTxn, WriteTxn};

/// The name of the environment file in the state directory.
pub const FILE_NAME: &str = "state.lmdb";

/// Room for databases added by later schema versions.
const MAX_DBS: u32 = 32;

/// The smallest map this crate opens with.
const MIN_MAP_SIZE: usize = 1 << 20;

/// How to open a [`Store`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    map_size: usize,
    max_map_size: usize,
    max_readers: u32,
}

impl StoreOptions {
    /// Default initial map size: 64 MiB.
    pub const DEFAULT_MAP_SIZE: usize = 64 << 20;
    /// Default limit for map growth: 16 GiB (the map is address space; the
    /// file only holds what is written).
    pub const DEFAULT_MAX_MAP_SIZE: usize = match 1usize.checked_shl(34) {
        Some(size) => size,
        None => usize::MAX,
    };
    /// Default number of reader slots (LMDB's default): how many read
    /// transactions may be open at once.
    pub const DEFAULT_MAX_READERS: u32 = 126;

    /// The defaults.
    pub fn new() -> Self {
        StoreOptions {
            map_size: Self::DEFAULT_MAP_SIZE,
            max_map_size: Self::DEFAULT_MAX_MAP_SIZE,
            max_readers: Self::DEFAULT_MAX_READERS,
        }
    }

    /// The map size to open with, in bytes; rounded up to whole pages and
    /// to at least 1 MiB, and raised to twice the file's size when the file
    /// is bigger. The map doubles when a write needs more.
    pub fn map_size(mut self, bytes: usize) -> Self {
        self.map_size = bytes;
        self
    }

    /// The size the map may grow to, in bytes. A write that needs more
    /// fails with [`Error::MapLimit`].
    pub fn max_map_size(mut self, bytes: usize) -> Self {
        self.max_map_size = bytes;
        self
    }

    /// The number of read transactions that may be open at once, across
    /// all threads.
    pub fn max_readers(mut self, readers: u32) -> Self {
        self.max_readers = readers;
        self
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// Whether this thread is inside a store transaction.
    static IN_TXN: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a transaction while it lives.
struct TxnGuard(());

impl TxnGuard {
    fn enter() -> Result<TxnGuard> {
        // Outside thread-local storage's life (thread exit) nothing is checked.
        if IN_TXN.try_with(|t| t.replace(true)).unwrap_or(false) {
            return Err(Error::NestedTransaction);
        }
        Ok(TxnGuard(()))
    }
}

impl Drop for TxnGuard {
    fn drop(&mut self) {
        let _ = IN_TXN.try_with(|t| t.set(false));
    }
}

/// What the write loop does after a failed attempt.
enum Retry {
    /// Grow the map past this size and run the closure again.
    Grow(usize),
    /// Adopt a map size changed by another process and run it again.
    Adopt,
}

/// The node's state: one LMDB environment with every database open.
///
/// Share it between threads with an `Arc`; it is `Send` and `Sync`.
pub struct Store {
    env: heed::Env<WithoutTls>,
    dbs: Databases<'static>,
    /// Held shared by every transaction, exclusively by map resizes.
    gate: RwLock<()>,
    path: PathBuf,
    max_map_size: usize,
}

impl Store {
    /// Opens or creates `<dir>/state.lmdb`, creating `dir` (mode 0700) when
    /// missing.
    ///
    /// Creates any missing database, then checks the schema version: a new
    /// file gets [`SCHEMA_VERSION`](crate::SCHEMA_VERSION), an older one is
    /// migrated in one write transaction, a newer one is refused with
    /// [`Error::SchemaTooNew`] and left untouched.
    ///
    /// One process at a time should open the file for writing; within a
    /// process, a second `open` of the same file fails until the first
    /// store is dropped.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        Store::open_with_schema(dir.as_ref(), options, &schema::CURRENT)
    }

    pub(crate) fn open_with_schema(
        dir: &Path,
        options: StoreOptions,
        schema: &Schema,
    ) -> Result<Store> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        let path = dir.join(FILE_NAME);
        let page = page_size::get();
        let file_len = fs::metadata(&path)
            .map(|m| usize::try_from(m.len()).unwrap_or(usize::MAX))
            .unwrap_or(0);
        let max_map_size = round_up(options.max_map_size.max(MIN_MAP_SIZE), page);
        let map_size = round_up(
            options
                .map_size
                .max(MIN_MAP_SIZE)
                .max(file_len.saturating_mul(2))
                .min(max_map_size),
            page,
        );

        let mut env_options = heed::EnvOpenOptions::new().read_txn_without_tls();
        env_options
            .map_size(map_size)
            .max_readers(options.max_readers)
            .max_dbs(MAX_DBS);
        // SAFETY: NO_SUB_DIR only says `path` is the data file rather than a
        // directory; it relaxes neither syncing nor locking.
        unsafe {
            env_options.flags(EnvFlags::NO_SUB_DIR);
        }
        // SAFETY: LMDB memory-maps the file, so it must not be changed other
        // than through LMDB. The file is private to the agent (mode 0600 in
        // a 0700 directory), is opened without NO_LOCK so LMDB's lock file
        // coordinates any other process, and heed refuses a second open of
        // the same file in this process. The state directory must be local
        // (not NFS), as docs/state.md says.
        let env = unsafe { env_options.open(&path) }.map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        // Free reader slots left by processes that died mid-read.
        env.clear_stale_readers()
            .map_err(|e| Error::lmdb("clear stale reader slots", e))?;

        let dbs = schema::create_databases(&env, &path, schema)?;
        let store = Store {
            env,
            dbs,
            gate: RwLock::new(()),
            path,
            max_map_size,
        };
        schema::migrate(&store, schema)?;
        Ok(store)
    }

    /// The `state.lmdb` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current map size in bytes (how large the file may get before
    /// the map grows again).
    pub fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// Runs `f` on a read-only snapshot and returns what it returns.
    ///
    /// The snapshot does not change while `f` runs, whatever other threads
    /// write. It holds at least every write whose [`Store::write`] returned
    /// before `read` was called. It may also hold a write still committing
    /// on another thread, so two reads in a row can, in that race, see that
    /// newest write and then the one before it (LMDB picks the snapshot
    /// from its two meta pages without a lock). Decide in a write
    /// transaction, which always starts from the newest state. Keep `f` short: the snapshot holds a reader slot and keeps
    /// old pages from being reused. Do not open another transaction inside
    /// `f` (that is [`Error::NestedTransaction`]).
    pub fn read<T>(&self, f: impl FnOnce(&ReadTxn<'_>) -> Result<T>) -> Result<T> {
        let _nesting = TxnGuard::enter()?;
        for _ in 0..3 {
            let gate = self.shared_gate();
            match self.env.read_txn() {
                Ok(txn) => {
                    let txn = ReadTxn {
                        txn,
                        dbs: &self.dbs,
                        _gate: gate,
                    };
                    return f(&txn);
                }
                Err(heed::Error::Mdb(MdbError::MapResized)) => {
                    drop(gate);
                    self.resize(Retry::Adopt)?;
                }
                Err(e) => return Err(Error::lmdb("begin a read transaction", e)),
            }
        }
        Err(Error::lmdb(
            "begin a read transaction",
            heed::Error::Mdb(MdbError::MapResized),
        ))
    }

    /// Runs `f` in a write transaction and commits what it did when it
    /// returns `Ok`; when it returns `Err`, nothing it did is kept.
    ///
    /// When the map is full, the transaction is dropped, the map grows and
    /// **`f` runs again** from the start, so `f` must not have effects
    /// outside the transaction (no files, no processes, no messages): do
    /// those after `write` returns, or record intent here and act after.
    /// Writes are serialized: one write transaction at a time in the whole
    /// environment. Do not open another transaction inside `f`.
    pub fn write<T>(&self, f: impl FnMut(&mut WriteTxn<'_>) -> Result<T>) -> Result<T> {
        self.write_with(f)
    }

    /// [`write`](Store::write) for closures with their own error type, such
    /// as the agent's, so that a refusal ("sandbox is not running") can
    /// abort the transaction without becoming a store error.
    pub fn write_with<T, E: From<Error>>(
        &self,
        mut f: impl FnMut(&mut WriteTxn<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let _nesting = TxnGuard::enter()?;
        loop {
            let retry = {
                let gate = self.shared_gate();
                let seen = self.map_size();
                match self.env.write_txn() {
                    Err(heed::Error::Mdb(MdbError::MapResized)) => Retry::Adopt,
                    Err(e) => return Err(Error::lmdb("begin a write transaction", e).into()),
                    Ok(txn) => {
                        let mut txn = WriteTxn {
                            txn,
                            dbs: &self.dbs,
                            map_full: false,
                            _gate: gate,
                        };
                        let result = f(&mut txn);
                        if txn.map_full {
                            // Whatever `f` made of the error, the transaction
                            // is unusable: drop it and try again, bigger.
                            Retry::Grow(seen)
                        } else {
                            let value = result?;
                            match txn.txn.commit() {
                                Ok(()) => return Ok(value),
                                Err(e) if is_map_full(&e) => Retry::Grow(seen),
                                Err(e) => {
                                    return Err(Error::lmdb("commit a write transaction", e).into())
                                }
                            }
                        }
                    }
                }
                // The transaction and then the gate are dropped here.
            };
            self.resize(retry)?;
        }
    }

    /// Writes a compacted copy of the whole store to `path`, which must not
    /// exist yet, while the store stays in use. To restore it, stop the
    /// agent and put the copy in place of `state.lmdb`.
    pub fn backup_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let _nesting = TxnGuard::enter()?;
        let failed = |source| Error::Backup {
            path: path.to_owned(),
            source,
        };
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| failed(heed::Error::Io(e)))?;
        let copied = {
            // The copy runs a read transaction of its own.
            let _gate = self.shared_gate();
            self.env.copy_to_file(&mut file, CompactionOption::Enabled)
        };
        match copied.and_then(|()| file.sync_all().map_err(heed::Error::Io)) {
            Ok(()) => Ok(()),
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(path);
                Err(failed(e))
            }
        }
    }

    fn shared_gate(&self) -> RwLockReadGuard<'_, ()> {
        // Nothing panics while holding the gate exclusively, and a read
        // guard does not poison it; a poisoned gate is still a valid one.
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the map size with every transaction of this process ended.
    fn resize(&self, retry: Retry) -> Result<()> {
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let current = self.map_size();
        let target = match retry {
            // LMDB reads the size another process set from the file.
            Retry::Adopt => 0,
            // Another thread grew it meanwhile: just try again.
            Retry::Grow(seen) if current > seen => return Ok(()),
            Retry::Grow(_) if current >= self.max_map_size => {
                return Err(Error::MapLimit {
                    path: self.path.clone(),
                    size: current,
                    limit: self.max_map_size,
                })
            }
            Retry::Grow(_) => {
                round_up(current.saturating_mul(2), page_size::get()).min(self.max_map_size)
            }
        };
        // SAFETY: LMDB requires that no transaction of this process is open
        // while the map is resized. Every transaction holds `gate` shared
        // for its whole life and we hold it exclusively, so none is.
        unsafe { self.env.resize(target) }.map_err(|source| Error::Resize {
            path: self.path.clone(),
            from: current,
            to: target,
            source,
        })
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("map_size", &self.map_size())
            .field("max_map_size", &self.max_map_size)
            .finish_non_exhaustive()
    }
}

/// `n` rounded up to a multiple of `page` (a power of two), or the largest
/// such multiple when that would overflow.
fn round_up(n: usize, page: usize) -> usize {
    let page = page.max(1);
    match n.checked_next_multiple_of(page) {
        Some(rounded) => rounded,
        None => usize::MAX / page * page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn round_up_to_pages() {
        assert_eq!(round_up(0, 4096), 0);
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
        assert_eq!(round_up(usize::MAX, 4096), usize::MAX / 4096 * 4096);
    }

    #[test]
    fn nested_transactions_are_refused_not_deadlocked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::new()).unwrap();
        let inner = store.read(|_| Ok(store.write(|_| Ok(())))).unwrap();
        assert!(matches!(inner, Err(Error::NestedTransaction)));
        let inner = store.write(|_| Ok(store.read(|_| Ok(())))).unwrap();
        assert!(matches!(inner, Err(Error::NestedTransaction)));
        // The thread is usable again afterwards.
        store.read(|_| Ok(())).unwrap();
    }

    #[test]
    fn damaged_values_written_raw_are_decode_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::new()).unwrap();
        let db = store.dbs.sandboxes;
        store
            .write(|w| {
                w.put_raw(db, b"sb-empty", &[])?;
                w.put_raw(db, b"sb-newer", &[9, 1, 2])?;
                w.put_raw(db, b"sb-junk", &[1, 0xff, 0xff])
            })
            .unwrap();
        store
            .read(|r| {
                let table = r.sandboxes();
                let get = |id: &str| table.get(&crate::SandboxId::parse(id).unwrap());
                assert!(matches!(get("sb-empty"), Err(Error::EmptyRecord { .. })));
                assert!(matches!(
                    get("sb-newer"),
                    Err(Error::UnknownRecordVersion {
                        version: 9,
                        known: 5,
                        ..
                    })
                ));
                assert!(matches!(get("sb-junk"), Err(Error::CorruptRecord { .. })));
                Ok(())
            })
            .unwrap();
    }
}
