//! Handlers for `/v1/sandboxes`: create, list, get, destroy, timeout, logs
//! and exec.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use lmdb_schema::{SandboxId, SandboxRecord, TimeoutAction};
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Reply};

use super::{Api, Wire};
use crate::fleet::Caller;
use crate::sandbox::{CreateRequest, SandboxError};

/// Largest console log returned by `/logs`.
const LOG_LIMIT: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default = "default_template")]
    template: String,
    /// Default 1; a snapshot's own.
    vcpus: Option<u32>,
    /// Default 512; a snapshot's own.
    memory_mb: Option<u32>,
    timeout_s: Option<u64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "default_internet")]
    internet: bool,
    #[serde(default)]
    timeout_action: TimeoutActionBody,
    /// Placement constraints in a fleet: only nodes with these labels.
    #[serde(default)]
    #[allow(dead_code)]
    node_labels: BTreeMap<String, String>,
}

/// `kill` (default) destroys a sandbox when its time is up; `pause` pauses it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TimeoutActionBody {
    #[default]
    Kill,
    Pause,
}

fn default_template() -> String {
    "base".into()
}
fn default_internet() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout_s: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    #[serde(default = "default_exec_timeout")]
    timeout_s: u64,
    stdin: Option<String>,
}

fn default_exec_timeout() -> u64 {
    60
}

/// The JSON shape of a sandbox.
pub fn sandbox_json(record: &SandboxRecord) -> Value {
    json!({
        "id": record.id.as_str(),
        "status": record.status.as_str(),
        "template": record.template.as_str(),
        "vcpus": record.vcpus,
        "memory_mb": record.memory_mb,
        "metadata": record.metadata,
        "internet": record.internet,
        "address": record
            .slot
            .and_then(|slot| crate::network::addr::SlotAddrs::new(slot.0).ok())
            .map(|addrs| addrs.host_ip.to_string()),
        "created_at": timestamp(record.created_at_ms),
        "expires_at": record.expires_at_ms.map(timestamp),
        "timeout_action": record.timeout_action.as_str(),
        "error": record.error,
    })
}

fn timestamp(ms: u64) -> String {
    wrenn_http::timefmt::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

pub(super) fn parse_id(id: &str) -> Result<SandboxId, ApiError> {
    SandboxId::parse(id).map_err(|_| SandboxError::NotFound(id.to_owned()).into())
}

/// `POST /v1/sandboxes` and `/v1/capsules`: in a fleet, placed on a node
/// ([`super::fleet::place`]) unless another node placed it here.
pub fn create(
    api: &Api,
    ex: &mut Exchange,
    wire: Wire,
    caller: &Caller,
) -> Result<Reply, ApiError> {
    let raw = ex.json_bytes()?;
    match &api.fleet {
        Some(fleet) if !caller.placed => super::fleet::place(api, fleet, &raw, wire, caller, ex),
        _ => {
            let record = create_here(api, &raw, wire, caller)?;
            Ok(Reply::Json(201, api.listed(wire.sandbox(&record))))
        }
    }
}

/// Creates the sandbox of body `raw` on this node, for `caller`'s owner,
/// within its quota.
pub(super) fn create_here(
    api: &Api,
    raw: &[u8],
    wire: Wire,
    caller: &Caller,
) -> Result<SandboxRecord, ApiError> {
    let mut request = match wire {
        Wire::Ours => create_request(api, raw)?,
        Wire::Sdk => super::capsules::create_request(api, raw)?,
    };
    request.owner = caller.owner.clone();
    if let (Some(fleet), Some(state)) = (&api.fleet, api.manager.node().drain_state()) {
        return Err(ApiError::unavailable(format!(
            "node {} is {state}: it takes no new sandboxes; create through another node, or \
             POST /v1/nodes/{}/undrain to take it back",
            fleet.node_name(),
            fleet.node_name()
        )));
    }
    // A snapshot another node has is fetched first (once, however many
    // creates ask).
    if let Some(fleet) = &api.fleet {
        api.fetcher.ensure(api, fleet, &request.template, caller)?;
    }
    // Another owner's snapshot is not there for this caller.
    if let Ok(snapshot) = api.manager.snapshots().get(&request.template) {
        if !caller.may_see(snapshot.record.owner.as_deref()) {
            return Err(SandboxError::TemplateNotFound(request.template).into());
        }
    }
    super::fleet::check_quota(api, caller, &request)?;
    Ok(api.manager.create(request)?)
}

fn create_request(api: &Api, raw: &[u8]) -> Result<CreateRequest, ApiError> {
    let body: CreateBody = wrenn_http::parse_json(raw)?;
    Ok(CreateRequest {
        template: body.template,
        vcpus: body.vcpus,
        memory_mb: body.memory_mb,
        timeout_s: Some(body.timeout_s.unwrap_or(api.default_timeout_s)),
        idle_timeout_s: None,
        metadata: body.metadata,
        env: body.env,
        internet: body.internet,
        timeout_action: match body.timeout_action {
            TimeoutActionBody::Kill => TimeoutAction::Kill,
            TimeoutActionBody::Pause => TimeoutAction::Pause,
        },
        owner: None,
    })
}

/// `GET /v1/sandboxes` and `/v1/capsules`: the caller's sandboxes; in a
/// fleet, those of every node ([`super::fleet::list`]), each with its node.
pub fn list(api: &Api, ex: &mut Exchange, wire: Wire, caller: &Caller) -> Result<Reply, ApiError> {
    let status = ex.query().text("status")?.map(str::to_owned);
    let mut wanted_metadata = Vec::new();
    for key in ex.query().names() {
        if let Some(name) = key.strip_prefix("metadata.") {
            let value = ex.query().text(key)?.unwrap_or_default().to_owned();
            wanted_metadata.push((name.to_owned(), value));
        }
    }
    let sandboxes: Vec<Value> = api
        .manager
        .list()?
        .iter()
        .filter(|r| caller.may_see(r.owner.as_deref()))
        .filter(|r| status.as_deref().is_none_or(|s| r.status.as_str() == s))
        .filter(|r| {
            wanted_metadata
                .iter()
                .all(|(k, v)| r.metadata.get(k) == Some(v))
        })
        // The SDK's list has no stopped capsules (it polls GET for those)
        // and not the node's own warm-up helpers.
        .filter(|r| {
            wire == Wire::Ours
                || !(r.status.is_terminal() || crate::sandbox::warm::is_warm_helper(r))
        })
        .map(|r| api.listed(wire.sandbox(r)))
        .collect();
    let sandboxes = match &api.fleet {
        Some(fleet) if !caller.is_forwarded() => {
            super::fleet::list(fleet, ex, wire, caller, status.as_deref(), sandboxes)
        }
        _ => sandboxes,
    };
    Ok(Reply::Json(
        200,
        match wire {
            Wire::Ours => json!({ "sandboxes": sandboxes }),
            Wire::Sdk => Value::Array(sandboxes),
        },
    ))
}

pub fn get(api: &Api, id: &str, wire: Wire) -> Result<Reply, ApiError> {
    let record = api.manager.get(&parse_id(id)?)?;
    Ok(Reply::Json(200, api.listed(wire.sandbox(&record))))
}

pub fn destroy(api: &Api, id: &str) -> Result<Reply, ApiError> {
    api.manager.destroy(&parse_id(id)?)?;
    Ok(Reply::NoContent)
}

/// Pauses a sandbox, within the key's `paused` quota.
pub fn pause(api: &Api, id: &str, wire: Wire, caller: &Caller) -> Result<Reply, ApiError> {
    super::fleet::check(api, caller, crate::fleet::view::Ask::Pause)?;
    let record = api.manager.pause(&parse_id(id)?)?;
    Ok(Reply::Json(200, wire.sandbox(&record)))
}

pub fn resume(api: &Api, id: &str, wire: Wire) -> Result<Reply, ApiError> {
    let record = api.manager.resume(&parse_id(id)?)?;
    Ok(Reply::Json(200, wire.sandbox(&record)))
}

pub fn set_timeout(api: &Api, ex: &mut Exchange, id: &str) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    let body: TimeoutBody = ex.json()?;
    let record = api.manager.set_timeout(&id, body.timeout_s)?;
    Ok(Reply::Json(200, sandbox_json(&record)))
}

