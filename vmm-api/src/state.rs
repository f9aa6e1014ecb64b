//! The version of a saved VM state (`vmstate`), as both sides read it: the
//! VMM, which writes and loads the file, and the agent, which records each
//! paused sandbox's version and asks, before it tries, whether the node's
//! VMM can resume it.
//!
//! A file starts with [`MAGIC`], a major and a minor (little-endian u16
//! each); files from before the header start with a one-byte format
//! number. A VMM reads every minor of its major up to its own, and the
//! legacy format it names ([`StateSupport`]); `wrenn-vmm --state-version
//! --json` prints its `StateSupport`.
//!
//! Not here: the body of the file and its checksum (wrenn-vmm's
//! `snapshot::format`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The first bytes of every versioned `vmstate`. Its first byte is not a
/// format byte of the files before the header (1 to 4).
pub const MAGIC: [u8; 8] = *b"WRNVMST\0";
/// Bytes before the body: magic, major, minor.
pub const HEADER_LEN: usize = 12;

/// A semantic version of the state layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StateVersion {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for StateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version a `vmstate` file says it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileVersion {
    /// A file before the header: byte 0 is the format number.
    Legacy(u8),
    /// A file with the header.
    Versioned(StateVersion),
}

impl fmt::Display for FileVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileVersion::Legacy(format) => {
                write!(f, "format {format} (before versioned headers)")
            }
            FileVersion::Versioned(version) => write!(f, "{version}"),
        }
    }
}

/// Why the start of a file is not a VM state header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The file is empty.
    Empty,
    /// It starts with neither the magic nor a legacy format byte.
    NotAState,
}

/// The version in the first bytes of a file (all of [`HEADER_LEN`] when it
/// has a header). `newest_legacy` is the highest format byte files before
/// the header had.
pub fn parse_header(start: &[u8], newest_legacy: u8) -> Result<FileVersion, HeaderError> {
    if let Some(header) = start.get(..HEADER_LEN) {
        if header[..MAGIC.len()] == MAGIC {
            let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
            return Ok(FileVersion::Versioned(StateVersion {
                major: u16_at(8),
                minor: u16_at(10),
            }));
        }
    }
    match start.first() {
        Some(&format) if (1..=newest_legacy).contains(&format) => Ok(FileVersion::Legacy(format)),
        Some(_) => Err(HeaderError::NotAState),
        None => Err(HeaderError::Empty),
    }
}

/// Which state versions one VMM writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSupport {
    /// The version it writes; it reads every minor of this major up to it.
    pub writes: StateVersion,
    /// The one format from before the header that it still reads.
    pub legacy_format: u8,
}

/// Why a VMM cannot read a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionError {
    TooNew {
        found: StateVersion,
        support: StateSupport,
    },
    OldMajor {
        found: StateVersion,
        support: StateSupport,
    },
    LegacyTooOld {
        found: u8,
        support: StateSupport,
    },
}

impl StateSupport {
    /// Whether a VMM with this support reads files of `version`.
    pub fn check(self, version: FileVersion) -> Result<(), VersionError> {
        match version {
            FileVersion::Legacy(found) if found == self.legacy_format => Ok(()),
            FileVersion::Legacy(found) => Err(VersionError::LegacyTooOld {
                found,
                support: self,
            }),
            FileVersion::Versioned(found) if found > self.writes => Err(VersionError::TooNew {
                found,
                support: self,
            }),
            FileVersion::Versioned(found) if found.major < self.writes.major => {
                Err(VersionError::OldMajor {
                    found,
                    support: self,
                })
            }
            FileVersion::Versioned(_) => Ok(()),
        }
    }
}

impl fmt::Display for StateSupport {
    /// What `wrenn-vmm --state-version` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "writes VM state {w}; reads {major}.0 to {w} and format {legacy} (before versioned \
             headers)",
            w = self.writes,
            major = self.writes.major,
            legacy = self.legacy_format
        )
    }
}

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VersionError::TooNew { found, support } => write!(
                f,
                "it is VM state {found}, newer than this wrenn-vmm knows (it writes {w} and \
                 reads {major}.0 to {w}): resume it with a wrenn-vmm >= the one that wrote it, \
                 one whose `wrenn-vmm --state-version` reads {found}",
                w = support.writes,
                major = support.writes.major
            ),
            VersionError::OldMajor { found, support } => write!(
                f,
                "it is VM state {found}, an older major than this wrenn-vmm reads (it writes \
                 {w} and reads {major}.0 to {w}): resume it with the wrenn-vmm that wrote it, \
                 or boot the sandbox anew",
                w = support.writes,
                major = support.writes.major
            ),
            VersionError::LegacyTooOld { found, support } => write!(
                f,
                "it is VM state format {found}, older than format {legacy}, the oldest this \
                 wrenn-vmm reads: resume it with the wrenn-vmm that wrote it, or boot the \
                 sandbox anew",
                legacy = support.legacy_format
            ),
        }
    }
}

impl std::error::Error for VersionError {}

#[cfg(test)]
mod tests {
    use super::*;

    const SUPPORT: StateSupport = StateSupport {
        writes: StateVersion { major: 2, minor: 3 },
        legacy_format: 4,
    };

    fn v(major: u16, minor: u16) -> FileVersion {
        FileVersion::Versioned(StateVersion { major, minor })
    }

    #[test]
    fn a_vmm_reads_every_minor_of_its_major_up_to_its_own_and_its_legacy_format() {
        for ok in [v(2, 0), v(2, 3), FileVersion::Legacy(4)] {
            assert_eq!(SUPPORT.check(ok), Ok(()), "{ok}");
        }
        for refused in [v(2, 4), v(3, 0), v(1, 9), FileVersion::Legacy(3)] {
            let err = SUPPORT.check(refused).expect_err("refused");
            assert!(err.to_string().contains("resume it with"), "{err}");
        }
    }

    #[test]
    fn the_header_says_the_version_and_a_legacy_byte_says_its_format() {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&[1, 0, 2, 0, 0xaa]);
        assert_eq!(parse_header(&header, 4), Ok(v(1, 2)));
        assert_eq!(parse_header(&[4, 0, 0], 4), Ok(FileVersion::Legacy(4)));
        assert_eq!(parse_header(&[9, 0], 4), Err(HeaderError::NotAState));
        assert_eq!(parse_header(&[], 4), Err(HeaderError::Empty));
    }

    #[test]
    fn support_goes_over_the_wire_as_json() {
        let json = serde_json::to_string(&SUPPORT).expect("encode");
        assert_eq!(
            json,
            r#"{"writes":{"major":2,"minor":3},"legacy_format":4}"#
        );
        let back: StateSupport = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, SUPPORT);
        assert_eq!(
            SUPPORT.to_string(),
            "writes VM state 2.3; reads 2.0 to 2.3 and format 4 (before versioned headers)"
        );
    }
}
