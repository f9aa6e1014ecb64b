//! The wire of the `wrenn` Python SDK (`docs/sdk.md`): `/v1/capsules`.
//!
//! The same `Manager` operations as `/v1/sandboxes` ([`super::sandboxes`]),
//! with the SDK's field names, enums, list shapes and error codes. What
//! only the SDK has (ping, process kill by pid, the JSON and multipart file
//! calls) is here too; envd does the work inside the guest.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, UNIX_EPOCH};

use envd_api::{EntryInfo, EntryKind, Listing, StartRequest, Started};
use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus, TimeoutAction};
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, ErrorCode, Exchange, Reply};

use super::sandboxes::parse_id;
use super::Api;
use crate::sandbox::envd::EnvdClient;
use crate::sandbox::error::{AGENT_ERROR, INVALID_STATE};
use crate::sandbox::{CreateRequest, SandboxError};

/// The shortest inactivity timer; shorter positive ones are raised to it.
const MIN_IDLE_S: u64 = 60;
/// A foreground command's time limit when the SDK sends none.
const DEFAULT_EXEC_TIMEOUT_S: u64 = 30;
/// The longest foreground command.
const MAX_EXEC_TIMEOUT_S: u64 = 24 * 3600;
/// Bytes read from the client per piece of an upload.
const UPLOAD_CHUNK: usize = 64 << 10;

/// An error as the SDK's typed exceptions expect it: the SDK picks its
/// exception by `error.code` (`invalid_request`, `invalid_state`,
/// `agent_error`, ...), not by the HTTP status.
pub fn present(err: ApiError) -> ApiError {
    let (code, status) = match (err.detail(), err.code()) {
        (Some(INVALID_STATE), _) => ("invalid_state", 409),
        (Some(AGENT_ERROR), _) => ("agent_error", 502),
        (_, ErrorCode::BadRequest | ErrorCode::InvalidJson | ErrorCode::InvalidArgument) => {
            ("invalid_request", 400)
        }
        (_, ErrorCode::PermissionDenied) => ("forbidden", 403),
        (_, ErrorCode::PayloadTooLarge) => ("too_large", 413),
        (_, ErrorCode::Internal) => ("internal_error", 500),
        (_, ErrorCode::Unavailable) => ("host_unavailable", 503),
        _ => return err,
    };
    err.shown_as(code, status)
}

/// The SDK's status names: it knows no `creating`, `destroying` or
/// `destroyed`.
pub fn status(status: SandboxStatus) -> &'static str {
    match status {
        SandboxStatus::Creating => "starting",
        SandboxStatus::Running => "running",
        SandboxStatus::Pausing => "pausing",
        SandboxStatus::Paused => "paused",
        SandboxStatus::Resuming => "resuming",
        SandboxStatus::Destroying => "stopping",
        SandboxStatus::Destroyed => "stopped",
        SandboxStatus::Error => "error",
    }
}

fn timestamp(ms: u64) -> String {
    wrenn_http::timefmt::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// The SDK's `Capsule` model.
pub fn capsule_json(record: &SandboxRecord) -> Value {
    json!({
        "id": record.id.as_str(),
        "status": status(record.status),
        // A capsule restored from a warm snapshot is of its base template.
        "template": crate::sandbox::warm::warm_base_of(record.template.as_str())
            .unwrap_or(record.template.as_str()),
        "vcpus": record.vcpus,
        "memory_mb": record.memory_mb,
        "timeout_sec": record.idle_timeout_s.unwrap_or(0),
        "created_at": timestamp(record.created_at_ms),
        "started_at": timestamp(record.created_at_ms),
        "last_active_at": timestamp(record.last_active_ms.max(record.created_at_ms)),
        "last_updated": timestamp(record.updated_at_ms.max(record.created_at_ms)),
        "metadata": record.metadata,
    })
}

/// `POST /v1/capsules`: the SDK sends only the keys it was given; others
/// (from newer SDKs) are ignored.
#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    template: Option<String>,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    timeout_sec: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Placement constraints in a fleet (read by [`super::fleet::place`]).
    #[serde(default)]
    #[allow(dead_code)]
    node_labels: BTreeMap<String, String>,
}

