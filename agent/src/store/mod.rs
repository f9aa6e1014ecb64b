//! The layer store: snapshots of devices (memory, disk) as headers that map
//! every block to zero or to a block of an immutable, content-addressed
//! layer file. The base of pause, resume and snapshot templates; the format
//! is described in `docs/layers.md`.
//!
//! - [`Header`], [`HeaderId`], [`LayerId`] and [`Reader`]: the format, from
//!   the `wrenn-layers` crate (shared with the VMM), re-exported here.
//! - `merge.rs`: a child header from its parent and a diff, already
//!   pointing every block at its final source (no chains).
//! - `layer.rs`: layer files, written under a temporary name, fsynced and
//!   renamed to the hex SHA-256 of their content.
//! - `refs.rs`: reference counts in LMDB's `layers` database and garbage
//!   collection after commits.
//! - `io.rs`: batched reads and writes through io_uring, or pread/pwrite.
//! - `snapshot.rs`, `read.rs`: the operations runtimes call:
//!   [`LayerStore::snapshot_file`], [`LayerStore::materialize`],
//!   [`LayerStore::read_blocks`].
//!
//! State on disk: `<state dir>/layers/<id>` and `<state dir>/headers/<id>`.

mod error;
mod io;
mod layer;
mod merge;
mod read;
mod refs;
mod snapshot;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lmdb_schema::Store;

pub use error::{Error, Result};
pub use io::{Backend, Io, Op, OpError};
pub use refs::GcReport;
pub use wrenn_layers::{
    check_block_size, Block, Error as FormatError, Extent, Header, HeaderId, LayerId, LayerRef,
    Reader, Source, DISK_BLOCK_SIZE, FORMAT_VERSION, MAX_BLOCK_SIZE, MEMORY_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
};

/// How long a layer or header written by this process is spared by garbage
/// collection when [`LayerStore::settle`] is not called for it.
pub const FRESH_FOR: Duration = Duration::from_secs(30 * 60);
/// Open layer files kept for reads.
const OPEN_FILES: usize = 1024;

/// How to open a [`LayerStore`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Use pread/pwrite even where io_uring works (tests, debugging).
    pub force_fallback: bool,
}

/// What this process is in the middle of, which garbage collection must
/// not mistake for leftovers of a crash.
#[derive(Default)]
struct Pending {
    /// Temporary files being written.
    temps: HashSet<OsString>,
    /// Layers written or reused by a snapshot whose header is not settled.
    layers: HashMap<LayerId, Instant>,
    /// Headers saved but not settled.
    headers: HashMap<HeaderId, Instant>,
}

/// Snapshots of devices in `<state dir>/layers` and `<state dir>/headers`,
/// with reference counts in the LMDB `layers` database. Shared between
/// threads.
pub struct LayerStore {
    db: Arc<Store>,
    layers_dir: PathBuf,
    headers_dir: PathBuf,
    io: Io,
    pending: Mutex<Pending>,
    files: Mutex<HashMap<LayerId, Arc<File>>>,
}

impl std::fmt::Debug for LayerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStore")
            .field("layers_dir", &self.layers_dir)
            .field("backend", &self.io.backend())
            .finish()
    }
}

impl LayerStore {
    /// Opens the store in `state_dir` (creating `layers/` and `headers/`),
    /// with io_uring when it works here.
    pub fn open(state_dir: &Path, db: Arc<Store>) -> Result<LayerStore> {
        LayerStore::open_with(state_dir, db, Options::default())
    }

