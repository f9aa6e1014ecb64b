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

/// One template (record version 2: adds what a snapshot restores from).
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
    /// Bytes on disk of all its files.
    pub size_bytes: u64,
    /// SHA-256 of the root file system, lowercase hex, when known.
    pub sha256: Option<String>,
    /// The sandbox a snapshot template was taken from.
    pub parent_sandbox: Option<SandboxId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// A snapshot's memory: a layer-store header holding references on its
    /// layers.
    pub memory_header: Option<[u8; 32]>,
    /// A snapshot's saved device and CPU state (path).
    pub vm_state: Option<String>,
    /// The raw image a snapshot's disk (`rootfs`, qcow2) rests on.
    pub disk_base: Option<String>,
    /// The guest agent's token inside a snapshot: a new sandbox uses it once
    /// to hand envd its own.
    pub envd_token: Option<String>,
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

impl From<TemplateRecordV1> for TemplateRecord {
    fn from(v1: TemplateRecordV1) -> TemplateRecord {
        TemplateRecord {
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
            1 => Some(decode_body::<TemplateRecordV1>(body).map(TemplateRecord::from)),
            _ => None,
        }
    }
}

impl Record for TemplateRecord {
    const DATABASE: &'static str = "templates";
    const CURRENT_VERSION: u8 = 2;
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
        assert_eq!(bytes[0], 2);
        assert_eq!(
            decode::<TemplateRecord>(&record.name, &bytes).unwrap(),
            record
        );
        assert!(record.is_snapshot());
        assert_eq!(TemplateKind::Base.to_string(), "base");
    }
}