/// The create request for an SDK body: the node's default template when
/// none is named, aliases resolved, and `timeout_sec` as an inactivity
/// timer that pauses (0 or absent: none).
pub fn create_request(api: &Api, raw: &[u8]) -> Result<CreateRequest, ApiError> {
    let body: CreateBody = match raw.iter().all(u8::is_ascii_whitespace) {
        true => CreateBody::default(),
        false => wrenn_http::parse_json(raw)?,
    };
    let template = template_name(&api.capsules, body.template);
    let idle = match body.timeout_sec {
        None | Some(0) => None,
        Some(t) => Some(u32::try_from(t.max(MIN_IDLE_S)).map_err(|_| {
            ApiError::invalid_argument(format!(
                "timeout_sec is {t}: give at most {} seconds of inactivity, or 0 for none",
                u32::MAX
            ))
        })?),
    };
    Ok(CreateRequest {
        template,
        vcpus: body.vcpus,
        memory_mb: body.memory_mb,
        timeout_s: idle.map(u64::from),
        idle_timeout_s: idle,
        metadata: body.metadata,
        env: BTreeMap::new(),
        internet: true,
        timeout_action: TimeoutAction::Pause,
        owner: None,
    })
}

/// The template an SDK create names: the node's default when it names
/// none, aliases resolved.
pub fn template_name(config: &crate::config::CapsulesConfig, asked: Option<String>) -> String {
    let name = asked
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| config.default_template.clone());
    config.template_aliases.get(&name).cloned().unwrap_or(name)
}

/// `POST /v1/capsules/{id}/ping`: the capsule's inactivity timer starts
/// again.
pub fn ping(api: &Api, id: &str) -> Result<Reply, ApiError> {
    api.manager.touch(&parse_id(id)?)?;
    Ok(Reply::NoContent)
}

#[derive(Debug, Deserialize)]
struct ExecBody {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    background: bool,
    timeout_sec: Option<u64>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
    tag: Option<String>,
}

/// `POST /v1/capsules/{id}/exec`: runs to the end (200 with the output
/// and exit code) or, with `background`, starts and answers 202 with the
/// pid and tag at once.
pub fn exec(api: &Api, ex: &mut Exchange, id: &str) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    let body: ExecBody = ex.json()?;
    if body.cmd.trim().is_empty() {
        return Err(ApiError::invalid_argument(
            "cmd is empty: name the program to run, e.g. \"/bin/sh\"",
        ));
    }
    let mut request = StartRequest::command(&body.cmd, &body.args);
    request.env = body.envs;
    request.cwd = body.cwd;
    let envd = envd(api, &id)?;
    if body.background {
        request.tag = Some(match body.tag {
            Some(tag) => tag,
            None => format!("proc-{}", random_hex(4)?),
        });
        let started: Started = envd
            .api()
            .start_background(&request)
            .map_err(SandboxError::from)?;
        return Ok(Reply::Json(
            202,
            json!({
                "sandbox_id": id.as_str(),
                "cmd": body.cmd,
                "pid": started.pid,
                "tag": started.tag.or(request.tag).unwrap_or_default(),
            }),
        ));
    }
    request.tag = body.tag;
    let timeout_s = match body.timeout_sec {
        None => DEFAULT_EXEC_TIMEOUT_S,
        Some(0) => MAX_EXEC_TIMEOUT_S,
        Some(t) if t > MAX_EXEC_TIMEOUT_S => {
            return Err(ApiError::invalid_argument(format!(
                "timeout_sec is {t}: a command may run at most {MAX_EXEC_TIMEOUT_S} seconds"
            )))
        }
        Some(t) => t,
    };
    let process = serde_json::to_value(&request).map_err(|e| ApiError::internal(e.to_string()))?;
    let result = envd
        .exec(process, None, Duration::from_secs(timeout_s))
        .map_err(SandboxError::from)?;
    if result.timed_out {
        return Err(ApiError::unavailable(format!(
            "the command ran past its timeout of {timeout_s} s and was killed; \
             give a larger timeout, or run it with background=True"
        ))
        .with_detail(AGENT_ERROR));
    }
    let exit_code = super::sockets::exit_code(result.exit_code, result.signal.as_deref());
    let _ = api.manager.touch(&id);
    Ok(Reply::Json(
        200,
        json!({
            "sandbox_id": id.as_str(),
            "cmd": body.cmd,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "encoding": result.encoding.as_str(),
            "exit_code": exit_code,
            "duration_ms": result.duration_ms,
        }),
    ))
}

