//! HTTP plumbing shared by all handlers: the `Exchange` (one request and the
//! state of its answer), query-string and body parsing, and turning a handler's
//! `Reply` or `ApiError` into a tiny_http response.

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::error::ApiError;

/// Largest JSON request body accepted (1 MiB).
pub const MAX_JSON_BODY: usize = 1 << 20;

/// What a handler answers when it has not streamed the response itself.
pub enum Reply {
    /// A JSON document with the given status.
    Json(u16, Value),
    /// 204 No Content.
    NoContent,
    /// A file streamed from disk with a Content-Length.
    File { file: File, len: u64 },
    /// The handler took the request and wrote the response itself.
    Streamed,
}

/// One request being answered. Handlers read from it and either return a
/// `Reply` or take the request to stream the response themselves.
pub struct Exchange {
    request: Option<Request>,
    method: Method,
    path: String,
    query: Query,
}

impl Exchange {
    pub fn new(request: Request) -> Self {
        let url = request.url().to_owned();
        let (path, query) = match url.split_once('?') {
            Some((path, query)) => (path.to_owned(), Query::parse(query)),
            None => (url, Query::default()),
        };
        Self {
            method: request.method().clone(),
            request: Some(request),
            path,
            query,
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The URL path, without the query string, still percent-encoded.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn query(&self) -> &Query {
        &self.query
    }

    /// A request header's value (case-insensitive name), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let request = self.request.as_ref()?;
        request
            .headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The body length the client announced in Content-Length, if any.
    pub fn body_length(&self) -> Option<usize> {
        self.request.as_ref().and_then(|r| r.body_length())
    }

    /// The request body. The first call answers `Expect: 100-continue`.
    pub fn body(&mut self) -> Result<&mut dyn Read, ApiError> {
        let request = self.request.as_mut().ok_or_else(taken)?;
        Ok(request.as_reader())
    }

    /// Reads the body as a JSON document of type `T` (at most 1 MiB).
    pub fn json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        if self.body_length().is_some_and(|n| n > MAX_JSON_BODY) {
            return Err(too_large_json());
        }
        let mut raw = Vec::new();
        self.body()?
            .take(MAX_JSON_BODY as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if raw.len() > MAX_JSON_BODY {
            return Err(too_large_json());
        }
        parse_json(&raw)
    }

    /// Takes the request out, to stream the answer on its connection.
    pub fn take_request(&mut self) -> Result<Request, ApiError> {
        self.request.take().ok_or_else(taken)
    }

    /// Sends the reply (or the error) unless the handler already streamed
    /// one. Returns the status sent, for the access log.
    pub fn finish(mut self, result: Result<Reply, ApiError>) -> u16 {
        let Some(request) = self.request.take() else {
            return match result {
                Ok(_) => 200,
                Err(err) => {
                    log_error(&err);
                    err.status()
                }
            };
        };
        let (status, sent) = match result {
            Ok(Reply::Json(status, body)) => {
                (status, request.respond(json_response(status, &body)))
            }
            Ok(Reply::NoContent) => (204, request.respond(Response::empty(204))),
            Ok(Reply::File { file, len }) => (200, request.respond(file_response(file, len))),
            Ok(Reply::Streamed) => (200, Ok(())),
            Err(err) => {
                log_error(&err);
                (err.status(), request.respond(error_response(&err)))
            }
        };
        if let Err(err) = sent {
            tracing::debug!(error = %err, "client went away before the response was sent");
        }
        status
    }
}

/// Server-side failures are worth a log line of their own.
fn log_error(err: &ApiError) {
    if err.status() >= 500 {
        tracing::warn!(
            code = err.code().as_str(),
            message = err.message(),
            "request failed"
        );
    }
}

fn taken() -> ApiError {
    ApiError::internal("the request was already taken by a stream; this is a bug in envd")
}

fn too_large_json() -> ApiError {
    ApiError::too_large(format!(
        "the JSON body is larger than {MAX_JSON_BODY} bytes; send a smaller document"
    ))
}

/// Parses a JSON request body, telling syntax errors from wrong shapes.
pub fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_json(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(raw).map_err(|err| {
        if err.is_data() {
            ApiError::invalid_argument(format!("invalid request: {err}"))
        } else {
            ApiError::invalid_json(format!("the request body is not valid JSON: {err}"))
        }
    })
}

/// A JSON response with the right Content-Type.
pub fn json_response(status: u16, body: &Value) -> Response<Cursor<Vec<u8>>> {
    let mut bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let response = Response::from_data(bytes).with_status_code(StatusCode(status));
    with_header(response, "Content-Type", "application/json")
}

/// The JSON error response, with `Allow` for 405.
pub fn error_response(err: &ApiError) -> Response<Cursor<Vec<u8>>> {
    let response = json_response(err.status(), &err.to_json());
    match err.allow() {
        Some(allow) => with_header(response, "Allow", allow),
        None => response,
    }
}

fn file_response(file: File, len: u64) -> Response<io::Take<File>> {
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    let response = Response::new(
        StatusCode(200),
        Vec::new(),
        file.take(len),
        Some(size),
        None,
    )
    // Always send Content-Length instead of switching to chunked for big files.
    .with_chunked_threshold(usize::MAX);
    with_header(response, "Content-Type", "application/octet-stream")
}

/// Adds a header; values are ASCII, so a failure is only logged.
pub fn with_header<R: Read>(response: Response<R>, name: &str, value: &str) -> Response<R> {
    match Header::from_bytes(name.as_bytes(), value.as_bytes()) {
        Ok(h) => response.with_header(h),
        Err(()) => {
            tracing::warn!(name, "dropping a response header that is not ASCII");
            response
        }
    }
}

/// A parsed query string: percent-decoded key/value pairs, in order.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, Vec<u8>)>,
}

impl Query {
    pub fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (key, value) = part.split_once('=').unwrap_or((part, ""));
                let key = String::from_utf8_lossy(&percent_decode(key, true)).into_owned();
                (key, percent_decode(value, true))
            })
            .collect();
        Self { pairs }
    }

    /// The raw bytes of the first value for `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value for `name` as UTF-8 text.
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.bytes(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| {
                    ApiError::invalid_argument(format!("query parameter '{name}' is not UTF-8"))
                })
            })
            .transpose()
    }

    /// The first value for `name` as a path (any bytes allowed).
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        self.bytes(name)
            .map(|v| PathBuf::from(std::ffi::OsStr::from_bytes(v)))
    }

    /// A boolean flag: `true`/`1`/`yes` or `false`/`0`/`no`; absent = `default`.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.text(name)? {
            None | Some("") => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ApiError::invalid_argument(format!(
                "query parameter '{name}' must be true or false, got '{other}'"
            ))),
        }
    }

    /// An unsigned number; absent = `default`.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, ApiError> {
        match self.text(name)? {
            None | Some("") => Ok(default),
            Some(text) => text.parse().map_err(|_| {
                ApiError::invalid_argument(format!(
                    "query parameter '{name}' must be a non-negative integer, got '{text}'"
                ))
            }),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`). Malformed
/// escapes are kept as they are.
pub fn percent_decode(input: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_escapes_plus_and_garbage() {
        assert_eq!(percent_decode("a%20b+c", true), b"a b c");
        assert_eq!(percent_decode("a+b", false), b"a+b");
        assert_eq!(percent_decode("%ff%FE", false), vec![0xff, 0xfe]);
        assert_eq!(percent_decode("100%", false), b"100%");
        assert_eq!(percent_decode("%zz%4", false), b"%zz%4");
    }

    #[test]
    fn query_reads_first_value_and_flags() {
        let q = Query::parse("path=%2Ftmp%2Fa+b&depth=3&recursive=true&path=/other");
        assert_eq!(q.path("path"), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(q.number("depth", 1).ok(), Some(3));
        assert_eq!(q.flag("recursive", false).ok(), Some(true));
        assert!(q.flag("depth", false).is_err());
        assert_eq!(q.number("missing", 7).ok(), Some(7));
    }

    #[test]
    fn json_errors_distinguish_syntax_from_shape() {
        #[derive(serde::Deserialize, Debug)]
        struct Body {
            #[allow(dead_code)]
            cmd: String,
        }
        let syntax = parse_json::<Body>(b"{not json").unwrap_err();
        assert_eq!(syntax.code().as_str(), "invalid_json");
        let shape = parse_json::<Body>(b"{}").unwrap_err();
        assert_eq!(shape.code().as_str(), "invalid_argument");
        let empty = parse_json::<Body>(b"  ").unwrap_err();
        assert_eq!(empty.code().as_str(), "invalid_json");
    }
}
