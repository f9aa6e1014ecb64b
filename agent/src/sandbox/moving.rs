//! A paused sandbox moved to another node (a drain, `docs/fleet.md`,
//! "Drain").
//!
//! The node it leaves writes its [`MoveBundle`]: the sandbox's record, and
//! every file it resumes from, each with its SHA-256 and size, as a
//! snapshot's [`Bundle`](super::Bundle) lists them: the memory header and
//! its layers (from the layer store), the VM state, and the disk flattened
//! over the raw base image (so that it rests on that image only, whatever
//! template the sandbox came from). The list is kept as `move.json` in the
//! sandbox's folder while the move lasts, for the other node's fetches.
//!
//! The node it goes to fetches the files (`api/drain.rs`), then
//! [`Manager::move_in`] puts layers and header into its layer store, the
//! VM state and disk into the sandbox's folder (the disk pointed at this
//! node's base image), and writes the record, paused, last. The node it
//! left then forgets it ([`Manager::move_out`]): the id stays the same, so
//! every client keeps its handle.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus};
use serde::{Deserialize, Serialize};

use super::bundle::{self, hash_file, BundleFile, Role};
use super::error::SandboxError;
use super::manager::Manager;
use super::registry::log_event;
use crate::store::{Header, HeaderId, LayerId};

/// The list of a moving sandbox's files, in its folder.
const MOVE_FILE: &str = "move.json";
/// The disk, flattened over its base image, as it travels.
const MOVING_DISK: &str = "moving-disk";

/// A paused sandbox as another node needs it to resume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveBundle {
    /// Its record on the node it leaves (paused).
    pub record: SandboxRecord,
    /// The base image its disk rests on, and that image's root file system
    /// SHA-256 when known: the node it goes to must have the same.
    pub base: String,
    pub base_sha256: Option<String>,
    /// Whether it ran before the move (and is resumed after it).
    pub was_running: bool,
    pub files: Vec<BundleFile>,
}

impl MoveBundle {
    /// Bytes of every file.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

impl Manager {
    /// Moves paused sandbox `id` away: its bundle is written, `send` hands
    /// it to the node it goes to (which fetches the files, and answers once
    /// the sandbox is there), and then this node forgets it. Other calls on
    /// the sandbox wait (409, busy) until the move ends; when `send` fails,
    /// the sandbox stays here, paused, as it was.
    pub fn move_out(
        &self,
        id: &SandboxId,
        was_running: bool,
        send: impl FnOnce(&MoveBundle) -> Result<(), String>,
    ) -> Result<Result<(), String>, SandboxError> {
        let (_busy, record) = self.registry.claim_in(id, SandboxStatus::Paused, "move")?;
        let dir = self.sandbox_dir(id);
        let bundle = self.move_bundle(&record, was_running)?;
        let sent = send(&bundle);
        let _ = fs::remove_file(dir.join(MOVE_FILE));
        let _ = fs::remove_file(dir.join(MOVING_DISK));
        if sent.is_err() {
            return Ok(sent);
        }
        tracing::info!(sandbox = %id, bytes = bundle.bytes(), "sandbox moved away");
        self.tear_down(&record);
        self.forget(&record, "move_out", "")?;
        Ok(Ok(()))
    }

    /// Writes the move bundle of paused `record`: the disk flattened, every
    /// file hashed, the list in `move.json`.
    fn move_bundle(
        &self,
        record: &SandboxRecord,
        was_running: bool,
    ) -> Result<MoveBundle, SandboxError> {
        let dir = self.sandbox_dir(&record.id);
        let (base, base_raw) = self.base_of(record)?;
        let disk = dir.join(MOVING_DISK);
        self.runtime.snapshot_disk(&dir, &base_raw, &disk)?;
        let mut files = Vec::new();
        if let Some(header) = self.load_memory(record.memory_header)? {
            let header_id = header.id().map_err(crate::store::Error::from)?;
            let path = self.layers.header_path(&header_id);
            let size = fs::metadata(&path)
                .map_err(SandboxError::io("inspect", &path))?
                .len();
            files.push(BundleFile {
                role: Role::Header,
                sha256: header_id.to_string(),
                size,
            });
            let block = u64::from(header.block_size());
            for layer in header.layers() {
                files.push(BundleFile {
                    role: Role::Layer,
                    sha256: layer.id.to_string(),
                    size: layer.blocks * block,
                });
            }
        }
        for (role, path) in [
            (Role::VmState, self.state_file(&record.id)),
            (Role::Disk, disk),
        ] {
            let (sha256, size) = hash_file(&path)?;
            files.push(BundleFile { role, sha256, size });
        }
        let bundle = MoveBundle {
            record: record.clone(),
            base_sha256: self.templates.rootfs_sha256(&base),
            base: base.to_string(),
            was_running,
            files,
        };
        let raw = serde_json::to_vec(&bundle)
            .map_err(|e| SandboxError::Internal(format!("cannot encode a move bundle: {e}")))?;
        write_synced(&dir, MOVE_FILE, &raw)?;
        Ok(bundle)
    }

