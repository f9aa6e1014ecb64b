//! `templates` records: one per template a sandbox can start from, keyed by
//! [`TemplateName`].
//!
//! Paths are stored as the agent gives them (relative to its template
//! directory or absolute); this crate does not touch the files.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{sealed::Upgrade, Record};
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

/// One template (record version 1).
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
}

impl Record for TemplateRecord {
    const DATABASE: &'static str = "templates";
    const CURRENT_VERSION: u8 = 1;
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
        assert_eq!(bytes[0], 1);
        assert_eq!(
            decode::<TemplateRecord>(&record.name, &bytes).unwrap(),
            record
        );
        assert!(record.is_snapshot());
        assert_eq!(TemplateKind::Base.to_string(), "base");
    }
}