pub fn logs(api: &Api, ex: &mut Exchange, id: &str) -> Result<Reply, ApiError> {
    let log = api.manager.console_log(&parse_id(id)?, LOG_LIMIT)?;
    let request = ex.take_request()?;
    let response = wrenn_http::tiny_http::Response::from_data(log);
    let response = wrenn_http::with_header(response, "Content-Type", "text/plain; charset=utf-8");
    let _ = request.respond(response);
    Ok(Reply::Streamed)
}

pub fn exec(api: &Api, ex: &mut Exchange, id: &str) -> Result<Reply, ApiError> {
    let id = parse_id(id)?;
    let stream = ex.query().flag("stream", false)?;
    let body: ExecBody = ex.json()?;
    if body.cmd.trim().is_empty() {
        return Err(ApiError::invalid_argument(
            "cmd is empty: name the program to run, e.g. \"python3\"",
        ));
    }
    if body.timeout_s == 0 || body.timeout_s > 24 * 3600 {
        return Err(ApiError::invalid_argument(
            "timeout_s must be between 1 and 86400 seconds",
        ));
    }
    let mut process = json!({ "cmd": body.cmd, "args": body.args, "env": body.env });
    if let Some(cwd) = body.cwd {
        process["cwd"] = Value::String(cwd);
    }
    if let Some(user) = body.user {
        process["user"] = Value::String(user);
    }
    if stream {
        return exec_stream(api, ex, &id, process);
    }
    let stdin = body.stdin.map(String::into_bytes);
    let result = api
        .manager
        .exec(&id, process, stdin, Duration::from_secs(body.timeout_s))?;
    Ok(Reply::Json(200, json!(result)))
}

/// Passes envd's event stream through, event by event.
fn exec_stream(
    api: &Api,
    ex: &mut Exchange,
    id: &SandboxId,
    process: Value,
) -> Result<Reply, ApiError> {
    let envd = api.manager.envd(id)?;
    let body = process.to_string();
    let mut reader = body.as_bytes();
    let response = envd
        .forward(
            "POST",
            "/processes",
            Some("application/json"),
            Some(&mut reader),
        )
        .map_err(crate::sandbox::SandboxError::from)?;
    if response.status() >= 300 {
        return Err(super::proxy::envd_error(response));
    }
    super::proxy::pass_stream(ex.take_request()?, response);
    Ok(Reply::Streamed)
}
