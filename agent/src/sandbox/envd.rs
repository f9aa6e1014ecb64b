//! The agent's client for envd, the guest agent inside every sandbox.
//!
//! The agent reaches envd over TCP at the sandbox's host-side address (see
//! `network`). Most API calls on a sandbox are forwarded to envd as they are
//! ([`EnvdClient::forward`]); running a command to completion
//! ([`EnvdClient::exec`]) reads envd's event stream and gathers it.
//! The wire format is in `docs/envd-api.md`.

use crate::clock::now_ms;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

/// envd's port in every guest.
pub const ENVD_PORT: u16 = 49983;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Event streams can be quiet for long; envd sends a keepalive every 15 s.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed call to envd.
#[derive(Debug, Error)]
pub enum EnvdError {
    #[error("the sandbox's guest agent does not answer ({0}); the sandbox may still be booting or has stopped")]
    Unreachable(String),
    /// envd answered with an error; its status and JSON body pass through.
    #[error("guest agent answered {status}: {body}")]
    Status { status: u16, body: Value },
    #[error("guest agent sent something unexpected: {0}")]
    Protocol(String),
}

/// What a command run to completion produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExecResult {
    pub exit_code: Option<i64>,
    pub signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// `utf8`, or `base64` when either stream is not valid UTF-8 (then both
    /// are base64).
    pub encoding: &'static str,
    pub duration_ms: u64,
    pub timed_out: bool,
}

/// A client for one sandbox's envd.
#[derive(Clone)]
pub struct EnvdClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl EnvdClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> EnvdClient {
        EnvdClient {
            base: format!("http://{addr}"),
            token,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(CONNECT_TIMEOUT)
                .timeout_read(STREAM_READ_TIMEOUT)
                .build(),
        }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.set("X-Access-Token", token),
            None => request,
        }
    }

    /// Whether envd answers `/health` now.
    pub fn healthy(&self) -> bool {
        self.request("GET", "/health")
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok()
    }

    /// Polls `/health` until envd answers or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, EnvdError> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.healthy() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(EnvdError::Unreachable(format!(
            "no answer within {}s",
            timeout.as_secs()
        )))
    }

    /// Sets the access token and default environment (`POST /init`).
    pub fn init(
        &self,
        token: &str,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), EnvdError> {
        let body = json!({ "access_token": token, "env_vars": env, "timestamp_ms": now_ms() });
        self.request("POST", "/init")
            .send_json(body)
            .map(drop)
            .map_err(into_error)
    }

    /// Forwards a request to envd and returns its response, whatever its
    /// status, for the caller to pass on. `path` includes the query.
    pub fn forward(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&mut dyn Read>,
    ) -> Result<ureq::Response, EnvdError> {
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
            Err(e) => Err(EnvdError::Unreachable(e.to_string())),
        }
    }

    /// Runs a process described by `process` (envd's `POST /processes` body)
    /// to its end, feeding it `stdin` if given, and killing it after
    /// `timeout`.
    pub fn exec(
        &self,
        mut process: Value,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecResult, EnvdError> {
        let started = Instant::now();
        process["stdin"] = Value::Bool(stdin.is_some());
        let response = self
            .request("POST", "/processes")
            .send_json(process)
            .map_err(into_error)?;
        let mut lines = BufReader::new(response.into_reader()).lines();
        let pid = read_start(&mut lines)?;
        if let Some(data) = stdin {
            self.feed_stdin(pid, data);
        }
        let timed_out = Arc::new(AtomicBool::new(false));
        let watchdog = self.kill_after(pid, timeout, Arc::clone(&timed_out));
        let result = gather(lines, started);
        watchdog.store(true, Ordering::Relaxed);
        let mut result = result?;
        result.timed_out = timed_out.load(Ordering::Relaxed);
        Ok(result)
    }

    fn feed_stdin(&self, pid: i64, data: Vec<u8>) {
        let client = self.clone();
        std::thread::spawn(move || {
            let _ = client
                .request("POST", &format!("/processes/{pid}/stdin"))
                .send_bytes(&data);
            let _ = client
                .request("POST", &format!("/processes/{pid}/stdin/close"))
                .call();
        });
    }

    /// Kills `pid` once `timeout` passes unless the returned flag is set first.
    fn kill_after(&self, pid: i64, timeout: Duration, fired: Arc<AtomicBool>) -> Arc<AtomicBool> {
        let done = Arc::new(AtomicBool::new(false));
        let (client, finished) = (self.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if finished.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !finished.load(Ordering::Relaxed) {
                fired.store(true, Ordering::Relaxed);
                let _ = client
                    .request("POST", &format!("/processes/{pid}/signal"))
                    .send_json(json!({ "signal": "SIGKILL" }));
            }
        });
        done
    }
}