    /// [`open`](LayerStore::open) with options.
    pub fn open_with(state_dir: &Path, db: Arc<Store>, options: Options) -> Result<LayerStore> {
        let layers_dir = state_dir.join("layers");
        let headers_dir = state_dir.join("headers");
        for dir in [&layers_dir, &headers_dir] {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(Error::io("create the folder", dir))?;
        }
        let io = if options.force_fallback {
            Io::fallback()
        } else {
            Io::probe()
        };
        Ok(LayerStore {
            db,
            layers_dir,
            headers_dir,
            io,
            pending: Mutex::new(Pending::default()),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// How layers are read and written (reported in `GET /v1/node`).
    pub fn backend(&self) -> Backend {
        self.io.backend()
    }

    /// The LMDB store holding the `layers` database.
    pub fn db(&self) -> &Arc<Store> {
        &self.db
    }

    /// `<state dir>/layers`.
    pub fn layers_dir(&self) -> &Path {
        &self.layers_dir
    }

    /// `<state dir>/headers`.
    pub fn headers_dir(&self) -> &Path {
        &self.headers_dir
    }

    /// The file of layer `id`.
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.layers_dir.join(id.to_string())
    }

    /// The file of header `id`.
    pub fn header_path(&self, id: &HeaderId) -> PathBuf {
        self.headers_dir.join(id.to_string())
    }

    /// Writes `header` as `headers/<id>` (once: the same header saved twice
    /// is one file) and returns its id. The file is spared by
    /// [`prune_headers`](LayerStore::prune_headers) until
    /// [`settle`](LayerStore::settle) or [`FRESH_FOR`].
    pub fn save_header(&self, header: &Header) -> Result<HeaderId> {
        let bytes = header.encode()?;
        let id = HeaderId::of(&bytes);
        self.mark_fresh_header(id);
        self.write_content(&self.headers_dir, &id.to_string(), &bytes)?;
        Ok(id)
    }

    /// Reads and checks `headers/<id>`: format version, checksum, mapping,
    /// and that the content hashes to `id`.
    pub fn load_header(&self, id: &HeaderId) -> Result<Header> {
        let path = self.header_path(id);
        let bytes = fs::read(&path).map_err(Error::io("read the header", &path))?;
        let header = Header::decode(&format!("header file {}", path.display()), &bytes)?;
        let actual = HeaderId::of(&bytes);
        if actual != *id {
            return Err(Error::HeaderIdMismatch { path, actual });
        }
        Ok(header)
    }

    /// Ends the protection of `header` and its layers from garbage
    /// collection: call it once the transaction that retained the header has
    /// committed, or when giving the header up (its unrecorded layers then
    /// become collectable strays).
    pub fn settle(&self, header: &Header) -> Result<()> {
        let id = header.id()?;
        let mut pending = self.pending();
        pending.headers.remove(&id);
        for layer in header.layers() {
            pending.layers.remove(&layer.id);
        }
        Ok(())
    }

    /// Marks a header as saved but not settled.
    fn mark_fresh_header(&self, id: HeaderId) {
        self.pending().headers.insert(id, Instant::now());
    }

    /// Marks a layer as in use by an unsettled snapshot.
    fn mark_fresh_layer(&self, id: LayerId) {
        self.pending().layers.insert(id, Instant::now());
    }

    /// Layers and headers still protected; forgets expired marks.
    fn fresh(&self) -> (HashSet<LayerId>, HashSet<HeaderId>) {
        let mut pending = self.pending();
        let live = |at: &mut Instant| at.elapsed() < FRESH_FOR;
        pending.layers.retain(|_, at| live(at));
        pending.headers.retain(|_, at| live(at));
        (
            pending.layers.keys().copied().collect(),
            pending.headers.keys().copied().collect(),
        )
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An open handle of layer `id`, cached.
    fn open_layer(&self, id: &LayerId) -> Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = files.get(id) {
            return Ok(Arc::clone(file));
        }
        let file = self.open_layer_file(id)?;
        if files.len() >= OPEN_FILES {
            files.clear();
        }
        let file = Arc::new(file);
        files.insert(*id, Arc::clone(&file));
        Ok(file)
    }

    /// Opens layer `id`; a missing file is the layer format's
    /// `LayerMissing` ([`FormatError`]).
    fn open_layer_file(&self, id: &LayerId) -> Result<File> {
        let path = self.layer_path(id);
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FormatError::LayerMissing {
                id: *id,
                path: path.clone(),
            }
            .into(),
            _ => Error::io("open the layer", &path)(e),
        })
    }

    /// Drops the cached handle of a deleted layer.
    fn forget_file(&self, id: &LayerId) {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_can_be_shared_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<LayerStore>();
        check::<Header>();
        check::<Error>();
    }
}
