//! `wrenn-vmm`: runs one microVM.
//!
//! Today it runs a flat 64-bit guest program (`--program`), as the tests
//! do, or a Linux kernel (`--kernel`, with `--initrd` and `--cmdline`); the
//! control API on a Unix socket and virtio devices follow (docs/vmm.md).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wrenn_vmm::{Exit, Machine, MachineConfig};

#[derive(Parser)]
#[command(version, about = "Wrenn's KVM microVM monitor")]
struct Flags {
    /// A flat 64-bit program, entered at 0x100000 in long mode.
    #[arg(long, conflicts_with = "kernel", required_unless_present = "kernel")]
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
    /// Where the guest's serial output goes (default: standard output).
    #[arg(long)]
    serial_log: Option<PathBuf>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
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

fn run(flags: &Flags) -> Result<Exit, String> {
    let out: Box<dyn Write + Send> = match &flags.serial_log {
        Some(path) => Box::new(
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
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
