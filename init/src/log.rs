//! Console logging for wrenn-init.
//!
//! Every line looks like `wrenn-init: <event> key=value ... t=1.234s`, where
//! `t` is the time since boot (`CLOCK_BOOTTIME`). Lines go to standard error:
//! for PID 1 that is the console the kernel opened before starting `/init`
//! (see [`ensure_console_fds`] for the case where it could not), for the test
//! subcommands it is the terminal. Each line is written with one `write` so it
//! does not interleave with envd's output on the same console.

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, open, FcntlArg, FdFlag, OFlag};
use nix::sys::stat::{fstat, makedev, Mode, SFlag};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Severity of a log line; `Debug` lines are only written with `wrenn.debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Turns debug lines on or off (from `wrenn.debug`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether debug lines are written.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Time since boot including suspend, or `None` if the clock is unavailable.
pub fn uptime() -> Option<Duration> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::from(ts))
}

/// Writes one log line (used through the `info!`/`warning!`/`error!`/`debug!` macros).
pub fn emit(level: Level, event: &str, fields: &[(&str, &dyn Display)]) {
    if level == Level::Debug && !debug_enabled() {
        return;
    }
    let line = format_line(level, event, fields, uptime());
    // Nothing sensible can be done if the console itself fails.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Renders a log line, including the trailing newline.
pub fn format_line(
    level: Level,
    event: &str,
    fields: &[(&str, &dyn Display)],
    t: Option<Duration>,
) -> String {
    let mut line = String::from("wrenn-init: ");
    match level {
        Level::Warn => line.push_str("warning: "),
        Level::Error => line.push_str("error: "),
        Level::Debug | Level::Info => {}
    }
    line.push_str(event);
    for (key, value) in fields {
        let _ = write!(line, " {key}={}", quote_value(&value.to_string()));
    }
    if let Some(t) = t {
        let _ = write!(line, " t={}.{:03}s", t.as_secs(), t.subsec_millis());
    }
    line.push('\n');
    line
}

/// Quotes a value when it would otherwise not read back as a single token.
fn quote_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c.is_control());
    if plain {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

/// Makes sure file descriptors 0, 1 and 2 reach the console. The kernel opens
/// `/dev/console` for PID 1 when the initramfs has it; otherwise they are
/// closed, or Rust's runtime pointed them at `/dev/null`. Either way they are
/// pointed at `/dev/console` here. Call after `/dev` is mounted.
pub fn ensure_console_fds() {
    let missing: Vec<i32> = (0..3).filter(|fd| !fd_reaches_console(*fd)).collect();
    if missing.is_empty() {
        return;
    }
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let Ok(console) = open("/dev/console", flags, Mode::empty()) else {
        return;
    };
    for fd in missing {
        if fd == console.as_raw_fd() {
            continue;
        }
        // A failure leaves that descriptor closed; logging then degrades silently.
        let _ = match fd {
            0 => dup2_stdin(&console),
            1 => dup2_stdout(&console),
            _ => dup2_stderr(&console),
        };
    }
    if console.as_raw_fd() <= 2 {
        // The console landed on a standard descriptor itself: keep it open and
        // let children inherit it.
        let _ = fcntl(&console, FcntlArg::F_SETFD(FdFlag::empty()));
        std::mem::forget(console);
    }
}

/// False when `fd` is closed or is `/dev/null` (character device 1:3).
fn fd_reaches_console(fd: i32) -> bool {
    // SAFETY: the descriptor is only used for an fstat query while this call
    // runs; a closed descriptor just makes fstat fail with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match fstat(fd) {
        Ok(st) => {
            let is_char = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFCHR.bits();
            !(is_char && st.st_rdev == makedev(1, 3))
        }
        Err(_) => false,
    }
}

/// Sorted, comma-separated entry names of `dir` (such as /sys/block), or
/// `none`; used to make "device did not appear" errors actionable.
pub fn list_dir(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    }
}

/// Logs an informational event: `info!("event", key = value, ...)`.
macro_rules! info {
    ($event:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::emit(
            $crate::log::Level::Info,
            $event,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

/// Logs a warning: `warning!("event", key = value, ...)`.
macro_rules! warning {
    ($event:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::emit(
            $crate::log::Level::Warn,
            $event,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

/// Logs an error: `error!("event", key = value, ...)`.
macro_rules! error {
    ($event:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::emit(
            $crate::log::Level::Error,
            $event,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

/// Logs a debug event, written only with `wrenn.debug`: `debug!("event", key = value)`.
macro_rules! debug {
    ($event:expr $(, $key:ident = $value:expr)* $(,)?) => {
        $crate::log::emit(
            $crate::log::Level::Debug,
            $event,
            &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),*],
        )
    };
}

pub(crate) use {debug, error, info, warning};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_event_fields_and_time() {
        let pid = 42;
        let line = format_line(
            Level::Info,
            "envd started",
            &[("pid", &pid)],
            Some(Duration::from_millis(1234)),
        );
        assert_eq!(line, "wrenn-init: envd started pid=42 t=1.234s\n");
    }

    #[test]
    fn marks_warnings_and_errors() {
        let line = format_line(Level::Warn, "odd", &[], None);
        assert_eq!(line, "wrenn-init: warning: odd\n");
        let line = format_line(Level::Error, "bad", &[], None);
        assert_eq!(line, "wrenn-init: error: bad\n");
    }

    #[test]
    fn listing_a_missing_dir_says_none() {
        assert_eq!(list_dir(Path::new("/nonexistent/sys/block")), "none");
    }

    #[test]
    fn listing_is_sorted() {
        let dir = std::env::temp_dir().join(format!("wrenn-init-ls-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vdb")).expect("mkdir");
        std::fs::create_dir_all(dir.join("vda")).expect("mkdir");
        assert_eq!(list_dir(&dir), "vda,vdb");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quotes_values_with_spaces_or_empty() {
        let spaced = "no such file";
        let empty = "";
        let line = format_line(Level::Info, "x", &[("error", &spaced), ("v", &empty)], None);
        assert_eq!(line, "wrenn-init: x error=\"no such file\" v=\"\"\n");
    }
}
