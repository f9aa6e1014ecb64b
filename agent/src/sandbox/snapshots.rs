//! Snapshot templates: a sandbox frozen under a name, that new sandboxes
//! restore from instead of booting.
//!
//! A snapshot is a `templates` record of kind `Snapshot` and a folder
//! `<state dir>/snapshots/<name>-<random>/` holding:
//!
//! - `vmstate`: the VM's device and CPU state;
//! - the disk, as the runtime writes it ([`crate::runtime::Runtime::snapshot_disk`]):
//!   QEMU's `disk.qcow2`, the sandbox's disk above its base image flattened
//!   into one qcow2 file over that raw image (so snapshots of sandboxes made
//!   from snapshots never chain); the native runtime's `disk.raw`, a raw
//!   copy (reflinked where the file system can) of the sandbox's disk;
//!
//! and the memory as a layer-store header (`memory_header`), whose layers it
//! holds references on. The disk's extension says which runtime took the
//! snapshot; only that runtime restores it. A sandbox made from it holds
//! references on the same layers, starts from a fresh overlay on (QEMU) or
//! copy of (native) the snapshot's disk, and, when paused,
//! stores only the memory blocks it changed. The record is written after the
//! folder is complete, so a folder without a record is a leftover, removed
//! at start.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use lmdb_schema::{
    EventRecord, SandboxId, SandboxStatus, TemplateKind, TemplateName, TemplateRecord,
};

use super::error::SandboxError;
use super::manager::Manager;
use crate::store::{Header, HeaderId};

pub(super) const VM_STATE: &str = "vmstate";
const TEMP_PREFIX: &str = ".tmp-";

/// What a caller asks for when taking a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub sandbox_id: SandboxId,
    /// `None`: a name is made up from the sandbox id and the time.
    pub name: Option<String>,
    /// Replace a snapshot of that name (refused while sandboxes use it).
    pub overwrite: bool,
}

/// What the layer store holds, for `GET /v1/node`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerUsage {
    /// Layer records with a reference.
    pub layers: u64,
    /// Bytes of those layers.
    pub bytes: u64,
    /// Layer files in the folder (more than `layers` only until the next
    /// collection).
    pub files: u64,
    /// Header files in the folder.
    pub headers: u64,
}

/// A snapshot with what the API shows of it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub record: TemplateRecord,
    /// Sandboxes made from it that still exist.
    pub users: Vec<SandboxId>,
}

impl Manager {
    /// The snapshot template called `name`, if there is one.
    pub(super) fn snapshot_record(
        &self,
        name: &TemplateName,
    ) -> Result<Option<TemplateRecord>, SandboxError> {
        let record = self.store().read(|txn| txn.templates().get(name))?;
        Ok(record.filter(TemplateRecord::is_snapshot))
    }

    /// The memory header of snapshot `template`, loaded and checked.
    pub(super) fn snapshot_memory(
        &self,
        template: &TemplateRecord,
    ) -> Result<(HeaderId, Header), SandboxError> {
        let id = template
            .memory_header
            .ok_or_else(|| SandboxError::BrokenSnapshot {
                name: template.name.to_string(),
                missing: "memory",
            })?;
        Ok((id, self.layers.load_header(&id)?))
    }

    /// Deletes header files that no sandbox or snapshot names.
    pub(super) fn prune_headers(&self) -> Result<Vec<HeaderId>, SandboxError> {
        Ok(self.layers.prune_headers_with(|| {
            Ok(self.store().read(|txn| {
                let mut keep = std::collections::HashSet::new();
                for item in txn.templates().iter()? {
                    keep.extend(item?.1.memory_header);
                }
                for item in txn.sandboxes().iter()? {
                    keep.extend(item?.1.memory_header);
                }
                Ok(keep)
            })?)
        })?)
    }
}

/// The snapshot templates of this node ([`Manager::snapshots`]).
pub struct Snapshots<'a> {
    pub(super) m: &'a Manager,
}

