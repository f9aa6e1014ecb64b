//! Extra services a guest image asks PID 1 to run beside envd.
//!
//! Each file `/etc/wrenn/services/NAME.service` of the real root describes one
//! service. Files are read once at boot, sorted by name, after envd has been
//! started; a file that does not parse is logged and skipped, it never stops
//! the boot. The format is `key=value` lines:
//!
//! ```text
//! # comment (whole lines only); blank lines are ignored
//! exec=/opt/app/bin/server --port=8888 --token=''    required, once
//! user=root                                          name or uid  [root]
//! cwd=/root                                          absolute     [the user's home]
//! env=KEY=VALUE                                      repeatable; overrides the defaults
//! restart=always                                     always|never [always]
//! ```
//!
//! `exec` is split into words on whitespace, as a shell would without any
//! expansion: `'...'` keeps its content literally, `"..."` too except that
//! `\"` and `\\` stand for `"` and `\`; quotes may join parts of one word
//! (`--token=''` is the word `--token=`). The first word must be an absolute
//! path. A service starts with a clean environment of `PATH`, `HOME`, `USER`
//! and `LOGNAME` (plus the `env=` entries), stdin on /dev/null, stdout and
//! stderr appended to `/var/log/wrenn/NAME.log`, in a session of its own.
//! With `restart=always` it is started again whenever it exits, after a delay
//! of 1 s doubling to 30 s (back to 1 s after a run of 60 s or more).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::log::{error, info, warning};
use crate::supervise::{describe, Backoff};

/// Where service files live on the real root.
pub const SERVICES_DIR: &str = "/etc/wrenn/services";
/// Where service output goes, one `NAME.log` per service.
pub const LOG_DIR: &str = "/var/log/wrenn";
/// The suffix a service file must have.
pub const SUFFIX: &str = ".service";

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// What to do when a service exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Always,
    Never,
}

impl fmt::Display for Restart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Restart::Always => "always",
            Restart::Never => "never",
        })
    }
}

/// One parsed service file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    /// Program (absolute path) and arguments.
    pub exec: Vec<String>,
    /// User name or numeric uid; `None` means root.
    pub user: Option<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub restart: Restart,
}

/// Why a service file was rejected; `line` is 1-based, 0 for the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Whether `name` is usable as a service name (and so as a log file name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// Parses the text of `NAME.service`.
pub fn parse(name: &str, text: &str) -> Result<ServiceSpec, ParseError> {
    if !valid_name(name) {
        return Err(err(
            0,
            format!("bad service name {name:?}: use letters, digits and . _ - @"),
        ));
    }
    let mut exec: Option<Vec<String>> = None;
    let mut user = None;
    let mut cwd = None;
    let mut env = Vec::new();
    let mut restart = None;
    for (index, raw) in text.lines().enumerate() {
        let n = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(n, format!("expected key=value, got {line:?}")));
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            "exec" => {
                if exec.is_some() {
                    return Err(err(n, "exec given twice"));
                }
                let words = split_words(value).map_err(|m| err(n, m))?;
                match words.first() {
                    None => return Err(err(n, "exec is empty")),
                    Some(program) if !program.starts_with('/') => {
                        return Err(err(
                            n,
                            format!("exec must start with an absolute path, not {program:?}"),
                        ))
                    }
                    Some(_) => {}
                }
                exec = Some(words);
            }
            "user" => {
                if user.is_some() {
                    return Err(err(n, "user given twice"));
                }
                if value.is_empty() || value.contains(|c: char| c == ':' || c.is_whitespace()) {
                    return Err(err(n, format!("bad user {value:?}")));
                }
                user = Some(value.to_string());
            }
            "cwd" => {
                if cwd.is_some() {
                    return Err(err(n, "cwd given twice"));
                }
                if !value.starts_with('/') {
                    return Err(err(
                        n,
                        format!("cwd must be an absolute path, not {value:?}"),
                    ));
                }
                cwd = Some(PathBuf::from(value));
            }
            "env" => {
                let Some((k, v)) = value.split_once('=') else {
                    return Err(err(n, format!("env wants KEY=VALUE, got {value:?}")));
                };
                let valid_key = !k.is_empty()
                    && !k.starts_with(|c: char| c.is_ascii_digit())
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid_key {
                    return Err(err(n, format!("bad environment variable name {k:?}")));
                }
                env.push((k.to_string(), v.to_string()));
            }
            "restart" => {
                if restart.is_some() {
                    return Err(err(n, "restart given twice"));
                }
                restart = Some(match value {
                    "always" => Restart::Always,
                    "never" => Restart::Never,
                    other => {
                        return Err(err(
                            n,
                            format!("restart must be always or never, not {other:?}"),
                        ))
                    }
                });
            }
            other => return Err(err(n, format!("unknown key {other:?}"))),
        }
    }
    let Some(exec) = exec else {
        return Err(err(0, "no exec= line"));
    };
    Ok(ServiceSpec {
        name: name.to_string(),
        exec,
        user,
        cwd,
        env,
        restart: restart.unwrap_or(Restart::Always),
    })
}

