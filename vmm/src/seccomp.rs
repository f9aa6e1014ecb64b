//! Seccomp filters, compiled with seccompiler and installed per thread.
//!
//! - **VMM** (installed on the main thread before the API thread starts, so
//!   the API's threads and the vCPU thread inherit it): the system calls
//!   the control API, snapshot files and KVM set-up need.
//! - **API** (added by the `api` thread, which takes requests from the
//!   listener and hands them to the workers): channels and futexes, its
//!   log, memory, and what listening again after an accept failure needs
//!   (a socket, its threads); no `ioctl`, no files, no KVM. The workers
//!   answer requests under the VMM filter, since the handlers build the VM
//!   and write snapshots.
//! - **devices** (added by the `devices` thread on top of the inherited
//!   one): epoll waits, reads and writes of disk files, taps and event
//!   descriptors, fsync, memory and exit calls; `openat` and `rename` only
//!   because a layered disk's flush replaces its written-block list (a
//!   temporary file, fsynced, renamed, and its folder fsynced); no `ioctl`.
//! - **vCPU** (added by the vCPU thread on top of the inherited one): only
//!   `ioctl(KVM_RUN)`, writes to the serial log, the futexes and signal
//!   returns of its loop, and what a thread needs to end.
//!
//! Any other system call kills the process (`SECCOMP_RET_KILL_PROCESS`).
//! The list was taken from `strace -f` of the API tests; to find a missing
//! one, run the VMM under `strace -f` and look for the call before SIGSYS.

use std::collections::BTreeMap;
use std::convert::TryFrom;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Error, Result};

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

const VMM_CALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_close,
    libc::SYS_connect,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    // The devices thread's wait: filters stack, so every call it makes
    // must pass this filter too.
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_getsockname,
    libc::SYS_gettid,
    libc::SYS_ioctl,
    libc::SYS_listen,
    libc::SYS_lseek,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_prlimit64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    // The `signals` thread's sigwait for SIGTERM and SIGINT.
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sched_getaffinity,
    // The vCPU thread adds its own filter.
    libc::SYS_seccomp,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    // A failed snapshot asks whether its file system is full.
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_userfaultfd,
];

/// The `api` thread: requests from tiny_http's channel to the workers'
/// channel, its log lines, its heap, and listening again on a fresh socket
/// (with tiny_http's accept threads, which inherit this filter) if
/// accepting fails.
const API_CALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_clock_gettime,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getsockname,
    libc::SYS_gettid,
    libc::SYS_listen,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_unlink,
];

/// The `devices` thread: waiting, queue I/O on disk files and taps, and
/// what a thread with a heap needs.
const DEVICES_CALLS: &[i64] = &[
    // Its epoll descriptor, when it ends.
    libc::SYS_close,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    // A layered disk's flush: the standard library's open checks its flags.
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    // A layered disk's flush: the temporary list file and its folder.
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_readv,
    // A layered disk's flush: the list file replaced.
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
];

/// What every thread needs, whatever else it does: its heap, its futexes,
/// signal masks and returns, yielding, writing (logs, the serial port) and
/// ending. Each filter below is these and its own.
const THREAD_CALLS: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_futex,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The vCPU thread calls nothing beyond the basics but `ioctl(KVM_RUN)`.
const VCPU_CALLS: &[i64] = &[];

/// A filter that allows [`THREAD_CALLS`], `calls` and, when given, `ioctl`
/// under its rules.
fn compile(calls: &[i64], ioctl: Option<Vec<SeccompRule>>) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = THREAD_CALLS
        .iter()
        .chain(calls)
        .map(|&call| (call, Vec::new()))
        .collect();
    if let Some(ioctl) = ioctl {
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Seccomp(format!("cannot build a filter: {e}")))?;
    BpfProgram::try_from(filter)
        .map_err(|e| Error::Seccomp(format!("cannot compile a filter: {e}")))
}

/// Compiles a filter and installs it on the calling thread.
fn install(name: &str, calls: &[i64], ioctl: Option<Vec<SeccompRule>>) -> Result<()> {
    let program = compile(calls, ioctl)?;
    seccompiler::apply_filter(&program)
        .map_err(|e| Error::Seccomp(format!("cannot install the {name} filter: {e}")))
}

/// Installs the VMM filter on the calling thread (threads it starts later
/// inherit it).
pub fn install_vmm_filter() -> Result<()> {
    install("VMM", VMM_CALLS, None)
}

/// Installs the API filter on the calling (`api`) thread.
pub fn install_api_filter() -> Result<()> {
    install("API", API_CALLS, None)
}

/// Installs the devices filter on the calling (`devices`) thread.
pub fn install_devices_filter() -> Result<()> {
    install("devices", DEVICES_CALLS, None)
}

/// Installs the vCPU filter on the calling (vCPU) thread.
pub fn install_vcpu_filter() -> Result<()> {
    let kvm_run = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    let rule = SeccompRule::new(vec![kvm_run]).map_err(|e| Error::Seccomp(e.to_string()))?;
    install("vCPU", VCPU_CALLS, Some(vec![rule]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile() {
        assert!(!compile(VMM_CALLS, None).unwrap().is_empty());
        assert!(!compile(DEVICES_CALLS, None).unwrap().is_empty());
        assert!(!compile(API_CALLS, None).unwrap().is_empty());
        let kvm_run =
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN).unwrap();
        let rule = SeccompRule::new(vec![kvm_run]).unwrap();
        assert!(!compile(VCPU_CALLS, Some(vec![rule])).unwrap().is_empty());
    }
}
