//! Starting a planned process and its helper threads: one reader per output
//! stream (pipes or PTY master) feeding the ring, and one waiter that reaps
//! the child and records its exit.
//!
//! The waiter first waits with `WNOWAIT`, leaving the child a zombie, then
//! reaps it while holding the output lock. Signals are sent under that same
//! lock after checking the process has not been reaped, so envd never
//! signals a pid the kernel may have reused.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use wrenn_http::{describe_io, ApiError};

use super::events::complete_utf8_prefix;
use super::output::{ExitInfo, Output, StreamKind, RING_CAPACITY};
use super::pty;
use super::registry::{Input, Process, Registry};
use super::spawn::{self, ChildIo};
use super::spec::LaunchPlan;

/// After the child exits, how long to wait for its output pipes to close
/// (a background grandchild may hold them open).
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Bytes read per chunk.
const READ_SIZE: usize = 32 * 1024;

/// Starts the process and registers it. The tag is reserved for the whole
/// start, so a concurrent start with the same tag gets 409.
pub fn start(registry: &Arc<Registry>, plan: &LaunchPlan) -> Result<Arc<Process>, ApiError> {
    let _reservation = plan
        .tag
        .as_deref()
        .map(|tag| registry.reserve_tag(tag))
        .transpose()?;
    let spawned = spawn::spawn(plan)?;
    let (input, readers) = split_io(spawned.io).map_err(|err| {
        ApiError::internal(format!(
            "cannot set up the process's I/O: {}",
            describe_io(&err)
        ))
    })?;
    let process = Arc::new(Process {
        id: registry.next_id(),
        pid: spawned.child.id(),
        tag: plan.tag.clone(),
        cmd: plan.cmd.clone(),
        args: plan.args.clone(),
        pty: plan.pty.is_some(),
        started_at: SystemTime::now(),
        output: Output::new(readers.len(), RING_CAPACITY),
        input: Mutex::new(input),
    });
    registry.insert(Arc::clone(&process));
    tracing::info!(pid = process.pid, cmd = %plan.cmd, user = %plan.account.name,
        tag = plan.tag.as_deref().unwrap_or(""), pty = process.pty, "process started");
    for reader in readers {
        spawn_reader(&process, reader);
    }
    spawn_waiter(registry, &process, spawned.child);
    Ok(process)
}

/// An output source for a reader thread.
enum Reader {
    Pipe(StreamKind, Box<dyn Read + Send>),
    Pty(Arc<OwnedFd>),
}

fn split_io(io: ChildIo) -> io::Result<(Input, Vec<Reader>)> {
    match io {
        ChildIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let input = match stdin {
                Some(pipe) => {
                    let fd = OwnedFd::from(pipe);
                    pty::set_nonblocking(fd.as_fd())?;
                    Input::Pipe(fd)
                }
                None => Input::Disabled,
            };
            let readers = vec![
                Reader::Pipe(StreamKind::Stdout, Box::new(stdout)),
                Reader::Pipe(StreamKind::Stderr, Box::new(stderr)),
            ];
            Ok((input, readers))
        }
        ChildIo::Pty { master } => {
            pty::set_nonblocking(master.as_fd())?;
            let master = Arc::new(master);
            Ok((Input::Pty(Arc::clone(&master)), vec![Reader::Pty(master)]))
        }
    }
}

fn spawn_reader(process: &Arc<Process>, reader: Reader) {
    let owner = Arc::clone(process);
    let name = format!("envd-out-{}", process.pid);
    let spawned = thread::Builder::new().name(name).spawn(move || {
        match reader {
            Reader::Pipe(kind, pipe) => pump_pipe(&owner.output, kind, pipe),
            Reader::Pty(master) => pump_pty(&owner.output, &master),
        }
        owner.output.stream_closed();
    });
    if let Err(err) = spawned {
        tracing::error!(pid = process.pid, error = %err, "cannot start an output reader; its output is lost");
        process.output.stream_closed();
    }
}

/// Carries an incomplete trailing UTF-8 sequence over to the next chunk.
struct Utf8Splitter {
    carry: Vec<u8>,
}

impl Utf8Splitter {
    fn push(&mut self, output: &Output, kind: StreamKind, data: &[u8]) {
        self.carry.extend_from_slice(data);
        let cut = complete_utf8_prefix(&self.carry);
        // An incomplete sequence is at most 3 bytes; anything longer that
        // still does not split is not UTF-8 and is sent as it is.
        let cut = if cut == 0 && self.carry.len() >= 4 {
            self.carry.len()
        } else {
            cut
        };
        if cut > 0 {
            output.append(kind, &self.carry[..cut]);
            self.carry.drain(..cut);
        }
    }

