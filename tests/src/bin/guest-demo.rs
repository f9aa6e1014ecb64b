//! `make run` until the node agent lands: boots one sandbox guest from the
//! base image under QEMU, runs Python in it through envd, prints the result
//! and powers the guest off.

use std::process::ExitCode;
use std::time::Duration;

use wrenn_tests::envd::{Envd, ENVD_PORT};
use wrenn_tests::guest::{hardware_kvm, BootSpec, GuestImage, GuestVm};
use wrenn_tests::netns::GUEST_IP;

const CODE: &str = "import platform, sys; print(f'Hello from Python {platform.python_version()} \
                    in a Wrenn sandbox (kernel {platform.release()}): 6*7 =', 6*7)";

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<(), String> {
    let image = GuestImage::locate()?;
    let accel = if hardware_kvm() {
        "KVM"
    } else {
        "TCG (no hardware virtualization here)"
    };
    println!(
        "booting {} with QEMU microvm, {accel}",
        image.kernel.display()
    );
    let mut vm = GuestVm::boot(&image, &BootSpec::default())?;
    let envd = || Envd::new(GUEST_IP, ENVD_PORT);
    if !vm
        .netns()
        .run(|| envd().wait_healthy(Duration::from_secs(180)))
    {
        return Err(format!(
            "envd never answered; console:\n{}",
            vm.console_tail(40)
        ));
    }
    println!(
        "envd ready {:.2}s after QEMU started",
        vm.uptime().as_secs_f64()
    );
    println!("$ python3 -c \"{CODE}\"");
    let output = vm.netns().run(|| envd().exec("python3", &["-c", CODE]))?;
    print!("{}", output.stdout_text());
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if output.exit_code != Some(0) {
        return Err(format!("python3 exited with {:?}", output.exit_code));
    }
    vm.netns()
        .run(|| envd().spawn_background("/bin/kill", &["-TERM", "1"]))?;
    match vm.wait_exit(Duration::from_secs(30)) {
        Some(_) => println!("guest powered off"),
        None => println!("guest did not power off in 30 s; killing QEMU"),
    }
    Ok(())
}
