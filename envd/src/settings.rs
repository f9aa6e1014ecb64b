//! Sandbox-wide settings that the host sends with `POST /init`: the access
//! token, default environment variables and the default user.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The current settings; read by every request, written by `/init`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Token every request (but `/health`) must present; `None` before `/init`.
    pub access_token: Option<String>,
    /// Variables merged into every process's environment.
    pub env_vars: BTreeMap<String, String>,
    /// User for processes and file operations that name none.
    pub default_user: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            access_token: None,
            env_vars: BTreeMap::new(),
            default_user: "root".to_owned(),
        }
    }
}

/// Settings behind a lock that tolerates poisoning (a panicking handler must
/// not lock everyone out).
#[derive(Debug, Default)]
pub struct SharedSettings(RwLock<Settings>);

impl SharedSettings {
    pub fn read(&self) -> RwLockReadGuard<'_, Settings> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Settings> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current settings, so no lock is held while working.
    pub fn snapshot(&self) -> Settings {
        self.read().clone()
    }
}
