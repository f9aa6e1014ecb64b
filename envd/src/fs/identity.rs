//! Running file operations as a user, one thread at a time.
//!
//! Linux keeps credentials per thread; the C library only makes them look
//! process-wide. Calling the raw system calls changes the file-system uid,
//! gid and supplementary groups of the calling thread alone, so a handler can
//! open, create or delete files with exactly the permissions (and the
//! resulting ownership) of the requested user while other threads keep root.
//! Threads created while a guard is alive inherit its identity, so handlers
//! never spawn threads under one.

use nix::unistd::{geteuid, getgroups};
use wrenn_http::ApiError;

use crate::users::Account;

/// While alive, the current thread's file operations run as an account.
/// Dropping it restores the previous identity.
#[must_use = "the identity is restored as soon as the guard is dropped"]
pub struct FsIdentity {
    saved: Option<Saved>,
}

struct Saved {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

impl FsIdentity {
    /// Switches the current thread to `account` for file operations.
    pub fn assume(account: &Account) -> Result<Self, ApiError> {
        let me = geteuid().as_raw();
        if me != 0 {
            if me == account.uid {
                return Ok(Self { saved: None });
            }
            return Err(ApiError::permission_denied(format!(
                "envd runs as uid {me}, not root, so it cannot act as '{}'",
                account.name
            )));
        }
        if account.is_root() {
            return Ok(Self { saved: None });
        }
        let saved = Saved {
            fsuid: set_fsuid(u32::MAX),
            fsgid: set_fsgid(u32::MAX),
            groups: getgroups()
                .map_err(|e| ApiError::internal(format!("cannot read the group list: {e}")))?
                .into_iter()
                .map(|g| g.as_raw())
                .collect(),
        };
        let guard = Self { saved: Some(saved) };
        set_groups(&account.groups).map_err(|e| {
            ApiError::internal(format!(
                "cannot switch to the groups of '{}': {e}",
                account.name
            ))
        })?;
        set_fsgid(account.gid);
        set_fsuid(account.uid);
        if set_fsuid(u32::MAX) != account.uid || set_fsgid(u32::MAX) != account.gid {
            return Err(ApiError::internal(format!(
                "cannot switch file access to user '{}'",
                account.name
            )));
        }
        Ok(guard)
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        let Some(saved) = self.saved.take() else {
            return;
        };
        set_fsuid(saved.fsuid);
        set_fsgid(saved.fsgid);
        if let Err(err) = set_groups(&saved.groups) {
            tracing::error!(error = %err, "cannot restore this thread's groups");
        }
        if set_fsuid(u32::MAX) != saved.fsuid {
            tracing::error!("cannot restore this thread's file-system uid");
        }
    }
}

/// Sets this thread's fsuid; returns the previous one. `u32::MAX` (-1) only
/// queries it.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid takes an integer and cannot fail in a harmful way; the
    // raw call affects only the calling thread.
    let previous = unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) };
    previous as u32
}

/// Sets this thread's fsgid; returns the previous one.
fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: as for `set_fsuid`.
    let previous = unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) };
    previous as u32
}

/// Sets this thread's supplementary groups.
fn set_groups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t; the raw
    // call (unlike libc's wrapper) changes only the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn nobody_cannot_read_a_private_root_file_and_identity_is_restored() {
        if !geteuid().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("envd-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, b"x").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let nobody = crate::users::lookup("nobody").expect("nobody exists");
        // Threads inherit the credentials of the thread that creates them, so
        // the "other" thread is started before switching.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn({
            let secret = secret.clone();
            move || wait.recv().is_ok() && std::fs::read(&secret).is_ok()
        });
        {
            let _as_nobody = FsIdentity::assume(&nobody).expect("assume nobody");
            let denied = std::fs::read(&secret).unwrap_err();
            assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
            // Other threads keep root's access meanwhile.
            go.send(()).expect("signal other thread");
            assert!(other.join().unwrap_or(false));
        }
        assert!(std::fs::read(&secret).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
