//! `wrenn-vmm`: runs one microVM.
//!
//! Today it runs a flat 64-bit guest program (`--program`), as the tests
//! and `make bench` do; the control API on a Unix socket, Linux boot,
//! virtio devices and snapshots follow (see docs/vmm.md).

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
    #[arg(long)]
    program: PathBuf,
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
    let program = std::fs::read(&flags.program)
        .map_err(|e| format!("cannot read {}: {e}", flags.program.display()))?;
    let out: Box<dyn Write + Send> = match &flags.serial_log {
        Some(path) => Box::new(
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let config = MachineConfig {
        vcpus: flags.vcpus,
        memory_mb: flags.memory_mb,
    };
    let mut machine = Machine::new(config, out).map_err(|e| e.to_string())?;
    machine.load_program(&program).map_err(|e| e.to_string())?;
    machine.run().map_err(|e| e.to_string())
}