    /// The move bundle of sandbox `id`, while it moves.
    pub fn moving(&self, id: &SandboxId) -> Result<MoveBundle, SandboxError> {
        let path = self.sandbox_dir(id).join(MOVE_FILE);
        let raw = fs::read(&path).map_err(|_| {
            SandboxError::NotFound(format!(
                "sandbox {id} is not moving from this node: a drain moves it"
            ))
        })?;
        serde_json::from_slice(&raw)
            .map_err(|e| SandboxError::Internal(format!("{}: {e}", path.display())))
    }

    /// The path and size of the file of moving sandbox `id` with checksum
    /// `sha256`.
    pub fn moving_file(
        &self,
        id: &SandboxId,
        sha256: &str,
    ) -> Result<(PathBuf, u64), SandboxError> {
        let bundle = self.moving(id)?;
        let file = bundle
            .files
            .iter()
            .find(|f| f.sha256 == sha256)
            .ok_or_else(|| {
                SandboxError::NotFound(format!("sandbox {id} has no file with SHA-256 {sha256}"))
            })?;
        let path = match file.role {
            Role::Header => self.layers.header_path(&header_id(sha256)?),
            Role::Layer => self.layers.layer_path(&layer_id(sha256)?),
            Role::VmState => self.state_file(id),
            Role::Disk => self.sandbox_dir(id).join(MOVING_DISK),
        };
        Ok((path, file.size))
    }