/// A running capsule's envd; using it counts as activity.
fn envd(api: &Api, id: &SandboxId) -> Result<EnvdClient, ApiError> {
    let envd = api.manager.envd(id)?;
    let _ = api.manager.touch(id);
    Ok(envd)
}

pub(super) fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ApiError::internal(format!("cannot get random bytes for a tag: {e}")))?;
    Ok(hex::encode(buf))
}

/// `GET /v1/capsules/{id}/processes`: the running background processes.
pub fn processes(api: &Api, id: &str) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    let listed: Value = envd_json(&envd(api, &id)?, "GET", "/processes", None)?;
    let processes: Vec<Value> = listed["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["running"].as_bool() == Some(true))
        .map(|p| json!({"pid": p["pid"], "tag": p["tag"], "cmd": p["cmd"], "args": p["args"]}))
        .collect();
    Ok(Reply::Json(200, json!({ "processes": processes })))
}

/// `DELETE /v1/capsules/{id}/processes/{pid}`: SIGKILL (or `?signal=`) to
/// the process group. A process that already ended counts as killed.
pub fn kill(api: &Api, ex: &Exchange, id: &str, selector: &str) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    let signal = ex.query().text("signal")?.unwrap_or("SIGKILL").to_owned();
    let path = format!("/processes/{}/signal", encode(selector));
    match envd_json(
        &envd(api, &id)?,
        "POST",
        &path,
        Some(json!({ "signal": signal })),
    ) {
        Ok(_) => Ok(Reply::NoContent),
        Err(err) if err.code() == ErrorCode::Conflict => Ok(Reply::NoContent),
        Err(err) => Err(err),
    }
}

/// One JSON call to envd; its refusals become the same errors.
fn envd_json(
    envd: &EnvdClient,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApiError> {
    let request = envd.api().request(method, path);
    let sent = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    match sent {
        Ok(response) => match response.status() {
            204 => Ok(Value::Null),
            _ => response.into_json().map_err(|e| {
                ApiError::unavailable(format!("the guest agent sent a body that is not JSON: {e}"))
                    .with_detail(AGENT_ERROR)
            }),
        },
        Err(ureq::Error::Status(_, response)) => Err(super::proxy::envd_error(response)),
        Err(err) => Err(ApiError::from(SandboxError::from(
            envd_api::client::Error::Unreachable(err.to_string()),
        ))),
    }
}

/// Percent-encodes a query value or path segment.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[derive(Debug, Deserialize)]
struct PathBody {
    path: String,
    #[serde(default = "one")]
    depth: u32,
}

fn one() -> u32 {
    1
}

/// `POST /v1/capsules/{id}/files/{op}`.
pub fn files(api: &Api, ex: &mut Exchange, id: &str, op: &[&str]) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    match op {
        ["write"] | ["stream", "write"] => upload(api, ex, &id),
        ["read"] | ["stream", "read"] => {
            let body: PathBody = ex.json()?;
            download(api, ex, &id, &body.path)
        }
        ["list"] => {
            let body: PathBody = ex.json()?;
            let path = format!("/fs/list?path={}&depth={}", encode(&body.path), body.depth);
            let listing: Listing =
                serde_json::from_value(envd_json(&envd(api, &id)?, "GET", &path, None)?)
                    .map_err(unexpected)?;
            let entries: Vec<Value> = listing.entries.iter().map(file_entry).collect();
            Ok(Reply::Json(200, json!({ "entries": entries })))
        }
        ["mkdir"] => {
            let body: PathBody = ex.json()?;
            let envd = envd(api, &id)?;
            envd_json(&envd, "POST", "/fs/mkdir", Some(json!({"path": body.path})))?;
            let stat = format!("/fs/stat?path={}", encode(&body.path));
            let entry: EntryInfo = serde_json::from_value(envd_json(&envd, "GET", &stat, None)?)
                .map_err(unexpected)?;
            Ok(Reply::Json(200, json!({ "entry": file_entry(&entry) })))
        }
        ["remove"] => {
            let body: PathBody = ex.json()?;
            let path = format!("/files?path={}", encode(&body.path));
            envd_json(&envd(api, &id)?, "DELETE", &path, None)?;
            Ok(Reply::NoContent)
        }
        _ => Err(ApiError::not_found(format!(
            "no endpoint at {}: the file calls are files/read, files/write, files/list, \
             files/mkdir, files/remove, files/stream/read and files/stream/write",
            ex.path()
        ))),
    }
}

