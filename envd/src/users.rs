//! User accounts from the system's passwd/group databases: who a process or a
//! file operation runs as, and names for the uids and gids `stat` reports.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};
use wrenn_http::ApiError;

/// A user a process or file operation runs as.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, including the primary group.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

impl Account {
    pub fn is_root(&self) -> bool {
        self.uid == 0 && self.gid == 0
    }
}

/// Looks a user up by name (or numeric uid). Unknown users are a 400.
pub fn lookup(name: &str) -> Result<Account, ApiError> {
    if name.is_empty() || name.contains('\0') {
        return Err(ApiError::invalid_argument(format!(
            "'{}' is not a valid user name",
            name.escape_debug()
        )));
    }
    let found = User::from_name(name).map_err(|e| {
        ApiError::internal(format!("cannot read the user database for '{name}': {e}"))
    })?;
    let found = match (found, name.parse::<u32>()) {
        (Some(user), _) => Some(user),
        (None, Ok(uid)) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        (None, Err(_)) => None,
    };
    let user = found.ok_or_else(|| {
        ApiError::invalid_argument(format!(
            "user '{name}' does not exist in this sandbox; create it (useradd) or pick another"
        ))
    })?;
    Ok(account_from(user))
}

/// Looks up `requested`, or the default user when none was requested.
pub fn lookup_or_default(requested: Option<&str>, default: &str) -> Result<Account, ApiError> {
    lookup(requested.unwrap_or(default))
}

fn account_from(user: User) -> Account {
    let groups = CString::new(user.name.as_bytes())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid]);
    Account {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        home: user.dir,
        shell: user.shell,
        name: user.name,
    }
}

/// Remembers uid/gid names during one listing, so each is looked up once.
#[derive(Default)]
pub struct NameCache {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl NameCache {
    pub fn user(&mut self, uid: u32) -> Option<String> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    pub fn group(&mut self, gid: u32) -> Option<String> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_by_name_and_uid() {
        let by_name = lookup("root").expect("root exists");
        assert_eq!(by_name.uid, 0);
        assert!(by_name.is_root());
        let by_uid = lookup("0").expect("uid 0 exists");
        assert_eq!(by_uid.name, "root");
    }

    #[test]
    fn unknown_user_is_invalid_argument() {
        let err = lookup("no-such-user-envd").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(lookup("").is_err());
    }
}
