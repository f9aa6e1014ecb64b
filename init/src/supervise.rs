//! PID 1's steady state: run envd and restart it when it exits, reap every
//! zombie, and power the VM off cleanly on request.
//!
//! The signals PID 1 reacts to are blocked (in [`block_signals`], before any
//! thread or child exists) and read from a signalfd in one poll loop, so no
//! code runs in signal-handler context. Zombies are reaped with
//! `waitpid(-1, WNOHANG)` after every wakeup; when the reaped pid is envd's, a
//! restart is scheduled with exponential back-off. The image's extra
//! services (see `services`) are started right after envd and supervised
//! the same way.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sync, Pid};

use crate::log::{debug, error, info, warning};
use crate::services::Services;

/// Signals that make PID 1 power the VM off. SIGINT is what the kernel sends
/// for ctrl-alt-del once `reboot(RB_DISABLE_CAD)` has been called.
pub const POWEROFF_SIGNALS: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGPWR,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

const ENVD_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
const TERM_GRACE: Duration = Duration::from_secs(3);
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Every signal PID 1 handles through the signalfd.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in POWEROFF_SIGNALS {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks the handled signals so they queue for the signalfd. Children get an
/// empty mask again: std's `Command` resets it before exec.
pub fn block_signals() -> nix::Result<()> {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
}

/// How to run envd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvdSpec {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// Restart delays: 100 ms doubling to 5 s, back to 100 ms after a 30 s run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
    reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_RESET_AFTER)
    }
}

