//! Test harness: starts the real envd binary on a free loopback port and
//! talks HTTP to it through the shared client (`envd_api::client`); the
//! helpers read bodies and events as raw JSON, so the tests check the wire
//! shape itself. The guard kills the processes envd started
//! and then envd itself, so no test leaves processes behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use envd_api::client::{Client, Timeouts};
use serde_json::{json, Value};

/// A running envd, killed (with everything it started) on drop.
pub struct Envd {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub client: Client,
}

impl Envd {
    pub fn start() -> Self {
        for _ in 0..5 {
            if let Some(envd) = Self::try_start() {
                return envd;
            }
        }
        panic!("envd did not start after 5 attempts");
    }

    fn try_start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_envd"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // Hand envd a stray inheritable descriptor, as a careless parent
        // would; envd must not pass it on to the processes it starts.
        // SAFETY: dup2 is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(|| {
                libc::dup2(2, 50);
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn envd");
        let client = Client::for_host("127.0.0.1", port).with_timeouts(Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
        });
        let mut envd = Envd {
            child,
            base: client.url(""),
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = envd.child.try_wait() {
                return None; // port taken meanwhile; try another
            }
            if envd.client.healthy() {
                return Some(envd);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        self.client.url(path)
    }

    /// Sends the token on every later request.
    pub fn use_token(&mut self, token: &str) {
        self.client.set_token(Some(token.to_owned()));
    }

    pub fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.client.request(method, path)
    }

    pub fn get(&self, path: &str) -> Resp {
        Resp::from(self.request("GET", path).call())
    }

    pub fn delete(&self, path: &str) -> Resp {
        Resp::from(self.request("DELETE", path).call())
    }

    pub fn post(&self, path: &str, body: Value) -> Resp {
        Resp::from(self.request("POST", path).send_json(body))
    }

    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Resp {
        Resp::from(self.request("POST", path).send_bytes(body))
    }

    /// Starts a background process; returns its pid.
    pub fn spawn_background(&self, mut spec: Value) -> u64 {
        spec["background"] = json!(true);
        let resp = self.post("/processes", spec);
        assert_eq!(resp.status, 201, "background start: {}", resp.text());
        resp.json()["pid"].as_u64().expect("pid")
    }

    /// Opens an NDJSON stream (POST with a JSON body, or GET).
    pub fn stream(&self, method: &str, path: &str, body: Option<Value>) -> Events {
        let req = self.request(method, path);
        let result = match body {
            Some(body) => req.send_json(body),
            None => req.call(),
        };
        match result {
            Ok(resp) => {
                assert_eq!(resp.content_type(), "application/x-ndjson");
                Events::new(resp.into_reader())
            }
            Err(ureq::Error::Status(code, resp)) => {
                panic!(
                    "stream {path} failed with {code}: {}",
                    resp.into_string().unwrap_or_default()
                )
            }
            Err(err) => panic!("stream {path}: {err}"),
        }
    }

    /// Runs a foreground process and collects all its events.
    pub fn run(&self, spec: Value) -> Vec<Value> {
        self.stream("POST", "/processes", Some(spec)).collect()
    }

    /// Peak resident memory of envd in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read envd status");
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM");
        kib * 1024
    }

    /// SIGKILLs every process envd still runs. Never panics (runs in Drop).
    fn kill_started_processes(&self) {
        let Ok(list) = self.request("GET", "/processes").call() else {
            return;
        };
        let Ok(list) = list.into_json::<Value>() else {
            return;
        };
        for p in list["processes"].as_array().cloned().unwrap_or_default() {
            if p["running"] == json!(true) {
                let pid = p["pid"].as_u64().unwrap_or(0);
                let _ = self
                    .request("POST", &format!("/processes/{pid}/signal"))
                    .send_json(json!({"signal": "SIGKILL"}));
            }
        }
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        self.kill_started_processes();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished HTTP exchange.
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub allow: Option<String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn from(result: Result<ureq::Response, ureq::Error>) -> Self {
        let resp = match result {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(err) => panic!("request failed: {err}"),
        };
        let status = resp.status();
        let content_type = resp.content_type().to_owned();
        let allow = resp.header("Allow").map(str::to_owned);
        let mut body = Vec::new();
        resp.into_reader()
            .read_to_end(&mut body)
            .expect("read body");
        Resp {
            status,
            content_type,
            allow,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts the status and the `{"error":{"code","message"}}` shape.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.content_type, "application/json");
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "body: {body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.len() > 10, "message should explain: {body}");
    }
}

/// NDJSON events, keepalives skipped.
pub struct Events {
    lines: std::io::Lines<BufReader<Box<dyn Read + Send + Sync>>>,
}

impl Events {
    fn new(reader: Box<dyn Read + Send + Sync>) -> Self {
        Events {
            lines: BufReader::new(reader).lines(),
        }
    }

    /// Moves reading to a thread; events arrive with their arrival time.
    pub fn into_channel(self) -> mpsc::Receiver<(Instant, Value)> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for event in self {
                if tx.send((Instant::now(), event)).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

impl Iterator for Events {
    type Item = Value;

    fn next(&mut self) -> Option<Value> {
        loop {
            let line = self.lines.next()?.ok()?;
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad NDJSON line ({e}): {line}"));
            if event["type"] != "keepalive" {
                return Some(event);
            }
        }
    }
}

/// The bytes of an output event, decoded from utf8 or base64.
pub fn event_bytes(event: &Value) -> Vec<u8> {
    let data = event["data"].as_str().expect("data");
    match event["encoding"].as_str() {
        Some("utf8") => data.as_bytes().to_vec(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("valid base64"),
        other => panic!("unknown encoding {other:?}"),
    }
}

/// All bytes of one stream type ("stdout", "stderr" or "pty").
pub fn output_of(events: &[Value], kind: &str) -> Vec<u8> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .flat_map(event_bytes)
        .collect()
}

/// The final `end` event; panics if the stream did not end with one.
pub fn end_of(events: &[Value]) -> &Value {
    let last = events.last().expect("at least one event");
    assert_eq!(last["type"], "end", "stream must end with end: {events:?}");
    last
}

/// Waits on a live event channel until the accumulated output of `kind`
/// contains `needle`; returns everything collected.
pub fn wait_for_output(
    events: &mpsc::Receiver<(Instant, Value)>,
    kind: &str,
    needle: &str,
    collected: &mut Vec<u8>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(collected).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok((_, event)) if event["type"] == kind => collected.extend(event_bytes(&event)),
            Ok(_) => {}
            Err(_) => panic!(
                "timed out waiting for {needle:?}; got {:?}",
                String::from_utf8_lossy(collected)
            ),
        }
    }
}

/// A scratch directory under /tmp, removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("envd-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch(path)
    }

    pub fn path(&self, rel: &str) -> String {
        self.0.join(rel).to_string_lossy().into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Percent-encodes a query value.
pub fn q(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
