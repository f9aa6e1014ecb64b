//! Handlers for `/v1/snapshots`: take, list, get and delete snapshot
//! templates. A key sees only its owner's snapshots. In a fleet a snapshot
//! is taken on the node holding its sandbox, its name is unique across the
//! fleet, lists show every node's (each with its `node`), and a get or
//! delete reaches the node that holds it.

use std::time::{Duration, UNIX_EPOCH};

use lmdb_schema::SandboxId;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Reply};

use super::fleet::NodeCall;
use super::Api;
use crate::fleet::{Caller, Gossip, Member};
use crate::sandbox::{SandboxError, Snapshot, SnapshotRequest};

/// How long another node may take to take a snapshot (pausing a VM and
/// storing its memory) or to answer a list.
const NODE_CALL: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    sandbox_id: String,
    name: Option<String>,
}

/// The JSON shape of a snapshot template.
pub fn snapshot_json(snapshot: &Snapshot) -> Value {
    let record = &snapshot.record;
    json!({
        "name": record.name.as_str(),
        "type": "snapshot",
        "vcpus": record.vcpus,
        "memory_mb": record.memory_mb,
        "size_bytes": record.size_bytes,
        "sandbox_id": record.parent_sandbox.as_ref().map(SandboxId::as_str),
        "created_at": wrenn_http::timefmt::rfc3339(
            UNIX_EPOCH + Duration::from_millis(record.created_at_ms)
        ),
        "used_by": snapshot.users.iter().map(SandboxId::as_str).collect::<Vec<_>>(),
        // A warm snapshot is the node's own (docs/image.md): not deletable.
        "platform": crate::sandbox::is_warm_name(record.name.as_str()),
        "protected": crate::sandbox::is_warm_name(record.name.as_str()),
        "metadata": {},
    })
}

/// A base image in the shape of a template: the node's own, so
/// `platform` and `protected` (it cannot be deleted through the API).
pub fn base_json(name: &str) -> Value {
    json!({
        "name": name,
        "type": "base",
        "platform": true,
        "protected": true,
        "metadata": {},
    })
}

pub fn create(api: &Api, ex: &mut Exchange, caller: &Caller) -> Result<Reply, ApiError> {
    let overwrite = ex.query().flag("overwrite", false)?;
    let raw = ex.json_bytes()?;
    let body: SnapshotBody = wrenn_http::parse_json(&raw)?;
    let sandbox_id = super::sandboxes::parse_id(&body.sandbox_id)?;
    if let Some(fleet) = &api.fleet {
        let others: Vec<Member> = fleet
            .members()
            .into_iter()
            .filter(|m| m.name != fleet.node_name())
            .collect();
        // Taken where the sandbox is.
        if !caller.is_forwarded() && api.manager.get(&sandbox_id).is_err() {
            let holder = others
                .iter()
                .find(|m| m.sandbox(sandbox_id.as_str()).is_some())
                .cloned()
                .or_else(|| {
                    let path = format!("/v1/sandboxes/{sandbox_id}");
                    super::fleet::locate(fleet, &path, &others)
                });
            if let Some(holder) = holder {
                let call = call("POST", ex, Some(&raw));
                return Ok(send(api, fleet, &holder, &call, caller));
            }
        }
        if let Some(name) = &body.name {
            // Replacing a snapshot replaces its copies: they go first,
            // once no sandbox of any node uses it.
            let here = api.manager.snapshots().get(name).is_ok();
            if overwrite && here {
                api.check_owner(caller, sandbox_id.as_str())?;
                let users = own(api, name, caller)?.users;
                let copies = copies_elsewhere(fleet, name, here);
                delete_copies(fleet, name, caller, &copies, &users)?;
            }
            let others: Vec<&Member> = match overwrite && here {
                true => Vec::new(),
                false => others.iter().collect(),
            };
            if let Some(other) = others.iter().find(|m| m.has_template(name)) {
                return Err(ApiError::conflict(format!(
                    "a template named {name} exists on node {}: snapshot names are unique \
                     across the fleet; choose another name",
                    other.name
                )));
            }
        }
    }
    api.check_owner(caller, sandbox_id.as_str())?;
    super::fleet::check(api, caller, crate::fleet::view::Ask::Snapshot)?;
    let snapshot = api.manager.snapshots().create(SnapshotRequest {
        sandbox_id,
        name: body.name,
        overwrite,
    })?;
    Ok(Reply::Json(201, api.listed(snapshot_json(&snapshot))))
}

