//! Boots the guest image under `qemu-system-x86_64 -M microvm,acpi=on` in a
//! network namespace of its own, the way the agent's QEMU runtime will.
//!
//! Each [`GuestVm`] gets a temporary folder with a qcow2 overlay on the base
//! root file system (the base image is never written) and the serial console
//! log. Dropping it kills the QEMU process it started, by PID, and removes the
//! namespace and the folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{NetNs, GUEST_IP};

/// Where `make image` puts the guest image unless `WRENN_IMAGE_DIR` says otherwise.
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/wrenn/images/base";

/// The three files of a guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

impl GuestImage {
    /// The image in `WRENN_IMAGE_DIR` (or the default folder), if it is complete.
    pub fn locate() -> Result<GuestImage, String> {
        let dir = std::env::var("WRENN_IMAGE_DIR").unwrap_or_else(|_| DEFAULT_IMAGE_DIR.into());
        let dir = Path::new(&dir);
        let image = GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            rootfs: dir.join("rootfs.ext4"),
        };
        for file in [&image.kernel, &image.initramfs, &image.rootfs] {
            if !file.is_file() {
                return Err(format!(
                    "{} is missing: build the guest image with `make image`",
                    file.display()
                ));
            }
        }
        Ok(image)
    }
}

/// The image for an end-to-end test, or None when the test should be
/// skipped. Under `make test` (`WRENN_E2E=1`) a missing image fails the test
/// instead: CI must never pass by skipping.
pub fn image_or_skip(test: &str) -> Option<GuestImage> {
    match GuestImage::locate() {
        Ok(image) => Some(image),
        Err(e) if std::env::var_os("WRENN_E2E").is_some() => panic!("{e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Extra kernel command line arguments.
    pub extra_cmdline: String,
}

impl Default for BootSpec {
    fn default() -> Self {
        BootSpec {
            vcpus: 1,
            memory_mb: 512,
            extra_cmdline: String::new(),
        }
    }
}

/// A running guest and everything created for it.
pub struct GuestVm {
    qemu: Option<Child>,
    netns: NetNs,
    dir: PathBuf,
    started: Instant,
}

/// Whether this host has hardware virtualization for QEMU. A PVM `/dev/kvm`
/// (a software hypervisor) does not count: stock kernels crawl under it.
pub fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    has_flag && Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists()
}

impl GuestVm {
    /// Starts QEMU; the guest is booting when this returns.
    pub fn boot(image: &GuestImage, spec: &BootSpec) -> Result<GuestVm, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wrenn-guest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let overlay = dir.join("rootfs.qcow2");
        run(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &image.rootfs.to_string_lossy(),
            &overlay.to_string_lossy(),
        ]))?;
        let netns = NetNs::with_tap()?;
        let console = dir.join("console.log");
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=-1 tsc_early_khz=2000000 lpj=8000000 \
             root=/dev/vda rw wrenn.ip={GUEST_IP}/30 wrenn.gw=169.254.0.22 {}",
            spec.extra_cmdline
        );
        let (accel, cpu) = if hardware_kvm() {
            ("kvm", "host")
        } else {
            ("tcg", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt")
        };
        let mut cmd = netns.command("qemu-system-x86_64");
        cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=on"])
            .args(["-accel", accel, "-cpu", cpu])
            .args([
                "-smp",
                &spec.vcpus.to_string(),
                "-m",
                &format!("{}M", spec.memory_mb),
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args([
                "-chardev",
                &format!("file,id=con0,path={}", console.display()),
            ])
            .args(["-serial", "chardev:con0"])
            .args(["-kernel", &image.kernel.to_string_lossy()])
            .args(["-initrd", &image.initramfs.to_string_lossy()])
            .args(["-append", &cmdline])
            .args([
                "-drive",
                &format!("id=root,file={},format=qcow2,if=none", overlay.display()),
            ])
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no"])
            .args(["-device", "virtio-net-device,netdev=net0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("qemu.stderr"))
                    .map_err(|e| format!("create qemu.stderr: {e}"))?,
            ));
        let started = Instant::now();
        let qemu = cmd
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64 (run `make deps`): {e}"))?;
        Ok(GuestVm {
            qemu: Some(qemu),
            netns,
            dir,
            started,
        })
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        let mut log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            log.push_str("\n--- qemu stderr ---\n");
            log.push_str(&stderr);
        }
        log
    }

    /// The last `lines` lines of the console, for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let log = self.console();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until QEMU exits by itself, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.qemu.as_mut()?;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.qemu = None;
                    return Some(status);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return None,
            }
        }
        None
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        match self.qemu.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.qemu.take() {
            // `ip netns exec` execs QEMU, so this PID is QEMU's own.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("WRENN_KEEP_GUEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept guest folder {}", self.dir.display());
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
