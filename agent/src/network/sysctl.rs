//! Network sysctls, read and written through `/proc/sys/net`.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens the
//! file, so these functions act on the current thread's namespace: the root
//! namespace from an ordinary thread, a slot from a thread inside it.

use std::fs;

use super::NetError;

/// Routing between interfaces (IPv4), for the whole namespace.
pub const IP_FORWARD: &str = "net/ipv4/ip_forward";

/// Sets `key` (a path under `/proc/sys`) to `value` unless it already has
/// it; returns whether it changed, so that callers log real changes only.
pub fn ensure(scope: &str, key: &str, value: &str) -> Result<bool, NetError> {
    let path = format!("/proc/sys/{key}");
    let error = |source| NetError::Sysctl {
        scope: scope.to_string(),
        key: key.replace('/', "."),
        value: value.to_string(),
        source,
    };
    let current = fs::read_to_string(&path).map_err(error)?;
    if current.trim() == value {
        return Ok(false);
    }
    fs::write(&path, value).map_err(error)?;
    Ok(true)
}
