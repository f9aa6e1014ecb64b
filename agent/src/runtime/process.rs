//! Facts about host processes from `/proc`: whether a PID is still the
//! process we started (PIDs are recycled), its memory and CPU time, which
//! VM processes belong to a sandbox folder, ending a process by PID, and
//! starting one inside a network namespace.

use std::fs::File;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{prepare, RuntimeError, VmStats};

/// The fields of `/proc/PID/stat` after the command name, which may itself
/// contain spaces and parentheses.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    Some(after_comm.split_whitespace().map(str::to_owned).collect())
}

/// Start time of `pid` in clock ticks since boot (field 22 of stat).
pub fn start_time_ticks(pid: u32) -> Option<u64> {
    // Field 22 overall is index 19 after pid (1) and comm (2) are removed.
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` is alive and is the process that started at `ticks`.
/// A zombie counts as gone.
pub fn is_same_process(pid: u32, ticks: u64) -> bool {
    match stat_fields(pid) {
        Some(fields) => {
            fields.first().map(String::as_str) != Some("Z")
                && fields.get(19).and_then(|t| t.parse().ok()) == Some(ticks)
        }
        None => false,
    }
}

/// Memory and CPU time of `pid`.
pub fn stats(pid: u32) -> Option<VmStats> {
    let fields = stat_fields(pid)?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    Some(VmStats {
        rss_bytes: rss_pages * page,
        cpu_time_ms: (utime + stime) * 1000 / ticks_per_s,
    })
}

/// Waits until the process is gone; false if it is still there at `timeout`.
pub fn wait_gone(pid: u32, ticks: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_same_process(pid, ticks) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a process has to end after SIGKILL before it counts as
/// unkillable.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Ends `pid` (if it is still the process that started at `ticks`): `ask`
/// asks it to end on its own (a signal, a quit command); after `grace` it
/// is sent SIGKILL; if it is still there [`KILL_GRACE`] later, that is an
/// error. A process already gone is fine.
pub fn stop_escalating(
    pid: u32,
    ticks: u64,
    grace: Duration,
    ask: impl FnOnce(),
) -> Result<(), RuntimeError> {
    if !is_same_process(pid, ticks) {
        return Ok(());
    }
    ask();
    if wait_gone(pid, ticks, grace) {
        return Ok(());
    }
    signal(pid, ticks, Signal::SIGKILL);
    if wait_gone(pid, ticks, KILL_GRACE) {
        Ok(())
    } else {
        Err(RuntimeError::Unkillable { pid })
    }
}

/// The pinned network namespace `name` (`/run/netns/<name>`), opened for a
/// child to enter with [`enter_netns`] before it execs.
pub fn open_netns(name: &str) -> Result<File, RuntimeError> {
    let path = PathBuf::from(format!("/run/netns/{name}"));
    File::open(&path).map_err(prepare(&path))
}

/// Moves the calling thread into the network namespace `fd`. Meant for a
/// `pre_exec` closure: it makes one async-signal-safe system call.
pub fn enter_netns(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag; it touches no memory of
    // ours. An invalid descriptor is an error, returned as such.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to `pid` if it is still the process that started at `ticks`.
pub fn signal(pid: u32, ticks: u64, signal: Signal) {
    if is_same_process(pid, ticks) {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(raw), signal);
        }
    }
}

/// Program names of the VM processes the runtimes start.
const VM_PROGRAMS: [&str; 2] = ["qemu-system", "wrenn-vmm"];

/// PIDs of the VM processes (QEMU or wrenn-vmm) of the sandbox folder `dir`:
/// the one its PID file names, and any whose command line names a file in
/// the folder (one started by an agent that died before writing the PID
/// file). Only VM programs count, so no other process is ever picked.
pub fn vm_pids_in(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.extend(read_pid_file(dir));
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|pid| is_vm_of(*pid, dir));
    pids
}

/// The PID in the sandbox folder's PID file, if it holds one.
pub fn read_pid_file(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(super::PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a VM program whose arguments name a file in `dir`.
fn is_vm_of(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let program = args.next().unwrap_or_default();
    let name = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !VM_PROGRAMS.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    let folder = format!("{}/", dir.to_string_lossy().trim_end_matches('/'));
    args.any(|arg| arg.contains(&folder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_recognised_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let ticks = start_time_ticks(pid).expect("own start time");
        assert!(is_same_process(pid, ticks));
        assert!(!is_same_process(pid, ticks + 1));
        assert!(stats(pid).expect("own stats").rss_bytes > 0);
    }

    #[test]
    fn only_vm_programs_naming_the_folder_are_its_vms() {
        // This test process names no sandbox folder and is no VM program.
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join(super::super::PID_FILE),
            std::process::id().to_string(),
        )
        .expect("pid file");
        assert_eq!(read_pid_file(dir.path()), Some(std::process::id()));
        assert!(vm_pids_in(dir.path()).is_empty());
    }

    #[test]
    fn a_missing_pid_is_gone() {
        assert!(!is_same_process(u32::MAX - 1, 0));
        assert!(wait_gone(u32::MAX - 1, 0, Duration::from_millis(1)));
    }
}
