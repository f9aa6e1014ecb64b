//! Drain: a node's sandboxes moved to the other nodes of its fleet
//! (`docs/fleet.md`, "Drain").
//!
//! - `POST /v1/nodes/{name}/drain` (an operator's key, on any node; sent
//!   on to `name`): the node marks itself `draining` (gossiped: placement
//!   passes it by, and it refuses creates), then for each sandbox: pauses
//!   it if it runs, picks a node as placement would (room, the template or
//!   a way to fetch it), and asks it to take the sandbox; that node
//!   fetches the sandbox's files from this one and resumes it; this node
//!   then forgets it. The id stays the same. Once every sandbox has moved,
//!   the node is `drained` (kept across restarts) and answers which went
//!   where; a sandbox that could not move stays here, as it was, and the
//!   answer (503) says why; POSTing again retries.
//! - `POST /v1/nodes/{name}/undrain`: the node takes sandboxes again.
//!
//! Between the nodes only (signed node calls):
//! - `GET /v1/fleet/sandboxes/{id}`: the [`MoveBundle`] of a moving sandbox;
//! - `GET /v1/fleet/sandboxes/{id}/files/{sha256}`: one of its files, with
//!   `Range`, as snapshot files are served (`api/transfer.rs`);
//! - `POST /v1/fleet/sandboxes/{id}/adopt` `{"from": NODE}`: take the
//!   sandbox `NODE` is moving: fetch, move in, resume if it ran.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use lmdb_schema::{SandboxId, SandboxStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Reply};

use super::fleet::NodeCall;
use super::Api;
use crate::fleet::{Caller, Gossip, Member};
use crate::sandbox::moving::MoveBundle;
use crate::sandbox::SandboxError;

/// How long another node may take to drain (every sandbox moved).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a node may take to take one sandbox (fetch and resume).
const ADOPT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a node may take to answer for a bundle.
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Drain states, as `GET /v1/nodes` and gossip show them.
const DRAINING: &str = "draining";
const DRAINED: &str = "drained";

/// Only an operator (a node key) drains: a fleet key's owner sees only its
/// own sandboxes, and a drain moves everyone's.
fn operator_only<'a>(api: &'a Api, caller: &Caller) -> Result<&'a Gossip, ApiError> {
    if caller.key.is_some() {
        return Err(ApiError::permission_denied(
            "draining a node moves every owner's sandboxes: use a node key ([api] key_hashes), \
             not a key of the fleet manifest",
        ));
    }
    api.fleet.as_deref().ok_or_else(|| {
        ApiError::invalid_argument(
            "this node is in no fleet: there is no other node to move its sandboxes to; give \
             it a fleet manifest (docs/fleet.md)",
        )
    })
}

/// The member named `name`, or a 404 naming the members.
fn member(fleet: &Gossip, name: &str) -> Result<Member, ApiError> {
    let members = fleet.members();
    members
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
            ApiError::not_found(format!(
                "no node named {name} in the fleet (its nodes: {}): see GET /v1/nodes",
                names.join(", ")
            ))
        })
}

/// `call` to node `name`'s API, answered as it answered.
fn send_on(
    fleet: &Gossip,
    name: &str,
    path: &str,
    timeout: Duration,
    caller: &Caller,
) -> Result<Reply, ApiError> {
    let target = member(fleet, name)?;
    if !target.is_live() {
        return Err(ApiError::unavailable(format!(
            "node {name} is {}: start it again, then retry",
            target.state
        )));
    }
    let call = NodeCall {
        method: "POST",
        path,
        target: path,
        placed: false,
        body: None,
        timeout,
    };
    let (status, body) = call.send(fleet, &target, caller);
    Ok(Reply::Json(status, body))
}