/// `call` sent on to `member`, its answer answered.
fn send(api: &Api, fleet: &Gossip, member: &Member, call: &NodeCall, caller: &Caller) -> Reply {
    api.counters
        .forwarded
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match call.send(fleet, member, caller) {
        (204, _) => Reply::NoContent,
        (status, body) => Reply::Json(status, body),
    }
}

/// A call sent on to the node that holds what it is about.
fn call<'a>(method: &'a str, ex: &'a Exchange, body: Option<&'a [u8]>) -> NodeCall<'a> {
    NodeCall {
        method,
        path: ex.path(),
        target: ex.url().unwrap_or(ex.path()),
        placed: false,
        body,
        timeout: NODE_CALL,
    }
}

/// The snapshot `name` as this node holds it, if the caller may see it.
fn own(api: &Api, name: &str, caller: &Caller) -> Result<Snapshot, ApiError> {
    let snapshot = api.manager.snapshots().get(name)?;
    match caller.may_see(snapshot.record.owner.as_deref()) {
        true => Ok(snapshot),
        false => Err(SandboxError::TemplateNotFound(name.to_owned()).into()),
    }
}

/// The fleet, and the other node that holds snapshot `name` when this
/// one does not.
fn holder<'a>(api: &'a Api, name: &str, caller: &Caller) -> Option<(&'a Gossip, Member)> {
    let fleet = api.fleet.as_ref().filter(|_| !caller.is_forwarded())?;
    if api.manager.snapshots().get(name).is_ok() {
        return None;
    }
    let members = fleet.members();
    let gossiped = members.iter().find(|m| {
        m.name != fleet.node_name()
            && m.published
                .get(&format!("tpl:{name}"))
                .is_some_and(|v| v.starts_with("snapshot|"))
    });
    let member = match gossiped {
        Some(m) => m.clone(),
        None => super::fleet::locate(fleet, &format!("/v1/snapshots/{name}"), &members)?,
    };
    Some((fleet, member))
}

/// A bare array, as the SDK reads it: base images, then snapshots;
/// `?type=base` or `?type=snapshot` keeps one kind.
pub fn list(api: &Api, ex: &Exchange, caller: &Caller) -> Result<Reply, ApiError> {
    let kind = ex.query().text("type")?;
    let (bases, snapshots) = match kind {
        None => (true, true),
        Some("base") => (true, false),
        Some("snapshot") => (false, true),
        Some(other) => {
            return Err(ApiError::invalid_argument(format!(
                "type is {other:?}: use type=base or type=snapshot, or leave it out for both"
            )))
        }
    };
    let mut listed: Vec<Value> = Vec::new();
    if bases {
        let names = api.manager.node().templates().list();
        listed.extend(names.iter().map(|name| base_json(name.as_str())));
    }
    if snapshots {
        listed.extend(
            api.manager
                .snapshots()
                .list()?
                .iter()
                .filter(|s| caller.may_see(s.record.owner.as_deref()))
                .map(|s| api.listed(snapshot_json(s))),
        );
        if let Some(fleet) = api.fleet.as_ref().filter(|_| !caller.is_forwarded()) {
            let path = ex.path();
            let call = NodeCall {
                method: "GET",
                path,
                target: &format!("{path}?type=snapshot"),
                placed: false,
                body: None,
                timeout: NODE_CALL,
            };
            let members = fleet.members();
            let answers = super::fleet::ask_others(fleet, &members, &call, caller);
            for (member, (status, body)) in answers {
                match body.as_array().filter(|_| status == 200) {
                    // A snapshot copied to other nodes is listed once.
                    Some(theirs) => {
                        for snapshot in theirs {
                            if !listed.iter().any(|s| s["name"] == snapshot["name"]) {
                                listed.push(snapshot.clone());
                            }
                        }
                    }
                    None => {
                        tracing::warn!(node = %member.name, status, "a node did not list its snapshots")
                    }
                }
            }
        }
    }
    Ok(Reply::Json(200, Value::Array(listed)))
}