/// Reads up to the `start` event; returns the pid.
fn read_start(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Result<i64, EnvdError> {
    for line in lines {
        let line = line.map_err(|e| EnvdError::Protocol(format!("reading events: {e}")))?;
        let event = parse_event(&line)?;
        if event["type"] == "start" {
            return event["pid"]
                .as_i64()
                .ok_or_else(|| EnvdError::Protocol(format!("start event without pid: {line}")));
        }
    }
    Err(EnvdError::Protocol(
        "the event stream ended before start".into(),
    ))
}

/// Collects output events up to `end`.
fn gather(
    lines: impl Iterator<Item = std::io::Result<String>>,
    started: Instant,
) -> Result<ExecResult, EnvdError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut result = ExecResult::default();
    for line in lines {
        let line = line.map_err(|e| EnvdError::Protocol(format!("reading events: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let event = parse_event(&line)?;
        match event["type"].as_str() {
            Some("stdout") | Some("pty") => stdout.extend(event_bytes(&event)?),
            Some("stderr") => stderr.extend(event_bytes(&event)?),
            Some("end") => {
                result.exit_code = event["exit_code"].as_i64();
                result.signal = event["signal"].as_str().map(str::to_owned);
                result.duration_ms = started.elapsed().as_millis() as u64;
                encode_output(&mut result, stdout, stderr);
                return Ok(result);
            }
            _ => {}
        }
    }
    Err(EnvdError::Protocol(
        "the event stream ended before the process did".into(),
    ))
}

fn encode_output(result: &mut ExecResult, stdout: Vec<u8>, stderr: Vec<u8>) {
    match (String::from_utf8(stdout), String::from_utf8(stderr)) {
        (Ok(out), Ok(err)) => {
            result.stdout = out;
            result.stderr = err;
            result.encoding = "utf8";
        }
        (out, err) => {
            let bytes = |r: Result<String, std::string::FromUtf8Error>| match r {
                Ok(s) => s.into_bytes(),
                Err(e) => e.into_bytes(),
            };
            result.stdout = BASE64.encode(bytes(out));
            result.stderr = BASE64.encode(bytes(err));
            result.encoding = "base64";
        }
    }
}

fn parse_event(line: &str) -> Result<Value, EnvdError> {
    serde_json::from_str(line).map_err(|e| EnvdError::Protocol(format!("bad event {line:?}: {e}")))
}

fn event_bytes(event: &Value) -> Result<Vec<u8>, EnvdError> {
    let data = event["data"].as_str().unwrap_or_default();
    if event["encoding"] == "base64" {
        BASE64
            .decode(data)
            .map_err(|e| EnvdError::Protocol(format!("bad base64 in event: {e}")))
    } else {
        Ok(data.as_bytes().to_vec())
    }
}

fn into_error(error: ureq::Error) -> EnvdError {
    match error {
        ureq::Error::Status(status, response) => {
            let text = response.into_string().unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            EnvdError::Status { status, body }
        }
        other => EnvdError::Unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(events: &[Value]) -> impl Iterator<Item = std::io::Result<String>> {
        events
            .iter()
            .map(|e| Ok(e.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn gathered_output_keeps_streams_apart_and_reads_the_end() {
        let events = [
            json!({"type":"stdout","data":"4","encoding":"utf8"}),
            json!({"type":"stderr","data":"warn\n","encoding":"utf8"}),
            json!({"type":"stdout","data":"2\n","encoding":"utf8"}),
            json!({"type":"end","exit_code":3,"signal":null}),
        ];
        let result = gather(lines(&events), Instant::now()).expect("gather");
        assert_eq!(result.stdout, "42\n");
        assert_eq!(result.stderr, "warn\n");
        assert_eq!(result.exit_code, Some(3));
        assert_eq!(result.encoding, "utf8");
    }

    #[test]
    fn binary_output_is_returned_as_base64_for_both_streams() {
        let events = [
            json!({"type":"stdout","data":"//4=","encoding":"base64"}),
            json!({"type":"stderr","data":"ok","encoding":"utf8"}),
            json!({"type":"end","exit_code":0,"signal":null}),
        ];
        let result = gather(lines(&events), Instant::now()).expect("gather");
        assert_eq!(result.encoding, "base64");
        assert_eq!(
            BASE64.decode(&result.stdout).expect("b64"),
            vec![0xff, 0xfe]
        );
        assert_eq!(BASE64.decode(&result.stderr).expect("b64"), b"ok");
    }

    #[test]
    fn a_stream_without_end_is_a_protocol_error() {
        let events = [json!({"type":"stdout","data":"x","encoding":"utf8"})];
        assert!(matches!(
            gather(lines(&events), Instant::now()),
            Err(EnvdError::Protocol(_))
        ));
    }
}
