//! `templates` records: one per template a sandbox can start from, keyed by
//! [`TemplateName`].
//!
//! Paths are stored as the agent gives them (relative to its template
//! directory or absolute); this crate does not touch the files.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{decode_body, sealed::Upgrade, Record};
use crate::keys::sealed::KeyBytes;
use wrenn_layers::HeaderId;

use super::kinds::{DiskFormat, RuntimeKind, VmStateVersion};
use crate::keys::{SandboxId, TemplateName};

/// How a template came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TemplateKind {
    /// Built from a kernel, an initramfs and a root file system; boots cold.
    Base,
    /// Taken from a sandbox; resumes from its memory snapshot.
    Snapshot,
}

impl TemplateKind {
    /// The kind in lowercase, as in APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Base => "base",
            TemplateKind::Snapshot => "snapshot",
        }
    }
}

impl fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One template (record version 4 added `owner`; version 3: says the runtime that took a snapshot,
/// the format of its disk and the version of its VM state, and names its
/// memory header by type; version 2 added what a snapshot restores from).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// Its name; the same as the key.
    pub name: TemplateName,
    /// How it came to be.
    pub kind: TemplateKind,
    /// Virtual CPUs it requires (a snapshot's are fixed); `None`: caller's choice.
    pub vcpus: Option<u32>,
    /// Memory in MiB it requires (a snapshot's is fixed); `None`: caller's choice.
    pub memory_mb: Option<u32>,
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    pub initramfs: String,
    /// Root file system image path.
    pub rootfs: String,
    /// How `rootfs` is laid out.
    pub disk_format: DiskFormat,
    /// The runtime that took a snapshot template, the only one that can
    /// restore it; `None` for a base template, which any runtime boots.
    pub runtime: Option<RuntimeKind>,
    /// Bytes on disk of all its files.
    pub size_bytes: u64,
    /// Lowercase hex SHA-256, when known: of a base's root file system; of
    /// a snapshot, the digest of its bundle (every file it restores from,
    /// with their checksums and sizes), which the fleet gossips and a node
    /// that copies it checks.
    pub sha256: Option<String>,
    /// The sandbox a snapshot template was taken from.
    pub parent_sandbox: Option<SandboxId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// A snapshot's memory: a layer-store header holding references on its
    /// layers.
    pub memory_header: Option<HeaderId>,
    /// A snapshot's saved device and CPU state (path).
    pub vm_state: Option<String>,
    /// The raw image a snapshot's disk (`rootfs`, qcow2) rests on.
    pub disk_base: Option<String>,
    /// The guest agent's token inside a snapshot: a new sandbox uses it once
    /// to hand envd its own.
    pub envd_token: Option<String>,
    /// The version of a native snapshot's VM state; `None` for QEMU's and
    /// for base templates.
    pub vm_state_version: Option<VmStateVersion>,
    /// Who took a snapshot: the owner of the fleet key it was taken with;
    /// only that owner's keys see it. `None`: a node key's, or a base image.
    pub owner: Option<String>,
}

/// Version 3, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct TemplateRecordV3 {
    name: TemplateName,
    kind: TemplateKind,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    kernel: String,
    initramfs: String,
    rootfs: String,
    disk_format: DiskFormat,
    runtime: Option<RuntimeKind>,
    size_bytes: u64,
    sha256: Option<String>,
    parent_sandbox: Option<SandboxId>,
    created_at_ms: u64,
    memory_header: Option<HeaderId>,
    vm_state: Option<String>,
    disk_base: Option<String>,
    envd_token: Option<String>,
    vm_state_version: Option<VmStateVersion>,
}

impl From<TemplateRecordV3> for TemplateRecord {
    fn from(v3: TemplateRecordV3) -> TemplateRecord {
        TemplateRecord {
            name: v3.name,
            kind: v3.kind,
            vcpus: v3.vcpus,
            memory_mb: v3.memory_mb,
            kernel: v3.kernel,
            initramfs: v3.initramfs,
            rootfs: v3.rootfs,
            disk_format: v3.disk_format,
            runtime: v3.runtime,
            size_bytes: v3.size_bytes,
            sha256: v3.sha256,
            parent_sandbox: v3.parent_sandbox,
            created_at_ms: v3.created_at_ms,
            memory_header: v3.memory_header,
            vm_state: v3.vm_state,
            disk_base: v3.disk_base,
            envd_token: v3.envd_token,
            vm_state_version: v3.vm_state_version,
            owner: None,
        }
    }
}

