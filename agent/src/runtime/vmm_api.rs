//! A client for wrenn-vmm's control API: HTTP/1.1 with JSON bodies on a
//! Unix socket (docs/vmm.md).
//!
//! One request per connection (`Connection: close`), read to its end: the
//! API answers small JSON bodies or none, so this is all the agent needs and
//! is written out rather than pulled in as an HTTP library that cannot
//! speak over Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::RuntimeError;

/// How long one request may take. Writing a full snapshot of a large guest
/// is the slowest; it takes seconds, not minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read; the API's are a few hundred bytes.
const MAX_ANSWER: u64 = 1 << 20;

/// The API of one wrenn-vmm process.
#[derive(Debug, Clone)]
pub struct VmmApi {
    socket: PathBuf,
}

impl VmmApi {
    pub fn new(socket: &Path) -> VmmApi {
        VmmApi {
            socket: socket.to_path_buf(),
        }
    }

    /// Whether the socket accepts connections (the VMM is serving).
    pub fn is_up(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// `GET /`: the VM's state (`not_started`, `running`, `paused`,
    /// `exited`) and, once exited, why.
    pub fn state(&self) -> Result<(String, Option<String>), RuntimeError> {
        let info = self.call("GET", "/", None)?;
        let state = info["state"].as_str().unwrap_or("unknown").to_owned();
        let exit = info["exit"].as_str().map(str::to_owned);
        Ok((state, exit))
    }

    /// `PUT path` with a JSON body; Ok when the VMM accepted it.
    pub fn put(&self, path: &str, body: &Value) -> Result<(), RuntimeError> {
        self.call("PUT", path, Some(body)).map(drop)
    }

    /// `PUT /actions` with `action_type`.
    pub fn action(&self, action_type: &str) -> Result<(), RuntimeError> {
        self.put(
            "/actions",
            &serde_json::json!({ "action_type": action_type }),
        )
    }

    /// Sends one request; the JSON body of a 2xx answer (null when empty),
    /// else an error that carries the VMM's message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RuntimeError> {
        let fail = |what: String| RuntimeError::Vmm(format!("{method} {path}: {what}"));
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(|e| fail(format!("cannot connect to {}: {e}", self.socket.display())))?;
        for timeout in [
            stream.set_read_timeout(Some(REQUEST_TIMEOUT)),
            stream.set_write_timeout(Some(REQUEST_TIMEOUT)),
        ] {
            timeout.map_err(|e| fail(e.to_string()))?;
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: wrenn-vmm\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| fail(format!("sending: {e}")))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(|e| fail(format!("reading the answer: {e}")))?;
        let (status, json) = parse_answer(&answer).map_err(fail)?;
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let message = json["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| json.to_string());
        Err(fail(format!("{status}: {message}")))
    }
}

/// The status and JSON body (null when empty) of a raw HTTP answer.
fn parse_answer(raw: &[u8]) -> Result<(u16, Value), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the VMM closed the connection mid-answer: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
    let body = body.trim();
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).map_err(|e| format!("answer {status} is not JSON: {e}"))?
    };
    Ok((status, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_with_and_without_a_body() {
        let (status, json) =
            parse_answer(b"HTTP/1.1 204 No Content\r\nServer: wrenn-vmm\r\n\r\n").expect("204");
        assert_eq!((status, json), (204, Value::Null));
        let (status, json) = parse_answer(
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 44\r\n\r\n{\"error\":{\"code\":\"conflict\",\"message\":\"x\"}}",
        )
        .expect("409");
        assert_eq!(status, 409);
        assert_eq!(json["error"]["message"], "x");
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_answer(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn a_missing_socket_is_an_error_that_names_it() {
        let api = VmmApi::new(Path::new("/nonexistent/wrenn-vmm.sock"));
        assert!(!api.is_up());
        let err = api.state().expect_err("no VMM");
        assert!(
            err.to_string().contains("/nonexistent/wrenn-vmm.sock"),
            "{err}"
        );
    }
}
