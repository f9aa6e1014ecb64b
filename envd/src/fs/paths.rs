//! Validating the paths clients send: absolute (or starting with `~`, the
//! acting user's home), no NUL bytes.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use wrenn_http::ApiError;

use crate::process::expand_home;

/// Checks `raw` and expands `~`; `what` names the parameter in errors.
pub fn absolute(raw: &Path, home: &Path, what: &str) -> Result<PathBuf, ApiError> {
    let bytes = raw.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(ApiError::invalid_argument(format!(
            "'{what}' is empty; give an absolute path such as /home/user/file.txt"
        )));
    }
    if bytes.contains(&0) {
        return Err(ApiError::invalid_argument(format!(
            "'{what}' contains a NUL byte"
        )));
    }
    let path = match raw.to_str() {
        Some(text) if text.starts_with('~') => expand_home(text, home),
        _ => raw.to_path_buf(),
    };
    if !path.is_absolute() {
        return Err(ApiError::invalid_argument(format!(
            "'{what}' must be an absolute path (or start with ~), got '{}'",
            path.display()
        )));
    }
    Ok(path)
}

/// `path` for messages and JSON (lossy for non-UTF-8 names).
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_empty_paths_are_rejected() {
        let home = Path::new("/root");
        assert!(absolute(Path::new("rel/x"), home, "path").is_err());
        assert!(absolute(Path::new(""), home, "path").is_err());
        assert_eq!(
            absolute(Path::new("~/x"), home, "path").ok(),
            Some(PathBuf::from("/root/x"))
        );
        assert_eq!(
            absolute(Path::new("/a/b"), home, "path").ok(),
            Some(PathBuf::from("/a/b"))
        );
    }
}
