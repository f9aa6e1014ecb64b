//! Turning a `POST /processes` body into a launch plan: validation, the
//! account to run as, the working directory, the environment, and the
//! program resolved through PATH. Everything that can be checked before
//! forking is checked here, so failures are clean 4xx answers.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use wrenn_http::ApiError;

use super::pty::{self, PtySize};
use crate::settings::Settings;
use crate::users::{self, Account};

/// PATH used when neither the defaults nor the request set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The body of `POST /processes`, as the wire crate defines it.
pub use envd_api::StartRequest;

/// Everything needed to start the process.
#[derive(Debug)]
pub struct LaunchPlan {
    /// Absolute path of the program to execute.
    pub program: PathBuf,
    /// `cmd` as the client sent it, passed as argv[0].
    pub cmd: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub account: Account,
    pub pty: Option<PtySize>,
    pub stdin: bool,
    pub tag: Option<String>,
    pub background: bool,
}

/// Validates the request against the current settings.
pub fn plan(request: StartRequest, settings: &Settings) -> Result<LaunchPlan, ApiError> {
    check_no_nul(&request)?;
    if request.cmd.is_empty() {
        return Err(ApiError::invalid_argument(
            "'cmd' is empty; name a program such as \"/bin/bash\"",
        ));
    }
    if let Some(tag) = &request.tag {
        validate_tag(tag)?;
    }
    let pty = request
        .pty
        .map(pty::validate)
        .transpose()
        .map_err(ApiError::invalid_argument)?;
    let account = users::lookup_or_default(request.user.as_deref(), &settings.default_user)?;
    check_can_switch_to(&account)?;
    let cwd = working_dir(request.cwd.as_deref(), &account)?;
    let env = environment(&request.env, settings, &account, pty.is_some())?;
    let path_var = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let program = resolve_program(&request.cmd, path_var, &cwd)?;
    Ok(LaunchPlan {
        program,
        cmd: request.cmd,
        args: request.args,
        env,
        cwd,
        account,
        pty,
        stdin: request.stdin,
        tag: request.tag,
        background: request.background,
    })
}

/// Tags are used in URLs, so they are short and URL-safe, and never all
/// digits (that would read as a pid).
pub fn validate_tag(tag: &str) -> Result<(), ApiError> {
    let valid_chars = tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let all_digits = tag.bytes().all(|b| b.is_ascii_digit());
    if tag.is_empty() || tag.len() > 64 || !valid_chars || all_digits {
        return Err(ApiError::invalid_argument(format!(
            "tag '{}' is invalid; use 1-64 characters from A-Z a-z 0-9 - _ . and at least one non-digit",
            tag.escape_debug()
        )));
    }
    Ok(())
}

fn check_no_nul(request: &StartRequest) -> Result<(), ApiError> {
    let strings = std::iter::once(&request.cmd)
        .chain(&request.args)
        .chain(request.env.iter().flat_map(|(k, v)| [k, v]))
        .chain(request.cwd.as_ref());
    for s in strings {
        if s.contains('\0') {
            return Err(ApiError::invalid_argument(
                "cmd, args, env and cwd must not contain NUL characters",
            ));
        }
    }
    Ok(())
}

/// Without root, envd can only start processes as its own user.
fn check_can_switch_to(account: &Account) -> Result<(), ApiError> {
    let me = nix::unistd::geteuid().as_raw();
    if me == 0 || me == account.uid {
        return Ok(());
    }
    Err(ApiError::permission_denied(format!(
        "envd runs as uid {me}, not root, so it cannot start processes as '{}'",
        account.name
    )))
}

/// The requested working directory (`~` = the user's home) or the home.
fn working_dir(requested: Option<&str>, account: &Account) -> Result<PathBuf, ApiError> {
    let dir = match requested {
        None | Some("") => {
            return Ok(if account.home.is_dir() {
                account.home.clone()
            } else {
                PathBuf::from("/")
            })
        }
        Some(dir) => expand_home(dir, &account.home),
    };
    if !dir.is_absolute() {
        return Err(ApiError::invalid_argument(format!(
            "cwd '{}' is not an absolute path; start it with / or ~",
            dir.display()
        )));
    }
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(ApiError::invalid_argument(format!(
            "cwd '{}' is not a directory",
            dir.display()
        ))),
        Err(_) => Err(ApiError::invalid_argument(format!(
            "cwd '{}' does not exist; create it first or pick another directory",
            dir.display()
        ))),
    }
}

