//! `wrenn-vmm`: runs one microVM.
//!
//! With `--api-sock PATH` it serves the control API on that Unix socket
//! (docs/vmm.md) and exits when its guest ends. Without, it runs a flat
//! 64-bit guest program (`--program`) or a Linux kernel (`--kernel`, with
//! `--initrd` and `--cmdline`) straight away.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::Parser;
use wrenn_http::{Listen, Server, ServerConfig};
use wrenn_vmm::api::Api;
use wrenn_vmm::controller::Controller;
use wrenn_vmm::{Exit, Machine, MachineConfig};

#[derive(Parser)]
#[command(version, about = "Wrenn's KVM microVM monitor")]
struct Flags {
    /// Serve the control API on this Unix socket (it must not exist).
    #[arg(long, conflicts_with_all = ["program", "kernel"])]
    api_sock: Option<PathBuf>,
    /// A flat 64-bit program, entered at 0x100000 in long mode.
    #[arg(long, conflicts_with = "kernel", required_unless_present_any = ["kernel", "api_sock", "state_version"])]
    program: Option<PathBuf>,
    /// A Linux kernel: bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs for the kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mb: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Where the guest's serial output goes, appended (default: standard
    /// output).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Print the VM state version this binary writes and those it reads.
    #[arg(long)]
    state_version: bool,
    /// With --state-version: print it as JSON (`vmm_api::state::StateSupport`),
    /// for the agent.
    #[arg(long, requires = "state_version")]
    json: bool,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.state_version {
        let support = wrenn_vmm::snapshot::format::SUPPORT;
        match serde_json::to_string(&support) {
            Ok(json) if flags.json => println!("{json}"),
            _ => println!("{support}"),
        }
        return ExitCode::SUCCESS;
    }
    if let Some(socket) = &flags.api_sock {
        return match serve(socket, &flags) {
            Ok(why) => {
                eprintln!("wrenn-vmm: guest ended: {why}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wrenn-vmm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&flags) {
        Ok(exit) => {
            eprintln!("wrenn-vmm: guest ended: {exit:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wrenn-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the control API until the guest ends; returns why it ended.
fn serve(socket: &std::path::Path, flags: &Flags) -> Result<String, String> {
    // Before any thread starts, so that every thread inherits the mask
    // and only the `signals` thread takes them.
    let stop_signals = block_stop_signals();
    let (ended, guest_end) = std::sync::mpsc::channel();
    let on_signal = ended.clone();
    let controller = Controller::new(serial_out(flags)?, ended, true).map_err(|e| e.to_string())?;
    let api = Api {
        controller: Arc::new(controller),
    };
    let config = ServerConfig {
        workers: 2,
        ..ServerConfig::new(
            "wrenn-vmm",
            env!("CARGO_PKG_VERSION"),
            Listen::Unix(socket.to_path_buf()),
        )
    };
    // From here on, this thread and every thread it starts (the server's
    // workers, the vCPU) are filtered.
    wrenn_vmm::seccomp::install_vmm_filter().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = wait_for_signal(&stop_signals) {
                let _ = on_signal.send(format!("stopped by signal {signal}"));
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let server = Server::bind(config, api).map_err(|e| e.to_string())?;
    let (installed, filtered) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let filter = wrenn_vmm::seccomp::install_api_filter();
            let ok = filter.is_ok();
            let _ = installed.send(filter);
            if ok {
                server.run()
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    filtered
        .recv()
        .map_err(|_| "the API thread ended before its filter was installed".to_owned())?
        .map_err(|e| e.to_string())?;
    let why = guest_end
        .recv()
        .map_err(|_| "the VM's controller went away".to_owned())?;
    // A Shutdown request is answered after it is told here: let the answer
    // go out before the process ends.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = std::fs::remove_file(socket);
    Ok(why)
}

/// Blocks SIGTERM and SIGINT on the calling thread (and the threads it
/// starts later) and returns that set, for [`wait_for_signal`]: a stop
/// signal then ends the VMM like a guest that ended, with its API socket
/// removed.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with
    // sigemptyset; every call below takes pointers to this local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of `set`'s signals; its number.
fn wait_for_signal(set: &libc::sigset_t) -> Option<i32> {
    let mut signal = 0;
    // SAFETY: `set` and `signal` are valid for the call; the signals are
    // blocked in every thread, so sigwait is how they arrive.
    (unsafe { libc::sigwait(set, &mut signal) } == 0).then_some(signal)
}

fn serial_out(flags: &Flags) -> Result<Box<dyn Write + Send>, String> {
    Ok(match &flags.serial_log {
        Some(path) => Box::new(
            // Appended to: a VM restored into the same folder keeps the
            // log of its earlier life.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    })
}

fn run(flags: &Flags) -> Result<Exit, String> {
    let out = serial_out(flags)?;
    let config = MachineConfig {
        vcpus: flags.vcpus,
        memory_mb: flags.memory_mb,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, out).map_err(|e| e.to_string())?;
    match (&flags.program, &flags.kernel) {
        (Some(path), _) => {
            let program =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            machine.load_program(&program).map_err(|e| e.to_string())?;
        }
        (None, Some(kernel)) => machine
            .load_linux(kernel, flags.initrd.as_deref(), &flags.cmdline)
            .map_err(|e| e.to_string())?,
        (None, None) => return Err("give --program or --kernel".into()),
    }
    machine.run().map_err(|e| e.to_string())
}
