//! The one blocking client for envd (feature `client`), used by the node
//! agent, the end-to-end tests and envd's own tests: health, `/init`,
//! starting processes, running one to completion with its typed event
//! stream gathered, and raw requests for everything else.
//!
//! Every call opens its TCP connection on the calling thread (and the
//! helper threads of [`Client::exec`] are scoped threads it starts), so a
//! caller that entered a network namespace with `setns` reaches envd inside
//! that namespace. It is not a forwarder: the agent's API layer streams
//! bodies through [`Client::forward`] untouched.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

pub use ureq;

use crate::error::ErrorBody;
use crate::process::{Encoding, Event, OutputData, StartRequest, Started};
use crate::system::{Health, InitRequest, InitResponse};

/// How often [`Client::wait_ready`] asks `/health`.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long one `/health` probe may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// A failed call to envd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the sandbox's guest agent does not answer ({0}); the sandbox may still be booting or has stopped")]
    Unreachable(String),
    /// envd answered with an error; its status and JSON body pass through.
    #[error("guest agent answered {status}: {body}")]
    Status { status: u16, body: Value },
    #[error("guest agent sent something unexpected: {0}; envd and its client may be of different versions")]
    Protocol(String),
    #[error("the request for the guest agent is invalid: {0}; fix the request body")]
    InvalidRequest(String),
}

impl Error {
    /// envd's `{"error":{"code","message"}}`, when it answered with one.
    pub fn body(&self) -> Option<ErrorBody> {
        match self {
            Error::Status { body, .. } => serde_json::from_value(body.clone()).ok(),
            _ => None,
        }
    }
}

/// Connection timeouts of a [`Client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// Longest silence while reading; event streams send a keepalive every
    /// 15 s, so this must be longer than that.
    pub read: Duration,
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(3),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
        }
    }
}

/// A client for one envd at `http://HOST:PORT`.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for envd at `addr`, without a token, with default timeouts.
    pub fn new(addr: SocketAddr) -> Client {
        Client::at(format!("http://{addr}"))
    }

    /// A client for envd at `host` (a name or an IPv4 address) and `port`.
    pub fn for_host(host: &str, port: u16) -> Client {
        Client::at(format!("http://{host}:{port}"))
    }

    fn at(base: String) -> Client {
        Client {
            base,
            token: None,
            agent: agent(Timeouts::default()),
        }
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Client {
        self.agent = agent(timeouts);
        self
    }

    /// The same client, sending `token` (if any) on every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    /// Sends `token` on every later request.
    pub fn set_token(&mut self, token: Option<String>) {
        self.token = token;
    }

    /// The full URL of `path` (which may carry a query).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A raw request with the token set, for calls without a helper here.
    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &self.url(path));
        match &self.token {
            Some(token) => request.set("X-Access-Token", token),
            None => request,
        }
    }

    /// Sends a request and returns envd's answer whatever its status, for
    /// the caller to pass on; only a failure to reach envd is an error.
    /// `path` includes the query.
    pub fn forward(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&mut dyn Read>,
    ) -> Result<ureq::Response, Error> {
        let mut request = self.request(method, path);
        if let Some(kind) = content_type {
            request = request.set("Content-Type", kind);
        }
        let result = match body {
            Some(reader) => request.send(reader),
            None => request.call(),
        };
        match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => Ok(response),
            Err(e) => Err(Error::Unreachable(e.to_string())),
        }
    }

    /// `GET /health`.
    pub fn health(&self) -> Result<Health, Error> {
        let response = self
            .request("GET", "/health")
            .timeout(HEALTH_TIMEOUT)
            .call()
            .map_err(into_error)?;
        read_json(response)
    }

    /// Whether envd answers `/health` now.
    pub fn healthy(&self) -> bool {
        self.health().is_ok()
    }

    /// Polls `/health` until envd answers or `timeout` passes; returns how
    /// long it took.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, Error> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.healthy() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(READY_POLL);
        }
        Err(Error::Unreachable(format!(
            "no answer within {}s",
            timeout.as_secs()
        )))
    }

    /// `POST /init`: token, default environment and user, clock.
    pub fn init(&self, request: &InitRequest) -> Result<InitResponse, Error> {
        self.post_json("/init", request)
    }

    /// Starts a process in the foreground and returns its event stream.
    pub fn start(&self, request: &StartRequest) -> Result<EventStream, Error> {
        let request = StartRequest {
            background: false,
            ..request.clone()
        };
        let response = self
            .request("POST", "/processes")
            .send_json(&request)
            .map_err(into_error)?;
        Ok(EventStream::new(response.into_reader()))
    }

    /// Starts a process in the background; returns its pid and tag.
    pub fn start_background(&self, request: &StartRequest) -> Result<Started, Error> {
        let request = StartRequest {
            background: true,
            ..request.clone()
        };
        self.post_json("/processes", &request)
    }

    /// Writes `data` to the stdin of process `pid`.
    pub fn write_stdin(&self, pid: u32, data: &[u8]) -> Result<(), Error> {
        self.request("POST", &format!("/processes/{pid}/stdin"))
            .send_bytes(data)
            .map(drop)
            .map_err(into_error)
    }

    /// Closes the stdin of process `pid` (EOF for the child).
    pub fn close_stdin(&self, pid: u32) -> Result<(), Error> {
        self.request("POST", &format!("/processes/{pid}/stdin/close"))
            .call()
            .map(drop)
            .map_err(into_error)
    }

    /// Sends `signal` (a name such as "SIGKILL") to the group of `pid`.
    pub fn signal(&self, pid: u32, signal: &str) -> Result<(), Error> {
        self.request("POST", &format!("/processes/{pid}/signal"))
            .send_json(json!({ "signal": signal }))
            .map(drop)
            .map_err(into_error)
    }

    /// Runs `request` to its end, feeding it `stdin` (then EOF) if given,
    /// and killing its process group once `timeout` passes, if given.
    pub fn exec(
        &self,
        request: &StartRequest,
        stdin: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<Finished, Error> {
        let started = Instant::now();
        let request = StartRequest {
            stdin: stdin.is_some(),
            ..request.clone()
        };
        let mut events = self.start(&request)?;
        let pid = read_start(&mut events)?;
        let timed_out = AtomicBool::new(false);
        let (done, finished) = mpsc::channel::<()>();
        let result = std::thread::scope(|scope| {
            if let Some(data) = stdin {
                // A refused write (the child exited or closed stdin) is the
                // child's business; its exit status tells the story.
                scope.spawn(move || {
                    let _ = self.write_stdin(pid, &data);
                    let _ = self.close_stdin(pid);
                });
            }
            if let Some(limit) = timeout {
                let timed_out = &timed_out;
                scope.spawn(move || {
                    if finished.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                        timed_out.store(true, Ordering::Relaxed);
                        let _ = self.signal(pid, "SIGKILL");
                    }
                });
            }
            let result = gather(events, pid, started);
            drop(done);
            result
        });
        let mut finished = result?;
        finished.timed_out = timed_out.load(Ordering::Relaxed);
        Ok(finished)
    }

    fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, Error> {
        let response = self
            .request("POST", path)
            .send_json(body)
            .map_err(into_error)?;
        read_json(response)
    }
}