pub fn get(api: &Api, ex: &Exchange, name: &str, caller: &Caller) -> Result<Reply, ApiError> {
    if let Some((fleet, holder)) = holder(api, name, caller) {
        return Ok(send(api, fleet, &holder, &call("GET", ex, None), caller));
    }
    Ok(Reply::Json(
        200,
        api.listed(snapshot_json(&own(api, name, caller)?)),
    ))
}

/// Deletes snapshot `name` (refused while sandboxes use it); in a fleet,
/// on every node it was copied to, once no sandbox on any of them uses it.
pub fn delete(api: &Api, name: &str, caller: &Caller) -> Result<Reply, ApiError> {
    let here = api.manager.snapshots().get(name).is_ok();
    if let Some(fleet) = api.fleet.as_ref().filter(|_| !caller.is_forwarded()) {
        let copies = copies_elsewhere(fleet, name, here);
        if !here && copies.is_empty() {
            return Err(SandboxError::SnapshotNotFound(name.to_owned()).into());
        }
        let users = match here {
            true => own(api, name, caller)?.users,
            false => Vec::new(),
        };
        let deleted = delete_copies(fleet, name, caller, &copies, &users)?;
        if !here {
            // Gossip a second behind may name holders that deleted it.
            return match deleted {
                0 => Err(SandboxError::SnapshotNotFound(name.to_owned()).into()),
                _ => Ok(Reply::NoContent),
            };
        }
    }
    own(api, name, caller)?;
    api.manager.snapshots().delete(name)?;
    Ok(Reply::NoContent)
}

/// The other live nodes that hold snapshot `name` (by gossip; asked of
/// every node when gossip knows none and this node lacks it).
fn copies_elsewhere(fleet: &Gossip, name: &str, here: bool) -> Vec<Member> {
    let members = fleet.members();
    let copies: Vec<Member> = members
        .iter()
        .filter(|m| m.name != fleet.node_name() && m.snapshot_digest(name).is_some())
        .cloned()
        .collect();
    if !copies.is_empty() || here {
        return copies;
    }
    super::fleet::locate(fleet, &format!("/v1/snapshots/{name}"), &members)
        .into_iter()
        .collect()
}

/// Deletes snapshot `name` on `copies`, after checking that no sandbox
/// uses it, neither on any of them nor here (`users_here`): a 409 naming
/// them, and nothing deleted, when one does. This node's own copy is the
/// caller's to delete. The copies deleted.
fn delete_copies(
    fleet: &Gossip,
    name: &str,
    caller: &Caller,
    copies: &[Member],
    users_here: &[SandboxId],
) -> Result<usize, ApiError> {
    let path = format!("/v1/snapshots/{name}");
    let on = |method| NodeCall {
        method,
        path: &path,
        target: &path,
        placed: false,
        body: None,
        timeout: NODE_CALL,
    };
    let answers = super::fleet::ask_others(fleet, copies, &on("GET"), caller);
    let mut users = Vec::new();
    if !users_here.is_empty() {
        let ids: Vec<&str> = users_here.iter().map(SandboxId::as_str).collect();
        users.push(format!("{} on node {}", ids.join(", "), fleet.node_name()));
    }
    for (member, (status, body)) in &answers {
        match status {
            200 => {
                let used: Vec<&str> = body["used_by"]
                    .as_array()
                    .map(|u| u.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !used.is_empty() {
                    users.push(format!("{} on node {}", used.join(", "), member.name));
                }
            }
            404 => {}
            _ => return Err(answer_error(*status, body)),
        }
    }
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "cannot delete snapshot {name}: sandboxes made from it still exist ({}); destroy \
             them first",
            users.join("; ")
        )));
    }
    let delete = on("DELETE");
    let mut deleted = 0;
    for (member, (status, _)) in answers {
        if status != 200 {
            continue;
        }
        match delete.send(fleet, member, caller) {
            (204, _) => deleted += 1,
            (404, _) => {}
            (status, body) => return Err(answer_error(status, &body)),
        }
    }
    Ok(deleted)
}

/// Another node's error answer, passed on.
fn answer_error(status: u16, body: &Value) -> ApiError {
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| format!("another node answered {status}"), str::to_owned);
    match status {
        404 => ApiError::not_found(message),
        409 => ApiError::conflict(message),
        400..=499 => ApiError::invalid_argument(message),
        _ => ApiError::unavailable(message),
    }
}
