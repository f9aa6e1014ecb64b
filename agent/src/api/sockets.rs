//! The SDK's WebSockets (`docs/sdk.md`): `exec/stream` runs a command and
//! streams its output, `processes/{pid}/stream` re-attaches to a running
//! process, `pty` runs a terminal (raw bytes in binary frames both ways,
//! JSON text frames for control).
//!
//! The relay hands these connections over before tiny_http sees them
//! ([`wrenn_http::Handler::divert`]); each socket then has an I/O thread in
//! `wrenn_http::ws` and one thread here that moves envd's events to it.
//! Errors after the upgrade are `{"type":"error","data":...}` messages, as
//! the SDK expects: it raises on any answer but 101.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envd_api::client::EventStream;
use envd_api::{Event, OutputData, PtySize, StartRequest};
use lmdb_schema::SandboxId;
use serde_json::{json, Value};
use wrenn_http::ws::{self, Inbox, Message, Outbox, Recv};
use wrenn_http::{Takeover, Upgraded};

use crate::sandbox::envd::EnvdClient;
use crate::sandbox::{Manager, SandboxError};

/// How long the client has to send its first message.
const FIRST_MESSAGE: Duration = Duration::from_secs(30);
/// The terminal's `{"type":"ping"}` keepalive, as upstream sends it.
const PTY_PING: Duration = Duration::from_secs(30);

/// Which socket a request asks for.
pub(super) enum Socket {
    Exec,
    Process(String),
    Pty,
}

impl Socket {
    /// The socket for a capsule path (`rest` after `/v1/capsules/{id}/`).
    pub(super) fn for_path(rest: &[&str]) -> Option<Socket> {
        match rest {
            ["exec", "stream"] => Some(Socket::Exec),
            ["processes", selector, "stream"] => Some(Socket::Process((*selector).to_owned())),
            ["pty"] => Some(Socket::Pty),
            _ => None,
        }
    }
}

/// The takeover that serves `socket` of sandbox `id`.
pub(super) fn takeover(manager: Arc<Manager>, id: String, socket: Socket) -> Takeover {
    Box::new(move |up: Upgraded| {
        let limits = ws::Limits::default();
        let Ok((out, inbox)) = ws::accept(up, limits) else {
            return;
        };
        let fatal = matches!(socket, Socket::Pty);
        if let Err(message) = serve(&manager, &id, socket, &out, inbox) {
            let mut error = json!({"type": "error", "data": message});
            if fatal {
                error["fatal"] = Value::Bool(true);
            }
            let _ = out.json(&error);
        }
        let _ = out.close(1000, "");
    })
}

fn serve(
    manager: &Manager,
    id: &str,
    socket: Socket,
    out: &Outbox,
    inbox: Inbox,
) -> Result<(), String> {
    let id = SandboxId::parse(id).map_err(|_| format!("sandbox {id} not found"))?;
    let envd = manager.envd(&id).map_err(|e| describe(&e))?;
    let _ = manager.touch(&id);
    match socket {
        Socket::Exec => exec(manager, &id, &envd, out, inbox),
        Socket::Process(selector) => {
            let events = attach(&envd, &selector)?;
            // Nothing to read from the client; keep its inbox drained.
            std::thread::spawn(move || while inbox.recv().is_some() {});
            relay_events(manager, &id, events, out, None)
        }
        Socket::Pty => pty(manager, &id, &envd, out, inbox),
    }
}

fn describe(err: &SandboxError) -> String {
    match err {
        SandboxError::NotFound(id) => format!("sandbox {id} not found"),
        other => other.to_string(),
    }
}