fn agent(timeouts: Timeouts) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(timeouts.connect)
        .timeout_read(timeouts.read)
        .timeout_write(timeouts.write)
        .build()
}

/// The NDJSON events of a process stream, typed; blank lines are skipped.
pub struct EventStream {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send + Sync>>>,
}

impl EventStream {
    /// Events read from a raw NDJSON body.
    pub fn new(body: Box<dyn Read + Send + Sync>) -> EventStream {
        EventStream {
            lines: BufReader::new(body).lines(),
        }
    }
}

impl Iterator for EventStream {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.lines.next()? {
                Ok(line) => line,
                Err(e) => return Some(Err(Error::Protocol(format!("reading events: {e}")))),
            };
            if !line.trim().is_empty() {
                return Some(parse_event(&line));
            }
        }
    }
}

fn parse_event(line: &str) -> Result<Event, Error> {
    serde_json::from_str(line).map_err(|e| Error::Protocol(format!("bad event {line:?}: {e}")))
}

/// How a process run to completion ended and what it printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    pub pid: u32,
    /// stdout, and a terminal's output for processes with a `pty`.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    /// Why the exit status is unknown, if it is.
    pub error: Option<String>,
    pub duration: Duration,
    /// Whether the timeout of [`Client::exec`] killed the process.
    pub timed_out: bool,
}

impl Finished {
    /// stdout as text, invalid UTF-8 replaced.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A finished run as the agent's API answers it: both streams as text, or
/// both as base64 when either is not valid UTF-8.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExecResult {
    pub exit_code: Option<i64>,
    pub signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub encoding: Encoding,
    pub duration_ms: u64,
    pub timed_out: bool,
}

impl From<Finished> for ExecResult {
    fn from(run: Finished) -> ExecResult {
        let (stdout, stderr, encoding) =
            match (String::from_utf8(run.stdout), String::from_utf8(run.stderr)) {
                (Ok(out), Ok(err)) => (out, err, Encoding::Utf8),
                (out, err) => (
                    BASE64.encode(out.map_or_else(|e| e.into_bytes(), String::into_bytes)),
                    BASE64.encode(err.map_or_else(|e| e.into_bytes(), String::into_bytes)),
                    Encoding::Base64,
                ),
            };
        ExecResult {
            exit_code: run.exit_code.map(i64::from),
            signal: run.signal,
            stdout,
            stderr,
            encoding,
            duration_ms: u64::try_from(run.duration.as_millis()).unwrap_or(u64::MAX),
            timed_out: run.timed_out,
        }
    }
}

/// Reads up to the `start` event; returns the pid.
fn read_start(events: &mut impl Iterator<Item = Result<Event, Error>>) -> Result<u32, Error> {
    for event in events {
        if let Event::Start { pid, .. } = event? {
            return Ok(pid);
        }
    }
    Err(Error::Protocol(
        "the event stream ended before start".into(),
    ))
}

