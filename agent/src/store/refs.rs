//! Reference counts of layers and garbage collection.
//!
//! A retained header holds one reference on each layer it lists. Counts
//! change only inside the caller's write transaction, together with the
//! record that says who uses the header, so a crash never separates the
//! two. Files are deleted only by [`LayerStore::collect_garbage`], after
//! the commit that let their count reach 0; it also removes what a crash
//! can leave behind (files without records, temporary files) and reports
//! records whose file is gone.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;

use lmdb_schema::{LayerId, LayerRecord, WriteTxn};

use super::error::{Error, Result};
use super::layer::{list, sync_dir, Entry};
use super::{FormatError, LayerStore};
use crate::clock::now_ms;
use wrenn_layers::{Header, HeaderId, LayerRef};

/// What [`LayerStore::collect_garbage`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Layers whose refcount was 0: record and file deleted.
    pub deleted: Vec<LayerId>,
    /// Layer files without a record (a crash between writing the file and
    /// recording it): deleted.
    pub strays: Vec<LayerId>,
    /// Records of used layers whose file is missing: kept and reported,
    /// since the snapshots using them cannot be restored.
    pub missing: Vec<LayerId>,
    /// Temporary files left by an earlier process: deleted.
    pub temp_files: usize,
}

/// The outcome of the collection's write transaction.
#[derive(Default)]
struct Swept {
    deleted: Vec<LayerId>,
    recorded: HashSet<LayerId>,
    referenced: Vec<LayerId>,
}

impl LayerStore {
    /// Takes one reference on every layer `header` lists, creating the
    /// records of new layers, inside the caller's write transaction.
    ///
    /// A layer without a record must have its file in place (a layer this
    /// process just wrote). Like any write closure, this may run more than
    /// once; it only reads files.
    pub fn retain(&self, txn: &mut WriteTxn<'_>, header: &Header) -> Result<()> {
        let now = now_ms();
        for layer in header.layers() {
            let record = match txn.layers().get(&layer.id)? {
                Some(mut record) => {
                    record.refcount = record.refcount.saturating_add(1);
                    record
                }
                None => self.new_record(layer, header.block_size(), now)?,
            };
            txn.layers().put(&layer.id, &record)?;
        }
        Ok(())
    }

