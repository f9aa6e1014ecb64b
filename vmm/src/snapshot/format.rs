//! The `vmstate` file: its header, its versions, and which of them this
//! VMM reads.
//!
//! ```text
//! offset  size  field
//! 0       8     magic, b"WRNVMST\0"
//! 8       2     major, little-endian
//! 10      2     minor, little-endian
//! 12      n     postcard encoding of the state of that version
//! 12 + n  4     CRC-32C (Castagnoli) of bytes 0 .. 12 + n, little-endian
//! ```
//!
//! Compatibility: this VMM writes [`STATE_VERSION`] and reads every minor
//! of its major up to its own. A minor only adds: its additions follow
//! the body of the minor before, and a loader that finds an older minor
//! fills them with their defaults. A major changes the layout: the old
//! one is frozen as its own types and converted, as format 4 (the files
//! before the header, whose byte 0 was the format version) is in
//! [`super::legacy`]. A file of a major or minor newer than this VMM's is
//! refused, naming both versions.
//!
//! Not here: what the state holds ([`super::state`]).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::legacy::VmStateV4;
use super::state::VmState;

pub use vmm_api::state::{
    FileVersion, StateSupport, StateVersion, VersionError, HEADER_LEN, MAGIC,
};

const CRC_LEN: usize = 4;

/// The version of the state layout this VMM writes.
pub const STATE_VERSION: StateVersion = StateVersion { major: 1, minor: 0 };

/// The one-byte format of the files before the header that this VMM still
/// reads (older ones were refused before the header existed).
pub const LEGACY_FORMAT: u8 = 4;

/// What this VMM writes and reads.
pub const SUPPORT: StateSupport = StateSupport {
    writes: STATE_VERSION,
    legacy_format: LEGACY_FORMAT,
};

/// What this VMM writes and reads, as `wrenn-vmm --state-version` prints
/// it.
pub fn supported_versions() -> String {
    SUPPORT.to_string()
}

/// Whether this VMM reads files of `version`.
pub fn check_version(version: FileVersion) -> Result<(), VersionError> {
    SUPPORT.check(version)
}

/// A `vmstate` file that cannot be read or written.
#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("{}: cannot read it: {source}; a snapshot folder holds `vmstate` and `memory`", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is too short to be a VM state ({len} bytes): the snapshot is damaged, take it again", path.display())]
    TooShort { path: PathBuf, len: usize },
    #[error("{} is not a VM state: it starts with neither the magic {MAGIC:?} nor a format byte; point at the snapshot's `vmstate`", path.display())]
    NotAState { path: PathBuf },
    #[error("{} is damaged: its checksum does not match; take the snapshot again", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: VersionError },
    #[error("{} ({version}) is damaged: it cannot be decoded: {reason}; take the snapshot again", path.display())]
    Decode {
        path: PathBuf,
        version: FileVersion,
        reason: String,
    },
    #[error("{} ({version}) is damaged: {reason}; take the snapshot again", path.display())]
    Inconsistent {
        path: PathBuf,
        version: FileVersion,
        reason: String,
    },
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
}

/// The version in the first bytes of a file (all of its header when it
/// has one).
fn parse_header(path: &Path, start: &[u8]) -> Result<FileVersion, StateFileError> {
    vmm_api::state::parse_header(start, LEGACY_FORMAT).map_err(|e| match e {
        vmm_api::state::HeaderError::NotAState => StateFileError::NotAState {
            path: path.to_owned(),
        },
        vmm_api::state::HeaderError::Empty => StateFileError::TooShort {
            path: path.to_owned(),
            len: 0,
        },
    })
}

/// The version of the `vmstate` file at `path`, from its header alone
/// (the checksum is not checked: the body is not read).
pub fn read_version(path: &Path) -> Result<FileVersion, StateFileError> {
    let read = |source| StateFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut start = Vec::with_capacity(HEADER_LEN);
    File::open(path)
        .map_err(read)?
        .take(HEADER_LEN as u64)
        .read_to_end(&mut start)
        .map_err(read)?;
    parse_header(path, &start)
}

/// The version of the `vmstate` file at `path` if this VMM can load it;
/// otherwise why not ([`StateFileError::Unsupported`] names the file's
/// version, this VMM's and what to do). Reads only the header.
pub fn probe(path: &Path) -> Result<FileVersion, StateFileError> {
    let version = read_version(path)?;
    check_version(version).map_err(|reason| StateFileError::Unsupported {
        path: path.to_owned(),
        reason,
    })?;
    Ok(version)
}