/// Splits `exec`'s value into words (see the module documentation).
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word exists once any character or quote pair was seen (so '' is a word).
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated ' quote".to_string()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated \" quote".to_string()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated \" quote".to_string()),
                    }
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A user as /etc/passwd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Finds `user` (a name, or a numeric uid) in the text of /etc/passwd.
pub fn lookup_user(passwd: &str, user: &str) -> Option<Account> {
    let by_uid: Option<u32> = user.parse().ok();
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            return None;
        }
        let uid: u32 = fields[2].parse().ok()?;
        let gid: u32 = fields[3].parse().ok()?;
        let matches = fields[0] == user || by_uid == Some(uid);
        matches.then(|| Account {
            name: fields[0].to_string(),
            uid,
            gid,
            home: PathBuf::from(fields[5]),
        })
    })
}

/// The account a service runs as: root when `user` is unset. A numeric uid
/// missing from /etc/passwd still works, with gid = uid and home `/`.
fn resolve_account(user: Option<&str>) -> Result<Account, String> {
    let user = user.unwrap_or("root");
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    if let Some(account) = lookup_user(&passwd, user) {
        return Ok(account);
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok(Account {
            name: user.to_string(),
            uid,
            gid: uid,
            home: PathBuf::from("/"),
        }),
        Err(_) if user == "root" => Ok(Account {
            name: "root".to_string(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
        }),
        Err(_) => Err(format!("no user {user:?} in /etc/passwd")),
    }
}

/// The environment a service starts with: defaults, then its `env=` lines.
pub fn environment(spec: &ServiceSpec, account: &Account) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), PATH_ENV.into()),
        ("HOME".into(), account.home.display().to_string()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
    ];
    for (key, value) in &spec.env {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// What loading a services folder found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub services: Vec<ServiceSpec>,
    /// `(file, reason)` for every file skipped.
    pub rejected: Vec<(PathBuf, String)>,
}

/// Reads every `*.service` file of `dir`, sorted by file name. A missing
/// folder means no services.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return loaded,
        Err(e) => {
            loaded
                .rejected
                .push((dir.to_path_buf(), format!("cannot read the folder: {e}")));
            return loaded;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX) && n.len() > SUFFIX.len())
        })
        .collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .unwrap_or_default()
            .to_string();
        let result = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| parse(&name, &text).map_err(|e| e.to_string()));
        match result {
            Ok(spec) => loaded.services.push(spec),
            Err(reason) => loaded.rejected.push((path, reason)),
        }
    }
    loaded
}

/// Starts one service; the child is reaped by PID 1's waitpid(-1) loop.
fn spawn(spec: &ServiceSpec) -> Result<Pid, String> {
    spawn_logging_to(spec, Path::new(LOG_DIR))
}

fn spawn_logging_to(spec: &ServiceSpec, log_dir: &Path) -> Result<Pid, String> {
    let account = resolve_account(spec.user.as_deref())?;
    fs::create_dir_all(log_dir).map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log descriptor: {e}"))?;
    let cwd = spec.cwd.clone().unwrap_or_else(|| account.home.clone());
    let mut cmd = Command::new(&spec.exec[0]);
    cmd.args(&spec.exec[1..])
        .env_clear()
        .envs(environment(spec, &account))
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    if account.uid != 0 || account.gid != 0 {
        // std drops the supplementary groups (setgroups(0)) before setgid and setuid.
        cmd.gid(account.gid).uid(account.uid);
    }
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setsid(2), which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} in {}: {e}", spec.exec[0], cwd.display()))?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// One service's lifecycle state.
struct Service {
    spec: ServiceSpec,
    running: Option<(Pid, Instant)>,
    start_at: Option<Instant>,
    backoff: Backoff,
    starts: u32,
}

