//! envd, the Wrenn guest agent: parses flags, sets up logging and serves the
//! HTTP API (processes, PTYs, files, watches) inside a sandbox VM.

mod app;
mod auth;
mod fs;
mod metrics;
mod process;
mod router;
mod server;
mod settings;
mod system;
mod users;

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// tiny_http allocates the unread rest of a dropped request's body; this
/// allocator keeps a huge one from aborting envd (see `wrenn_http::alloc`).
#[global_allocator]
static GLOBAL: wrenn_http::ServerAllocator = wrenn_http::ServerAllocator;

/// Address served when neither --listen nor ENVD_LISTEN is given.
const DEFAULT_LISTEN: &str = "0.0.0.0:49983";

const USAGE: &str = "usage: envd [--listen ADDR]

Serves the Wrenn sandbox API over HTTP.

options:
  --listen ADDR   address to listen on (default 0.0.0.0:49983; env ENVD_LISTEN)
  --version       print the version and exit
  --help          print this help and exit

environment:
  ENVD_LISTEN     address to listen on, when --listen is not given
  ENVD_LOG        log filter, e.g. info or envd=debug (default info)";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Serve { listen: String },
    Help,
    Version,
}

fn parse_args(
    mut args: impl Iterator<Item = String>,
    env_listen: Option<String>,
) -> Result<Command, String> {
    let mut listen = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            "--listen" => {
                let value = args
                    .next()
                    .ok_or("--listen needs an address, e.g. 0.0.0.0:49983")?;
                listen = Some(value);
            }
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = Some(value.to_owned()),
                None => return Err(format!("unknown argument '{other}'")),
            },
        }
    }
    let listen = listen
        .or(env_listen.filter(|v| !v.is_empty()))
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    Ok(Command::Serve { listen })
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("ENVD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string().replace('\n', " ");
        tracing::error!(panic = %message, "a handler panicked");
    }));
}

/// Marks every descriptor envd inherited (beyond stdio) close-on-exec, so
/// whatever its parent left open never reaches user processes. Descriptors
/// envd opens itself are close-on-exec already.
fn close_inherited_fds_on_exec() {
    // SAFETY: close_range only changes descriptor flags; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: walk /proc/self/fd instead.
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!("cannot list open descriptors; inherited ones may leak to processes");
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on a descriptor number only sets a flag; an fd that
        // was closed meanwhile just yields EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn main() -> ExitCode {
    let command = parse_args(std::env::args().skip(1), std::env::var("ENVD_LISTEN").ok());
    let listen = match command {
        Ok(Command::Serve { listen }) => listen,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("envd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("envd: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging();
    close_inherited_fds_on_exec();
    match server::run(&listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "envd cannot start");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: Option<&str>) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()), env.map(str::to_owned))
    }

    #[test]
    fn listen_comes_from_flag_then_env_then_default() {
        let serve = |l: &str| {
            Ok(Command::Serve {
                listen: l.to_owned(),
            })
        };
        assert_eq!(parse(&[], None), serve(DEFAULT_LISTEN));
        assert_eq!(parse(&[], Some("127.0.0.1:1")), serve("127.0.0.1:1"));
        assert_eq!(
            parse(&["--listen", "127.0.0.1:2"], Some("x")),
            serve("127.0.0.1:2")
        );
        assert_eq!(parse(&["--listen=127.0.0.1:3"], None), serve("127.0.0.1:3"));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(parse(&["--listen"], None).is_err());
        assert!(parse(&["--bogus"], None).is_err());
        assert_eq!(parse(&["--help"], None), Ok(Command::Help));
    }
}