fn unexpected(err: serde_json::Error) -> ApiError {
    ApiError::unavailable(format!(
        "the guest agent sent a file listing this node cannot read ({err}); \
         the image's envd may be of another version: rebuild the image"
    ))
    .with_detail(AGENT_ERROR)
}

/// The SDK's `FileEntry`: `type` only `file`, `directory` or `symlink`,
/// `mode` an integer, `modified_at` Unix seconds.
fn file_entry(entry: &EntryInfo) -> Value {
    let kind = match entry.kind {
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::File | EntryKind::Other => "file",
    };
    let mode = u32::from_str_radix(&entry.mode, 8).unwrap_or(0);
    let modified_at = humantime::parse_rfc3339_weak(&entry.modified)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    json!({
        "name": entry.name,
        "path": entry.path,
        "type": kind,
        "size": entry.size,
        "mode": mode,
        "permissions": permissions(kind, mode),
        "owner": entry.owner,
        "group": entry.group,
        "modified_at": modified_at,
        "symlink_target": entry.symlink_target,
    })
}

/// `ls -l` style: `drwxr-xr-x`.
fn permissions(kind: &str, mode: u32) -> String {
    let mut out = String::with_capacity(10);
    out.push(match kind {
        "directory" => 'd',
        "symlink" => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

/// Streams a guest file to the client.
fn download(api: &Api, ex: &mut Exchange, id: &SandboxId, path: &str) -> Result<Reply, ApiError> {
    let envd = envd(api, id)?;
    let target = format!("/files?path={}", encode(path));
    let response = envd
        .forward("GET", &target, None, None)
        .map_err(SandboxError::from)?;
    if response.status() >= 300 {
        return Err(super::proxy::envd_error(response));
    }
    super::proxy::pass_response(ex.take_request()?, response);
    Ok(Reply::Streamed)
}

/// `files/write` and `files/stream/write`: a multipart body with a `path`
/// part, then a `file` part that is streamed into the guest file as it
/// arrives, never held whole.
fn upload(api: &Api, ex: &mut Exchange, id: &SandboxId) -> Result<Reply, ApiError> {
    let content_type = ex.header("Content-Type").unwrap_or_default().to_owned();
    let boundary = multer::parse_boundary(&content_type).map_err(|_| {
        ApiError::invalid_argument(
            "the body must be multipart/form-data with a boundary: a \"path\" part, \
             then a \"file\" part with the bytes",
        )
    })?;
    let envd = envd(api, id)?;
    let mut request = ex.take_request()?;
    // multer parses a `Send` stream; the request body reader is not `Send`,
    // so a thread of its own reads it and hands the pieces over, a few at a
    // time (the client is not read faster than the guest takes the file).
    let (pieces, received) = std::sync::mpsc::sync_channel::<std::io::Result<bytes::Bytes>>(4);
    let result = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let body = request.as_reader();
            loop {
                let mut buf = vec![0u8; UPLOAD_CHUNK];
                let piece = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        Ok(bytes::Bytes::from(buf))
                    }
                    Err(err) => Err(err),
                };
                let failed = piece.is_err();
                if pieces.send(piece).is_err() || failed {
                    break;
                }
            }
            request
        });
        let chunks = futures::stream::iter(received);
        let written = write_parts(&envd, multer::Multipart::new(chunks, boundary));
        (reader.join(), written)
    });
    let (Ok(request), written) = result else {
        return Err(ApiError::internal("the upload's reader thread failed"));
    };
    let response = match written {
        Ok(()) => wrenn_http::tiny_http::Response::empty(204).boxed(),
        Err(err) => wrenn_http::error_response(&present(err)).boxed(),
    };
    let _ = request.respond(response);
    Ok(Reply::Streamed)
}

