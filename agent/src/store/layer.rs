//! Layer files and the content-addressed file mechanics they share with
//! header files.
//!
//! A layer is `<state dir>/layers/<id>`: packed blocks, block `i` at byte
//! `i * block_size`, nothing else; `<id>` is the hex SHA-256 of the file.
//! New files are written as `.tmp-<pid>-<n>` in the same folder, fsynced,
//! renamed to their id (or dropped when a file with that id is already
//! there) and the folder is fsynced, so a name always stands for complete,
//! durable content. [`LayerWriter`] streams blocks into a new layer.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wrenn_layers::LayerId;

use super::error::{Error, Result};
use super::io::{Op, OpError};
use super::LayerStore;
use wrenn_layers::{parse_hex32, LayerRef};

/// Prefix of files being written.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";
/// Bytes gathered before a write batch is submitted.
const WRITE_CHUNK: usize = 8 << 20;
/// Bytes per operation of a write or verify batch.
pub(crate) const OP_BYTES: usize = 1 << 20;

/// What a name in a content-addressed folder is.
pub(crate) enum Entry {
    /// A finished file named by its SHA-256.
    Content([u8; 32]),
    /// A file being written, or left by a crash while it was.
    Temp(OsString),
    /// Anything else (left alone).
    Other,
}

/// Classifies a folder entry by its name.
pub(crate) fn classify(name: OsString) -> Entry {
    let Some(text) = name.to_str() else {
        return Entry::Other;
    };
    if text.starts_with(TEMP_PREFIX) {
        return Entry::Temp(name);
    }
    parse_hex32(text).map_or(Entry::Other, Entry::Content)
}

/// Every entry of `dir`.
pub(crate) fn list(dir: &Path) -> Result<Vec<Entry>> {
    let failed = Error::io("list", dir);
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(failed)? {
        let entry = entry.map_err(Error::io("list", dir))?;
        entries.push(classify(entry.file_name()));
    }
    Ok(entries)
}

/// A fresh temporary name in this process.
fn temp_name() -> OsString {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    OsString::from(format!("{TEMP_PREFIX}{}-{n}", std::process::id()))
}

/// Fsyncs a folder, so that renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync the folder", dir))
}

/// Creates a new file for writing, readable only by its owner.
fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("create", path))
}

/// Gives a finished, fsynced temporary file its content name in `dir`:
/// renames it unless a file of that name exists (same content, so the
/// temporary file is dropped), then fsyncs the folder.
fn install(dir: &Path, temp: &Path, name: &str) -> Result<()> {
    let target = dir.join(name);
    if target.exists() {
        fs::remove_file(temp).map_err(Error::io("remove", temp))?;
    } else {
        fs::rename(temp, &target).map_err(Error::io("rename into place", temp))?;
    }
    sync_dir(dir)
}

impl LayerStore {
    /// Writes `bytes` as `<dir>/<name>` unless that file exists; `name` is
    /// the hex SHA-256 of `bytes`. Used for header files.
    pub(crate) fn write_content(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        if dir.join(name).exists() {
            return Ok(());
        }
        let temp = self.begin_temp(dir);
        let result = self
            .write_temp(&temp, bytes)
            .and_then(|()| install(dir, &temp, name));
        self.end_temp(&temp, result.is_err());
        result
    }

    /// Writes and fsyncs a new temporary file.
    fn write_temp(&self, temp: &Path, bytes: &[u8]) -> Result<()> {
        let file = create_new(temp)?;
        let ops = chunk_ops(&file, 0, bytes.len());
        self.io.write(&ops, bytes).map_err(write_error(temp))?;
        file.sync_all().map_err(Error::io("fsync", temp))
    }

    /// Registers a temporary file so that garbage collection spares it.
    fn begin_temp(&self, dir: &Path) -> PathBuf {
        let name = temp_name();
        self.pending().temps.insert(name.clone());
        dir.join(name)
    }

    /// Forgets a temporary file; removes it when `remove` (a failed write).
    fn end_temp(&self, temp: &Path, remove: bool) {
        if remove {
            let _ = fs::remove_file(temp);
        }
        if let Some(name) = temp.file_name() {
            self.pending().temps.remove(name);
        }
    }

