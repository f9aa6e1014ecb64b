//! Forking and executing a planned process: stdio (pipes or a PTY), user
//! identity, new process group or session, working directory.
//!
//! Every process leads its own process group (PTY processes their own
//! session, with the PTY as controlling terminal), so a signal can reach the
//! whole job. Only the three stdio descriptors are inherited: every other
//! descriptor envd opens is close-on-exec.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};

use wrenn_http::{describe_io, ApiError};

use super::pty;
use super::spec::LaunchPlan;

/// The child's end of envd's I/O.
pub enum ChildIo {
    Pipes {
        stdin: Option<ChildStdin>,
        stdout: ChildStdout,
        stderr: ChildStderr,
    },
    Pty {
        master: OwnedFd,
    },
}

/// A started child and the descriptors to talk to it.
pub struct Spawned {
    pub child: Child,
    pub io: ChildIo,
}

/// Starts the process described by `plan`.
pub fn spawn(plan: &LaunchPlan) -> Result<Spawned, ApiError> {
    let mut command = Command::new(&plan.program);
    command
        .arg0(&plan.cmd)
        .args(&plan.args)
        .env_clear()
        .envs(&plan.env);
    let setup = ChildSetup::new(plan)?;
    let master = match plan.pty {
        Some(size) => Some(attach_pty(&mut command, size)?),
        None => {
            attach_pipes(&mut command, plan.stdin);
            None
        }
    };
    // SAFETY: the closure only makes async-signal-safe system calls on data
    // prepared before the fork, as `pre_exec` requires.
    unsafe {
        command.pre_exec(move || setup.apply());
    }
    let mut child = command.spawn().map_err(|err| spawn_error(&err, plan))?;
    // Dropping the command closes envd's copies of the PTY slave, so the
    // master sees EOF once the child and its descendants close it.
    drop(command);
    let io = match master {
        Some(master) => ChildIo::Pty { master },
        None => take_pipes(&mut child)?,
    };
    Ok(Spawned { child, io })
}

fn attach_pty(command: &mut Command, size: pty::PtySize) -> Result<OwnedFd, ApiError> {
    let fail = |err: io::Error| {
        ApiError::internal(format!("cannot open a terminal: {}", describe_io(&err)))
    };
    let terminal = pty::open(size).map_err(fail)?;
    command
        .stdin(Stdio::from(terminal.slave.try_clone().map_err(fail)?))
        .stdout(Stdio::from(terminal.slave.try_clone().map_err(fail)?))
        .stderr(Stdio::from(terminal.slave));
    Ok(terminal.master)
}

fn attach_pipes(command: &mut Command, stdin: bool) {
    command
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
}

fn take_pipes(child: &mut Child) -> Result<ChildIo, ApiError> {
    match (child.stdout.take(), child.stderr.take()) {
        (Some(stdout), Some(stderr)) => Ok(ChildIo::Pipes {
            stdin: child.stdin.take(),
            stdout,
            stderr,
        }),
        _ => Err(ApiError::internal(
            "the child's output pipes are missing; this is a bug in envd",
        )),
    }
}

/// Identity and session changes applied in the child between fork and exec.
struct ChildSetup {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    new_session: bool,
    switch_user: bool,
}

impl ChildSetup {
    fn new(plan: &LaunchPlan) -> Result<Self, ApiError> {
        let cwd = CString::new(plan.cwd.as_os_str().as_bytes())
            .map_err(|_| ApiError::invalid_argument("cwd must not contain NUL characters"))?;
        Ok(Self {
            uid: plan.account.uid,
            gid: plan.account.gid,
            groups: plan.account.groups.clone(),
            cwd,
            new_session: plan.pty.is_some(),
            switch_user: nix::unistd::geteuid().is_root(),
        })
    }

    /// Runs in the forked child: async-signal-safe calls only, no allocation.
    fn apply(&self) -> io::Result<()> {
        if self.switch_user {
            // SAFETY: the pointer and length describe a live Vec of gid_t.
            check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) })?;
            // SAFETY: plain system call with an integer argument.
            check(unsafe { libc::setgid(self.gid) })?;
            // SAFETY: plain system call with an integer argument.
            check(unsafe { libc::setuid(self.uid) })?;
        }
        if self.new_session {
            // SAFETY: plain system call; the child is not a group leader.
            check(unsafe { libc::setsid() })?;
            // SAFETY: fd 0 is the PTY slave (dup'ed by std before this runs);
            // TIOCSCTTY takes an integer argument.
            check(unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) })?;
        }
        // SAFETY: `cwd` is a NUL-terminated string owned by `self`.
        check(unsafe { libc::chdir(self.cwd.as_ptr()) })?;
        Ok(())
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Explains why the child could not be started.
fn spawn_error(err: &io::Error, plan: &LaunchPlan) -> ApiError {
    let context = format!(
        "cannot start '{}' ({}) as user '{}' in {}",
        plan.cmd,
        plan.program.display(),
        plan.account.name,
        plan.cwd.display()
    );
    match err.raw_os_error() {
        Some(libc::ENOENT) => ApiError::not_found(format!(
            "{context}: the program or its interpreter (#! line) does not exist"
        )),
        Some(libc::ENOEXEC) => ApiError::invalid_argument(format!(
            "{context}: not an executable format; add a #! line or run it through an interpreter"
        )),
        _ => ApiError::from_io(err, context),
    }
}