/// Every service of the image, started and restarted from PID 1's loop.
pub struct Services {
    services: Vec<Service>,
    spawner: fn(&ServiceSpec) -> Result<Pid, String>,
}

impl Services {
    /// Services due to start at once.
    pub fn new(specs: Vec<ServiceSpec>) -> Self {
        Self::with_spawner(specs, spawn)
    }

    fn with_spawner(
        specs: Vec<ServiceSpec>,
        spawner: fn(&ServiceSpec) -> Result<Pid, String>,
    ) -> Self {
        let now = Instant::now();
        Services {
            services: specs
                .into_iter()
                .map(|spec| Service {
                    spec,
                    running: None,
                    start_at: Some(now),
                    backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_RESET_AFTER),
                    starts: 0,
                })
                .collect(),
            spawner,
        }
    }

    /// Loads the services of `dir`, logging every rejected file.
    pub fn load(dir: &Path) -> Self {
        let loaded = load_dir(dir);
        for (path, reason) in &loaded.rejected {
            error!(
                "service file skipped",
                file = path.display(),
                reason = reason
            );
        }
        if !loaded.services.is_empty() {
            let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
            info!(
                "services found",
                dir = dir.display(),
                names = names.join(",")
            );
        }
        Self::new(loaded.services)
    }

    /// Starts every service whose start is due.
    pub fn start_due(&mut self, now: Instant) {
        for service in &mut self.services {
            if service.start_at.is_none_or(|at| at > now) {
                continue;
            }
            service.start_at = None;
            service.starts += 1;
            match (self.spawner)(&service.spec) {
                Ok(pid) => {
                    info!(
                        "service started",
                        name = service.spec.name,
                        pid = pid,
                        start = service.starts
                    );
                    service.running = Some((pid, Instant::now()));
                }
                Err(e) => {
                    let delay = service.backoff.delay_after(Duration::ZERO);
                    match service.spec.restart {
                        Restart::Always => {
                            error!(
                                "service failed to start",
                                name = service.spec.name,
                                error = e,
                                retry_ms = delay.as_millis()
                            );
                            service.start_at = Some(Instant::now() + delay);
                        }
                        Restart::Never => error!(
                            "service failed to start; restart=never, giving up",
                            name = service.spec.name,
                            error = e
                        ),
                    }
                }
            }
        }
    }

    /// Handles a reaped child; true when it was a service.
    pub fn on_exit(&mut self, pid: Pid, status: &WaitStatus) -> bool {
        let Some(service) = self
            .services
            .iter_mut()
            .find(|s| s.running.is_some_and(|(p, _)| p == pid))
        else {
            return false;
        };
        let ran = service
            .running
            .map(|(_, since)| since.elapsed())
            .unwrap_or_default();
        service.running = None;
        match service.spec.restart {
            Restart::Always => {
                let delay = service.backoff.delay_after(ran);
                warning!(
                    "service exited",
                    name = service.spec.name,
                    pid = pid,
                    status = describe(status),
                    ran_ms = ran.as_millis(),
                    restart_ms = delay.as_millis()
                );
                service.start_at = Some(Instant::now() + delay);
            }
            Restart::Never => info!(
                "service exited; restart=never",
                name = service.spec.name,
                pid = pid,
                status = describe(status),
                ran_ms = ran.as_millis()
            ),
        }
        true
    }

    /// Time until the next scheduled start, if any.
    pub fn next_wakeup(&self, now: Instant) -> Option<Duration> {
        self.services
            .iter()
            .filter_map(|s| s.start_at)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn words(text: &str) -> Vec<String> {
        split_words(text).unwrap()
    }

    #[test]
    fn parses_a_full_service_file() {
        let text = "\
# Jupyter for the code runner
exec=/opt/wrenn/jupyter/bin/jupyter server --ServerApp.token='' --no-browser

user=user
cwd=/home/user
env=PATH=/opt/wrenn/jupyter/bin:/usr/bin:/bin
env=JUPYTER_RUNTIME_DIR=/tmp/jupyter
restart=never
";
        let spec = parse("jupyter", text).unwrap();
        assert_eq!(spec.name, "jupyter");
        assert_eq!(
            spec.exec,
            vec![
                "/opt/wrenn/jupyter/bin/jupyter",
                "server",
                "--ServerApp.token=",
                "--no-browser"
            ]
        );
        assert_eq!(spec.user.as_deref(), Some("user"));
        assert_eq!(spec.cwd, Some(PathBuf::from("/home/user")));
        assert_eq!(
            spec.env,
            vec![
                (
                    "PATH".to_string(),
                    "/opt/wrenn/jupyter/bin:/usr/bin:/bin".to_string()
                ),
                (
                    "JUPYTER_RUNTIME_DIR".to_string(),
                    "/tmp/jupyter".to_string()
                ),
            ]
        );
        assert_eq!(spec.restart, Restart::Never);
    }

    #[test]
    fn defaults_are_root_home_and_restart_always() {
        let spec = parse("a", "exec=/bin/sleep 10\n").unwrap();
        assert_eq!(spec.user, None);
        assert_eq!(spec.cwd, None);
        assert!(spec.env.is_empty());
        assert_eq!(spec.restart, Restart::Always);
    }

    #[test]
    fn splits_words_with_quotes() {
        assert_eq!(words("  a  b\tc "), vec!["a", "b", "c"]);
        assert_eq!(words("'' x"), vec!["", "x"]);
        assert_eq!(words("--o='*' --p=\"a b\""), vec!["--o=*", "--p=a b"]);
        assert_eq!(words(r#""say \"hi\" \\ \n""#), vec![r#"say "hi" \ \n"#]);
        assert_eq!(words("it''s"), vec!["its"]);
        assert!(words("").is_empty());
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
    }

    #[test]
    fn rejects_bad_files_with_the_line_number() {
        let cases = [
            ("", 0, "no exec= line"),
            ("# only a comment\n", 0, "no exec= line"),
            ("exec=bin/x\n", 1, "absolute path"),
            ("exec=\n", 1, "exec is empty"),
            ("exec=/a\nexec=/b\n", 2, "twice"),
            ("exec=/a\nnonsense\n", 2, "key=value"),
            ("exec=/a\ncolor=blue\n", 2, "unknown key"),
            ("exec=/a\nrestart=sometimes\n", 2, "always or never"),
            ("exec=/a\ncwd=tmp\n", 2, "absolute path"),
            ("exec=/a\nenv=NOVALUE\n", 2, "KEY=VALUE"),
            ("exec=/a\nenv=1X=2\n", 2, "variable name"),
            ("exec=/a\nuser=a:b\n", 2, "bad user"),
            ("\n\nexec=/a 'x\n", 3, "unterminated"),
        ];
        for (text, line, needle) in cases {
            let e = parse("svc", text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for name in ["", ".hidden", "a/b", "a b"] {
            assert!(parse(name, "exec=/a\n").is_err(), "{name:?}");
        }
        assert!(parse("jupyter-server_2.x@1", "exec=/a\n").is_ok());
    }

    #[test]
    fn finds_users_by_name_or_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      broken line\n\
                      user:x:1000:1000::/home/user:/bin/bash\n";
        let user = lookup_user(passwd, "user").unwrap();
        assert_eq!(
            user,
            Account {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: PathBuf::from("/home/user")
            }
        );
        assert_eq!(lookup_user(passwd, "1000").unwrap().name, "user");
        assert_eq!(
            lookup_user(passwd, "0").unwrap().home,
            PathBuf::from("/root")
        );
        assert_eq!(lookup_user(passwd, "nobody"), None);
    }

    #[test]
    fn env_lines_override_the_defaults() {
        let spec = parse("s", "exec=/a\nenv=PATH=/x\nenv=A=1\nenv=A=2\n").unwrap();
        let account = Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
        };
        let env = environment(&spec, &account);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PATH"), Some("/x"));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("USER"), Some("root"));
        assert_eq!(get("A"), Some("2"));
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
    }

    #[test]
    fn loads_sorted_service_files_and_skips_bad_ones() {
        let dir = std::env::temp_dir().join(format!("wrenn-init-svc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("b.service"), "exec=/bin/b\n").unwrap();
        fs::write(dir.join("a.service"), "exec=/bin/a\n").unwrap();
        fs::write(dir.join("bad.service"), "exec=relative\n").unwrap();
        fs::write(dir.join("notes.txt"), "exec=/bin/ignored\n").unwrap();
        fs::write(dir.join(".service"), "exec=/bin/ignored\n").unwrap();
        let loaded = load_dir(&dir);
        let names: Vec<&str> = loaded.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(loaded.rejected.len(), 1);
        assert!(loaded.rejected[0].0.ends_with("bad.service"));
        let _ = fs::remove_dir_all(&dir);
        assert!(load_dir(&dir).services.is_empty());
    }

    fn fake_spawn(_: &ServiceSpec) -> Result<Pid, String> {
        Ok(Pid::from_raw(4242))
    }

    fn failing_spawn(_: &ServiceSpec) -> Result<Pid, String> {
        Err("no such file".into())
    }

    #[test]
    fn crashed_services_restart_with_backoff() {
        let spec = parse("s", "exec=/bin/s\n").unwrap();
        let mut services = Services::with_spawner(vec![spec], fake_spawn);
        let now = Instant::now();
        assert_eq!(services.next_wakeup(now), Some(Duration::ZERO));
        services.start_due(now);
        assert_eq!(services.next_wakeup(now), None);
        let pid = Pid::from_raw(4242);
        assert!(!services.on_exit(Pid::from_raw(1), &WaitStatus::Exited(pid, 0)));
        assert!(services.on_exit(pid, &WaitStatus::Exited(pid, 1)));
        let first = services.next_wakeup(Instant::now()).unwrap();
        assert!(first > Duration::from_millis(900) && first <= BACKOFF_INITIAL);
        // Not due yet: nothing starts.
        services.start_due(Instant::now());
        assert!(services.services[0].running.is_none());
        services.start_due(Instant::now() + Duration::from_secs(2));
        assert!(services.on_exit(pid, &WaitStatus::Exited(pid, 1)));
        let second = services.next_wakeup(Instant::now()).unwrap();
        assert!(second > Duration::from_millis(1900), "{second:?}");
    }

    #[test]
    fn restart_never_leaves_the_service_stopped() {
        let spec = parse("s", "exec=/bin/s\nrestart=never\n").unwrap();
        let mut services = Services::with_spawner(vec![spec.clone()], fake_spawn);
        services.start_due(Instant::now());
        let pid = Pid::from_raw(4242);
        assert!(services.on_exit(pid, &WaitStatus::Exited(pid, 0)));
        assert_eq!(services.next_wakeup(Instant::now()), None);
        let mut failing = Services::with_spawner(vec![spec], failing_spawn);
        failing.start_due(Instant::now());
        assert_eq!(failing.next_wakeup(Instant::now()), None);
    }

    #[test]
    fn failed_starts_are_retried_with_backoff() {
        let spec = parse("s", "exec=/bin/s\n").unwrap();
        let mut services = Services::with_spawner(vec![spec], failing_spawn);
        services.start_due(Instant::now());
        let wait = services.next_wakeup(Instant::now()).unwrap();
        assert!(wait > Duration::from_millis(900) && wait <= BACKOFF_INITIAL);
    }

    #[test]
    fn spawned_service_runs_in_its_own_session_and_appends_to_its_log() {
        let dir = std::env::temp_dir().join(format!("wrenn-init-svclog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let text = "exec=/bin/sh -c 'echo out; echo err >&2; echo \"sid=$(cut -d\" \" -f6 /proc/self/stat) pid=$$ pwd=$PWD x=$X\"'\n\
                    cwd=/tmp\nenv=X=42\n";
        let spec = parse("t", text).unwrap();
        for _ in 0..2 {
            let pid = spawn_logging_to(&spec, &dir).unwrap();
            let status = nix::sys::wait::waitpid(pid, None).unwrap();
            assert_eq!(status, WaitStatus::Exited(pid, 0));
        }
        let log = fs::read_to_string(dir.join("t.log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 6, "{log}");
        assert_eq!(&lines[..2], &["out", "err"]);
        // A session leader's session id is its own pid.
        let fields: Vec<&str> = lines[2].split(' ').collect();
        assert_eq!(
            fields[0].trim_start_matches("sid="),
            fields[1].trim_start_matches("pid=")
        );
        assert_eq!(&fields[2..], &["pwd=/tmp", "x=42"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_doubles_from_one_to_thirty_seconds() {
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_RESET_AFTER);
        let delays: Vec<u64> = (0..7)
            .map(|_| backoff.delay_after(Duration::ZERO).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff.delay_after(BACKOFF_RESET_AFTER), BACKOFF_INITIAL);
    }
}