    /// The record of a layer being recorded for the first time.
    fn new_record(&self, layer: &LayerRef, block_size: u32, now: u64) -> Result<LayerRecord> {
        let path = self.layer_path(&layer.id);
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(FormatError::LayerMissing { id: layer.id, path }.into())
            }
            Err(e) => return Err(Error::io("inspect", path)(e)),
        };
        let expected = layer.blocks.saturating_mul(u64::from(block_size));
        if size != expected {
            return Err(Error::LayerCorrupt {
                id: layer.id,
                path,
                problem: format!(
                    "is {size} bytes but the header says {} blocks of {block_size}",
                    layer.blocks
                ),
            });
        }
        Ok(LayerRecord {
            size_bytes: size,
            block_size,
            blocks: layer.blocks,
            sha256: layer.id.0,
            refcount: 1,
            created_at_ms: now,
        })
    }

    /// Gives back the references `header` took, inside the caller's write
    /// transaction. Returns the layers no header uses any more; their files
    /// go at the next [`collect_garbage`](LayerStore::collect_garbage),
    /// after this transaction commits.
    pub fn release(&self, txn: &mut WriteTxn<'_>, header: &Header) -> Result<Vec<LayerId>> {
        let mut unreferenced = Vec::new();
        for layer in header.layers() {
            let underflow = |state| Error::RefcountUnderflow {
                id: layer.id,
                state,
            };
            let mut record = txn
                .layers()
                .get(&layer.id)?
                .ok_or_else(|| underflow("missing"))?;
            record.refcount = record
                .refcount
                .checked_sub(1)
                .ok_or_else(|| underflow("at refcount 0"))?;
            txn.layers().put(&layer.id, &record)?;
            if record.is_unreferenced() {
                unreferenced.push(layer.id);
            }
        }
        Ok(unreferenced)
    }

    /// Deletes layers at refcount 0 (record, then file), layer files
    /// without a record and leftover temporary files; reports records whose
    /// file is missing. Layers of unsettled snapshots of this process are
    /// spared. Run it after commits that released headers and at start.
    pub fn collect_garbage(&self) -> Result<GcReport> {
        let mut files = HashSet::new();
        let mut temps = Vec::new();
        for entry in list(&self.layers_dir)? {
            match entry {
                Entry::Content(digest) => {
                    files.insert(LayerId(digest));
                }
                Entry::Temp(name) => temps.push(name),
                Entry::Other => {}
            }
        }
        let (fresh, _) = self.fresh();
        let swept = self.db.write_with(|txn| sweep(txn, &fresh))?;
        let mut report = GcReport {
            deleted: swept.deleted,
            ..GcReport::default()
        };
        for id in &report.deleted {
            self.remove_layer(id)?;
        }
        report.strays = files
            .into_iter()
            .filter(|id| !swept.recorded.contains(id) && !fresh.contains(id))
            .collect();
        report.strays.sort_unstable();
        for id in &report.strays {
            self.remove_layer(id)?;
        }
        report.temp_files = self.remove_temps(&self.layers_dir, temps)?;
        report.missing = self.missing(&swept.referenced);
        sync_dir(&self.layers_dir)?;
        Ok(report)
    }

    /// Deletes a layer file; one already gone is fine.
    fn remove_layer(&self, id: &LayerId) -> Result<()> {
        self.forget_file(id);
        let path = self.layer_path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
            _ => Ok(()),
        }
    }

    /// Deletes the temporary files in `names` that nothing is writing.
    fn remove_temps(&self, dir: &std::path::Path, names: Vec<std::ffi::OsString>) -> Result<usize> {
        let stale: Vec<_> = {
            let pending = self.pending();
            names
                .into_iter()
                .filter(|n| !pending.temps.contains(n))
                .collect()
        };
        for name in &stale {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(Error::io("remove", path)(e))
                }
                _ => {}
            }
        }
        Ok(stale.len())
    }

    /// The layers in `referenced` whose file is gone, each logged.
    fn missing(&self, referenced: &[LayerId]) -> Vec<LayerId> {
        let missing: Vec<LayerId> = referenced
            .iter()
            .filter(|id| !self.layer_path(id).exists())
            .copied()
            .collect();
        for id in &missing {
            let path = self.layer_path(id);
            tracing::error!(layer = %id, path = %path.display(), "a layer in use is missing: the snapshots that use it cannot be restored");
        }
        missing
    }

    /// Deletes header files that are not in `keep`, except headers saved by
    /// this process and not yet settled, and leftover temporary files.
    /// Returns the deleted ids. The caller builds `keep` from every record
    /// that names a header.
    pub fn prune_headers(&self, keep: &HashSet<HeaderId>) -> Result<Vec<HeaderId>> {
        self.prune_headers_with(|| Ok(keep.clone()))
    }

    /// [`prune_headers`](LayerStore::prune_headers) with `keep` read by the
    /// store while nothing can slip between: a header settled after `keep`
    /// is read is still protected, and one settled before has its record
    /// committed before, so `keep` (read from the records) holds it. Use
    /// this while other threads record headers.
    pub fn prune_headers_with(
        &self,
        keep: impl FnOnce() -> Result<HashSet<HeaderId>>,
    ) -> Result<Vec<HeaderId>> {
        let (_, fresh) = self.fresh();
        let keep = keep()?;
        let mut removed = Vec::new();
        let mut temps = Vec::new();
        for entry in list(&self.headers_dir)? {
            match entry {
                Entry::Content(digest) => {
                    let id = HeaderId(digest);
                    if !keep.contains(&id) && !fresh.contains(&id) {
                        let path = self.header_path(&id);
                        fs::remove_file(&path).map_err(Error::io("remove", path))?;
                        removed.push(id);
                    }
                }
                Entry::Temp(name) => temps.push(name),
                Entry::Other => {}
            }
        }
        self.remove_temps(&self.headers_dir, temps)?;
        sync_dir(&self.headers_dir)?;
        removed.sort_unstable();
        Ok(removed)
    }
}

/// Deletes the records at refcount 0 (except `fresh` ones) and notes every
/// record. Runs inside a write closure, so it starts from scratch each time.
fn sweep(txn: &mut WriteTxn<'_>, fresh: &HashSet<LayerId>) -> Result<Swept> {
    let records: Vec<(LayerId, LayerRecord)> =
        txn.layers().iter()?.collect::<lmdb_schema::Result<_>>()?;
    let mut swept = Swept::default();
    for (id, record) in records {
        swept.recorded.insert(id);
        if !record.is_unreferenced() {
            swept.referenced.push(id);
        } else if !fresh.contains(&id) {
            txn.layers().delete(&id)?;
            swept.deleted.push(id);
        }
    }
    Ok(swept)
}
