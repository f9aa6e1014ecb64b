//! HTTP plumbing shared by all handlers: the `Exchange` (one request and the
//! state of its answer), body parsing, and turning a handler's `Reply` or
//! `ApiError` into a tiny_http response.

use std::fs::File;
use std::io::{self, Cursor, Read};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::query::Query;

/// What a handler answers when it has not streamed the response itself.
pub enum Reply {
    /// A JSON document with the given status.
    Json(u16, Value),
    /// 204 No Content.
    NoContent,
    /// A file streamed from disk with a Content-Length.
    File { file: File, len: u64 },
    /// A body read as it is sent, `len` bytes, with extra headers (such as
    /// a 206 with its `Content-Range`).
    Stream {
        status: u16,
        len: u64,
        headers: Vec<(&'static str, String)>,
        body: Box<dyn Read + Send>,
    },
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
    /// The server's name, for the message of a bug.
    server: &'static str,
    /// Largest JSON body `json` reads.
    max_json_body: usize,
}

impl Exchange {
    /// Wraps `request`, served under `config` (its name and JSON body cap).
    /// The server makes these; a unit test can wrap a `tiny_http::TestRequest`.
    pub fn new(request: Request, config: &ServerConfig) -> Self {
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
            server: config.name,
            max_json_body: config.max_json_body,
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

    /// The request target as sent: path and query string. `None` once the
    /// request was taken.
    pub fn url(&self) -> Option<&str> {
        self.request.as_ref().map(|r| r.url())
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
        let server = self.server;
        let request = self.request.as_mut().ok_or_else(|| taken(server))?;
        Ok(request.as_reader())
    }

    /// Reads the body as a JSON document of type `T` (at most the server's
    /// `max_json_body`, 1 MiB by default).
    pub fn json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        parse_json(&self.json_bytes()?)
    }

    /// Reads the body of a JSON request as bytes, bounded like
    /// [`Exchange::json`]: for a handler that parses it more than one way
    /// or sends it on.
    pub fn json_bytes(&mut self) -> Result<Vec<u8>, ApiError> {
        let max = self.max_json_body;
        if self.body_length().is_some_and(|n| n > max) {
            return Err(too_large_json(max));
        }
        let mut raw = Vec::new();
        self.body()?
            .take(max as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if raw.len() > max {
            return Err(too_large_json(max));
        }
        Ok(raw)
    }

    /// Takes the request out, to stream the answer on its connection.
    pub fn take_request(&mut self) -> Result<Request, ApiError> {
        self.request.take().ok_or_else(|| taken(self.server))
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
            Ok(Reply::Stream {
                status,
                len,
                headers,
                body,
            }) => (
                status,
                request.respond(stream_response(status, len, &headers, body)),
            ),
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

fn taken(server: &str) -> ApiError {
    ApiError::internal(format!(
        "the request was already taken by a stream; this is a bug in {server}"
    ))
}

fn too_large_json(max: usize) -> ApiError {
    ApiError::too_large(format!(
        "the JSON body is larger than {max} bytes; send a smaller document"
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

fn stream_response(
    status: u16,
    len: u64,
    headers: &[(&'static str, String)],
    body: Box<dyn Read + Send>,
) -> Response<Box<dyn Read + Send>> {
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    let mut response = Response::new(StatusCode(status), Vec::new(), body, Some(size), None)
        .with_chunked_threshold(usize::MAX);
    response = with_header(response, "Content-Type", "application/octet-stream");
    for (name, value) in headers {
        response = with_header(response, name, value);
    }
    response
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

#[cfg(test)]
mod tests {
    use tiny_http::TestRequest;

    use super::*;
    use crate::config::Listen;

    fn exchange(request: TestRequest) -> Exchange {
        let config = ServerConfig {
            max_json_body: 8,
            ..ServerConfig::new("test", "0", Listen::Tcp("127.0.0.1:0".into()))
        };
        Exchange::new(request.into(), &config)
    }

    #[test]
    fn json_body_is_capped_by_the_config() {
        let mut fits = exchange(TestRequest::new().with_body("[1,2,3]"));
        assert_eq!(fits.json::<Vec<u8>>().ok(), Some(vec![1, 2, 3]));
        let mut big = exchange(TestRequest::new().with_body("[1,2,3,4]"));
        let err = big.json::<Vec<u8>>().unwrap_err();
        assert_eq!(err.status(), 413);
        assert!(err.message().contains("larger than 8 bytes"));
    }

    #[test]
    fn path_and_query_are_split_and_a_second_take_is_a_bug() {
        let mut ex = exchange(TestRequest::new().with_path("/a%20b?x=1&y"));
        assert_eq!(ex.path(), "/a%20b");
        assert_eq!(ex.query().number("x", 0).ok(), Some(1));
        assert!(ex.take_request().is_ok());
        let err = ex.take_request().unwrap_err();
        assert_eq!(err.status(), 500);
        assert!(err.message().ends_with("this is a bug in test"));
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
