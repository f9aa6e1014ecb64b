//! Small types that records share: which runtime a VM ran under, the format
//! of a disk image, and the version of a saved VM state. Each is stored as
//! itself, so no code has to infer it (from a file name, say) again.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The runtime that runs (or ran) a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeKind {
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// `wrenn-vmm`, Wrenn's own VMM.
    Native,
}

impl RuntimeKind {
    /// The name in lowercase, as in configs, APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Qemu => "qemu",
            RuntimeKind::Native => "native",
        }
    }

    /// The kind named `name` (`qemu` or `native`).
    pub fn parse(name: &str) -> Option<RuntimeKind> {
        match name {
            "qemu" => Some(RuntimeKind::Qemu),
            "native" => Some(RuntimeKind::Native),
            _ => None,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a disk image file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskFormat {
    /// Byte for byte the device.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU uses for it (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The version of a saved VM state (`vmstate`) as wrenn-vmm writes it:
/// `major.minor`. A VMM reads every minor of its major up to its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmStateVersion {
    /// Changes break the layout.
    pub major: u16,
    /// Changes only add.
    pub minor: u16,
}

impl fmt::Display for VmStateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in [RuntimeKind::Qemu, RuntimeKind::Native] {
            assert_eq!(RuntimeKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(RuntimeKind::parse("firecracker"), None);
        assert_eq!(DiskFormat::Qcow2.to_string(), "qcow2");
        assert_eq!(VmStateVersion { major: 1, minor: 2 }.to_string(), "1.2");
    }
}
