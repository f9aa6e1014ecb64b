//! What this host can run sandboxes with, and why.
//!
//! Hardware virtualization means a CPU flag (`vmx` or `svm`) and a `/dev/kvm`
//! that is not PVM: PVM is a software hypervisor under which stock kernels
//! crawl and stop on some instructions, so it counts as no KVM for QEMU.

use std::path::Path;

/// How QEMU accelerates guests on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The outcome of probing the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    pub accel: Accel,
    /// One sentence, for logs and `GET /v1/node`.
    pub reason: String,
}

/// Probes the real host.
pub fn probe_host() -> HostProbe {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    decide(
        &cpuinfo,
        Path::new("/dev/kvm").exists(),
        Path::new("/sys/module/kvm_pvm").exists(),
    )
}

/// The decision itself, from what was read.
pub fn decide(cpuinfo: &str, dev_kvm: bool, pvm: bool) -> HostProbe {
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .find(|f| *f == "vmx" || *f == "svm");
    let (accel, reason) = match (flag, dev_kvm, pvm) {
        (_, true, true) => (
            Accel::Tcg,
            "/dev/kvm is PVM (software virtualization), too slow for stock guest kernels: \
             using QEMU with TCG emulation"
                .to_owned(),
        ),
        (Some(flag), true, false) => (
            Accel::Kvm,
            format!("hardware virtualization ({flag}) with /dev/kvm: using QEMU with KVM"),
        ),
        (Some(flag), false, _) => (
            Accel::Tcg,
            format!(
                "the CPU has {flag} but /dev/kvm is missing (load kvm_intel or kvm_amd): \
                 using QEMU with TCG emulation"
            ),
        ),
        (None, _, _) => (
            Accel::Tcg,
            "no hardware virtualization (no vmx/svm CPU flag): using QEMU with TCG emulation"
                .to_owned(),
        ),
    };
    HostProbe { accel, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor: 0\nflags\t\t: fpu vme vmx sse2\n";
    const NONE: &str = "processor: 0\nflags\t\t: fpu vme sse2\n";

    #[test]
    fn hardware_kvm_is_used_when_present() {
        assert_eq!(decide(VMX, true, false).accel, Accel::Kvm);
    }

    #[test]
    fn pvm_counts_as_no_hardware_virtualization() {
        let probe = decide(NONE, true, true);
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("PVM"), "{}", probe.reason);
    }

    #[test]
    fn a_flag_without_dev_kvm_says_which_module_to_load() {
        let probe = decide(VMX, false, false);
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("kvm_intel"), "{}", probe.reason);
    }
}