impl Snapshots<'_> {
    /// Freezes a sandbox into a snapshot template. A running sandbox is
    /// paused for the time it takes and runs on afterwards; a paused one
    /// stays paused.
    pub fn create(&self, request: SnapshotRequest) -> Result<Snapshot, SandboxError> {
        if let Some(name) = request
            .name
            .as_deref()
            .filter(|n| super::warm::is_warm_name(n))
        {
            return Err(SandboxError::Conflict(format!(
                "{name}: names ending in {} are reserved for the node's warm templates: \
                 choose another name",
                super::warm::WARM_SUFFIX
            )));
        }
        self.create_reserved(request)
    }

    /// [`Snapshots::create`] that may use a reserved (warm) name.
    pub(super) fn create_reserved(
        &self,
        request: SnapshotRequest,
    ) -> Result<Snapshot, SandboxError> {
        let id = request.sandbox_id.clone();
        let name = match &request.name {
            Some(name) => TemplateName::parse(name)
                .map_err(|e| SandboxError::Invalid(format!("name: {e}")))?,
            None => TemplateName::parse(&format!("{}-{}", id, self.m.now_ms()))
                .map_err(|e| SandboxError::Internal(e.to_string()))?,
        };
        if self.m.templates.exists(&name) {
            return Err(SandboxError::Conflict(format!(
                "{name} is the name of a base image: choose another name"
            )));
        }
        self.check_name_free(&name, request.overwrite)?;
        let _busy = self.m.registry.claim(&id)?;
        let record = self.m.get(&id)?;
        let was_running = match record.status {
            SandboxStatus::Running => true,
            SandboxStatus::Paused => false,
            other => {
                return Err(SandboxError::Conflict(format!(
                    "cannot snapshot sandbox {id}: it is {}; only a running or paused sandbox \
                     can be snapshotted",
                    other.as_str()
                )))
            }
        };
        tracing::info!(sandbox = %id, snapshot = %name, was_running, "taking a snapshot");
        let paused = if was_running {
            self.m.pause_claimed(record)?
        } else {
            record
        };
        let taken = self.write_snapshot(&paused, &name, request.overwrite);
        if was_running {
            // Whatever became of the snapshot, the sandbox runs on.
            if let Err(e) = self.m.resume_claimed(paused) {
                tracing::error!(sandbox = %id, error = %e, "cannot resume after the snapshot; it stays paused");
            }
        }
        let record = taken?;
        tracing::info!(sandbox = %id, snapshot = %name, size_bytes = record.size_bytes, "snapshot taken");
        Ok(Snapshot {
            record,
            users: Vec::new(),
        })
    }

    /// 409 when `name` is taken and may not be (or cannot be) replaced.
    fn check_name_free(&self, name: &TemplateName, overwrite: bool) -> Result<(), SandboxError> {
        if self
            .m
            .store()
            .read(|txn| txn.templates().get(name))?
            .is_none()
        {
            return Ok(());
        }
        if !overwrite {
            return Err(SandboxError::Conflict(format!(
                "a snapshot named {name} exists: choose another name, or replace it with \
                 ?overwrite=true"
            )));
        }
        let users = self.users_of(name)?;
        if !users.is_empty() {
            return Err(in_use(name, &users, "replace"));
        }
        Ok(())
    }

    /// Sandboxes that restore from or rest on snapshot `name`.
    fn users_of(&self, name: &TemplateName) -> Result<Vec<SandboxId>, SandboxError> {
        Ok(self
            .m
            .list()?
            .into_iter()
            .filter(|s| &s.template == name)
            .map(|s| s.id)
            .collect())
    }

    /// Writes the folder of a snapshot of the paused `sandbox`, then its
    /// record (replacing an unused one of the same name when `overwrite`).
    fn write_snapshot(
        &self,
        sandbox: &lmdb_schema::SandboxRecord,
        name: &TemplateName,
        overwrite: bool,
    ) -> Result<TemplateRecord, SandboxError> {
        let (memory_id, memory) = match self.m.load_memory(sandbox.memory_header)? {
            Some(header) => (header.id().map_err(crate::store::Error::from)?, header),
            None => {
                return Err(SandboxError::Internal(format!(
                    "sandbox {} has no memory in layers; pause and resume it once, then retry",
                    sandbox.id
                )))
            }
        };
        let (kernel, initramfs, disk_base) = self.boot_files_of(&sandbox.template)?;
        let (disk_file, disk_format) = self.m.runtime.snapshot_disk_file();
        let (final_dir, folder) = self.new_folder(name, |dir| {
            self.write_snapshot_files(sandbox, dir, &disk_base)?;
            // What another node fetches: checksums, and the digest.
            let folder = super::bundle::hash_folder(dir, disk_file)?;
            super::bundle::write_folder_files(dir, &folder)?;
            Ok(folder)
        })?;
        let digest = {
            let header = self.m.layers.header_path(&memory_id);
            let size = fs::metadata(&header)
                .map_err(SandboxError::io("inspect", &header))?
                .len();
            super::bundle::digest(&super::bundle::bundle_files(
                &memory_id, &memory, size, folder,
            ))
        };
        let files_size = dir_size(&final_dir);
        let memory_size = memory.stored_blocks() * u64::from(memory.block_size());
        let record = TemplateRecord {
            name: name.clone(),
            kind: TemplateKind::Snapshot,
            vcpus: Some(sandbox.vcpus),
            memory_mb: Some(sandbox.memory_mb),
            kernel,
            initramfs,
            rootfs: path_text(&final_dir.join(disk_file)),
            disk_format,
            runtime: Some(self.m.runtime.kind()),
            size_bytes: files_size + memory_size,
            sha256: Some(digest),
            parent_sandbox: Some(sandbox.id.clone()),
            created_at_ms: self.m.now_ms(),
            memory_header: Some(memory_id),
            vm_state: Some(path_text(&final_dir.join(VM_STATE))),
            disk_base: Some(path_text(&disk_base)),
            envd_token: sandbox.envd_token.clone(),
            vm_state_version: sandbox.vm_state_version,
            owner: sandbox.owner.clone(),
        };
        let committed = self.m.store().write_with(|txn| {
            let mut released = Vec::new();
            let mut replaced = None;
            if let Some(old) = txn.templates().get(name)? {
                let in_use = txn.sandboxes().iter()?.any(|s| match s {
                    Ok((_, s)) => &s.template == name,
                    Err(_) => true,
                });
                if !overwrite || in_use {
                    return Err(SandboxError::Conflict(format!(
                        "snapshot {name} was taken or put in use meanwhile: retry"
                    )));
                }
                if let Some(old_memory) = self.m.load_memory(old.memory_header)? {
                    released = self.m.layers.release(txn, &old_memory)?;
                }
                replaced = Some(old);
            }
            self.m.layers.retain(txn, &memory)?;
            txn.templates().put(name, &record)?;
            txn.events().append(&EventRecord {
                at_ms: record.created_at_ms,
                sandbox: Some(sandbox.id.clone()),
                kind: "snapshot_create".into(),
                detail: name.as_str().to_owned(),
            })?;
            Ok((released, replaced))
        });
        let (released, replaced) = match committed {
            Ok(done) => done,
            Err(e) => {
                let _ = fs::remove_dir_all(&final_dir);
                return Err(e);
            }
        };
        let replaced_any = replaced.is_some() || !released.is_empty();
        if let Some(old) = replaced {
            remove_snapshot_dir(&old);
        }
        if replaced_any {
            self.m.collect_layers();
        }
        Ok(record)
    }

    /// `vmstate` copied, the disk written by the runtime (flattened over
    /// `disk_base` or copied), all synced.
    fn write_snapshot_files(
        &self,
        sandbox: &lmdb_schema::SandboxRecord,
        dir: &Path,
        disk_base: &Path,
    ) -> Result<(), SandboxError> {
        let state = dir.join(VM_STATE);
        fs::copy(self.m.state_file(&sandbox.id), &state)
            .map_err(SandboxError::io("copy the VM state to", &state))?;
        let disk = dir.join(self.m.runtime.snapshot_disk_file().0);
        self.m
            .runtime
            .snapshot_disk(&self.m.sandbox_dir(&sandbox.id), disk_base, &disk)?;
        for file in [&state, &disk] {
            File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(SandboxError::io("sync", file))?;
        }
        sync_dir(dir)
    }

    /// A new folder for snapshot `name`, filled by `fill` under a
    /// temporary name and renamed into place once `fill` succeeded (a
    /// folder without a record is removed at start).
    pub(super) fn new_folder<T>(
        &self,
        name: &TemplateName,
        fill: impl FnOnce(&Path) -> Result<T, SandboxError>,
    ) -> Result<(PathBuf, T), SandboxError> {
        fs::create_dir_all(&self.m.snapshots_dir).map_err(SandboxError::io(
            "create the snapshots folder",
            &self.m.snapshots_dir,
        ))?;
        let suffix = hex::encode(random_bytes::<4>()?);
        let final_dir = self.m.snapshots_dir.join(format!("{name}-{suffix}"));
        let temp_dir = self
            .m
            .snapshots_dir
            .join(format!("{TEMP_PREFIX}{name}-{suffix}"));
        fs::create_dir(&temp_dir)
            .map_err(SandboxError::io("create the snapshot folder", &temp_dir))?;
        let filled = match fill(&temp_dir) {
            Ok(filled) => filled,
            Err(e) => {
                let _ = fs::remove_dir_all(&temp_dir);
                return Err(e);
            }
        };
        fs::rename(&temp_dir, &final_dir).map_err(SandboxError::io(
            "move the finished snapshot to",
            &final_dir,
        ))?;
        sync_dir(&self.m.snapshots_dir)?;
        Ok((final_dir, filled))
    }

    /// Kernel, initramfs and base raw image of template `name`.
    fn boot_files_of(
        &self,
        name: &TemplateName,
    ) -> Result<(String, String, PathBuf), SandboxError> {
        if let Some(t) = self.m.snapshot_record(name)? {
            let base = t
                .disk_base
                .clone()
                .ok_or_else(|| SandboxError::BrokenSnapshot {
                    name: name.to_string(),
                    missing: "base image",
                })?;
            return Ok((t.kernel, t.initramfs, PathBuf::from(base)));
        }
        let files = self.m.templates.files(name)?;
        Ok((
            path_text(&files.kernel),
            path_text(&files.initramfs),
            files.rootfs,
        ))
    }

    /// Every snapshot template, by name, with the sandboxes using each.
    pub fn list(&self) -> Result<Vec<Snapshot>, SandboxError> {
        let records: Vec<TemplateRecord> = self.m.store().read(|txn| {
            txn.templates()
                .iter()?
                .map(|r| r.map(|(_, v)| v))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let sandboxes = self.m.list()?;
        Ok(records
            .into_iter()
            .filter(TemplateRecord::is_snapshot)
            .map(|record| Snapshot {
                users: sandboxes
                    .iter()
                    .filter(|s| s.template == record.name)
                    .map(|s| s.id.clone())
                    .collect(),
                record,
            })
            .collect())
    }

    /// One snapshot template.
    pub fn get(&self, name: &str) -> Result<Snapshot, SandboxError> {
        let name = parse_existing(name)?;
        let record = self
            .m
            .snapshot_record(&name)?
            .ok_or_else(|| not_found(&name))?;
        let users = self.users_of(&name)?;
        Ok(Snapshot { record, users })
    }

    /// Deletes a snapshot template that no sandbox uses. A warm snapshot
    /// (`*.warm`) is the node's own while warm-up is on: refused.
    pub fn delete(&self, name: &str) -> Result<(), SandboxError> {
        let name = parse_existing(name)?;
        if super::warm::is_warm_name(name.as_str()) && self.m.config.templates.warm {
            let base = super::warm::warm_base_of(name.as_str()).unwrap_or_default();
            return Err(SandboxError::Conflict(format!(
                "snapshot {name} is the warm snapshot of template {base}, kept by the node: \
                 it is replaced when the image changes; to remove it, turn warm templates off \
                 ([templates] warm = false, or WRENN_WARM=0) and delete it then"
            )));
        }
        self.delete_reserved(&name)
    }

    /// [`Snapshots::delete`] that may delete a warm snapshot.
    pub(super) fn delete_reserved(&self, name: &TemplateName) -> Result<(), SandboxError> {
        let name = name.clone();
        let (record, released) = self.m.store().write_with(|txn| {
            let record = txn
                .templates()
                .get(&name)?
                .filter(TemplateRecord::is_snapshot)
                .ok_or_else(|| not_found(&name))?;
            let mut users = Vec::new();
            for item in txn.sandboxes().iter()? {
                let (_, sandbox) = item?;
                if sandbox.template == name {
                    users.push(sandbox.id);
                }
            }
            if !users.is_empty() {
                return Err(in_use(&name, &users, "delete"));
            }
            let released = match self.m.load_memory(record.memory_header)? {
                Some(memory) => self.m.layers.release(txn, &memory)?,
                None => Vec::new(),
            };
            txn.templates().delete(&name)?;
            txn.events().append(&EventRecord {
                at_ms: self.m.now_ms(),
                sandbox: None,
                kind: "snapshot_delete".into(),
                detail: name.as_str().to_owned(),
            })?;
            Ok((record, released))
        })?;
        remove_snapshot_dir(&record);
        if !released.is_empty() || record.memory_header.is_some() {
            self.m.collect_layers();
        }
        tracing::info!(snapshot = %name, "snapshot deleted");
        Ok(())
    }

    /// Counts what the layer store holds.
    pub fn layer_usage(&self) -> Result<LayerUsage, SandboxError> {
        let mut usage = self.m.store().read(|txn| {
            let mut usage = LayerUsage::default();
            for item in txn.layers().iter()? {
                let (_, layer) = item?;
                if layer.refcount > 0 {
                    usage.layers += 1;
                    usage.bytes += layer.size_bytes;
                }
            }
            Ok(usage)
        })?;
        let count = |dir: &Path| {
            fs::read_dir(dir).map_or(0, |entries| {
                entries
                    .flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count() as u64
            })
        };
        usage.files = count(self.m.layers.layers_dir());
        usage.headers = count(self.m.layers.headers_dir());
        Ok(usage)
    }

    /// At start: removes snapshot folders no record names (a crash while
    /// one was written), layer files no record uses and header files no
    /// record names.
    pub fn clean_files(&self) -> Result<(), SandboxError> {
        let snapshots = self.list()?;
        let kept: Vec<PathBuf> = snapshots
            .iter()
            .filter_map(|s| Path::new(&s.record.rootfs).parent().map(Path::to_path_buf))
            .collect();
        if let Ok(entries) = fs::read_dir(&self.m.snapshots_dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if !kept.contains(&path) {
                    tracing::info!(dir = %path.display(), "removing a snapshot folder no snapshot uses");
                    let _ = fs::remove_dir_all(&path);
                }
            }
        }
        let pruned = self.m.prune_headers()?;
        let report = self.m.layers.collect_garbage()?;
        tracing::info!(
            headers_removed = pruned.len(),
            layers_deleted = report.deleted.len(),
            stray_layers = report.strays.len(),
            missing_layers = report.missing.len(),
            "layer store checked"
        );
        Ok(())
    }
}

