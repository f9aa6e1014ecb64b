//! Directory creation (`mkdir -p`) and moves (rename, with a copy-and-delete
//! fallback across file systems).

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use wrenn_http::ApiError;

/// Whether `make_dirs` created the directory or found it already there.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    New,
    Existing,
}

/// `mkdir -p`: 409 if a non-directory is in the way.
pub fn make_dirs(path: &Path) -> Result<Created, ApiError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(Created::Existing),
        Ok(_) => return Err(in_the_way(path)),
        Err(_) => {}
    }
    fs::create_dir_all(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR | libc::EEXIST) => in_the_way(path),
        _ => ApiError::from_io(&e, format!("cannot create {}", path.display())),
    })?;
    Ok(Created::New)
}

fn in_the_way(path: &Path) -> ApiError {
    ApiError::conflict(format!(
        "cannot create {}: a file (not a directory) is in the way",
        path.display()
    ))
}

/// Renames `from` to `to` (rename(2) rules: an existing file at `to` is
/// replaced, an existing non-empty directory is a conflict).
pub fn move_path(from: &Path, to: &Path) -> Result<(), ApiError> {
    fs::symlink_metadata(from)
        .map_err(|e| ApiError::from_io(&e, format!("cannot move {}", from.display())))?;
    if let Some(parent) = to.parent() {
        if !parent.is_dir() {
            return Err(ApiError::not_found(format!(
                "cannot move to {}: the directory {} does not exist; create it first",
                to.display(),
                parent.display()
            )));
        }
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => move_across(from, to),
        Err(e) => Err(move_error(&e, from, to)),
    }
}

fn move_error(err: &io::Error, from: &Path, to: &Path) -> ApiError {
    let context = format!("cannot move {} to {}", from.display(), to.display());
    match err.raw_os_error() {
        Some(libc::ENOTEMPTY | libc::EEXIST) => ApiError::conflict(format!(
            "{context}: the destination is a directory that is not empty"
        )),
        Some(libc::EISDIR | libc::ENOTDIR) => ApiError::conflict(format!(
            "{context}: one is a directory and the other is not"
        )),
        Some(libc::EINVAL) => {
            ApiError::invalid_argument(format!("{context}: cannot move a directory into itself"))
        }
        _ => ApiError::from_io(err, context),
    }
}

/// Copy-and-delete for moves between file systems. The destination must not
/// exist; a failed copy is removed again.
fn move_across(from: &Path, to: &Path) -> Result<(), ApiError> {
    let context = || format!("cannot move {} to {}", from.display(), to.display());
    if fs::symlink_metadata(to).is_ok() {
        return Err(ApiError::conflict(format!(
            "{}: the destination exists on another file system; delete it first",
            context()
        )));
    }
    if let Err(err) = copy_tree(from, to) {
        let _ = remove_any(to);
        return Err(ApiError::from_io(&err, context()));
    }
    remove_any(from).map_err(|e| {
        ApiError::from_io(
            &e,
            format!("{}: copied, but removing the source failed", context()),
        )
    })
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        symlink(fs::read_link(from)?, to)
    } else if kind.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.permissions().mode()))
    } else if kind.is_file() {
        fs::copy(from, to).map(|_| ())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} is a device, socket or FIFO", from.display()),
        ))
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("envd-ops-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn mkdir_reports_new_existing_and_conflict() {
        let dir = scratch("mkdir");
        assert_eq!(make_dirs(&dir.join("a/b")).ok(), Some(Created::New));
        assert_eq!(make_dirs(&dir.join("a/b")).ok(), Some(Created::Existing));
        fs::write(dir.join("file"), b"x").expect("write");
        assert_eq!(make_dirs(&dir.join("file/sub")).unwrap_err().status(), 409);
        assert_eq!(make_dirs(&dir.join("file")).unwrap_err().status(), 409);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn copy_fallback_moves_trees() {
        let dir = scratch("copy");
        fs::create_dir_all(dir.join("src/sub")).expect("mkdir");
        fs::write(dir.join("src/sub/f"), b"data").expect("write");
        symlink("sub/f", dir.join("src/link")).expect("symlink");
        move_across(&dir.join("src"), &dir.join("dst")).expect("move");
        assert!(!dir.join("src").exists());
        assert_eq!(fs::read(dir.join("dst/sub/f")).ok(), Some(b"data".to_vec()));
        assert_eq!(fs::read(dir.join("dst/link")).ok(), Some(b"data".to_vec()));
        let _ = fs::remove_dir_all(&dir);
    }
}