    /// Puts a layer fetched from another node in place: `staged`, a file
    /// on this file system whose SHA-256 the caller checked to be `id`,
    /// becomes `layers/<id>` (or is dropped when that file exists). The
    /// layer is spared by garbage collection until
    /// [`settle`](LayerStore::settle) or [`super::FRESH_FOR`].
    pub fn adopt_layer(&self, staged: &Path, id: &LayerId) -> Result<()> {
        self.mark_fresh_layer(*id);
        File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("fsync", staged))?;
        install(&self.layers_dir, staged, &id.to_string())
    }

    /// [`adopt_layer`](LayerStore::adopt_layer) for a header file.
    pub fn adopt_header(&self, staged: &Path, id: &wrenn_layers::HeaderId) -> Result<()> {
        self.mark_fresh_header(*id);
        File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("fsync", staged))?;
        install(&self.headers_dir, staged, &id.to_string())
    }

    /// Starts a new layer in `layers/`.
    pub(crate) fn layer_writer(&self, block_size: u32) -> LayerWriter<'_> {
        LayerWriter {
            store: self,
            block_size,
            file: None,
            buf: Vec::new(),
            written: 0,
            blocks: 0,
            hasher: Sha256::new(),
        }
    }

    /// Re-reads layer `id` and checks its size and SHA-256 against its record.
    pub fn verify(&self, id: &LayerId) -> Result<()> {
        let record = self
            .db
            .read(|r| r.layers().get(id))?
            .ok_or(Error::LayerUnknown { id: *id })?;
        let path = self.layer_path(id);
        // Not the cached handle: the file may have been put back since.
        let file = self.open_layer_file(id)?;
        let corrupt = |problem: String| Error::LayerCorrupt {
            id: *id,
            path: path.clone(),
            problem,
        };
        let len = file.metadata().map_err(Error::io("inspect", &path))?.len();
        if len != record.size_bytes {
            return Err(corrupt(format!(
                "is {len} bytes but its record says {}",
                record.size_bytes
            )));
        }
        let digest = self.hash_file(&file, len, &path)?;
        if digest != record.sha256 || digest != id.0 {
            return Err(corrupt(format!("hashes to {}", hex::encode(digest))));
        }
        Ok(())
    }

    /// The SHA-256 of the first `len` bytes of `file`, read in batches.
    fn hash_file(&self, file: &File, len: u64, path: &Path) -> Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(WRITE_CHUNK as u64) as usize;
            let ops = chunk_ops(file, at, n);
            self.io
                .read(&ops, &mut buf[..n])
                .map_err(|e| read_error(path.to_owned())(e.source))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hasher.finalize().into())
    }
}

/// Operations covering `len` bytes of `file` from `offset`, buffer from 0,
/// [`OP_BYTES`] each.
pub(crate) fn chunk_ops(file: &File, offset: u64, len: usize) -> Vec<Op<'_>> {
    (0..len)
        .step_by(OP_BYTES)
        .map(|start| {
            let end = (start + OP_BYTES).min(len);
            Op {
                file,
                offset: offset + start as u64,
                range: start..end,
            }
        })
        .collect()
}

/// A new layer being written: blocks are appended in order, hashed as they
/// go and written in batches. Nothing is on disk until the first batch;
/// an unfinished writer removes its temporary file when dropped.
pub(crate) struct LayerWriter<'s> {
    store: &'s LayerStore,
    block_size: u32,
    file: Option<(File, PathBuf)>,
    buf: Vec<u8>,
    written: u64,
    blocks: u64,
    hasher: Sha256,
}

impl LayerWriter<'_> {
    /// Appends one block (exactly `block_size` bytes).
    pub(crate) fn append(&mut self, block: &[u8]) -> Result<()> {
        debug_assert_eq!(block.len(), self.block_size as usize);
        self.hasher.update(block);
        self.buf.extend_from_slice(block);
        self.blocks += 1;
        if self.buf.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is gathered, creating the temporary file first.
    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let temp = self.store.begin_temp(&self.store.layers_dir);
            let file = create_new(&temp);
            let file = file.inspect_err(|_| self.store.end_temp(&temp, false))?;
            self.file = Some((file, temp));
        }
        let Some((file, temp)) = &self.file else {
            return Ok(());
        };
        let ops = chunk_ops(file, self.written, self.buf.len());
        self.store
            .io
            .write(&ops, &self.buf)
            .map_err(write_error(temp))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Finishes the layer: fsync, name it by its SHA-256 (reusing an
    /// existing file of that content), fsync the folder. `None` when no
    /// block was appended. The layer is marked fresh, so garbage collection
    /// leaves it alone until a header that uses it is retained.
    pub(crate) fn finish(mut self) -> Result<Option<LayerRef>> {
        if self.blocks == 0 {
            return Ok(None);
        }
        self.flush()?;
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let id = LayerId(digest);
        let Some((file, temp)) = self.file.take() else {
            return Ok(None);
        };
        // Marked before the name exists, so a concurrent collection never
        // sees it unrecorded and unmarked.
        self.store.mark_fresh_layer(id);
        let result = file
            .sync_all()
            .map_err(Error::io("fsync", &temp))
            .and_then(|()| install(&self.store.layers_dir, &temp, &id.to_string()));
        self.store.end_temp(&temp, result.is_err());
        result?;
        Ok(Some(LayerRef {
            id,
            blocks: self.blocks,
        }))
    }
}

impl Drop for LayerWriter<'_> {
    fn drop(&mut self) {
        if let Some((_, temp)) = self.file.take() {
            self.store.end_temp(&temp, true);
        }
    }
}

/// An `Error::Io` for a failed read of a layer, naming the file.
pub(crate) fn read_error(path: PathBuf) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        action: "read layer",
        path,
        source,
    }
}

/// An `Error::Io` for a failed write batch to `path`.
fn write_error(path: &Path) -> impl FnOnce(OpError) -> Error + '_ {
    move |e| Error::Io {
        action: "write",
        path: path.to_owned(),
        source: e.source,
    }
}