fn parse_existing(name: &str) -> Result<TemplateName, SandboxError> {
    TemplateName::parse(name).map_err(|_| {
        SandboxError::NotFound(format!(
            "snapshot {name} does not exist: list snapshots with GET /v1/snapshots"
        ))
    })
}

fn not_found(name: &TemplateName) -> SandboxError {
    SandboxError::SnapshotNotFound(name.to_string())
}

fn in_use(name: &TemplateName, users: &[SandboxId], verb: &str) -> SandboxError {
    let list: Vec<&str> = users.iter().map(SandboxId::as_str).collect();
    SandboxError::Conflict(format!(
        "cannot {verb} snapshot {name}: {} sandbox(es) were made from it and still exist \
         ({}); destroy them first",
        users.len(),
        list.join(", ")
    ))
}

fn remove_snapshot_dir(record: &TemplateRecord) {
    if let Some(dir) = Path::new(&record.rootfs).parent() {
        if let Err(e) = fs::remove_dir_all(dir) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot remove a snapshot folder; it goes at the next start");
        }
    }
}

/// Bytes on disk (allocated blocks) of the files directly in `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SandboxError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(SandboxError::io("sync the folder", dir))
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SandboxError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|source| SandboxError::Randomness {
        what: "a snapshot folder name",
        source,
    })?;
    Ok(bytes)
}
