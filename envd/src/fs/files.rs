//! File contents: streamed downloads, atomic streamed uploads (temporary file
//! in the target directory, fsync, rename), and deletion.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use wrenn_http::{ApiError, Reply};

/// Buffer used to copy an upload to disk.
const COPY_BUFFER: usize = 256 * 1024;

/// Opens a regular file for a streamed download.
pub fn open_for_download(path: &Path) -> Result<Reply, ApiError> {
    let meta = fs::metadata(path)
        .map_err(|e| ApiError::from_io(&e, format!("cannot read {}", path.display())))?;
    check_regular(path, &meta)?;
    // O_NONBLOCK keeps a FIFO swapped in after the check from blocking open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ApiError::from_io(&e, format!("cannot read {}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| ApiError::from_io(&e, format!("cannot read {}", path.display())))?;
    check_regular(path, &meta)?;
    Ok(Reply::File {
        file,
        len: meta.len(),
    })
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), ApiError> {
    if meta.is_dir() {
        return Err(ApiError::invalid_argument(format!(
            "{} is a directory; use GET /fs/list to see its contents",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(ApiError::invalid_argument(format!(
            "{} is not a regular file (device, socket or FIFO) and cannot be downloaded",
            path.display()
        )));
    }
    Ok(())
}

/// Where a finished upload went and how big it is.
#[derive(Debug)]
pub struct Uploaded {
    pub path: PathBuf,
    pub size: u64,
}

/// Writes `body` to `path` atomically. `expected` is the announced
/// Content-Length; a shorter body leaves the target untouched.
pub fn upload(
    path: &Path,
    body: &mut dyn Read,
    expected: Option<usize>,
) -> Result<Uploaded, ApiError> {
    let target = write_target(path)?;
    let parent = target.parent().ok_or_else(|| {
        ApiError::invalid_argument(format!("{} is not a file path", target.display()))
    })?;
    fs::create_dir_all(parent).map_err(|e| {
        ApiError::from_io(
            &e,
            format!("cannot create the directory {}", parent.display()),
        )
    })?;
    let mut temp = TempFile::create(&target)?;
    let size = copy_body(body, &mut temp.file, &target)?;
    if let Some(expected) = expected.map(|n| n as u64) {
        if size != expected {
            return Err(ApiError::bad_request(format!(
                "the upload ended after {size} of {expected} bytes; {} was not changed, retry the upload",
                target.display()
            )));
        }
    }
    temp.commit(&target)?;
    Ok(Uploaded { path: target, size })
}

/// The file to replace: a symlink to an existing file is written through.
fn write_target(path: &Path) -> Result<PathBuf, ApiError> {
    let target = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    };
    if target.is_dir() {
        return Err(ApiError::invalid_argument(format!(
            "{} is a directory; upload to a file path inside it",
            target.display()
        )));
    }
    Ok(target)
}

fn copy_body(body: &mut dyn Read, file: &mut File, target: &Path) -> Result<u64, ApiError> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return Ok(size),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "the upload was interrupted after {size} bytes ({e}); {} was not changed",
                    target.display()
                )))
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| ApiError::from_io(&e, format!("cannot write {}", target.display())))?;
        size += n as u64;
    }
}

/// A temporary file next to the target, removed unless committed.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    fn create(target: &Path) -> Result<Self, ApiError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_name = format!(".{name}.envd-{}-{unique}.tmp", std::process::id());
        let path = target.with_file_name(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&path)
            .map_err(|e| ApiError::from_io(&e, format!("cannot create {}", target.display())))?;
        Ok(Self {
            path,
            file,
            committed: false,
        })
    }

    /// Keeps the old file's permissions, syncs, and renames over `target`.
    fn commit(mut self, target: &Path) -> Result<(), ApiError> {
        let fail =
            |e: io::Error| ApiError::from_io(&e, format!("cannot write {}", target.display()));
        if let Ok(old) = fs::metadata(target) {
            let mode = old.permissions().mode() & 0o7777;
            self.file
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(fail)?;
        }
        self.file.sync_all().map_err(fail)?;
        fs::rename(&self.path, target).map_err(fail)?;
        self.committed = true;
        if let Some(parent) = target.parent() {
            // Make the rename itself durable; failure here is not fatal.
            if let Err(err) = File::open(parent).and_then(|dir| dir.sync_all()) {
                tracing::debug!(error = %err, "cannot sync the parent directory");
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes a file, a symlink (not its target) or a directory tree.
pub fn remove(path: &Path) -> Result<(), ApiError> {
    if path == Path::new("/") {
        return Err(ApiError::invalid_argument(
            "refusing to delete /; name the directory you mean",
        ));
    }
    let meta = fs::symlink_metadata(path)
        .map_err(|e| ApiError::from_io(&e, format!("cannot delete {}", path.display())))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| ApiError::from_io(&e, format!("cannot delete {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("envd-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn upload_creates_parents_and_replaces_atomically() {
        let dir = scratch("upload");
        let target = dir.join("a/b/file.txt");
        let done = upload(&target, &mut &b"hello"[..], Some(5)).expect("upload");
        assert_eq!(done.size, 5);
        assert_eq!(fs::read(&target).ok(), Some(b"hello".to_vec()));
        let short = upload(&target, &mut &b"xy"[..], Some(10)).unwrap_err();
        assert_eq!(short.status(), 400);
        assert_eq!(fs::read(&target).ok(), Some(b"hello".to_vec()));
        let leftovers = fs::read_dir(target.parent().unwrap_or(&dir))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(leftovers, 1, "no temporary files are left behind");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn remove_refuses_root_and_reports_missing() {
        assert_eq!(remove(Path::new("/")).unwrap_err().status(), 400);
        let missing = scratch("missing").join("nope");
        assert_eq!(remove(&missing).unwrap_err().status(), 404);
    }
}