/// Writes the `file` part of `parts` to the guest file its `path` part
/// names.
fn write_parts(envd: &EnvdClient, mut parts: multer::Multipart<'_>) -> Result<(), ApiError> {
    let mut path: Option<String> = None;
    let mut written = false;
    while let Some(field) =
        futures::executor::block_on(parts.next_field()).map_err(bad_multipart)?
    {
        match field.name() {
            Some("path") => {
                let text = futures::executor::block_on(field.text()).map_err(bad_multipart)?;
                path = Some(text.trim().to_owned());
            }
            Some("file") => {
                let Some(path) = path.as_deref() else {
                    return Err(ApiError::invalid_argument(
                        "the \"path\" part must come before the \"file\" part",
                    ));
                };
                let target = format!("/files?path={}", encode(path));
                let mut reader = FieldReader {
                    field,
                    pending: bytes::Bytes::new(),
                };
                let response = envd
                    .forward(
                        "PUT",
                        &target,
                        Some("application/octet-stream"),
                        Some(&mut reader),
                    )
                    .map_err(SandboxError::from)?;
                if response.status() >= 300 {
                    return Err(super::proxy::envd_error(response));
                }
                written = true;
            }
            _ => {
                futures::executor::block_on(field.bytes()).map_err(bad_multipart)?;
            }
        }
    }
    match written {
        true => Ok(()),
        false => Err(ApiError::invalid_argument(
            "the multipart body has no \"file\" part: send the path, then the file",
        )),
    }
}

fn bad_multipart(err: multer::Error) -> ApiError {
    ApiError::invalid_argument(format!(
        "the multipart body is malformed ({err}): send a \"path\" part and a \"file\" part"
    ))
}

/// One multipart part as a `Read`, for the upload to envd.
struct FieldReader<'a> {
    field: multer::Field<'a>,
    pending: bytes::Bytes,
}

impl Read for FieldReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.is_empty() {
            match futures::executor::block_on(self.field.chunk()) {
                Ok(Some(chunk)) => self.pending = chunk,
                Ok(None) => return Ok(0),
                Err(err) => return Err(std::io::Error::other(err.to_string())),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions("directory", 0o755), "drwxr-xr-x");
        assert_eq!(permissions("file", 0o640), "-rw-r-----");
        assert_eq!(permissions("symlink", 0o777), "lrwxrwxrwx");
    }

    #[test]
    fn sdk_codes_follow_the_kind_of_error() {
        let shown = present(ApiError::invalid_argument("x"));
        assert_eq!((shown.code_str(), shown.status()), ("invalid_request", 400));
        let shown = present(ApiError::conflict("x").with_detail(INVALID_STATE));
        assert_eq!((shown.code_str(), shown.status()), ("invalid_state", 409));
        let shown = present(ApiError::unavailable("x").with_detail(AGENT_ERROR));
        assert_eq!((shown.code_str(), shown.status()), ("agent_error", 502));
        let shown = present(ApiError::not_found("x"));
        assert_eq!((shown.code_str(), shown.status()), ("not_found", 404));
        let shown = present(ApiError::unauthorized("x"));
        assert_eq!((shown.code_str(), shown.status()), ("unauthorized", 401));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("/a b/c&d"), "/a%20b/c%26d");
    }
}
