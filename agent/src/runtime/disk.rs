//! Raw disk files: a sandbox's own copy of its base image, made cheaply.
//!
//! wrenn-vmm's virtio-blk reads and writes a raw file, so a native sandbox
//! cannot share its base through a qcow2 backing file as QEMU does. It gets
//! a copy instead: a reflink (`FICLONE`) where the file system shares blocks
//! between files (XFS, Btrfs), which costs no data at all, else a copy of
//! the data ranges only (`SEEK_DATA`/`SEEK_HOLE` with `copy_file_range`), so
//! the copy is as sparse as its source.
//!
//! Not here: formats other than raw.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::Path;

/// How a copy was made, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Blocks shared with the source until either is written.
    Reflink,
    /// The source's data ranges copied; its holes stay holes.
    Sparse,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::Reflink => "reflink",
            CopyKind::Sparse => "sparse",
        }
    }
}

/// Copies `src` to `dst` (replaced if it exists), as a reflink where the
/// file system can, else keeping holes. `dst` is complete when this
/// returns, under a temporary name until then; it is not synced.
pub fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<CopyKind> {
    let source = File::open(src)?;
    let len = source.metadata()?.len();
    let mut temp_name = dst.as_os_str().to_owned();
    temp_name.push(".partial");
    let temp = Path::new(&temp_name);
    let target = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temp)?;
    let copied = reflink(&source, &target).and_then(|done| {
        if done {
            Ok(CopyKind::Reflink)
        } else {
            copy_data_ranges(&source, &target, len).map(|()| CopyKind::Sparse)
        }
    });
    match copied {
        Ok(kind) => {
            drop(target);
            std::fs::rename(temp, dst)?;
            Ok(kind)
        }
        Err(e) => {
            drop(target);
            let _ = std::fs::remove_file(temp);
            Err(e)
        }
    }
}

/// Shares `source`'s blocks with `target`; false where the file system (or
/// the pair of them) cannot.
fn reflink(source: &File, target: &File) -> std::io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        // Not supported here, or across these two file systems.
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => Ok(false),
        _ => Err(error),
    }
}

/// Copies every data range of `source` to the same offset of `target` and
/// sets `target`'s length to `len`: holes are never written.
fn copy_data_ranges(source: &File, target: &File, len: u64) -> std::io::Result<()> {
    target.set_len(len)?;
    let mut offset = 0u64;
    while offset < len {
        let Some(start) = seek(source, offset, libc::SEEK_DATA)? else {
            break; // Only a hole is left.
        };
        let end = seek(source, start, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(len);
        copy_range(source, target, start, end)?;
        offset = end;
    }
    Ok(())
}

/// `lseek` with `whence`; None when no data follows `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let at = i64::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
    // SAFETY: lseek only moves the file position of an open descriptor.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(error)
    }
}

/// Copies bytes `start..end` of `source` to the same place in `target`.
fn copy_range(source: &File, target: &File, start: u64, end: u64) -> std::io::Result<()> {
    let mut at = i64::try_from(start).map_err(|_| ErrorKind::InvalidInput)?;
    let end = i64::try_from(end).map_err(|_| ErrorKind::InvalidInput)?;
    while at < end {
        let (mut from, mut to) = (at, at);
        let chunk = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both descriptors are open; the offsets are owned locals
        // that the kernel advances.
        let copied = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut from,
                target.as_raw_fd(),
                &mut to,
                chunk,
                0,
            )
        };
        if copied < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if copied == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the source ended while copying (it changed during the copy)",
            ));
        }
        at += copied as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_copy_has_the_same_bytes_and_keeps_the_holes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("base.raw");
        let mut file = File::create(&src).expect("create");
        // 64 MiB with data at the start, in the middle and at the very end.
        file.set_len(64 << 20).expect("len");
        file.write_all(b"start").expect("write");
        file.seek(SeekFrom::Start(32 << 20)).expect("seek");
        file.write_all(&[7u8; 8192]).expect("write");
        file.seek(SeekFrom::Start((64 << 20) - 3)).expect("seek");
        file.write_all(b"end").expect("write");
        drop(file);

        let dst = dir.path().join("disk.raw");
        std::fs::write(&dst, b"an old disk that is replaced").expect("old");
        let kind = copy_sparse(&src, &dst).expect("copy");

        let (mut a, mut b) = (Vec::new(), Vec::new());
        File::open(&src)
            .and_then(|mut f| f.read_to_end(&mut a))
            .expect("read");
        File::open(&dst)
            .and_then(|mut f| f.read_to_end(&mut b))
            .expect("read");
        assert!(a == b, "the copy ({}) differs", kind.as_str());
        let allocated = std::fs::metadata(&dst).expect("meta").blocks() * 512;
        assert!(
            allocated < 4 << 20,
            "the {} copy allocates {allocated} bytes: holes were filled",
            kind.as_str()
        );
        assert!(!dir.path().join("disk.raw.partial").exists());
    }

    #[test]
    fn a_missing_source_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let dst = dir.path().join("disk.raw");
        assert!(copy_sparse(&dir.path().join("absent"), &dst).is_err());
        assert!(!dst.exists());
    }
}