/// `POST /v1/nodes/{name}/drain`.
pub(super) fn drain(api: &Api, name: &str, caller: &Caller) -> Result<Reply, ApiError> {
    let fleet = operator_only(api, caller)?;
    if name != fleet.node_name() {
        let path = format!("/v1/nodes/{name}/drain");
        return send_on(fleet, name, &path, DRAIN_TIMEOUT, caller);
    }
    let node = api.manager.node();
    node.set_drain_state(Some(DRAINING))?;
    tracing::info!(node = name, "draining: moving every sandbox to other nodes");
    let sandboxes: Vec<_> = api
        .manager
        .list()?
        .into_iter()
        .filter(|r| !r.status.is_terminal() && !crate::sandbox::warm::is_warm_helper(r))
        .collect();
    let mut moved = Vec::new();
    let mut failed = Vec::new();
    for record in sandboxes {
        match move_one(api, fleet, &record.id) {
            Ok(to) => moved.push(json!({"id": record.id.as_str(), "to": to})),
            Err(why) => {
                tracing::warn!(sandbox = %record.id, "cannot move the sandbox: {why}");
                failed.push(format!("{}: {why}", record.id));
            }
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::unavailable(format!(
            "node {name} is draining: {} sandboxes moved, {} not ({}); it takes no new \
             sandboxes meanwhile: fix what is said and POST /v1/nodes/{name}/drain again, or \
             undrain it",
            moved.len(),
            failed.len(),
            failed.join("; ")
        ))
        .with_detail("drain_incomplete"));
    }
    node.set_drain_state(Some(DRAINED))?;
    tracing::info!(node = name, moved = moved.len(), "drained");
    Ok(Reply::Json(
        200,
        json!({"node": name, "state": DRAINED, "moved": moved}),
    ))
}

/// Moves sandbox `id` to another node: the name of the node it went to.
fn move_one(api: &Api, fleet: &Gossip, id: &SandboxId) -> Result<String, String> {
    let record = api.manager.get(id).map_err(|e| e.to_string())?;
    let was_running = match record.status {
        SandboxStatus::Running => {
            api.manager
                .pause(id)
                .map_err(|e| format!("cannot pause it: {e}"))?;
            true
        }
        SandboxStatus::Paused => false,
        other => {
            return Err(format!(
                "it is {other}: only running and paused sandboxes move"
            ))
        }
    };
    let members = fleet.members();
    let (targets, refusals) = super::fleet::candidates(
        &members,
        record.template.as_str(),
        record.memory_mb,
        &BTreeMap::new(),
    );
    let targets: Vec<&Member> = targets
        .into_iter()
        .filter(|m| m.name != fleet.node_name())
        .collect();
    let mut went = None;
    let outcome = api.manager.move_out(id, was_running, |_| {
        if targets.is_empty() {
            return Err(format!("no node can take it ({})", refusals.join("; ")));
        }
        let path = format!("/v1/fleet/sandboxes/{id}/adopt");
        let body =
            serde_json::to_vec(&json!({"from": fleet.node_name()})).map_err(|e| e.to_string())?;
        let call = NodeCall {
            method: "POST",
            path: &path,
            target: &path,
            placed: false,
            body: Some(&body),
            timeout: ADOPT_TIMEOUT,
        };
        let mut why = Vec::new();
        for target in &targets {
            match call.send(fleet, target, &Caller::operator()) {
                (200, _) => {
                    went = Some(target.name.clone());
                    return Ok(());
                }
                (status, body) => why.push(format!(
                    "{} answered {status}: {}",
                    target.name,
                    body["error"]["message"].as_str().unwrap_or("?")
                )),
            }
        }
        Err(why.join("; "))
    });
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(e) => Some(e.to_string()),
    };
    match (failure, went) {
        (None, Some(to)) => {
            tracing::info!(sandbox = %id, to, "sandbox moved");
            Ok(to)
        }
        (failure, _) => {
            // It stays here, as it was.
            if was_running {
                if let Err(e) = api.manager.resume(id) {
                    tracing::error!(sandbox = %id, error = %e, "cannot resume a sandbox that did not move");
                }
            }
            Err(failure.unwrap_or_else(|| "no node took it".into()))
        }
    }
}

/// `POST /v1/nodes/{name}/undrain`.
pub(super) fn undrain(api: &Api, name: &str, caller: &Caller) -> Result<Reply, ApiError> {
    let fleet = operator_only(api, caller)?;
    if name != fleet.node_name() {
        let path = format!("/v1/nodes/{name}/undrain");
        return send_on(fleet, name, &path, BUNDLE_TIMEOUT, caller);
    }
    api.manager.node().set_drain_state(None)?;
    tracing::info!(node = name, "undrained: taking sandboxes again");
    Ok(Reply::Json(200, json!({"node": name, "state": "live"})))
}

fn parse_id(id: &str) -> Result<SandboxId, ApiError> {
    super::sandboxes::parse_id(id)
}