/// The bytes of a `vmstate` file holding `state`, at [`STATE_VERSION`].
pub fn encode(state: &VmState) -> Result<Vec<u8>, StateFileError> {
    let mut header = Vec::with_capacity(HEADER_LEN + (16 << 10));
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&STATE_VERSION.major.to_le_bytes());
    header.extend_from_slice(&STATE_VERSION.minor.to_le_bytes());
    let mut bytes =
        postcard::to_extend(state, header).map_err(|e| StateFileError::Encode(e.to_string()))?;
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// The state in the bytes of a `vmstate` file (read from `path`), of any
/// version this VMM reads, upgraded to the current layout; with the
/// version the file had.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<(VmState, FileVersion), StateFileError> {
    if bytes.len() < 1 + CRC_LEN {
        return Err(StateFileError::TooShort {
            path: path.to_owned(),
            len: bytes.len(),
        });
    }
    let (covered, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    if crc32c::crc32c(covered).to_le_bytes() != crc {
        return Err(StateFileError::Checksum {
            path: path.to_owned(),
        });
    }
    let version = parse_header(path, covered)?;
    check_version(version).map_err(|reason| StateFileError::Unsupported {
        path: path.to_owned(),
        reason,
    })?;
    let undecodable = |e: postcard::Error| StateFileError::Decode {
        path: path.to_owned(),
        version,
        reason: e.to_string(),
    };
    let inconsistent = |reason: String| StateFileError::Inconsistent {
        path: path.to_owned(),
        version,
        reason,
    };
    let state = match version {
        FileVersion::Legacy(_) => {
            let v4: VmStateV4 = postcard::from_bytes(&covered[1..]).map_err(undecodable)?;
            VmState::from(v4)
        }
        // Major 1, minor 0: the body alone. Minor 1 will decode its
        // additions from what follows, or take their defaults when the
        // file's minor is 0.
        FileVersion::Versioned(_) => {
            let (state, rest) = postcard::take_from_bytes::<VmState>(&covered[HEADER_LEN..])
                .map_err(undecodable)?;
            if !rest.is_empty() {
                return Err(inconsistent(format!(
                    "{} bytes follow the state",
                    rest.len()
                )));
            }
            state
        }
    };
    state.check().map_err(inconsistent)?;
    Ok((state, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u16, minor: u16) -> FileVersion {
        FileVersion::Versioned(StateVersion { major, minor })
    }

    #[test]
    fn the_version_this_vmm_writes_is_pinned() {
        // A new version: keep this one's fixtures, add the new one's
        // (tests/fixtures/README.md), and move this pin.
        assert_eq!(STATE_VERSION, StateVersion { major: 1, minor: 0 });
        assert_eq!(&MAGIC, b"WRNVMST\0");
    }

    #[test]
    fn older_minors_of_the_same_major_and_format_4_are_read_and_nothing_newer() {
        assert_eq!(check_version(v(1, 0)), Ok(()));
        assert_eq!(check_version(FileVersion::Legacy(4)), Ok(()));
        for found in [
            StateVersion { major: 1, minor: 1 },
            StateVersion { major: 2, minor: 0 },
        ] {
            assert_eq!(
                check_version(FileVersion::Versioned(found)),
                Err(VersionError::TooNew {
                    found,
                    support: SUPPORT
                })
            );
        }
        let found = StateVersion { major: 0, minor: 9 };
        assert_eq!(
            check_version(FileVersion::Versioned(found)),
            Err(VersionError::OldMajor {
                found,
                support: SUPPORT
            })
        );
        assert_eq!(
            check_version(FileVersion::Legacy(3)),
            Err(VersionError::LegacyTooOld {
                found: 3,
                support: SUPPORT
            })
        );
    }

    #[test]
    fn a_too_new_file_names_both_versions_and_what_to_do() {
        let err = VersionError::TooNew {
            found: StateVersion { major: 2, minor: 3 },
            support: SUPPORT,
        }
        .to_string();
        assert!(err.contains("VM state 2.3"), "{err}");
        assert!(err.contains("writes 1.0"), "{err}");
        assert!(err.contains("resume it with a wrenn-vmm >="), "{err}");
    }

    #[test]
    fn the_header_alone_says_the_version() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("vmstate");
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&2u16.to_le_bytes());
        header.extend_from_slice(&7u16.to_le_bytes());
        std::fs::write(&path, &header).expect("written");
        assert_eq!(read_version(&path).expect("a version"), v(2, 7));
        let err = probe(&path).expect_err("2.7 is too new").to_string();
        assert!(err.contains("2.7") && err.contains("vmstate"), "{err}");

        std::fs::write(&path, [4u8, 0, 0]).expect("written");
        assert_eq!(probe(&path).expect("format 4"), FileVersion::Legacy(4));
        std::fs::write(&path, b"{\"not\": 1}").expect("written");
        assert!(matches!(
            read_version(&path),
            Err(StateFileError::NotAState { .. })
        ));
        std::fs::write(&path, b"").expect("written");
        assert!(matches!(
            read_version(&path),
            Err(StateFileError::TooShort { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(probe(&missing), Err(StateFileError::Read { .. })));
    }

    #[test]
    fn a_file_with_bytes_after_the_state_is_refused() {
        let mut bytes = encode(&super::super::state::tests::sample()).expect("encodes");
        bytes.truncate(bytes.len() - CRC_LEN);
        bytes.push(0);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let err = decode(Path::new("vmstate"), &bytes).err().expect("refused");
        assert!(err.to_string().contains("1 bytes follow"), "{err}");
    }
}
