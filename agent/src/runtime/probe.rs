//! What this host can run sandboxes with, which runtime to use, and why.
//!
//! Hardware virtualization means a CPU flag (`vmx` or `svm`) and a `/dev/kvm`
//! that is not PVM: PVM is a software hypervisor under which stock kernels
//! crawl and stop on some instructions, so it counts as no KVM.
//!
//! The choice ([`choose`]) takes the configured `runtime.kind` and
//! `runtime.accel` and what the host offers:
//!
//! | kind | host | runtime |
//! |---|---|---|
//! | `auto` | hardware KVM and `wrenn-vmm` found | native |
//! | `auto` | otherwise | QEMU, KVM with hardware virtualization, else TCG |
//! | `auto` with `accel` set | any | QEMU with that accel (accel is QEMU's setting) |
//! | `native` | any `/dev/kvm` | native, with a loud warning under PVM |
//! | `qemu` | any | QEMU |
//!
//! Not here: finding the `wrenn-vmm` binary (see [`super::native`]).

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

/// Which runtime runs this node's sandboxes: the type the records store.
pub use lmdb_schema::RuntimeKind;

/// What was read from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `vmx` or `svm` when the CPU has it.
    pub virt_flag: Option<&'static str>,
    pub dev_kvm: bool,
    /// `/dev/kvm` is PVM (`/sys/module/kvm_pvm` exists).
    pub pvm: bool,
}

impl HostFacts {
    /// Reads the real host.
    pub fn read() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts::from_parts(
            &cpuinfo,
            Path::new("/dev/kvm").exists(),
            Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    /// From `/proc/cpuinfo`'s text and the two files' presence.
    pub fn from_parts(cpuinfo: &str, dev_kvm: bool, pvm: bool) -> HostFacts {
        let virt_flag = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(str::split_whitespace)
            .find_map(|f| match f {
                "vmx" => Some("vmx"),
                "svm" => Some("svm"),
                _ => None,
            });
        HostFacts {
            virt_flag,
            dev_kvm,
            pvm,
        }
    }

    /// Hardware virtualization usable through `/dev/kvm`.
    pub fn hardware_kvm(&self) -> bool {
        self.virt_flag.is_some() && self.dev_kvm && !self.pvm
    }

    /// One clause saying what the host has, for reasons.
    pub fn describe(&self) -> String {
        match (self.virt_flag, self.dev_kvm, self.pvm) {
            (_, true, true) => {
                "/dev/kvm is PVM (software virtualization), too slow for stock guest kernels"
                    .to_owned()
            }
            (Some(flag), true, false) => format!("hardware virtualization ({flag}) with /dev/kvm"),
            (Some(flag), false, _) => {
                format!("the CPU has {flag} but /dev/kvm is missing (load kvm_intel or kvm_amd)")
            }
            (None, true, false) => {
                "/dev/kvm without a vmx/svm CPU flag (nested or software virtualization)".to_owned()
            }
            (None, false, _) => "no hardware virtualization (no vmx/svm CPU flag)".to_owned(),
        }
    }
}

/// The outcome: the runtime, QEMU's acceleration, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    pub runtime: RuntimeKind,
    /// QEMU's acceleration; `kvm` for the native runtime, which has no other.
    pub accel: Accel,
    /// One sentence, for logs and `GET /v1/node`.
    pub reason: String,
    /// Said loudly at start and shown by `GET /v1/node`: the choice works
    /// but not well (a native runtime forced onto PVM).
    pub warning: Option<String>,
}

/// Probes the real host for the default settings (`auto`, `auto`), with
/// `wrenn-vmm` considered absent: QEMU, as the host allows.
pub fn probe_host() -> HostProbe {
    let facts = HostFacts::read();
    qemu_for(&facts, "auto", None)
}

/// The QEMU choice for `cpuinfo` and the two files, with default settings.
pub fn decide(cpuinfo: &str, dev_kvm: bool, pvm: bool) -> HostProbe {
    qemu_for(&HostFacts::from_parts(cpuinfo, dev_kvm, pvm), "auto", None)
}

