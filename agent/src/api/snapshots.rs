//! Handlers for `/v1/snapshots`: take, list, get and delete snapshot
//! templates.

use std::time::{Duration, UNIX_EPOCH};

use lmdb_schema::SandboxId;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Reply};

use super::Api;
use crate::sandbox::{Snapshot, SnapshotRequest};

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

pub fn create(api: &Api, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let overwrite = ex.query().flag("overwrite", false)?;
    let body: SnapshotBody = ex.json()?;
    let sandbox_id = super::sandboxes::parse_id(&body.sandbox_id)?;
    let snapshot = api.manager.snapshots().create(SnapshotRequest {
        sandbox_id,
        name: body.name,
        overwrite,
    })?;
    Ok(Reply::Json(201, snapshot_json(&snapshot)))
}

/// A bare array, as the SDK reads it: base images, then snapshots;
/// `?type=base` or `?type=snapshot` keeps one kind.
pub fn list(api: &Api, ex: &Exchange) -> Result<Reply, ApiError> {
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
        listed.extend(api.manager.snapshots().list()?.iter().map(snapshot_json));
    }
    Ok(Reply::Json(200, Value::Array(listed)))
}

pub fn get(api: &Api, name: &str) -> Result<Reply, ApiError> {
    let snapshot = api.manager.snapshots().get(name)?;
    Ok(Reply::Json(200, snapshot_json(&snapshot)))
}

pub fn delete(api: &Api, name: &str) -> Result<Reply, ApiError> {
    api.manager.snapshots().delete(name)?;
    Ok(Reply::NoContent)
}