/// `GET /v1/fleet/sandboxes/{id}`.
pub(super) fn bundle(api: &Api, id: &str, caller: &Caller) -> Result<Reply, ApiError> {
    super::transfer::node_only(api, caller)?;
    let bundle = api.manager.moving(&parse_id(id)?)?;
    let body = serde_json::to_value(&bundle)
        .map_err(|e| ApiError::internal(format!("cannot encode the move of {id}: {e}")))?;
    Ok(Reply::Json(200, body))
}

/// `GET /v1/fleet/sandboxes/{id}/files/{sha256}`.
pub(super) fn file(
    api: &Api,
    ex: &Exchange,
    id: &str,
    sha256: &str,
    caller: &Caller,
) -> Result<Reply, ApiError> {
    super::transfer::node_only(api, caller)?;
    let (path, size) = api.manager.moving_file(&parse_id(id)?, sha256)?;
    super::transfer::serve(api, ex, &path, size)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdoptBody {
    from: String,
}

/// `POST /v1/fleet/sandboxes/{id}/adopt`.
pub(super) fn adopt(
    api: &Api,
    ex: &mut Exchange,
    id: &str,
    caller: &Caller,
) -> Result<Reply, ApiError> {
    super::transfer::node_only(api, caller)?;
    let fleet = operator_only(api, caller)?;
    let id = parse_id(id)?;
    let body: AdoptBody = wrenn_http::parse_json(&ex.json_bytes()?)?;
    if let Some(state) = api.manager.node().drain_state() {
        return Err(ApiError::unavailable(format!(
            "node {} is {state}: it takes no sandboxes",
            fleet.node_name()
        )));
    }
    let source = member(fleet, &body.from)?;
    let path = format!("/v1/fleet/sandboxes/{id}");
    let call = NodeCall {
        method: "GET",
        path: &path,
        target: &path,
        placed: false,
        body: None,
        timeout: BUNDLE_TIMEOUT,
    };
    let bundle: MoveBundle = match call.send(fleet, &source, &Caller::operator()) {
        (200, body) => serde_json::from_value(body).map_err(|e| {
            ApiError::unavailable(format!("node {} sent a bad move bundle: {e}", source.name))
        })?,
        (status, body) => {
            return Err(ApiError::unavailable(format!(
                "node {} answered {status} for the move of {id}: {}",
                source.name,
                body["error"]["message"].as_str().unwrap_or("?")
            )))
        }
    };
    if bundle.record.id != id {
        return Err(ApiError::invalid_argument(format!(
            "node {} sent the move of {} for {id}",
            source.name, bundle.record.id
        )));
    }
    // Its template first: a snapshot this node lacks is fetched (its
    // layers then need not travel twice).
    api.fetcher.ensure(
        api,
        fleet,
        bundle.record.template.as_str(),
        &Caller::operator(),
    )?;
    let staging = api.manager.incoming_dir().join(format!("sbx-{id}"));
    fs::create_dir_all(&staging)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", staging.display())))?;
    for file in &bundle.files {
        api.fetcher
            .fetch_file(api, fleet, &source, &path, &staging, file)
            .map_err(|why| {
                ApiError::unavailable(format!(
                    "the move of {id} from {} stopped: {why}; it is retried from where it \
                     stopped",
                    source.name
                ))
            })?;
    }
    let moved = api.manager.move_in(&bundle, &staging, &source.name);
    let _ = fs::remove_dir_all(&staging);
    let record = moved?;
    if bundle.was_running {
        if let Err(e) = api.manager.resume(&id) {
            // The node it came from keeps it: this copy goes.
            if let Err(gone) = api.manager.destroy(&id) {
                tracing::error!(sandbox = %id, error = %gone, "cannot remove a sandbox that did not resume");
            }
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} moved in but did not resume here: {e}"
            ))
            .into());
        }
    }
    let record = api.manager.get(&id).unwrap_or(record);
    Ok(Reply::Json(
        200,
        api.listed(super::sandboxes::sandbox_json(&record)),
    ))
}

/// What a node's drain state is, for `GET /v1/node`.
pub(super) fn state_json(api: &Api) -> Value {
    match api.manager.node().drain_state() {
        Some(state) => Value::String(state),
        None => Value::Null,
    }
}
