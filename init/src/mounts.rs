//! Mounting: the kernel file systems PID 1 needs (in the initramfs and again
//! after the switch to the real root), waiting for the root device, and
//! mounting the root file system.
//!
//! A path counts as already mounted when its device number differs from its
//! parent's; such mounts are left alone, so running a stage twice is harmless.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use thiserror::Error;

use crate::cmdline::Config;
use crate::log::{debug, warning};

/// One file system to mount.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounted first in the initramfs; `/dev` comes first so the console exists.
pub const EARLY: [MountSpec; 3] = [
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mounted on the real root before envd starts.
pub const LATE: [MountSpec; 5] = [
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mount failures, each naming what was attempted.
#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot create mount point {path}: {source}")]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("cannot mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: PathBuf,
        source: Errno,
    },
    #[error("cannot mount root device {device} ({options}) on {target}: {source}{}", root_hint(*source))]
    Root {
        device: String,
        /// File system type and mount options, e.g. `ext4, rw,noatime`.
        options: String,
        target: PathBuf,
        source: Errno,
    },
    #[error("root device {device} did not appear within {waited:?}; is virtio_blk loaded and the disk attached? block devices present: {present}")]
    RootTimeout {
        device: String,
        waited: Duration,
        present: String,
    },
}

/// Whether something else is mounted on `path` (device differs from parent's).
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let meta = fs::metadata(path)?;
    let parent = fs::metadata(path.join(".."))?;
    Ok(meta.dev() != parent.dev() || meta.ino() == parent.ino())
}

/// Creates `path` (and parents) as a directory if it does not exist.
pub fn ensure_dir(path: &Path) -> Result<(), MountError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| MountError::MountPoint {
            path: path.to_path_buf(),
            source,
        })
}

/// Mounts `spec` unless its target is already a mount point.
/// Returns whether a mount was made.
pub fn mount_spec(spec: &MountSpec) -> Result<bool, MountError> {
    let target = Path::new(spec.target);
    if is_mount_point(target).unwrap_or(false) {
        debug!("already mounted", target = spec.target);
        return Ok(false);
    }
    ensure_dir(target)?;
    mount(
        Some(spec.source),
        target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    )
    .map_err(|source| MountError::Mount {
        fstype: spec.fstype.to_string(),
        target: target.to_path_buf(),
        source,
    })?;
    debug!("mounted", fstype = spec.fstype, target = spec.target);
    Ok(true)
}

/// Mounts /dev, /proc and /sys; any failure is fatal for the boot.
pub fn mount_early() -> Result<(), MountError> {
    EARLY.iter().try_for_each(|spec| mount_spec(spec).map(drop))
}

/// Mounts /dev/pts, /dev/shm, /tmp, /run and the cgroup2 hierarchy, logging
/// (not failing on) problems, then points /dev/ptmx at the new devpts.
pub fn mount_late() {
    for spec in &LATE {
        if let Err(e) = mount_spec(spec) {
            warning!("mount failed", target = spec.target, error = e);
        }
    }
    if let Err(e) = link_ptmx(Path::new("/dev")) {
        warning!("cannot point /dev/ptmx at pts/ptmx", error = e);
    }
}

/// Replaces `<dev>/ptmx` with a symlink to `pts/ptmx`, so opening it uses
/// the devpts instance mounted on `<dev>/pts`.
pub fn link_ptmx(dev: &Path) -> io::Result<()> {
    let ptmx = dev.join("ptmx");
    match fs::symlink_metadata(&ptmx) {
        Ok(meta) if meta.file_type().is_symlink() => return Ok(()),
        Ok(meta) if meta.file_type().is_char_device() || meta.is_file() => fs::remove_file(&ptmx)?,
        Ok(_) => return Err(io::Error::other("exists and is not a device node")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    symlink("pts/ptmx", &ptmx)
}

/// Polls until `device` exists, up to `timeout`.
pub fn wait_for_device(device: &str, timeout: Duration) -> Result<Duration, MountError> {
    let started = Instant::now();
    loop {
        if Path::new(device).exists() {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(MountError::RootTimeout {
                device: device.to_string(),
                waited: timeout,
                present: crate::log::list_dir(Path::new("/sys/block")),
            });
        }
        sleep(Duration::from_millis(20));
    }
}

/// Mounts the root device from the configuration on `target`.
pub fn mount_root(config: &Config, target: &Path) -> Result<(), MountError> {
    ensure_dir(target)?;
    let flags = if config.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let data = config.rootflags.as_deref();
    mount(
        Some(config.root.as_str()),
        target,
        Some(config.rootfstype.as_str()),
        flags,
        data,
    )
    .map_err(|source| MountError::Root {
        device: config.root.clone(),
        options: format!(
            "{}, {}{}",
            config.rootfstype,
            if config.read_only { "ro" } else { "rw" },
            data.map(|d| format!(",{d}")).unwrap_or_default()
        ),
        target: target.to_path_buf(),
        source,
    })
}

fn root_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EINVAL => " (wrong rootfstype=, bad rootflags=, or no file system on the device?)",
        Errno::ENODEV => " (the kernel does not support this rootfstype=)",
        Errno::ENXIO | Errno::ENOENT => " (the device node exists but no disk is behind it)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_of_a_file_system_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")).expect("stat /"));
    }

    #[test]
    fn plain_directory_is_not_a_mount_point() {
        let dir = std::env::temp_dir().join(format!("wrenn-init-mp-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).expect("mkdir");
        assert!(!is_mount_point(&dir.join("sub")).expect("stat"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn ptmx_becomes_symlink_and_is_idempotent() {
        let dev = std::env::temp_dir().join(format!("wrenn-init-ptmx-{}", std::process::id()));
        fs::create_dir_all(&dev).expect("mkdir");
        fs::write(dev.join("ptmx"), b"").expect("placeholder");
        link_ptmx(&dev).expect("replace");
        link_ptmx(&dev).expect("again");
        let target = fs::read_link(dev.join("ptmx")).expect("symlink");
        assert_eq!(target, PathBuf::from("pts/ptmx"));
        let _ = fs::remove_dir_all(&dev);
    }

    #[test]
    fn root_error_message_is_actionable() {
        let err = MountError::Root {
            device: "/dev/vda".into(),
            options: "ext4, rw".into(),
            target: PathBuf::from("/newroot"),
            source: Errno::EINVAL,
        };
        assert!(err
            .to_string()
            .starts_with("cannot mount root device /dev/vda (ext4, rw) on /newroot: EINVAL"));
        assert!(err.to_string().contains("wrong rootfstype="));
    }
}