/// Collects output events up to `end`.
fn gather(
    events: impl Iterator<Item = Result<Event, Error>>,
    pid: u32,
    started: Instant,
) -> Result<Finished, Error> {
    let mut run = Finished {
        pid,
        ..Finished::default()
    };
    for event in events {
        match event? {
            Event::Stdout(data) | Event::Pty(data) => run.stdout.extend(decode(&data)?),
            Event::Stderr(data) => run.stderr.extend(decode(&data)?),
            Event::End {
                exit_code,
                signal,
                error,
            } => {
                run.exit_code = exit_code;
                run.signal = signal;
                run.error = error;
                run.duration = started.elapsed();
                return Ok(run);
            }
            Event::Start { .. } | Event::Truncated { .. } | Event::Keepalive | Event::Unknown => {}
        }
    }
    Err(Error::Protocol(
        "the event stream ended before the process did".into(),
    ))
}

fn decode(data: &OutputData) -> Result<Vec<u8>, Error> {
    data.bytes()
        .map_err(|e| Error::Protocol(format!("bad base64 in an output event: {e}")))
}

fn read_json<T: DeserializeOwned>(response: ureq::Response) -> Result<T, Error> {
    let path = response.get_url().to_owned();
    response.into_json().map_err(|e| {
        Error::Protocol(format!(
            "the answer of {path} is not the expected JSON: {e}"
        ))
    })
}

fn into_error(error: ureq::Error) -> Error {
    match error {
        ureq::Error::Status(status, response) => {
            let text = response.into_string().unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Error::Status { status, body }
        }
        other => Error::Unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(lines: &[&str]) -> EventStream {
        let body = lines.join("\n").into_bytes();
        EventStream::new(Box::new(std::io::Cursor::new(body)))
    }

    #[test]
    fn gathered_output_keeps_streams_apart_and_reads_the_end() {
        let events = stream(&[
            r#"{"type":"start","pid":9,"tag":null}"#,
            r#"{"type":"stdout","data":"4","encoding":"utf8"}"#,
            "",
            r#"{"type":"keepalive"}"#,
            r#"{"type":"stderr","data":"warn\n","encoding":"utf8"}"#,
            r#"{"type":"stdout","data":"2\n","encoding":"utf8"}"#,
            r#"{"type":"end","exit_code":3,"signal":null,"error":null}"#,
        ]);
        let run = gather(events, 9, Instant::now()).expect("gather");
        assert_eq!(run.stdout_text(), "42\n");
        assert_eq!(run.stderr, b"warn\n");
        assert_eq!(run.exit_code, Some(3));
        let result = ExecResult::from(run);
        assert_eq!(result.encoding, Encoding::Utf8);
        assert_eq!(result.stdout, "42\n");
    }

    #[test]
    fn binary_output_is_returned_as_base64_for_both_streams() {
        let events = stream(&[
            r#"{"type":"stdout","data":"//4=","encoding":"base64"}"#,
            r#"{"type":"stderr","data":"ok","encoding":"utf8"}"#,
            r#"{"type":"end","exit_code":0,"signal":null}"#,
        ]);
        let result = ExecResult::from(gather(events, 1, Instant::now()).expect("gather"));
        assert_eq!(result.encoding, Encoding::Base64);
        assert_eq!(BASE64.decode(&result.stdout).ok(), Some(vec![0xff, 0xfe]));
        assert_eq!(BASE64.decode(&result.stderr).ok(), Some(b"ok".to_vec()));
    }

    #[test]
    fn exec_result_keeps_the_agents_json_shape() {
        let result = ExecResult {
            exit_code: Some(0),
            stdout: "hi\n".into(),
            duration_ms: 5,
            ..ExecResult::default()
        };
        assert_eq!(
            serde_json::to_string(&result).expect("encode"),
            r#"{"exit_code":0,"signal":null,"stdout":"hi\n","stderr":"","encoding":"utf8","duration_ms":5,"timed_out":false}"#
        );
    }

    #[test]
    fn a_stream_without_end_is_a_protocol_error() {
        let events = stream(&[r#"{"type":"stdout","data":"x","encoding":"utf8"}"#]);
        assert!(matches!(
            gather(events, 1, Instant::now()),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn a_stream_without_start_is_a_protocol_error() {
        let mut events = stream(&[r#"{"type":"keepalive"}"#]);
        assert!(matches!(read_start(&mut events), Err(Error::Protocol(_))));
    }

    #[test]
    fn unknown_events_are_skipped() {
        let events = stream(&[
            r#"{"type":"progress","pct":50}"#,
            r#"{"type":"end","exit_code":0,"signal":null,"error":null}"#,
        ]);
        assert_eq!(
            gather(events, 1, Instant::now()).expect("gather").exit_code,
            Some(0)
        );
    }

    #[test]
    fn an_unreachable_envd_is_reported_as_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let client = Client::for_host("127.0.0.1", port);
        assert!(!client.healthy());
        assert!(matches!(
            client.wait_ready(Duration::from_millis(120)),
            Err(Error::Unreachable(_))
        ));
    }
}
