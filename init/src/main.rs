//! wrenn-init: PID 1 of a Wrenn sandbox VM.
//!
//! Mode selection happens here. As PID 1 the process boots the guest (see
//! `guest`), or with `wrenn.mode=host` reports that host mode is not
//! implemented yet and powers off. PID 1 must never exit or panic (the kernel
//! would panic with an unhelpful message), so every failure, panics included,
//! is logged and ends in a clean power-off. Run as any other process it only
//! offers the side-effect-free test subcommands of `cli`.

mod cli;
mod cmdline;
mod etc;
mod guest;
mod log;
mod modules;
mod mounts;
mod net;
mod services;
mod supervise;
mod switch_root;

use std::process::ExitCode;

use nix::unistd::{getpid, Pid};
use thiserror::Error;

use crate::cmdline::{Config, Mode};
use crate::guest::GuestError;
use crate::log::{debug, error, info, warning};
use crate::mounts::MountError;

fn main() -> ExitCode {
    if getpid() == Pid::from_raw(1) {
        pid1()
    } else {
        cli::run(std::env::args_os().skip(1).collect())
    }
}

/// Why PID 1 stopped booting.
#[derive(Debug, Error)]
enum BootError {
    #[error("cannot block signals for the supervisor: {0}")]
    Signals(nix::Error),
    #[error("mounting /dev, /proc and /sys: {0}")]
    EarlyMounts(MountError),
    #[error(
        "wrenn.mode=host is not implemented in this version of wrenn-init; use wrenn.mode=guest"
    )]
    HostModeNotImplemented,
    #[error("{0}")]
    Guest(GuestError),
    #[error("wrenn-init panicked (the panic message is logged above)")]
    Panicked,
}

/// PID 1 entry point: boot, and power off if booting stops for any reason.
fn pid1() -> ! {
    std::panic::set_hook(Box::new(|panic| {
        let message = panic.to_string().replace('\n', " ");
        error!("panic", message = message);
    }));
    let reason = std::panic::catch_unwind(boot).unwrap_or(BootError::Panicked);
    error!("boot stopped; powering off", reason = reason);
    supervise::power_off()
}

/// Runs the boot; it returns only when the boot cannot go on.
fn boot() -> BootError {
    // Before anything else, so no signal is lost and no thread or child
    // starts with these signals unblocked.
    if let Err(e) = supervise::block_signals() {
        return BootError::Signals(e);
    }
    // Ctrl-alt-del then arrives as SIGINT instead of an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        warning!("cannot disable ctrl-alt-del reboot", error = e);
    }
    let mounted = mounts::mount_early();
    log::ensure_console_fds();
    if let Err(e) = mounted {
        return BootError::EarlyMounts(e);
    }
    let config = read_config();
    info!(
        "starting",
        version = env!("CARGO_PKG_VERSION"),
        mode = config.mode
    );
    match config.mode {
        Mode::Host => BootError::HostModeNotImplemented,
        Mode::Guest => BootError::Guest(guest::run(&config)),
    }
}

/// Reads /proc/cmdline, logging rejected values; defaults if unreadable.
fn read_config() -> Config {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        warning!("cannot read /proc/cmdline; using defaults", error = e);
        String::new()
    });
    let parsed = cmdline::parse(&text);
    log::set_debug(parsed.config.debug);
    debug!("kernel command line", cmdline = text.trim());
    for warning in &parsed.warnings {
        warning!("kernel command line", problem = warning);
    }
    parsed.config
}