/// The first message, as JSON.
fn first_message(inbox: &Inbox) -> Result<Value, String> {
    match inbox.recv_timeout(FIRST_MESSAGE) {
        Ok(Message::Text(text)) => serde_json::from_str(text.as_str())
            .map_err(|e| format!("the first message is not JSON: {e}")),
        Ok(_) => Err("the first message must be a JSON text frame".into()),
        Err(Recv::Timeout) => Err(format!(
            "no start message within {} s",
            FIRST_MESSAGE.as_secs()
        )),
        Err(Recv::Closed) => Err("the socket closed before the start message".into()),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn string_map(value: &Value) -> std::collections::BTreeMap<String, String> {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// `exec/stream`: `{"type":"start","cmd","args"}`, then the process's
/// events. A `{"type":"stop"}` or the client leaving before the end kills
/// it.
fn exec(
    manager: &Manager,
    id: &SandboxId,
    envd: &EnvdClient,
    out: &Outbox,
    inbox: Inbox,
) -> Result<(), String> {
    let start = first_message(&inbox)?;
    if start["type"] != "start" {
        return Err("the first message must be {\"type\":\"start\",\"cmd\":...}".into());
    }
    let cmd = start["cmd"].as_str().unwrap_or_default();
    if cmd.trim().is_empty() {
        return Err("cmd is empty: name the program to run".into());
    }
    let request = StartRequest::command(cmd, &strings(&start["args"]));
    let events = envd
        .api()
        .start(&request)
        .map_err(|e| describe(&e.into()))?;
    let pid = Arc::new(AtomicU32::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (envd, pid, ended) = (envd.clone(), Arc::clone(&pid), Arc::clone(&ended));
        move || {
            let stop = loop {
                match inbox.recv() {
                    Some(Message::Text(text)) => {
                        let stop = serde_json::from_str::<Value>(text.as_str())
                            .is_ok_and(|m| m["type"] == "stop");
                        if stop {
                            break true;
                        }
                    }
                    Some(_) => {}
                    None => break !ended.load(Ordering::Acquire),
                }
            };
            let pid = pid.load(Ordering::Acquire);
            if stop && pid != 0 {
                let _ = envd.api().signal(pid, "SIGKILL");
            }
        }
    };
    std::thread::spawn(watcher);
    let result = relay_events(manager, id, events, out, Some(&pid));
    ended.store(true, Ordering::Release);
    result
}

/// envd's event stream of process `selector` (a pid or a tag).
fn attach(envd: &EnvdClient, selector: &str) -> Result<EventStream, String> {
    let path = format!("/processes/{}/events", super::capsules::encode(selector));
    let response = envd
        .forward("GET", &path, None, None)
        .map_err(|e| describe(&e.into()))?;
    if response.status() >= 300 {
        let status = response.status();
        let body: Value = response.into_json().unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("refused");
        return Err(match status {
            404 => format!("process {selector} not found: {message}"),
            _ => format!("cannot attach to process {selector}: {message}"),
        });
    }
    Ok(EventStream::new(response.into_reader()))
}

fn text(data: &OutputData) -> String {
    match data.bytes() {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => data.data.clone(),
    }
}

/// An exit status as one number: a signal N is 128 + N, as shells say;
/// -1 when neither is known.
pub(super) fn exit_code(exit_code: Option<i64>, signal: Option<&str>) -> i64 {
    match (exit_code, signal) {
        (Some(code), _) => code,
        (None, Some(name)) => name
            .parse::<nix::sys::signal::Signal>()
            .map_or(-1, |s| 128 + s as i64),
        (None, None) => -1,
    }
}

/// The SDK's `exit` message for envd's `end` event.
fn exit_message(code: Option<i32>, signal: Option<&str>) -> Value {
    json!({"type": "exit", "exit_code": exit_code(code.map(i64::from), signal)})
}

/// Sends the SDK's `start`, `stdout`, `stderr` and `exit` messages for
/// envd's events until the process ends or the client leaves.
fn relay_events(
    manager: &Manager,
    id: &SandboxId,
    events: EventStream,
    out: &Outbox,
    pid: Option<&AtomicU32>,
) -> Result<(), String> {
    for event in events {
        let event = event.map_err(|e| format!("the guest agent's stream broke: {e}"))?;
        let message = match event {
            Event::Start { pid: started, .. } => {
                if let Some(pid) = pid {
                    pid.store(started, Ordering::Release);
                }
                json!({"type": "start", "pid": started})
            }
            Event::Stdout(data) | Event::Pty(data) => {
                json!({"type": "stdout", "data": text(&data)})
            }
            Event::Stderr(data) => json!({"type": "stderr", "data": text(&data)}),
            Event::End {
                exit_code: code,
                signal,
                ..
            } => {
                let _ = out.json(&exit_message(code, signal.as_deref()));
                return Ok(());
            }
            Event::Truncated { .. } | Event::Keepalive | Event::Unknown => continue,
        };
        if out.json(&message).is_err() {
            return Ok(());
        }
        let _ = manager.touch(id);
    }
    Err("the guest agent's stream ended before the process did".into())
}

/// `pty`: `{"type":"start",...}` starts a terminal (it outlives the
/// socket, for `pty_connect`); `{"type":"connect","tag"}` re-attaches.
fn pty(
    manager: &Manager,
    id: &SandboxId,
    envd: &EnvdClient,
    out: &Outbox,
    inbox: Inbox,
) -> Result<(), String> {
    let first = first_message(&inbox)?;
    let (pid, events) = match first["type"].as_str() {
        Some("start") => {
            let cmd = first["cmd"].as_str().unwrap_or("/bin/bash");
            let size = |key: &str, default: u16| {
                first[key]
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .unwrap_or(default)
            };
            let mut request = StartRequest::command(cmd, &strings(&first["args"]));
            request.env = string_map(&first["envs"]);
            request
                .env
                .entry("TERM".into())
                .or_insert_with(|| "xterm-256color".into());
            request.cwd = first["cwd"].as_str().map(str::to_owned);
            request.pty = Some(PtySize {
                cols: size("cols", 80),
                rows: size("rows", 24),
            });
            request.stdin = true;
            let hex = super::capsules::random_hex(4).map_err(|e| e.message().to_owned())?;
            request.tag = Some(format!("pty-{hex}"));
            let started = envd
                .api()
                .start_background(&request)
                .map_err(|e| describe(&e.into()))?;
            let tag = started.tag.or(request.tag).unwrap_or_default();
            let _ = out.json(&json!({"type": "started", "tag": tag, "pid": started.pid}));
            (started.pid, attach(envd, &started.pid.to_string())?)
        }
        Some("connect") => {
            let tag = first["tag"].as_str().unwrap_or_default();
            if tag.is_empty() {
                return Err("connect needs the tag of the terminal".into());
            }
            let mut events = attach(envd, tag)?;
            // The first event names the process.
            let pid = match events.next() {
                Some(Ok(Event::Start { pid, .. })) => pid,
                _ => return Err(format!("terminal {tag} did not start its stream")),
            };
            (pid, events)
        }
        _ => {
            return Err(
                "the first message must be {\"type\":\"start\"} or {\"type\":\"connect\"}".into(),
            )
        }
    };
    let input = {
        let (envd, out) = (envd.clone(), out.clone());
        move || pty_input(&envd, pid, &out, &inbox)
    };
    std::thread::spawn(input);
    for event in events {
        let event = event.map_err(|e| format!("the guest agent's stream broke: {e}"))?;
        let sent = match event {
            Event::Pty(data) | Event::Stdout(data) | Event::Stderr(data) => match data.bytes() {
                Ok(bytes) => out.binary(bytes),
                Err(_) => out.binary(data.data.into_bytes()),
            },
            Event::End {
                exit_code: code,
                signal,
                ..
            } => {
                let _ = out.json(&exit_message(code, signal.as_deref()));
                return Ok(());
            }
            _ => continue,
        };
        if sent.is_err() {
            // The client left; the terminal stays for `pty_connect`.
            return Ok(());
        }
        let _ = manager.touch(id);
    }
    Err("the guest agent's stream ended before the terminal did".into())
}

/// The client's side of a terminal: keystrokes (binary frames, or 0.1.5's
/// base64 `input`), `resize` and `kill`; a `ping` to it every 30 s.
fn pty_input(envd: &EnvdClient, pid: u32, out: &Outbox, inbox: &Inbox) {
    loop {
        let message = match inbox.recv_timeout(PTY_PING) {
            Ok(message) => message,
            Err(Recv::Timeout) => {
                if out.json(&json!({"type": "ping"})).is_err() {
                    return;
                }
                continue;
            }
            Err(Recv::Closed) => return,
        };
        let failed = match message {
            Message::Binary(bytes) => envd.api().write_stdin(pid, &bytes).err(),
            Message::Text(text) => {
                let control: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                match control["type"].as_str() {
                    Some("resize") => envd
                        .api()
                        .request("POST", &format!("/processes/{pid}/resize"))
                        .send_json(json!({"cols": control["cols"], "rows": control["rows"]}))
                        .err()
                        .map(|e| envd_api::client::Error::Protocol(e.to_string())),
                    Some("kill") => envd.api().signal(pid, "SIGKILL").err(),
                    Some("input") => {
                        let data = OutputData {
                            data: control["data"].as_str().unwrap_or_default().to_owned(),
                            encoding: envd_api::Encoding::Base64,
                        };
                        match data.bytes() {
                            Ok(bytes) => envd.api().write_stdin(pid, &bytes).err(),
                            Err(_) => None,
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(err) = failed {
            tracing::debug!(pid, error = %err, "terminal input not delivered");
        }
    }
}
