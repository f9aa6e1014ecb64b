//! A snapshot template as it travels from node to node (`docs/fleet.md`,
//! "Templates between nodes").
//!
//! A [`Bundle`] lists every file a snapshot restores from, each with its
//! SHA-256 and size: the memory header, the layers that header names, the
//! VM state and the disk. Layers and headers are named by their SHA-256
//! already; the VM state and the disk are hashed once, when the snapshot is
//! taken (or the first time an older snapshot's bundle is asked for), into
//! `bundle.json` in the snapshot's folder. The digest over the list is the
//! snapshot's checksum: its record's `sha256`, gossiped with its name.
//!
//! A node that fetched every file of a bundle (each checked against the
//! bundle, the bundle against the gossiped digest) imports it
//! ([`Snapshots::import`]): layers and header go into its layer store, the
//! VM state and the disk into a new snapshot folder (the disk's backing
//! file pointed at this node's copy of the base image, which must be the
//! same image), and the record is written last, as for a snapshot taken
//! here.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use lmdb_schema::{
    DiskFormat, EventRecord, RuntimeKind, SandboxId, TemplateKind, TemplateName, TemplateRecord,
    VmStateVersion,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::SandboxError;
use super::snapshots::{Snapshot, Snapshots};
use crate::store::{Header, HeaderId, LayerId};

/// The list of a snapshot's VM state and disk checksums, in its folder.
const BUNDLE_FILE: &str = "bundle.json";
/// First line of what a bundle's digest is taken over.
const DIGEST_FORMAT: &str = "wrenn-snapshot-bundle 1";

/// What a file of a bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The memory's layer-store header.
    Header,
    /// A layer the header names.
    Layer,
    /// The VM's device and CPU state.
    VmState,
    /// The disk, as the runtime wrote it.
    Disk,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Header => "header",
            Role::Layer => "layer",
            Role::VmState => "vm_state",
            Role::Disk => "disk",
        }
    }
}

/// One file of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub role: Role,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
    pub size: u64,
}

/// A snapshot template as another node needs it to restore from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub name: String,
    /// SHA-256 over the format and every file's role, checksum and size.
    pub digest: String,
    /// The runtime that took it: only that runtime restores it.
    pub runtime: RuntimeKind,
    pub disk_format: DiskFormat,
    /// The base image its disk rests on, which the importing node must
    /// have; with that image's root file system SHA-256 when known.
    pub base: String,
    pub base_sha256: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub size_bytes: u64,
    pub owner: Option<String>,
    pub parent_sandbox: Option<String>,
    pub created_at_ms: u64,
    pub envd_token: Option<String>,
    pub vm_state_version: Option<VmStateVersion>,
    pub files: Vec<BundleFile>,
}

impl Bundle {
    /// Bytes of every file.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The file with checksum `sha256`.
    pub fn file(&self, sha256: &str) -> Option<&BundleFile> {
        self.files.iter().find(|f| f.sha256 == sha256)
    }

    /// Whether `digest` is the digest of `files`.
    pub fn is_consistent(&self) -> bool {
        digest(&self.files) == self.digest
    }
}

