//! Named network namespaces, the way iproute2 keeps them: a namespace is
//! pinned by bind-mounting its `nsfs` file onto `/run/netns/<name>`, so
//! `ip netns` and `ip -n` see ours and we see theirs.
//!
//! Namespaces are only ever entered on threads this module spawns for the
//! purpose; they exit when the work is done, so no thread of the caller (a
//! tokio worker, say) ever changes namespace. Creating one does not fork
//! (unlike rtnetlink's `NetworkNamespace::add`): a fresh thread unshares its
//! network namespace and bind-mounts `/proc/thread-self/ns/net`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use tracing::debug;

use super::NetError;

/// Where named namespaces are pinned, as with iproute2.
pub const NETNS_DIR: &str = "/run/netns";

/// Serialises making [`NETNS_DIR`] a shared mount, so two first setups in
/// this process do not both bind-mount it onto itself.
static DIR_LOCK: Mutex<()> = Mutex::new(());

/// `/run/netns/<name>`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether `/run/netns/<name>` exists (pinned or a stale file).
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Names under [`NETNS_DIR`]; none when the directory does not exist.
pub fn list() -> Result<Vec<String>, NetError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetError::NetnsList { source }),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetError::NetnsList { source })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// Runs `work` on a new thread and waits for it; `what` names the thread
/// and the panic, if any. The thread starts in the caller's namespace.
pub fn on_thread<T, F>(what: &str, work: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("wrenn-net-{what}"))
            .spawn_scoped(scope, work)
            .map_err(|source| NetError::Thread {
                what: what.to_string(),
                source,
            })?;
        handle.join().map_err(|_| NetError::ThreadPanicked {
            what: what.to_string(),
        })
    })
}

/// Opens `/run/netns/<name>` (for `setns` or to move a link into it).
pub fn open(name: &str) -> Result<File, NetError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path(name))
        .map_err(|source| NetError::NetnsOpen {
            name: name.to_string(),
            source,
        })
}

/// Runs `work` on a new thread that has entered the namespace `name`.
pub fn run_in<T, F>(name: &str, work: F) -> Result<T, NetError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = open(name)?;
    on_thread(name, move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetError::NetnsEnter {
            name: name.to_string(),
            source: errno.into(),
        })?;
        drop(file);
        Ok(work())
    })?
}

/// Creates the namespace `name` and pins it at `/run/netns/<name>`. Fails if
/// that path exists already: callers remove leftovers first.
pub fn create(name: &str) -> Result<(), NetError> {
    prepare_dir()?;
    let target = path(name);
    let create_error = |source: io::Error| NetError::NetnsCreate {
        name: name.to_string(),
        source,
    };
    // The mount point: an empty file, as iproute2 makes it.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&target)
        .map_err(create_error)?;
    let pinned = on_thread("netns-create", || -> Result<(), Errno> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })?;
    if let Err(errno) = pinned {
        // Nothing was mounted: the empty file is all there is to undo.
        let _ = fs::remove_file(&target);
        return Err(create_error(errno.into()));
    }
    debug!(netns = name, "network namespace created");
    Ok(())
}

/// Unpins and removes `/run/netns/<name>`; a missing one is fine. The
/// namespace itself goes once nothing else holds it (a process inside, an
/// open fd): its devices and nft tables go with it.
pub fn remove(name: &str) -> Result<(), NetError> {
    let target = path(name);
    let remove_error = |source: io::Error| NetError::NetnsRemove {
        name: name.to_string(),
        source,
    };
    match umount2(&target, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a stale file from an interrupted setup).
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
        Err(errno) => return Err(remove_error(errno.into())),
    }
    match fs::remove_file(&target) {
        Ok(()) => {
            debug!(netns = name, "network namespace removed");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(remove_error(e)),
    }
}

/// Makes sure [`NETNS_DIR`] exists and is a shared mount, as iproute2 does:
/// mounts pinned under it then propagate to mount namespaces created later
/// (a QEMU started in its own mount namespace still sees them).
fn prepare_dir() -> Result<(), NetError> {
    let dir_error = |source: io::Error| NetError::NetnsDir {
        path: NETNS_DIR.to_string(),
        source,
    };
    let _guard = DIR_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match fs::DirBuilder::new().mode(0o755).create(NETNS_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(dir_error(e)),
    }
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet; make it one by binding it onto itself.
        Err(Errno::EINVAL) => {}
        Err(errno) => return Err(dir_error(errno.into())),
    }
    mount(
        Some(NETNS_DIR),
        NETNS_DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|errno| dir_error(errno.into()))?;
    make_shared().map_err(|errno| dir_error(errno.into()))
}