    fn flush(&mut self, output: &Output, kind: StreamKind) {
        output.append(kind, &self.carry);
        self.carry.clear();
    }
}

fn pump_pipe(output: &Output, kind: StreamKind, mut pipe: Box<dyn Read + Send>) {
    let mut buf = vec![0u8; READ_SIZE];
    let mut splitter = Utf8Splitter { carry: Vec::new() };
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => splitter.push(output, kind, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::warn!(error = %err, "reading process output failed");
                break;
            }
        }
    }
    splitter.flush(output, kind);
}

/// Reads the non-blocking PTY master until the slave side is gone (EIO).
fn pump_pty(output: &Output, master: &OwnedFd) {
    let mut buf = vec![0u8; READ_SIZE];
    let mut splitter = Utf8Splitter { carry: Vec::new() };
    loop {
        match nix::unistd::read(master, &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => break,
            Ok(n) => splitter.push(output, StreamKind::Pty, &buf[..n]),
            Err(nix::errno::Errno::EAGAIN) => {
                let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
                if let Err(err) = poll(&mut fds, PollTimeout::NONE) {
                    if err != nix::errno::Errno::EINTR {
                        tracing::warn!(error = %err, "polling the terminal failed");
                        break;
                    }
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => {
                tracing::warn!(error = %err, "reading the terminal failed");
                break;
            }
        }
    }
    splitter.flush(output, StreamKind::Pty);
}

fn spawn_waiter(registry: &Arc<Registry>, process: &Arc<Process>, child: Child) {
    let (for_registry, owner) = (Arc::clone(registry), Arc::clone(process));
    let child = Arc::new(Mutex::new(Some(child)));
    let for_thread = Arc::clone(&child);
    let name = format!("envd-wait-{}", process.pid);
    let spawned = thread::Builder::new().name(name).spawn(move || {
        if let Some(child) = take(&for_thread) {
            wait_and_finish(&for_registry, &owner, child);
        }
    });
    if let Err(err) = spawned {
        // Without a waiter the process would never be reaped: stop it now.
        tracing::error!(pid = process.pid, error = %err, "cannot start a waiter; killing the process");
        if let Some(mut child) = take(&child) {
            let _ = killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
            let st = process.output.lock();
            let status = child.wait();
            process.output.record_exit(st, exit_info(status));
            process.output.mark_complete();
            registry.finished(process.id);
        }
    }
}

fn take(child: &Mutex<Option<Child>>) -> Option<Child> {
    child
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// Blocks until the child exits but leaves it a zombie, so its pid stays
/// reserved until `Child::wait` reaps it.
fn wait_without_reaping(pid: u32) {
    let target = Pid::from_raw(pid as i32);
    loop {
        match waitid(Id::Pid(target), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => tracing::warn!(pid, error = %err, "waitid failed"),
            Ok(_) => {}
        }
        return;
    }
}

fn wait_and_finish(registry: &Registry, process: &Process, mut child: Child) {
    wait_without_reaping(process.pid);
    let st = process.output.lock();
    let status = child.wait();
    let exit = exit_info(status);
    tracing::info!(pid = process.pid, exit_code = ?exit.code, signal = ?exit.signal, "process exited");
    process.output.record_exit(st, exit);
    process.output.wait_for_streams(EXIT_GRACE);
    *process.input() = Input::Closed;
    process.output.mark_complete();
    registry.finished(process.id);
}

fn exit_info(status: io::Result<std::process::ExitStatus>) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => ExitInfo {
            code: status.code(),
            signal: status.signal(),
            error: None,
            at: SystemTime::now(),
        },
        Err(err) => ExitInfo {
            code: None,
            signal: None,
            error: Some(format!(
                "cannot read the exit status: {}",
                describe_io(&err)
            )),
            at: SystemTime::now(),
        },
    }
}

/// Why a signal could not be delivered.
#[derive(Debug)]
pub enum SignalError {
    AlreadyExited,
    Failed(nix::errno::Errno),
}

/// Sends `signal` to the process's group (its pid is the group id).
pub fn signal_group(process: &Process, signal: Signal) -> Result<(), SignalError> {
    let st = process.output.lock();
    if st.exit.is_some() {
        return Err(SignalError::AlreadyExited);
    }
    let pid = Pid::from_raw(process.pid as i32);
    let result = match killpg(pid, signal) {
        // The child may not have made itself a group leader yet.
        Err(nix::errno::Errno::ESRCH) => nix::sys::signal::kill(pid, signal),
        other => other,
    };
    drop(st);
    result.map_err(SignalError::Failed)
}