/// Chooses the runtime for the configured `kind` (`auto`, `qemu`, `native`)
/// and `accel` (`auto`, `kvm`, `tcg`). `vmm` is whether `wrenn-vmm` was
/// found, or why not. An impossible setting is an error that says what to
/// change.
pub fn choose(
    facts: &HostFacts,
    kind: &str,
    accel: &str,
    vmm: Result<(), &str>,
) -> Result<HostProbe, String> {
    match kind {
        "native" => native_forced(facts, accel, vmm),
        "qemu" => Ok(qemu_for(facts, accel, None)),
        "auto" if accel != "auto" => Ok(qemu_for(
            facts,
            accel,
            Some(format!(
                "runtime.accel = {accel} is a QEMU setting, so runtime auto uses QEMU"
            )),
        )),
        "auto" if facts.hardware_kvm() => match vmm {
            Ok(()) => Ok(HostProbe {
                runtime: RuntimeKind::Native,
                accel: Accel::Kvm,
                reason: format!("{}: using wrenn-vmm (native)", facts.describe()),
                warning: None,
            }),
            Err(why) => Ok(qemu_for(
                facts,
                "auto",
                Some(format!("wrenn-vmm is not available ({why})")),
            )),
        },
        "auto" => Ok(qemu_for(facts, "auto", None)),
        other => Err(format!(
            "runtime {other:?} is unknown: use auto, qemu or native"
        )),
    }
}

/// `runtime = native`, whatever the host offers, as long as wrenn-vmm can
/// run at all.
fn native_forced(
    facts: &HostFacts,
    accel: &str,
    vmm: Result<(), &str>,
) -> Result<HostProbe, String> {
    if accel == "tcg" {
        return Err(
            "runtime native runs on KVM only, but runtime.accel is tcg (a QEMU setting): \
             set accel to auto, or use runtime qemu"
                .into(),
        );
    }
    if !facts.dev_kvm {
        return Err(format!(
            "runtime native (wrenn-vmm) needs /dev/kvm, and this host has none ({}): \
             use runtime auto or qemu (QEMU with TCG emulation)",
            facts.describe()
        ));
    }
    if let Err(why) = vmm {
        return Err(format!("runtime native is configured, but {why}"));
    }
    let warning = (!facts.hardware_kvm()).then(|| {
        format!(
            "{}: a stock guest kernel boots only to its first messages under wrenn-vmm here \
             and then crawls or stops, so sandboxes will not become ready. Use runtime auto \
             (QEMU) on this host",
            facts.describe()
        )
    });
    Ok(HostProbe {
        runtime: RuntimeKind::Native,
        accel: Accel::Kvm,
        reason: format!(
            "runtime native forced by the configuration (runtime.kind or WRENN_RUNTIME), \
             on a host with {}: using wrenn-vmm",
            facts.describe()
        ),
        warning,
    })
}

