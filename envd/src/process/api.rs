//! HTTP handlers for `/processes`: start (streamed or background), list,
//! re-attach to events, stdin, signals and terminal resize.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use envd_api::Started;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::stream::{NdjsonStream, KEEPALIVE_INTERVAL};
use wrenn_http::{describe_io, ApiError, Exchange, Reply, Request};

use super::events::{self, signal_name, Event};
use super::launch::{self, SignalError};
use super::output::Cursor;
use super::pty::{self, PtySize};
use super::registry::{Input, Process, Registry};
use super::signal as signals;
use super::spec::{self, StartRequest};
use super::stdin::{self, StdinError};
use crate::settings::SharedSettings;
use wrenn_http::timefmt::rfc3339;

/// Output bytes sent in one HTTP chunk at most.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// `POST /processes`: starts a process; streams its events unless
/// `background` is set.
pub fn start(
    registry: &Arc<Registry>,
    settings: &SharedSettings,
    ex: &mut Exchange,
) -> Result<Reply, ApiError> {
    let request: StartRequest = ex.json()?;
    let plan = spec::plan(request, &settings.snapshot())?;
    let process = launch::start(registry, &plan)?;
    if plan.background {
        let started = Started {
            pid: process.pid,
            tag: process.tag.clone(),
        };
        return Ok(Reply::Json(201, json!(started)));
    }
    follow(&process, ex.take_request()?);
    Ok(Reply::Streamed)
}

/// `GET /processes`
pub fn list(registry: &Registry) -> Reply {
    let processes: Vec<Value> = registry.list().iter().map(|p| describe(p)).collect();
    Reply::Json(200, json!({ "processes": processes }))
}

/// `GET /processes/{sel}`
pub fn info(registry: &Registry, selector: &str) -> Result<Reply, ApiError> {
    let process = registry.find(selector)?;
    Ok(Reply::Json(200, describe(&process)))
}

/// `GET /processes/{sel}/events`: replay buffered output, then follow.
pub fn events(registry: &Registry, ex: &mut Exchange, selector: &str) -> Result<Reply, ApiError> {
    let process = registry.find(selector)?;
    follow(&process, ex.take_request()?);
    Ok(Reply::Streamed)
}

fn describe(process: &Process) -> Value {
    let exit = process.output.lock().exit.clone();
    let accepts_input = matches!(*process.input(), Input::Pipe(_) | Input::Pty(_));
    json!({
        "pid": process.pid,
        "tag": process.tag,
        "cmd": process.cmd,
        "args": process.args,
        "pty": process.pty,
        "stdin": accepts_input,
        "running": exit.is_none(),
        "exit_code": exit.as_ref().and_then(|e| e.code),
        "signal": exit.as_ref().and_then(|e| e.signal).map(signal_name),
        "started_at": rfc3339(process.started_at),
        "ended_at": exit.as_ref().map(|e| rfc3339(e.at)),
    })
}

/// Streams `start`, buffered and live output, then `end`. A client that goes
/// away only stops its stream; the process keeps running.
pub fn follow(process: &Process, request: Request) {
    let result = NdjsonStream::open(request).and_then(|stream| stream_events(process, stream));
    if let Err(err) = result {
        tracing::debug!(pid = process.pid, error = %err, "event stream ended early: client went away");
    }
}

fn stream_events(process: &Process, mut stream: NdjsonStream) -> io::Result<()> {
    stream.send(&Event::Start {
        pid: process.pid,
        tag: process.tag.clone(),
    })?;
    let mut cursor = Cursor::default();
    loop {
        let batch = process
            .output
            .next(&mut cursor, KEEPALIVE_INTERVAL, MAX_BATCH_BYTES);
        if batch.dropped > 0 {
            stream.queue(&Event::Truncated {
                dropped_bytes: batch.dropped,
            })?;
        }
        for chunk in &batch.chunks {
            stream.queue(&events::output(chunk))?;
        }
        if let Some(exit) = &batch.end {
            stream.queue(&events::end(exit))?;
            return stream.finish();
        }
        if stream.queued_len() == 0 {
            stream.queue(&Event::Keepalive)?;
        }
        stream.flush()?;
    }
}

