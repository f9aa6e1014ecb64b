//! Subcommands for running wrenn-init as an ordinary process (not PID 1), for
//! tests and for debugging an image. They only read files and print: nothing
//! here mounts, loads modules, signals processes or powers anything off.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;
use std::process::ExitCode;

use crate::cmdline;
use crate::etc;
use crate::modules;
use crate::services;

pub const USAGE: &str = "\
wrenn-init: PID 1 of a Wrenn sandbox VM.

As PID 1 (started by the kernel as /init) it boots the sandbox according to
the kernel command line. This process is not PID 1, so only these
side-effect-free subcommands are available:

  wrenn-init modules-order <modules.dep>
      Print the modules of <modules.dep> in load order (dependencies first),
      one path per line, after checking every file exists next to it.
  wrenn-init parse-cmdline [\"<kernel command line>\"]
      Print the configuration parsed from the given command line (default:
      /proc/cmdline) as key=value lines; rejected values go to stderr.
  wrenn-init render-etc [\"<kernel command line>\"]
      Print the /etc/hostname, /etc/hosts (as created from scratch) and
      /etc/resolv.conf that boot would write for that command line.
  wrenn-init check-services [<dir>]
      Parse every *.service file of <dir> (default: /etc/wrenn/services) the
      way boot does and print each service; exit 1 if any file is rejected.
  wrenn-init help | version

Exit status: 0 on success, 1 if a subcommand failed, 2 on a usage error.
";

/// Runs a subcommand; `args` excludes the program name.
pub fn run(args: Vec<OsString>) -> ExitCode {
    let Some(args) = args
        .into_iter()
        .map(|a| a.into_string().ok())
        .collect::<Option<Vec<String>>>()
    else {
        return usage_error("arguments must be valid UTF-8");
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["modules-order", dep_file] => modules_order(Path::new(dep_file)),
        ["parse-cmdline"] => with_cmdline(None, parse_cmdline),
        ["parse-cmdline", text] => with_cmdline(Some(text), parse_cmdline),
        ["render-etc"] => with_cmdline(None, render_etc),
        ["render-etc", text] => with_cmdline(Some(text), render_etc),
        ["check-services"] => check_services(Path::new(services::SERVICES_DIR)),
        ["check-services", dir] => check_services(Path::new(dir)),
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["version" | "--version"] => {
            println!("wrenn-init {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        [] => usage_error("no subcommand given"),
        [other, ..] => usage_error(&format!("unknown subcommand or wrong arguments: {other}")),
    }
}

fn usage_error(problem: &str) -> ExitCode {
    eprintln!("wrenn-init: {problem}\n\n{USAGE}");
    ExitCode::from(2)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wrenn-init: {message}");
    ExitCode::FAILURE
}

fn modules_order(dep_file: &Path) -> ExitCode {
    match modules::plan(dep_file) {
        Ok(plan) => {
            for module in plan {
                println!("{}", module.relative);
            }
            ExitCode::SUCCESS
        }
        Err(e) => failure(e),
    }
}

/// Parses the given command line (or /proc/cmdline), reports rejected values
/// on stderr and passes the configuration to `action`.
fn with_cmdline(text: Option<&str>, action: fn(&cmdline::Config) -> ExitCode) -> ExitCode {
    let text = match text {
        Some(text) => text.to_string(),
        None => match read_proc_cmdline() {
            Ok(text) => text,
            Err(e) => return failure(format!("cannot read /proc/cmdline: {e}")),
        },
    };
    let parsed = cmdline::parse(&text);
    for warning in &parsed.warnings {
        eprintln!("wrenn-init: warning: {warning}");
    }
    action(&parsed.config)
}

fn read_proc_cmdline() -> io::Result<String> {
    fs::read_to_string("/proc/cmdline")
}

fn parse_cmdline(config: &cmdline::Config) -> ExitCode {
    print!("{config}");
    ExitCode::SUCCESS
}

fn render_etc(config: &cmdline::Config) -> ExitCode {
    print!(
        "==> /etc/hostname <==\n{}\n==> /etc/hosts <==\n{}\n==> /etc/resolv.conf <==\n{}",
        etc::render_hostname(&config.hostname),
        etc::render_hosts(None, &config.hostname),
        etc::render_resolv_conf(&config.dns)
    );
    ExitCode::SUCCESS
}

fn check_services(dir: &Path) -> ExitCode {
    let loaded = services::load_dir(dir);
    for spec in &loaded.services {
        println!(
            "{}: exec={:?} user={} cwd={} env={:?} restart={}",
            spec.name,
            spec.exec,
            spec.user.as_deref().unwrap_or("root"),
            spec.cwd
                .as_ref()
                .map_or("(home)".to_string(), |c| c.display().to_string()),
            spec.env,
            spec.restart
        );
    }
    for (path, reason) in &loaded.rejected {
        eprintln!("wrenn-init: {}: {reason}", path.display());
    }
    if loaded.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