    /// Makes sandbox `bundle.record.id` of this node, paused, from the
    /// files in `staged` (each named by its SHA-256, already checked, on
    /// the state directory's file system); `from` names the node it left.
    pub fn move_in(
        &self,
        bundle: &MoveBundle,
        staged: &Path,
        from: &str,
    ) -> Result<SandboxRecord, SandboxError> {
        let id = bundle.record.id.clone();
        if self.get(&id).is_ok() {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} is on this node already"
            )));
        }
        let runtime = self.runtime.kind();
        if bundle.record.runtime != runtime {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} was paused under the {} runtime and this node runs {runtime}: \
                 move it to a node that runs {}",
                bundle.record.runtime, bundle.record.runtime
            )));
        }
        let mut record = bundle.record.clone();
        let (base, base_raw) = self.base_of(&record)?;
        let ours = self.templates.rootfs_sha256(&base);
        if let (Some(theirs), Some(ours)) = (&bundle.base_sha256, &ours) {
            if theirs != ours {
                return Err(SandboxError::Conflict(format!(
                    "sandbox {id} rests on base image {base} {theirs}, and this node's is \
                     {ours}: give every node the same images (make image)"
                )));
            }
        }
        let staged_file = |role: Role| -> Result<PathBuf, SandboxError> {
            let file = bundle
                .files
                .iter()
                .find(|f| f.role == role)
                .ok_or_else(|| {
                    SandboxError::Invalid(format!(
                        "the move bundle of {id} lacks its {}",
                        role_name(role)
                    ))
                })?;
            Ok(staged.join(&file.sha256))
        };
        let header = match bundle.files.iter().find(|f| f.role == Role::Header) {
            Some(file) => {
                let hid = header_id(&file.sha256)?;
                let path = staged.join(&file.sha256);
                let raw = fs::read(&path).map_err(SandboxError::io("read", &path))?;
                if HeaderId::of(&raw) != hid {
                    return Err(SandboxError::Invalid(format!(
                        "the memory header fetched for {id} does not hash to {hid}"
                    )));
                }
                let header = Header::decode(&format!("fetched header {hid}"), &raw)
                    .map_err(crate::store::Error::from)?;
                for layer in header.layers() {
                    let staged = staged.join(layer.id.to_string());
                    self.layers.adopt_layer(&staged, &layer.id)?;
                }
                self.layers.adopt_header(&path, &hid)?;
                Some((hid, header))
            }
            None => None,
        };
        let dir = self.sandbox_dir(&id);
        let placed = (|| {
            fs::create_dir_all(&dir)
                .map_err(SandboxError::io("create the sandbox folder", &dir))?;
            let state = self.state_file(&id);
            let state_from = staged_file(Role::VmState)?;
            fs::rename(&state_from, &state).map_err(SandboxError::io("move in", &state_from))?;
            let disk = dir.join(self.runtime.sandbox_disk_file());
            let disk_from = staged_file(Role::Disk)?;
            fs::rename(&disk_from, &disk).map_err(SandboxError::io("move in", &disk_from))?;
            self.runtime.adopt_disk(&disk, &base_raw)?;
            for file in [&state, &disk] {
                File::open(file)
                    .and_then(|f| f.sync_all())
                    .map_err(SandboxError::io("sync", file))?;
            }
            super::snapshots::sync_dir(&dir)
        })();
        let now = self.now_ms();
        record.status = SandboxStatus::Paused;
        record.slot = None;
        record.vmm = None;
        record.error = None;
        record.updated_at_ms = now;
        record.memory_header = header.as_ref().map(|(hid, _)| *hid);
        let committed = placed.and_then(|()| {
            self.store.write_with(|txn| {
                if txn.sandboxes().get(&id)?.is_some() {
                    return Err(SandboxError::Conflict(format!(
                        "sandbox {id} was made here meanwhile"
                    )));
                }
                if let Some((_, header)) = &header {
                    self.layers.retain(txn, header)?;
                }
                txn.sandboxes().put(&id, &record)?;
                log_event(txn, &id, "move_in", &format!("from node {from}"), now)?;
                Ok(())
            })
        });
        if let Some((_, header)) = &header {
            self.layers.settle(header)?;
        }
        if let Err(e) = committed {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(sandbox = %id, from, bytes = bundle.bytes(), "sandbox moved in");
        Ok(record)
    }

    /// The base image sandbox `record`'s disk rests on: its name and this
    /// node's raw root file system of it.
    fn base_of(
        &self,
        record: &SandboxRecord,
    ) -> Result<(lmdb_schema::TemplateName, PathBuf), SandboxError> {
        match self.snapshot_record(&record.template)? {
            Some(snapshot) => {
                let base = bundle::base_of(&snapshot)
                    .and_then(|b| lmdb_schema::TemplateName::parse(&b).ok())
                    .ok_or_else(|| SandboxError::BrokenSnapshot {
                        name: snapshot.name.to_string(),
                        missing: "base image",
                    })?;
                let files = self.templates.files(&base)?;
                Ok((base, files.rootfs))
            }
            None => {
                let files = self.templates.files(&record.template)?;
                Ok((record.template.clone(), files.rootfs))
            }
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Header => "memory header",
        Role::Layer => "memory layer",
        Role::VmState => "VM state",
        Role::Disk => "disk",
    }
}

fn header_id(text: &str) -> Result<HeaderId, SandboxError> {
    HeaderId::parse(text)
        .ok_or_else(|| SandboxError::Invalid(format!("{text} is not a header id (64 hex digits)")))
}

fn layer_id(text: &str) -> Result<LayerId, SandboxError> {
    LayerId::parse(text).map_err(|e| SandboxError::Invalid(e.to_string()))
}

/// `dir/name` written under a temporary name, fsynced, renamed.
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SandboxError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    fs::write(&temp, bytes).map_err(SandboxError::io("write", &temp))?;
    File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(SandboxError::io("sync", &temp))?;
    fs::rename(&temp, &path).map_err(SandboxError::io("rename into place", &temp))?;
    super::snapshots::sync_dir(dir)
}