/// Replaces a leading `~` (alone or followed by `/`) with `home`.
pub fn expand_home(path: &str, home: &Path) -> PathBuf {
    match path.strip_prefix('~') {
        Some("") => home.to_path_buf(),
        Some(rest) if rest.starts_with('/') => home.join(rest.trim_start_matches('/')),
        _ => PathBuf::from(path),
    }
}

/// Base variables, then the `/init` defaults, then the request's own.
fn environment(
    requested: &BTreeMap<String, String>,
    settings: &Settings,
    account: &Account,
    pty: bool,
) -> Result<BTreeMap<String, String>, ApiError> {
    for key in requested.keys() {
        if key.is_empty() || key.contains('=') {
            return Err(ApiError::invalid_argument(format!(
                "environment variable name '{}' is invalid; names are non-empty and have no '='",
                key.escape_debug()
            )));
        }
    }
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), account.home.display().to_string());
    env.insert("USER".to_owned(), account.name.clone());
    env.insert("LOGNAME".to_owned(), account.name.clone());
    env.insert("SHELL".to_owned(), account.shell.display().to_string());
    if pty {
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    env.extend(settings.env_vars.clone());
    env.extend(requested.clone());
    Ok(env)
}

/// Finds the program: a path with `/` is taken as is (relative to `cwd`),
/// anything else is searched in `path_var`.
pub fn resolve_program(cmd: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ApiError> {
    if cmd.contains('/') {
        let path = cwd.join(cmd);
        return match probe(&path) {
            Probe::Executable => Ok(path),
            Probe::NotExecutable => Err(not_executable(&path)),
            Probe::Missing => Err(ApiError::not_found(format!(
                "cannot start '{cmd}': {} does not exist",
                path.display()
            ))),
        };
    }
    let mut not_executable_match = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let candidate = cwd.join(dir).join(cmd);
        match probe(&candidate) {
            Probe::Executable => return Ok(candidate),
            Probe::NotExecutable => {
                not_executable_match.get_or_insert(candidate);
            }
            Probe::Missing => {}
        }
    }
    match not_executable_match {
        Some(path) => Err(not_executable(&path)),
        None => Err(ApiError::not_found(format!(
            "command '{cmd}' was not found in PATH ({path_var}); install it or pass its full path"
        ))),
    }
}

enum Probe {
    Executable,
    NotExecutable,
    Missing,
}

fn probe(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Probe::Executable,
        Ok(meta) if meta.is_file() => Probe::NotExecutable,
        _ => Probe::Missing,
    }
}

fn not_executable(path: &Path) -> ApiError {
    ApiError::permission_denied(format!(
        "{} is not executable; chmod +x it or run it through an interpreter",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_through_path() {
        let found = resolve_program("sh", DEFAULT_PATH, Path::new("/")).expect("sh exists");
        assert!(found.is_absolute() && found.ends_with("sh"));
        let err = resolve_program("no-such-cmd-envd", DEFAULT_PATH, Path::new("/")).unwrap_err();
        assert_eq!(err.status(), 404);
        let direct = resolve_program("/bin/sh", "", Path::new("/")).expect("absolute");
        assert_eq!(direct, PathBuf::from("/bin/sh"));
        let passwd = resolve_program("/etc/passwd", "", Path::new("/")).unwrap_err();
        assert_eq!(passwd.status(), 403);
    }

    #[test]
    fn tags_are_url_safe_and_not_numeric() {
        assert!(validate_tag("web-server_1.0").is_ok());
        assert!(validate_tag("123").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag("").is_err());
    }

    #[test]
    fn tilde_expands_to_home() {
        let home = Path::new("/home/u");
        assert_eq!(expand_home("~", home), PathBuf::from("/home/u"));
        assert_eq!(expand_home("~/x", home), PathBuf::from("/home/u/x"));
        assert_eq!(expand_home("/abs", home), PathBuf::from("/abs"));
        assert_eq!(expand_home("~other", home), PathBuf::from("~other"));
    }
}
