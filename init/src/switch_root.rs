//! Leaving the initramfs for the real root file system.
//!
//! The steps match what busybox `switch_root` does: move /dev, /proc and /sys
//! under the new root, delete the initramfs contents (they live in RAM and are
//! unreachable afterwards), then move the new root over `/` and chroot into it.
//! Deletion only touches files on the initramfs itself: it never descends into
//! another mount (such as the new root), and it refuses to run unless `/` is a
//! ramfs or tmpfs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
use nix::unistd::{chdir, chroot};
use thiserror::Error;

use crate::log::debug;

/// `RAMFS_MAGIC` from linux/magic.h (not exported by libc or nix).
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// The file systems moved from the initramfs into the new root.
const MOVED_MOUNTS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// A failed step of the root switch.
#[derive(Debug, Error)]
pub enum SwitchRootError {
    #[error("refusing to switch root: / is not an initramfs (ramfs or tmpfs)")]
    NotInitramfs,
    #[error("cannot inspect {path}: {source}")]
    Inspect { path: PathBuf, source: Errno },
    #[error("cannot move mount {from} to {to}: {source}")]
    MoveMount {
        from: PathBuf,
        to: PathBuf,
        source: Errno,
    },
    #[error("{step} failed while entering the new root: {source}")]
    Enter { step: &'static str, source: Errno },
}

/// What the initramfs cleanup did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    pub removed: usize,
    pub failed: usize,
}

/// Whether `path` is on a ramfs or tmpfs, i.e. we are still in the initramfs.
pub fn is_initramfs(path: &Path) -> Result<bool, SwitchRootError> {
    let fs = statfs(path).map_err(|source| SwitchRootError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    let kind = fs.filesystem_type();
    Ok(kind == TMPFS_MAGIC || kind == FsType(RAMFS_MAGIC as _))
}

/// Switches from the initramfs to the file system mounted on `new_root`.
pub fn switch_root(new_root: &Path) -> Result<Cleanup, SwitchRootError> {
    if !is_initramfs(Path::new("/"))? {
        return Err(SwitchRootError::NotInitramfs);
    }
    move_mounts(new_root)?;
    let cleanup = free_initramfs(Path::new("/"));
    enter(new_root)?;
    Ok(cleanup)
}

fn move_mounts(new_root: &Path) -> Result<(), SwitchRootError> {
    for from in MOVED_MOUNTS {
        let to = new_root.join(from.trim_start_matches('/'));
        // The real root normally has these directories; create them if not
        // (fails harmlessly on a read-only root, and the move then reports it).
        let _ = fs::create_dir_all(&to);
        mount(
            Some(from),
            &to,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|source| SwitchRootError::MoveMount {
            from: PathBuf::from(from),
            to,
            source,
        })?;
    }
    Ok(())
}

/// Deletes everything on the file system of `root` below `root`, without
/// crossing into other mounts. Errors are counted, not fatal: the only cost of
/// a leftover file is a little memory.
pub fn free_initramfs(root: &Path) -> Cleanup {
    let mut cleanup = Cleanup::default();
    match fs::symlink_metadata(root) {
        Ok(meta) => remove_tree(root, meta.dev(), &mut cleanup),
        Err(_) => cleanup.failed += 1,
    }
    debug!(
        "initramfs freed",
        removed = cleanup.removed,
        failed = cleanup.failed
    );
    cleanup
}

fn remove_tree(dir: &Path, dev: u64, cleanup: &mut Cleanup) {
    let Ok(entries) = fs::read_dir(dir) else {
        cleanup.failed += 1;
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            cleanup.failed += 1;
            continue;
        };
        if meta.dev() != dev {
            continue; // a mount point: not ours to delete
        }
        let result = if meta.is_dir() {
            remove_tree(&path, dev, cleanup);
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => cleanup.removed += 1,
            Err(_) => cleanup.failed += 1,
        }
    }
}

/// `cd new_root; mount --move . /; chroot .; cd /`.
fn enter(new_root: &Path) -> Result<(), SwitchRootError> {
    let step = |step: &'static str| move |source| SwitchRootError::Enter { step, source };
    chdir(new_root).map_err(step("chdir to the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("moving the new root onto /"))?;
    chroot(".").map_err(step("chroot"))?;
    chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_files_dirs_and_symlinks_without_following_links() {
        let base = std::env::temp_dir().join(format!("wrenn-init-free-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("outside");
        fs::create_dir_all(root.join("lib/modules/6.1")).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(root.join("init"), b"x").expect("write");
        fs::write(root.join("lib/modules/6.1/a.ko"), b"x").expect("write");
        fs::write(outside.join("keep"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");

        let cleanup = free_initramfs(&root);

        assert_eq!(cleanup.failed, 0);
        assert_eq!(cleanup.removed, 6);
        assert_eq!(fs::read_dir(&root).expect("root kept").count(), 0);
        assert!(outside.join("keep").exists(), "symlink target must survive");
        let _ = fs::remove_dir_all(&base);
    }
}
