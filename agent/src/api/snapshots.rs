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

pub fn list(api: &Api) -> Result<Reply, ApiError> {
    let snapshots: Vec<Value> = api
        .manager
        .snapshots()
        .list()?
        .iter()
        .map(snapshot_json)
        .collect();
    Ok(Reply::Json(200, json!({ "snapshots": snapshots })))
}

pub fn get(api: &Api, name: &str) -> Result<Reply, ApiError> {
    let snapshot = api.manager.snapshots().get(name)?;
    Ok(Reply::Json(200, snapshot_json(&snapshot)))
}

pub fn delete(api: &Api, name: &str) -> Result<Reply, ApiError> {
    api.manager.snapshots().delete(name)?;
    Ok(Reply::NoContent)
}