impl Backoff {
    /// Delays from `initial` doubling to `max`, back to `initial` after a run
    /// of `reset_after` or longer.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max,
            reset_after,
        }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn delay_after(&mut self, ran: Duration) -> Duration {
        if ran >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[derive(Debug, Clone, Copy)]
struct Running {
    pid: Pid,
    since: Instant,
}

/// envd's lifecycle state.
struct Supervisor {
    spec: EnvdSpec,
    envd: Option<Running>,
    restart_at: Option<Instant>,
    backoff: Backoff,
}

impl Supervisor {
    fn new(spec: EnvdSpec) -> Self {
        Supervisor {
            spec,
            envd: None,
            restart_at: Some(Instant::now()),
            backoff: Backoff::default(),
        }
    }

    /// Starts envd if a start is due.
    fn start_if_due(&mut self, now: Instant) {
        if self.restart_at.is_some_and(|at| at <= now) {
            self.restart_at = None;
            self.start();
        }
    }

    fn start(&mut self) {
        match spawn_envd(&self.spec) {
            Ok(pid) => {
                info!("envd started", pid = pid, path = self.spec.path.display());
                self.envd = Some(Running {
                    pid,
                    since: Instant::now(),
                });
            }
            Err(e) => {
                let delay = self.backoff.delay_after(Duration::ZERO);
                error!(
                    "envd failed to start",
                    path = self.spec.path.display(),
                    error = e,
                    retry_ms = delay.as_millis()
                );
                self.restart_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Handles a reaped child; schedules a restart when it was envd.
    fn on_exit(&mut self, pid: Pid, status: &WaitStatus) {
        match self.envd {
            Some(running) if running.pid == pid => {
                let ran = running.since.elapsed();
                let delay = self.backoff.delay_after(ran);
                warning!(
                    "envd exited",
                    pid = pid,
                    status = describe(status),
                    ran_ms = ran.as_millis(),
                    restart_ms = delay.as_millis()
                );
                self.envd = None;
                self.restart_at = Some(Instant::now() + delay);
            }
            _ => debug!("reaped", pid = pid, status = describe(status)),
        }
    }

    /// Time until the next scheduled start, if one is scheduled.
    fn next_wakeup(&self, now: Instant) -> Option<Duration> {
        self.restart_at.map(|at| at.saturating_duration_since(now))
    }
}

fn spawn_envd(spec: &EnvdSpec) -> std::io::Result<Pid> {
    let child = Command::new(&spec.path)
        .args(&spec.args)
        .env_clear()
        .env("PATH", ENVD_PATH_ENV)
        .env("HOME", "/root")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()?;
    // The child is reaped by the waitpid(-1) loop, never through `Child`.
    Ok(Pid::from_raw(child.id() as i32))
}

/// Human-readable exit status: `exit:N` or `signal:NAME[+core]`.
pub fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit:{code}"),
        WaitStatus::Signaled(_, signal, core) => {
            format!(
                "signal:{}{}",
                signal.as_str(),
                if *core { "+core" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

/// Whether PID 1 still has children after a reaping pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Children {
    Remaining,
    None,
}

/// Reaps every exited child without blocking, passing each to `on_exit`.
fn reap(mut on_exit: impl FnMut(Pid, &WaitStatus)) -> Children {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Children::Remaining,
            Err(Errno::ECHILD) => return Children::None,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    on_exit(pid, &status);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!("waitpid failed", error = e);
                return Children::Remaining;
            }
        }
    }
}

/// What the signals read in one wakeup ask for.
enum Request {
    Continue,
    PowerOff(Signal),
}

/// Runs envd, then the image's services, under supervision until a
/// power-off signal, then powers off.
pub fn run(spec: EnvdSpec, mut services: Services) -> ! {
    let signals = match SignalFd::with_flags(
        &handled_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            error!("cannot create signalfd; no supervision possible", error = e);
            power_off();
        }
    };
    let mut supervisor = Supervisor::new(spec);
    loop {
        // Signals that arrived during boot are handled before envd first starts.
        let request = drain_signals(&signals);
        let _ = reap(|pid, status| {
            if !services.on_exit(pid, status) {
                supervisor.on_exit(pid, status);
            }
        });
        if let Request::PowerOff(signal) = request {
            shutdown(signal);
        }
        // envd first: services start in the same pass, right after it.
        supervisor.start_if_due(Instant::now());
        services.start_due(Instant::now());
        let now = Instant::now();
        let wakeup = match (supervisor.next_wakeup(now), services.next_wakeup(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        wait_readable(&signals, wakeup);
    }
}

fn wait_readable(fd: &SignalFd, timeout: Option<Duration>) {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up so a pending restart is not polled for in a busy loop.
        Some(t) => {
            PollTimeout::try_from(t + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    // EINTR or other failures just mean another trip around the loop.
    let _ = poll(&mut fds, timeout);
}

fn drain_signals(fd: &SignalFd) -> Request {
    let mut request = Request::Continue;
    loop {
        match fd.read_signal() {
            Ok(Some(info)) => {
                let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                    continue;
                };
                if POWEROFF_SIGNALS.contains(&signal) {
                    request = Request::PowerOff(signal);
                } else if signal == Signal::SIGHUP {
                    info!("SIGHUP received; nothing to reload");
                }
            }
            Ok(None) | Err(_) => return request,
        }
    }
}

/// Stops every process (SIGTERM, a grace period, SIGKILL), then powers off.
pub fn shutdown(signal: Signal) -> ! {
    info!("power-off requested", signal = signal.as_str());
    signal_all(Signal::SIGTERM);
    if !reap_until_gone(TERM_GRACE) {
        warning!("processes still running after SIGTERM; sending SIGKILL");
        signal_all(Signal::SIGKILL);
        reap_until_gone(KILL_GRACE);
    }
    power_off();
}

fn signal_all(signal: Signal) {
    // kill(-1) reaches every process except PID 1; ESRCH means none are left.
    match kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => warning!("kill(-1) failed", signal = signal.as_str(), error = e),
    }
}

/// Reaps children until none are left or `limit` passes; true if none left.
fn reap_until_gone(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let children = reap(|pid, status| {
            debug!(
                "reaped during shutdown",
                pid = pid,
                status = describe(status)
            )
        });
        if children == Children::None {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

/// Flushes file systems, remounts / read-only and powers the VM off. If the
/// kernel refuses, it sleeps forever rather than letting PID 1 exit (which
/// would panic the kernel) or spin.
pub fn power_off() -> ! {
    sync();
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, remount, None::<&str>) {
        debug!("remounting / read-only failed", error = e);
    }
    sync();
    info!("powering off");
    let error = match reboot(RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    error!("reboot(RB_POWER_OFF) failed; halting here", error = error);
    loop {
        sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.delay_after(ms(10)).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn backoff_resets_after_a_long_run() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.delay_after(ms(10));
        }
        assert_eq!(backoff.delay_after(Duration::from_secs(30)), ms(100));
        assert_eq!(backoff.delay_after(ms(10)), ms(200));
    }

    fn supervisor_running(pid: i32) -> Supervisor {
        let mut supervisor = Supervisor::new(EnvdSpec {
            path: PathBuf::from("/usr/local/bin/envd"),
            args: Vec::new(),
        });
        supervisor.restart_at = None;
        supervisor.envd = Some(Running {
            pid: Pid::from_raw(pid),
            since: Instant::now(),
        });
        supervisor
    }

    #[test]
    fn envd_exit_schedules_a_restart_after_the_backoff() {
        let mut supervisor = supervisor_running(10);
        let now = Instant::now();
        supervisor.on_exit(Pid::from_raw(10), &WaitStatus::Exited(Pid::from_raw(10), 1));
        assert!(supervisor.envd.is_none());
        let wait = supervisor.next_wakeup(now).expect("restart scheduled");
        assert!(wait >= ms(90) && wait <= ms(200), "{wait:?}");
    }

    #[test]
    fn orphan_exit_does_not_touch_envd() {
        let mut supervisor = supervisor_running(10);
        supervisor.on_exit(Pid::from_raw(11), &WaitStatus::Exited(Pid::from_raw(11), 0));
        assert_eq!(supervisor.envd.map(|r| r.pid), Some(Pid::from_raw(10)));
        assert_eq!(supervisor.next_wakeup(Instant::now()), None);
    }

    #[test]
    fn statuses_are_described() {
        let pid = Pid::from_raw(7);
        assert_eq!(describe(&WaitStatus::Exited(pid, 3)), "exit:3");
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGSEGV, true)),
            "signal:SIGSEGV+core"
        );
    }

    #[test]
    fn handled_signals_cover_poweroff_child_and_hup() {
        let set = handled_signals();
        for signal in POWEROFF_SIGNALS {
            assert!(set.contains(signal));
        }
        assert!(set.contains(Signal::SIGCHLD));
        assert!(set.contains(Signal::SIGHUP));
        assert!(!set.contains(Signal::SIGKILL));
    }

    #[test]
    fn spawned_child_starts_with_an_empty_signal_mask() {
        // The supervisor blocks signals; envd must not inherit that.
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR2);
        let mut old = SigSet::empty();
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)).expect("block");
        let output = Command::new("/bin/sh")
            .args(["-c", "grep SigBlk /proc/self/status"])
            .output();
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None).expect("restore");
        let text = String::from_utf8_lossy(&output.expect("run sh").stdout).into_owned();
        assert_eq!(text.trim(), "SigBlk:\t0000000000000000");
    }
}