/// Version 2, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct TemplateRecordV2 {
    name: TemplateName,
    kind: TemplateKind,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    kernel: String,
    initramfs: String,
    rootfs: String,
    size_bytes: u64,
    sha256: Option<String>,
    parent_sandbox: Option<SandboxId>,
    created_at_ms: u64,
    memory_header: Option<[u8; 32]>,
    vm_state: Option<String>,
    disk_base: Option<String>,
    envd_token: Option<String>,
}

impl From<TemplateRecordV2> for TemplateRecordV3 {
    /// Version 2 said the disk's format, and with it the runtime that took a
    /// snapshot, only by the file's extension: `.qcow2` was QEMU's, anything
    /// else a raw disk of the native runtime. This is the one place that
    /// still reads it from the name.
    fn from(v2: TemplateRecordV2) -> TemplateRecordV3 {
        let qcow2 = v2.rootfs.ends_with(".qcow2");
        let disk_format = if qcow2 {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        let runtime = (v2.kind == TemplateKind::Snapshot).then_some(if qcow2 {
            RuntimeKind::Qemu
        } else {
            RuntimeKind::Native
        });
        TemplateRecordV3 {
            name: v2.name,
            kind: v2.kind,
            vcpus: v2.vcpus,
            memory_mb: v2.memory_mb,
            kernel: v2.kernel,
            initramfs: v2.initramfs,
            rootfs: v2.rootfs,
            disk_format,
            runtime,
            size_bytes: v2.size_bytes,
            sha256: v2.sha256,
            parent_sandbox: v2.parent_sandbox,
            created_at_ms: v2.created_at_ms,
            memory_header: v2.memory_header.map(HeaderId),
            vm_state: v2.vm_state,
            disk_base: v2.disk_base,
            envd_token: v2.envd_token,
            vm_state_version: None,
        }
    }
}

/// Version 1, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct TemplateRecordV1 {
    name: TemplateName,
    kind: TemplateKind,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    kernel: String,
    initramfs: String,
    rootfs: String,
    size_bytes: u64,
    sha256: Option<String>,
    parent_sandbox: Option<SandboxId>,
    created_at_ms: u64,
}

impl From<TemplateRecordV1> for TemplateRecordV2 {
    fn from(v1: TemplateRecordV1) -> TemplateRecordV2 {
        TemplateRecordV2 {
            name: v1.name,
            kind: v1.kind,
            vcpus: v1.vcpus,
            memory_mb: v1.memory_mb,
            kernel: v1.kernel,
            initramfs: v1.initramfs,
            rootfs: v1.rootfs,
            size_bytes: v1.size_bytes,
            sha256: v1.sha256,
            parent_sandbox: v1.parent_sandbox,
            created_at_ms: v1.created_at_ms,
            memory_header: None,
            vm_state: None,
            disk_base: None,
            envd_token: None,
        }
    }
}

impl TemplateRecord {
    /// Whether sandboxes resume from it rather than boot.
    pub fn is_snapshot(&self) -> bool {
        self.kind == TemplateKind::Snapshot
    }
}

impl Upgrade for TemplateRecord {
    fn own_key(&self) -> Option<Cow<'_, [u8]>> {
        Some(self.name.to_bytes())
    }

    fn upgrade(version: u8, body: &[u8]) -> Option<Result<Self, String>> {
        match version {
            1 => Some(decode_body::<TemplateRecordV1>(body).map(|v1| {
                TemplateRecord::from(TemplateRecordV3::from(TemplateRecordV2::from(v1)))
            })),
            2 => Some(
                decode_body::<TemplateRecordV2>(body)
                    .map(|v2| TemplateRecord::from(TemplateRecordV3::from(v2))),
            ),
            3 => Some(decode_body::<TemplateRecordV3>(body).map(TemplateRecord::from)),
            _ => None,
        }
    }
}

impl Record for TemplateRecord {
    const DATABASE: &'static str = "templates";
    const CURRENT_VERSION: u8 = 4;
    type Key = TemplateName;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::records::samples;

    #[test]
    fn round_trip() {
        let record = samples::template();
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], 4);
        assert_eq!(
            decode::<TemplateRecord>(&record.name, &bytes).unwrap(),
            record
        );
        assert!(record.is_snapshot());
        assert_eq!(TemplateKind::Base.to_string(), "base");
    }
}