/// `POST /processes/{sel}/stdin`: the raw body goes to the child's stdin.
pub fn write_stdin(
    registry: &Registry,
    ex: &mut Exchange,
    selector: &str,
) -> Result<Reply, ApiError> {
    let process = registry.find(selector)?;
    let input = process.input();
    let fd = match &*input {
        Input::Pipe(fd) => fd.as_fd(),
        Input::Pty(master) => master.as_fd(),
        other => return Err(input_unavailable(&process, other)),
    };
    ensure_running(&process)?;
    let mut body = ex.body()?;
    match stdin::copy_body(fd, &mut body) {
        Ok(written) => Ok(Reply::Json(200, json!({ "written": written }))),
        Err(err) => Err(stdin_error(&process, err)),
    }
}

/// `POST /processes/{sel}/stdin/close`: EOF for pipes, ^D for terminals.
pub fn close_stdin(registry: &Registry, selector: &str) -> Result<Reply, ApiError> {
    let process = registry.find(selector)?;
    let mut input = process.input();
    match &*input {
        Input::Pipe(_) => *input = Input::Closed,
        Input::Pty(master) => {
            ensure_running(&process)?;
            let eof = [control_d()];
            stdin::write_all(master.as_fd(), &eof, &mut 0)
                .map_err(|err| stdin_error(&process, err))?;
        }
        other => return Err(input_unavailable(&process, other)),
    }
    Ok(Reply::Json(200, json!({})))
}

/// The terminal's default EOF character.
fn control_d() -> u8 {
    0x04
}

fn ensure_running(process: &Process) -> Result<(), ApiError> {
    if process.output.lock().exit.is_some() {
        return Err(ApiError::conflict(format!(
            "process {} has already exited",
            process.pid
        )));
    }
    Ok(())
}

fn input_unavailable(process: &Process, input: &Input) -> ApiError {
    match input {
        Input::Disabled => ApiError::conflict(format!(
            "process {} was started without stdin; start it with \"stdin\": true to write to it",
            process.pid
        )),
        _ => ApiError::conflict(format!(
            "the stdin of process {} is closed (closed by a client, or the process exited)",
            process.pid
        )),
    }
}

fn stdin_error(process: &Process, err: StdinError) -> ApiError {
    let pid = process.pid;
    match err {
        StdinError::Closed { written } => ApiError::conflict(format!(
            "process {pid} closed its stdin or exited after {written} bytes were written"
        )),
        StdinError::Stalled { written } => ApiError::conflict(format!(
            "process {pid} stopped reading its stdin for {}s; {written} bytes were written",
            stdin::STALL_TIMEOUT.as_secs()
        )),
        StdinError::Body { written, error } => ApiError::bad_request(format!(
            "reading the request body failed after {written} bytes: {error}"
        )),
        StdinError::Io { written, error } => ApiError::internal(format!(
            "writing to the stdin of process {pid} failed after {written} bytes: {}",
            describe_io(&error)
        )),
    }
}

#[derive(Deserialize)]
struct SignalRequest {
    signal: Value,
}

/// `POST /processes/{sel}/signal`: signals the process's whole group.
pub fn signal(registry: &Registry, ex: &mut Exchange, selector: &str) -> Result<Reply, ApiError> {
    let request: SignalRequest = ex.json()?;
    let signal = signals::parse(&request.signal)?;
    let process = registry.find(selector)?;
    match launch::signal_group(&process, signal) {
        Ok(()) => {
            tracing::info!(pid = process.pid, signal = %signal, "signal sent");
            Ok(Reply::Json(200, json!({})))
        }
        Err(SignalError::AlreadyExited) => Err(ApiError::conflict(format!(
            "process {} has already exited; there is nothing to signal",
            process.pid
        ))),
        Err(SignalError::Failed(errno)) => Err(ApiError::internal(format!(
            "cannot signal process {}: {}",
            process.pid,
            errno.desc()
        ))),
    }
}

/// `POST /processes/{sel}/resize`: sets the terminal size.
pub fn resize(registry: &Registry, ex: &mut Exchange, selector: &str) -> Result<Reply, ApiError> {
    let size: PtySize = ex.json()?;
    let size = pty::validate(size).map_err(ApiError::invalid_argument)?;
    let process = registry.find(selector)?;
    if !process.pty {
        return Err(ApiError::conflict(format!(
            "process {} has no terminal; start it with \"pty\" to resize it",
            process.pid
        )));
    }
    let input = process.input();
    let Input::Pty(master) = &*input else {
        return Err(ApiError::conflict(format!(
            "process {} has exited; its terminal is gone",
            process.pid
        )));
    };
    pty::resize(master.as_fd(), size).map_err(|err| {
        ApiError::internal(format!("cannot resize the terminal: {}", describe_io(&err)))
    })?;
    Ok(Reply::Json(200, json!(size)))
}
