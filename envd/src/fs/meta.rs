//! File metadata for `/fs/stat` and `/fs/list`: one JSON shape for an entry,
//! and a bounded recursive directory walk that never follows symlinks.

use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use wrenn_http::ApiError;

use super::paths::display;
use crate::users::NameCache;
use wrenn_http::timefmt::rfc3339;

/// Deepest recursion `/fs/list` does; larger depths are capped to this.
pub const MAX_DEPTH: u64 = 64;
/// Most entries one listing returns; the rest are cut off (`truncated`).
pub const MAX_ENTRIES: usize = 100_000;

/// One file, directory or link, and a listing, as the wire crate defines them.
pub use envd_api::{EntryInfo, EntryKind, Listing};

/// Describes `path` itself (a symlink is reported as a symlink).
pub fn stat(path: &Path) -> Result<EntryInfo, ApiError> {
    let meta = fs::symlink_metadata(path)
        .map_err(|e| ApiError::from_io(&e, format!("cannot stat {}", path.display())))?;
    Ok(describe(path, &meta, &mut NameCache::default()))
}

fn describe(path: &Path, meta: &Metadata, names: &mut NameCache) -> EntryInfo {
    let file_type = meta.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let symlink_target = file_type
        .is_symlink()
        .then(|| fs::read_link(path).ok().map(|t| display(&t)))
        .flatten();
    EntryInfo {
        name: path
            .file_name()
            .map_or_else(|| display(path), |n| n.to_string_lossy().into_owned()),
        path: display(path),
        kind,
        size: meta.len(),
        mode: format!("{:04o}", meta.mode() & 0o7777),
        uid: meta.uid(),
        gid: meta.gid(),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified: rfc3339(meta.modified().unwrap_or(std::time::UNIX_EPOCH)),
        symlink_target,
    }
}

/// Lists `dir` down to `depth` levels (1 = direct children). Sub-directories
/// that cannot be read are skipped; the top one must be readable.
pub fn list(dir: &Path, depth: u64) -> Result<Listing, ApiError> {
    let meta = fs::metadata(dir)
        .map_err(|e| ApiError::from_io(&e, format!("cannot list {}", dir.display())))?;
    if !meta.is_dir() {
        return Err(ApiError::invalid_argument(format!(
            "{} is not a directory; use GET /fs/stat for a single file",
            dir.display()
        )));
    }
    let mut walk = Walk {
        entries: Vec::new(),
        truncated: false,
        names: NameCache::default(),
    };
    let children = read_sorted(dir)
        .map_err(|e| ApiError::from_io(&e, format!("cannot list {}", dir.display())))?;
    walk.visit(children, depth.clamp(1, MAX_DEPTH));
    Ok(Listing {
        entries: walk.entries,
        truncated: walk.truncated,
    })
}

struct Walk {
    entries: Vec<EntryInfo>,
    truncated: bool,
    names: NameCache,
}

impl Walk {
    fn visit(&mut self, children: Vec<fs::DirEntry>, depth: u64) {
        for child in children {
            if self.entries.len() >= MAX_ENTRIES {
                self.truncated = true;
                return;
            }
            let path = child.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue; // removed while listing
            };
            let descend = depth > 1 && meta.file_type().is_dir();
            self.entries.push(describe(&path, &meta, &mut self.names));
            if descend {
                if let Ok(grandchildren) = read_sorted(&path) {
                    self.visit(grandchildren, depth - 1);
                }
            }
        }
    }
}

fn read_sorted(dir: &Path) -> std::io::Result<Vec<fs::DirEntry>> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(fs::DirEntry::file_name);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reports_type_mode_and_owner() {
        let info = stat(Path::new("/etc/passwd")).expect("stat passwd");
        assert_eq!(info.kind, EntryKind::File);
        assert_eq!(info.name, "passwd");
        assert_eq!(info.mode.len(), 4);
        let root = stat(Path::new("/")).expect("stat /");
        assert_eq!(root.kind, EntryKind::Dir);
    }

    #[test]
    fn list_of_a_file_is_invalid() {
        let err = list(Path::new("/etc/passwd"), 1).unwrap_err();
        assert_eq!(err.status(), 400);
    }
}
