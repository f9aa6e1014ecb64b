//! A client for wrenn-vmm's control API: HTTP/1.1 with JSON bodies on a
//! Unix socket (docs/vmm.md).
//!
//! One request per connection (`Connection: close`), read to its end: the
//! API answers small JSON bodies or none, so this is all the agent needs and
//! is written out rather than pulled in as an HTTP library that cannot
//! speak over Unix sockets. The bodies and answers are the `vmm-api`
//! crate's types, the same the VMM parses; a refusal comes back as a
//! [`CallError::Refused`] with the VMM's status and error code.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use vmm_api::{paths, Action, ErrorBody, InstanceAction, VmInfo};

use super::RuntimeError;

/// How long one request may take. Writing a full snapshot of a large guest
/// is the slowest; it takes seconds, not minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read; the API's are a few hundred bytes.
const MAX_ANSWER: u64 = 1 << 20;

/// A request the VMM did not carry out.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket does not accept connections: no VMM serves it.
    #[error("{method} {path}: cannot connect to {}: {source}", .socket.display())]
    Connect {
        method: &'static str,
        path: String,
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The connection failed while the request or its answer travelled.
    #[error("{method} {path}: {what}: {source}")]
    Io {
        method: &'static str,
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    /// The answer is not HTTP with a JSON body of the expected shape.
    #[error("{method} {path}: {why}")]
    Answer {
        method: &'static str,
        path: String,
        why: String,
    },
    /// The VMM answered with an error: its status and the body's code and
    /// message.
    #[error("{method} {path}: {status}: {message}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        code: String,
        message: String,
    },
}

impl CallError {
    /// Whether the VMM does not know the resource: it is older than the
    /// agent (a 404 with code `not_found`).
    pub fn is_unknown_resource(&self) -> bool {
        matches!(self, CallError::Refused { status: 404, code, .. } if code == vmm_api::codes::NOT_FOUND)
    }
}

impl From<CallError> for RuntimeError {
    fn from(error: CallError) -> RuntimeError {
        RuntimeError::Vmm(error.to_string())
    }
}

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

    /// `GET /`: the VM's phase (with why it exited, once it has) and size.
    pub fn info(&self) -> Result<VmInfo, CallError> {
        let json = self.call("GET", paths::INFO, None)?;
        serde_json::from_value(json).map_err(|e| CallError::Answer {
            method: "GET",
            path: paths::INFO.into(),
            why: format!("the VM's state is not what this agent reads: {e}"),
        })
    }

    /// `PUT path` with a body of the `vmm-api` crate; Ok when the VMM
    /// accepted it.
    pub fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), CallError> {
        let body = serde_json::to_string(body).map_err(|e| CallError::Answer {
            method: "PUT",
            path: path.into(),
            why: format!("cannot encode the request: {e}"),
        })?;
        self.call("PUT", path, Some(&body)).map(drop)
    }

    /// `PUT /actions`.
    pub fn action(&self, action_type: Action) -> Result<(), CallError> {
        self.put(paths::ACTIONS, &InstanceAction { action_type })
    }

    /// Sends one request; the JSON body of a 2xx answer (null when empty),
    /// else the VMM's error.
    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Value, CallError> {
        let io = |what: &'static str| {
            move |source| CallError::Io {
                method,
                path: path.into(),
                what,
                source,
            }
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| CallError::Connect {
                method,
                path: path.into(),
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(io("setting timeouts"))?;
        let body = body.unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: wrenn-vmm\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(io("sending"))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(io("reading the answer"))?;
        let (status, json) = parse_answer(&answer).map_err(|why| CallError::Answer {
            method,
            path: path.into(),
            why,
        })?;
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let (code, message) = match serde_json::from_value::<ErrorBody>(json.clone()) {
            Ok(body) => (body.error.code, body.error.message),
            Err(_) => (String::new(), json.to_string()),
        };
        Err(CallError::Refused {
            method,
            path: path.into(),
            status,
            code,
            message,
        })
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

    fn refused(status: u16, code: &str) -> CallError {
        CallError::Refused {
            method: "PUT",
            path: "/drives/rootfs".into(),
            status,
            code: code.into(),
            message: "no resource at /drives/rootfs".into(),
        }
    }

    #[test]
    fn only_a_not_found_answer_means_an_older_vmm() {
        assert!(refused(404, "not_found").is_unknown_resource());
        assert!(!refused(400, "invalid_argument").is_unknown_resource());
        assert!(!refused(409, "conflict").is_unknown_resource());
        assert!(!refused(404, "").is_unknown_resource());
        let text = RuntimeError::from(refused(404, "not_found")).to_string();
        assert!(
            text.contains("PUT /drives/rootfs: 404: no resource"),
            "{text}"
        );
    }

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
        let err = api.info().expect_err("no VMM");
        assert!(
            err.to_string().contains("/nonexistent/wrenn-vmm.sock"),
            "{err}"
        );
    }
}
