//! Network namespaces that a test creates for itself, with a tap device for a
//! guest inside. Everything is removed when the [`NetNs`] is dropped.
//!
//! Not for production networking: the agent builds its own with rtnetlink.
//! Here iproute2 is enough, and it keeps the harness short.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

/// Address of the host's side of a guest link (the guest's gateway).
pub const GATEWAY_CIDR: &str = "169.254.0.22/30";
/// Address of the guest, fixed for every sandbox.
pub const GUEST_IP: &str = "169.254.0.21";

/// A named network namespace holding `tap0`, deleted on drop.
pub struct NetNs {
    name: String,
    /// Whether dropping this handle deletes the namespace.
    owned: bool,
}

impl NetNs {
    /// Creates `wrenn-test-<pid>-<n>` with `lo` up and `tap0` carrying the
    /// gateway address.
    pub fn with_tap() -> Result<NetNs, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "wrenn-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ns.ip(&["addr", "add", GATEWAY_CIDR, "dev", "tap0"])?;
        ns.ip(&["link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace that someone else owns and deletes.
    pub fn existing(name: &str) -> NetNs {
        NetNs {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace, so that every
    /// socket it opens lives there, and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file =
                        File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("warning: could not delete netns {}: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
