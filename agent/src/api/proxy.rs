//! Calls on a sandbox's processes and files, forwarded to its envd:
//! `/v1/sandboxes/{id}/REST` becomes envd's `/REST` with the same query and
//! body. Bodies stream both ways, so a large file never sits in memory, and
//! event streams pass through event by event.

use std::io::{BufRead, BufReader};

use serde_json::Value;
use wrenn_http::tiny_http::{Header, Response, StatusCode};
use wrenn_http::{ApiError, Exchange, NdjsonStream, Reply};

use super::Api;
use crate::sandbox::SandboxError;

/// Forwards the request to the sandbox's envd and its answer back.
pub fn forward(api: &Api, ex: &mut Exchange, id: &str) -> Result<Reply, ApiError> {
    let id = super::sandboxes::parse_id(id)?;
    let envd = api.manager.envd(&id)?;
    let mut request = ex.take_request()?;
    let prefix = format!("/v1/sandboxes/{}", id.as_str());
    let target = request
        .url()
        .strip_prefix(&prefix)
        .unwrap_or("/")
        .to_owned();
    let method = request.method().as_str().to_owned();
    let content_type = header(&request, "Content-Type");
    let has_body = request.body_length().is_some_and(|n| n > 0)
        || header(&request, "Transfer-Encoding").is_some();
    let response = if has_body {
        envd.forward(
            &method,
            &target,
            content_type.as_deref(),
            Some(request.as_reader()),
        )
    } else {
        envd.forward(&method, &target, None, None)
    };
    let response = match response {
        Ok(response) => response,
        Err(e) => {
            let error = ApiError::from(SandboxError::from(e));
            let _ = request.respond(wrenn_http::error_response(&error));
            return Ok(Reply::Streamed);
        }
    };
    let is_stream = response.content_type() == "application/x-ndjson";
    if is_stream && response.status() < 300 {
        pass_stream(request, response);
    } else {
        pass_response(request, response);
    }
    Ok(Reply::Streamed)
}

/// envd's error answer as an [`ApiError`] with the same status and message.
pub fn envd_error(response: ureq::Response) -> ApiError {
    let status = response.status();
    let body: Value = response.into_json().unwrap_or(Value::Null);
    crate::sandbox::error::envd_refusal(status, &body)
}

fn header(request: &wrenn_http::Request, name: &str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_owned())
}

/// Copies status, content type, length and body.
pub fn pass_response(request: wrenn_http::Request, response: ureq::Response) {
    let status = StatusCode(response.status());
    let length = response
        .header("Content-Length")
        .and_then(|v| v.parse::<usize>().ok());
    let mut headers = Vec::new();
    for name in ["Content-Type", "Allow"] {
        if let Some(value) = response.header(name) {
            if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                headers.push(h);
            }
        }
    }
    let body = response.into_reader();
    let reply = Response::new(status, headers, body, length, None);
    let _ = request.respond(reply);
}

/// Passes an NDJSON event stream through, flushing each event.
pub fn pass_stream(request: wrenn_http::Request, response: ureq::Response) {
    let Ok(mut stream) = NdjsonStream::open(request) else {
        return;
    };
    for line in BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { break };
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if stream.send(&event).is_err() {
            return;
        }
    }
    let _ = stream.finish();
}