/// QEMU with `accel` (`auto` as the host allows); `why_qemu` explains why
/// QEMU when it is not the obvious choice.
fn qemu_for(facts: &HostFacts, accel: &str, why_qemu: Option<String>) -> HostProbe {
    let (accel, how) = match accel {
        "kvm" => (
            Accel::Kvm,
            "using QEMU with KVM, as configured (runtime.accel = kvm)".to_owned(),
        ),
        "tcg" => (
            Accel::Tcg,
            "using QEMU with TCG emulation, as configured (runtime.accel = tcg)".to_owned(),
        ),
        _ if facts.hardware_kvm() => (Accel::Kvm, "using QEMU with KVM".to_owned()),
        _ => (Accel::Tcg, "using QEMU with TCG emulation".to_owned()),
    };
    let reason = match why_qemu {
        Some(why) => format!("{}; {why}: {how}", facts.describe()),
        None => format!("{}: {how}", facts.describe()),
    };
    HostProbe {
        runtime: RuntimeKind::Qemu,
        accel,
        reason,
        warning: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor: 0\nflags\t\t: fpu vme vmx sse2\n";
    const NONE: &str = "processor: 0\nflags\t\t: fpu vme sse2\n";

    fn hardware() -> HostFacts {
        HostFacts::from_parts(VMX, true, false)
    }

    fn pvm() -> HostFacts {
        HostFacts::from_parts(NONE, true, true)
    }

    #[test]
    fn hardware_kvm_is_used_when_present() {
        assert_eq!(decide(VMX, true, false).accel, Accel::Kvm);
    }

    #[test]
    fn pvm_counts_as_no_hardware_virtualization() {
        let probe = decide(NONE, true, true);
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("PVM"), "{}", probe.reason);
        assert!(!pvm().hardware_kvm());
    }

    #[test]
    fn a_flag_without_dev_kvm_says_which_module_to_load() {
        let probe = decide(VMX, false, false);
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("kvm_intel"), "{}", probe.reason);
    }

    #[test]
    fn auto_on_hardware_kvm_is_native() {
        let probe = choose(&hardware(), "auto", "auto", Ok(())).expect("choice");
        assert_eq!(probe.runtime, RuntimeKind::Native);
        assert!(probe.reason.contains("vmx"), "{}", probe.reason);
        assert_eq!(probe.warning, None);
    }

    #[test]
    fn auto_without_wrenn_vmm_falls_back_to_qemu_and_says_why() {
        let probe = choose(&hardware(), "auto", "auto", Err("not built")).expect("choice");
        assert_eq!(
            (probe.runtime, probe.accel),
            (RuntimeKind::Qemu, Accel::Kvm)
        );
        assert!(probe.reason.contains("not built"), "{}", probe.reason);
    }

    #[test]
    fn auto_under_pvm_or_without_kvm_is_qemu_with_tcg() {
        for facts in [pvm(), HostFacts::from_parts(NONE, false, false)] {
            let probe = choose(&facts, "auto", "auto", Ok(())).expect("choice");
            assert_eq!(
                (probe.runtime, probe.accel),
                (RuntimeKind::Qemu, Accel::Tcg)
            );
        }
    }

    #[test]
    fn auto_with_an_accel_set_is_qemu_with_it() {
        let probe = choose(&hardware(), "auto", "tcg", Ok(())).expect("choice");
        assert_eq!(
            (probe.runtime, probe.accel),
            (RuntimeKind::Qemu, Accel::Tcg)
        );
        assert!(probe.reason.contains("accel = tcg"), "{}", probe.reason);
    }

    #[test]
    fn native_forced_under_pvm_runs_with_a_loud_warning() {
        let probe = choose(&pvm(), "native", "auto", Ok(())).expect("choice");
        assert_eq!(probe.runtime, RuntimeKind::Native);
        assert!(probe.reason.contains("forced"), "{}", probe.reason);
        let warning = probe.warning.expect("a warning under PVM");
        assert!(
            warning.contains("PVM") && warning.contains("auto"),
            "{warning}"
        );
    }

    #[test]
    fn native_forced_on_hardware_kvm_has_no_warning() {
        let probe = choose(&hardware(), "native", "kvm", Ok(())).expect("choice");
        assert_eq!(probe.runtime, RuntimeKind::Native);
        assert!(probe.reason.contains("forced"), "{}", probe.reason);
        assert_eq!(probe.warning, None);
    }

    #[test]
    fn native_forced_without_kvm_vmm_or_with_tcg_is_refused_with_the_fix() {
        let no_kvm = HostFacts::from_parts(VMX, false, false);
        let err = choose(&no_kvm, "native", "auto", Ok(())).expect_err("no /dev/kvm");
        assert!(err.contains("/dev/kvm") && err.contains("qemu"), "{err}");
        let err = choose(&hardware(), "native", "tcg", Ok(())).expect_err("tcg");
        assert!(err.contains("accel"), "{err}");
        let err = choose(
            &hardware(),
            "native",
            "auto",
            Err("wrenn-vmm is missing: build it"),
        )
        .expect_err("no binary");
        assert!(err.contains("build it"), "{err}");
    }

    #[test]
    fn qemu_is_qemu_whatever_the_host() {
        let probe = choose(&hardware(), "qemu", "auto", Ok(())).expect("choice");
        assert_eq!(
            (probe.runtime, probe.accel),
            (RuntimeKind::Qemu, Accel::Kvm)
        );
        let probe = choose(&pvm(), "qemu", "kvm", Ok(())).expect("choice");
        assert_eq!(
            (probe.runtime, probe.accel),
            (RuntimeKind::Qemu, Accel::Kvm)
        );
        assert!(choose(&pvm(), "docker", "auto", Ok(())).is_err());
    }
}