/// The digest of a bundle's files.
pub fn digest(files: &[BundleFile]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DIGEST_FORMAT.as_bytes());
    hasher.update(b"\n");
    for file in files {
        hasher.update(format!("{} {} {}\n", file.role.as_str(), file.sha256, file.size).as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// SHA-256 and size of the file at `path`, read in 1 MiB pieces.
pub fn hash_file(path: &Path) -> Result<(String, u64), SandboxError> {
    let mut file = File::open(path).map_err(SandboxError::io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(SandboxError::io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// The VM state's and disk's entries, as `bundle.json` of `dir` lists
/// them: read, or (a snapshot taken before bundles) hashed and written.
pub(super) fn folder_files(dir: &Path, disk_file: &str) -> Result<Vec<BundleFile>, SandboxError> {
    let listed = dir.join(BUNDLE_FILE);
    if let Some(files) = fs::read(&listed)
        .ok()
        .and_then(|raw| serde_json::from_slice::<Vec<BundleFile>>(&raw).ok())
    {
        return Ok(files);
    }
    let files = hash_folder(dir, disk_file)?;
    write_folder_files(dir, &files)?;
    Ok(files)
}

/// Hashes the VM state and disk of a snapshot folder.
pub(super) fn hash_folder(dir: &Path, disk_file: &str) -> Result<Vec<BundleFile>, SandboxError> {
    let mut files = Vec::new();
    for (role, name) in [
        (Role::VmState, super::snapshots::VM_STATE),
        (Role::Disk, disk_file),
    ] {
        let (sha256, size) = hash_file(&dir.join(name))?;
        files.push(BundleFile { role, sha256, size });
    }
    Ok(files)
}

/// Writes `bundle.json` of `dir`: a temporary name, fsynced, renamed.
pub(super) fn write_folder_files(dir: &Path, files: &[BundleFile]) -> Result<(), SandboxError> {
    let path = dir.join(BUNDLE_FILE);
    let temp = dir.join(format!(".{BUNDLE_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(files)
        .map_err(|e| SandboxError::Internal(format!("cannot encode {}: {e}", path.display())))?;
    fs::write(&temp, bytes).map_err(SandboxError::io("write", &temp))?;
    File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(SandboxError::io("sync", &temp))?;
    fs::rename(&temp, &path).map_err(SandboxError::io("rename into place", &temp))?;
    super::snapshots::sync_dir(dir)
}

/// Every file of a snapshot: its memory header, the header's layers, then
/// the VM state and disk (`folder`).
pub(super) fn bundle_files(
    memory_id: &HeaderId,
    memory: &Header,
    header_size: u64,
    folder: Vec<BundleFile>,
) -> Vec<BundleFile> {
    let mut files = vec![BundleFile {
        role: Role::Header,
        sha256: memory_id.to_string(),
        size: header_size,
    }];
    let block = u64::from(memory.block_size());
    for layer in memory.layers() {
        files.push(BundleFile {
            role: Role::Layer,
            sha256: layer.id.to_string(),
            size: layer.blocks * block,
        });
    }
    files.extend(folder);
    files
}

impl Snapshots<'_> {
    /// The bundle of snapshot `name`, for another node to fetch. A warm
    /// snapshot is each node's own: refused.
    pub fn bundle(&self, name: &str) -> Result<Bundle, SandboxError> {
        let snapshot = self.get(name)?;
        let record = snapshot.record;
        if super::warm::is_warm_name(record.name.as_str()) {
            return Err(SandboxError::Conflict(format!(
                "{name} is a warm snapshot, which every node makes for itself: it does not \
                 travel"
            )));
        }
        let (memory_id, memory) = self.m.snapshot_memory(&record)?;
        let header_path = self.m.layers.header_path(&memory_id);
        let header_size = fs::metadata(&header_path)
            .map_err(SandboxError::io("inspect", &header_path))?
            .len();
        let dir = snapshot_dir(&record)?;
        let disk_file = file_name(&record.rootfs);
        let folder = folder_files(&dir, &disk_file)?;
        let files = bundle_files(&memory_id, &memory, header_size, folder);
        let digest = digest(&files);
        if record.sha256.as_deref() != Some(digest.as_str()) {
            // Taken before bundles: its checksum is recorded now.
            let name = record.name.clone();
            let sum = digest.clone();
            self.m.store().write_with(|txn| {
                if let Some(mut current) = txn.templates().get(&name)? {
                    current.sha256 = Some(sum.clone());
                    txn.templates().put(&name, &current)?;
                }
                Ok::<_, SandboxError>(())
            })?;
        }
        let base = base_name(&record)?;
        Ok(Bundle {
            name: record.name.to_string(),
            digest,
            runtime: record.runtime.unwrap_or(RuntimeKind::Qemu),
            disk_format: record.disk_format,
            base_sha256: self.m.templates.rootfs_sha256(&base),
            base: base.to_string(),
            vcpus: record.vcpus.unwrap_or(1),
            memory_mb: record.memory_mb.unwrap_or(512),
            size_bytes: record.size_bytes,
            owner: record.owner,
            parent_sandbox: record.parent_sandbox.map(|s| s.to_string()),
            created_at_ms: record.created_at_ms,
            envd_token: record.envd_token,
            vm_state_version: record.vm_state_version,
            files,
        })
    }

    /// The path and size of the file of snapshot `name` whose SHA-256 is
    /// `sha256`.
    pub fn bundle_file(&self, name: &str, sha256: &str) -> Result<(PathBuf, u64), SandboxError> {
        let bundle = self.bundle(name)?;
        let file = bundle.file(sha256).ok_or_else(|| {
            SandboxError::NotFound(format!(
                "snapshot {name} has no file with SHA-256 {sha256}: ask for its bundle again \
                 (it may have been replaced)"
            ))
        })?;
        let record = self.get(name)?.record;
        let path = match file.role {
            Role::Header => self.m.layers.header_path(&parse_header_id(sha256)?),
            Role::Layer => self.m.layers.layer_path(&parse_layer_id(sha256)?),
            Role::VmState => snapshot_dir(&record)?.join(super::snapshots::VM_STATE),
            Role::Disk => PathBuf::from(&record.rootfs),
        };
        Ok((path, file.size))
    }

    /// Makes snapshot `bundle.name` of this node from the files in
    /// `staged`, each named by its SHA-256 and already checked against
    /// the bundle (they are moved, not copied: `staged` must be on the
    /// state directory's file system). `from` names the node it came from,
    /// for the event log. A snapshot of that name and digest already here
    /// is returned as it is.
    pub fn import(
        &self,
        bundle: &Bundle,
        staged: &Path,
        from: &str,
    ) -> Result<Snapshot, SandboxError> {
        let name = TemplateName::parse(&bundle.name)
            .map_err(|e| SandboxError::Invalid(format!("snapshot name: {e}")))?;
        if let Some(existing) = self.m.snapshot_record(&name)? {
            if existing.sha256.as_deref() == Some(bundle.digest.as_str()) {
                return self.get(name.as_str());
            }
            return Err(SandboxError::Conflict(format!(
                "this node has another snapshot named {name}: delete it here first"
            )));
        }
        if !bundle.is_consistent() {
            return Err(SandboxError::Invalid(format!(
                "the bundle of snapshot {name} does not match its digest {}",
                bundle.digest
            )));
        }
        let runtime = self.m.runtime.kind();
        if bundle.runtime != runtime {
            return Err(SandboxError::Conflict(format!(
                "snapshot {name} was taken by the {} runtime and this node runs {runtime}: \
                 create it on a node that runs {}",
                bundle.runtime, bundle.runtime
            )));
        }
        let base = TemplateName::parse(&bundle.base)
            .map_err(|e| SandboxError::Invalid(format!("base image: {e}")))?;
        let base_files = self.m.templates.files(&base)?;
        let ours = self.m.templates.rootfs_sha256(&base);
        if let (Some(theirs), Some(ours)) = (&bundle.base_sha256, &ours) {
            if theirs != ours {
                return Err(SandboxError::Conflict(format!(
                    "snapshot {name} rests on base image {base} with root file system \
                     {theirs}, and this node's {base} is {ours}: give every node the same \
                     images (make image) and retry"
                )));
            }
        }
        let staged_file = |role: Role| -> Result<(&BundleFile, PathBuf), SandboxError> {
            let file = bundle.files.iter().find(|f| f.role == role).ok_or(
                SandboxError::BrokenSnapshot {
                    name: name.to_string(),
                    missing: role.as_str(),
                },
            )?;
            Ok((file, staged.join(&file.sha256)))
        };
        let (header_file, header_path) = staged_file(Role::Header)?;
        let header_id = parse_header_id(&header_file.sha256)?;
        let raw = fs::read(&header_path).map_err(SandboxError::io("read", &header_path))?;
        if HeaderId::of(&raw) != header_id {
            return Err(SandboxError::Invalid(format!(
                "the memory header fetched for snapshot {name} does not hash to {header_id}"
            )));
        }
        let header = Header::decode(&format!("fetched header {header_id}"), &raw)
            .map_err(crate::store::Error::from)?;
        for layer in header.layers() {
            if bundle.file(&layer.id.to_string()).is_none() {
                return Err(SandboxError::Invalid(format!(
                    "the bundle of snapshot {name} lacks layer {} of its memory",
                    layer.id
                )));
            }
        }
        // From here the layers are in the store, spared by garbage
        // collection until settled; given up on failure, they are strays.
        let imported = self.install(
            bundle,
            &name,
            staged,
            &header,
            &header_id,
            &base_files,
            from,
        );
        let settled = self.m.layers.settle(&header);
        let snapshot = imported?;
        settled?;
        Ok(snapshot)
    }

    /// [`Snapshots::import`] once the files are checked.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        bundle: &Bundle,
        name: &TemplateName,
        staged: &Path,
        header: &Header,
        header_id: &HeaderId,
        base: &super::templates::TemplateFiles,
        from: &str,
    ) -> Result<Snapshot, SandboxError> {
        for layer in header.layers() {
            self.m
                .layers
                .adopt_layer(&staged.join(layer.id.to_string()), &layer.id)?;
        }
        self.m
            .layers
            .adopt_header(&staged.join(header_id.to_string()), header_id)?;
        let (disk_file, _) = self.m.runtime.snapshot_disk_file();
        let (folder, ()) = self.new_folder(name, |dir| {
            for (role, target) in [
                (Role::VmState, super::snapshots::VM_STATE),
                (Role::Disk, disk_file),
            ] {
                let file = bundle.files.iter().find(|f| f.role == role).ok_or(
                    SandboxError::BrokenSnapshot {
                        name: name.to_string(),
                        missing: role.as_str(),
                    },
                )?;
                let source = staged.join(&file.sha256);
                let dest = dir.join(target);
                fs::rename(&source, &dest).map_err(SandboxError::io("move in", &source))?;
            }
            let disk = dir.join(disk_file);
            self.m.runtime.adopt_disk(&disk, &base.rootfs)?;
            // The disk's backing file may be written anew: hash it again
            // for this node's bundle (its digest stays the fetched one).
            let local = hash_folder(dir, disk_file)?;
            write_folder_files(dir, &local)?;
            for file in [dir.join(super::snapshots::VM_STATE), disk] {
                File::open(&file)
                    .and_then(|f| f.sync_all())
                    .map_err(SandboxError::io("sync", &file))?;
            }
            super::snapshots::sync_dir(dir)
        })?;
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let parent = bundle
            .parent_sandbox
            .as_deref()
            .and_then(|id| SandboxId::parse(id).ok());
        let record = TemplateRecord {
            name: name.clone(),
            kind: TemplateKind::Snapshot,
            vcpus: Some(bundle.vcpus),
            memory_mb: Some(bundle.memory_mb),
            kernel: text(&base.kernel),
            initramfs: text(&base.initramfs),
            rootfs: text(&folder.join(disk_file)),
            disk_format: bundle.disk_format,
            runtime: Some(bundle.runtime),
            size_bytes: bundle.size_bytes,
            sha256: Some(bundle.digest.clone()),
            parent_sandbox: parent,
            created_at_ms: bundle.created_at_ms,
            memory_header: Some(*header_id),
            vm_state: Some(text(&folder.join(super::snapshots::VM_STATE))),
            disk_base: Some(text(&base.rootfs)),
            envd_token: bundle.envd_token.clone(),
            vm_state_version: bundle.vm_state_version,
            owner: bundle.owner.clone(),
        };
        let committed = self.m.store().write_with(|txn| {
            if txn.templates().get(name)?.is_some() {
                return Err(SandboxError::Conflict(format!(
                    "a snapshot named {name} was made here meanwhile: delete one of them"
                )));
            }
            self.m.layers.retain(txn, header)?;
            txn.templates().put(name, &record)?;
            txn.events().append(&EventRecord {
                at_ms: self.m.now_ms(),
                sandbox: None,
                kind: "snapshot_import".into(),
                detail: format!("{name} from node {from}"),
            })?;
            Ok(())
        });
        if let Err(e) = committed {
            let _ = fs::remove_dir_all(&folder);
            return Err(e);
        }
        tracing::info!(snapshot = %name, from, bytes = bundle.bytes(), "snapshot imported");
        Ok(Snapshot {
            record,
            users: Vec::new(),
        })
    }
}

/// The folder of a snapshot: its disk's.
fn snapshot_dir(record: &TemplateRecord) -> Result<PathBuf, SandboxError> {
    Path::new(&record.rootfs)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| SandboxError::BrokenSnapshot {
            name: record.name.to_string(),
            missing: "folder",
        })
}

/// The name of the base image snapshot `record` rests on, if it says.
pub fn base_of(record: &TemplateRecord) -> Option<String> {
    base_name(record).ok().map(|n| n.to_string())
}

/// The base image a snapshot's disk rests on: the folder of its
/// `disk_base`, named like the image.
fn base_name(record: &TemplateRecord) -> Result<TemplateName, SandboxError> {
    let broken = || SandboxError::BrokenSnapshot {
        name: record.name.to_string(),
        missing: "base image",
    };
    let base = record.disk_base.as_deref().ok_or_else(broken)?;
    let folder = Path::new(base)
        .parent()
        .and_then(Path::file_name)
        .ok_or_else(broken)?;
    TemplateName::parse(&folder.to_string_lossy()).map_err(|_| broken())
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn parse_header_id(text: &str) -> Result<HeaderId, SandboxError> {
    HeaderId::parse(text)
        .ok_or_else(|| SandboxError::Invalid(format!("{text} is not a header id (64 hex digits)")))
}

fn parse_layer_id(text: &str) -> Result<LayerId, SandboxError> {
    LayerId::parse(text).map_err(|e| SandboxError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<BundleFile> {
        vec![
            BundleFile {
                role: Role::Header,
                sha256: "aa".repeat(32),
                size: 4096,
            },
            BundleFile {
                role: Role::Disk,
                sha256: "bb".repeat(32),
                size: 1 << 20,
            },
        ]
    }

    #[test]
    fn the_digest_changes_with_any_role_checksum_size_or_order() {
        let base = digest(&files());
        assert_eq!(base, digest(&files()), "stable");
        assert_eq!(base.len(), 64);
        let mut role = files();
        role[1].role = Role::VmState;
        let mut sum = files();
        sum[0].sha256 = "ab".repeat(32);
        let mut size = files();
        size[1].size += 1;
        let mut order = files();
        order.reverse();
        for (what, changed) in [
            ("role", role),
            ("sha", sum),
            ("size", size),
            ("order", order),
        ] {
            assert_ne!(digest(&changed), base, "{what}");
        }
    }

    #[test]
    fn a_folder_is_hashed_once_and_read_back_from_its_list() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(super::super::snapshots::VM_STATE), b"state").unwrap();
        fs::write(dir.path().join("disk.qcow2"), b"disk bytes").unwrap();
        let hashed = folder_files(dir.path(), "disk.qcow2").unwrap();
        assert_eq!(hashed[0].role, Role::VmState);
        assert_eq!(hashed[0].sha256, hex::encode(Sha256::digest(b"state")));
        assert_eq!((hashed[1].role, hashed[1].size), (Role::Disk, 10));
        assert!(dir.path().join(BUNDLE_FILE).is_file());
        // The list is what counts afterwards: the files are not read again.
        fs::write(dir.path().join("disk.qcow2"), b"changed").unwrap();
        assert_eq!(folder_files(dir.path(), "disk.qcow2").unwrap(), hashed);
        assert!(!dir.path().join(format!(".{BUNDLE_FILE}.tmp")).exists());
    }
}
