//! A small blocking client for envd's HTTP API, enough for end-to-end tests
//! and the guest demo: health checks and running a command to completion.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};

/// envd's port inside every guest.
pub const ENVD_PORT: u16 = 49983;

/// What a finished process printed and how it ended.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: Option<i64>,
    pub events: Vec<Value>,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A client for one envd at `http://HOST:PORT`.
pub struct Envd {
    base: String,
    agent: ureq::Agent,
}

impl Envd {
    pub fn new(host: &str, port: u16) -> Envd {
        Envd {
            base: format!("http://{host}:{port}"),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout_read(Duration::from_secs(120))
                .build(),
        }
    }

    /// Whether `GET /health` answers 200.
    pub fn healthy(&self) -> bool {
        self.agent
            .get(&format!("{}/health", self.base))
            .timeout(Duration::from_secs(2))
            .call()
            .is_ok()
    }

    /// Polls `/health` until it answers or `timeout` passes.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.healthy() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Runs `cmd args` in the foreground and collects its event stream.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output, String> {
        self.exec_json(json!({ "cmd": cmd, "args": args }))
    }

    /// Starts a process described by `body` (see docs/envd-api.md) and
    /// reads its NDJSON events until `end`.
    pub fn exec_json(&self, body: Value) -> Result<Output, String> {
        let response = self
            .agent
            .post(&format!("{}/processes", self.base))
            .send_json(body)
            .map_err(|e| format!("POST /processes: {}", describe(e)))?;
        let mut out = Output::default();
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.map_err(|e| format!("reading events: {e}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let event: Value =
                serde_json::from_str(&line).map_err(|e| format!("bad event {line:?}: {e}"))?;
            let data = decode(&event);
            match event["type"].as_str() {
                Some("stdout") | Some("pty") => out.stdout.extend(data),
                Some("stderr") => out.stderr.extend(data),
                Some("end") => out.exit_code = event["exit_code"].as_i64(),
                _ => {}
            }
            out.events.push(event);
        }
        Ok(out)
    }

    /// Starts a background process; returns its pid.
    pub fn spawn_background(&self, cmd: &str, args: &[&str]) -> Result<i64, String> {
        let response: Value = self
            .agent
            .post(&format!("{}/processes", self.base))
            .send_json(json!({ "cmd": cmd, "args": args, "background": true }))
            .map_err(|e| format!("POST /processes: {}", describe(e)))?
            .into_json()
            .map_err(|e| format!("bad JSON: {e}"))?;
        response["pid"]
            .as_i64()
            .ok_or_else(|| format!("no pid in {response}"))
    }
}

/// The bytes of an output event, whatever its encoding.
fn decode(event: &Value) -> Vec<u8> {
    let data = event["data"].as_str().unwrap_or_default();
    if event["encoding"].as_str() == Some("base64") {
        BASE64.decode(data).unwrap_or_default()
    } else {
        data.as_bytes().to_vec()
    }
}

fn describe(error: ureq::Error) -> String {
    match error {
        ureq::Error::Status(code, response) => {
            format!(
                "HTTP {code}: {}",
                response.into_string().unwrap_or_default()
            )
        }
        other => other.to_string(),
    }
}
