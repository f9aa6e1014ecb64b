//! The node's HTTP API (`docs/api.md`): authentication, routing, JSON shapes.
//!
//! Handlers validate input and call [`Manager`]; they never touch a VM, the
//! network or LMDB themselves. Calls on a sandbox's processes and files are
//! forwarded to its envd ([`proxy`]).

mod proxy;
mod sandboxes;
mod snapshots;

use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wrenn_http::{ApiError, Exchange, Handler, Method, Reply};

use crate::runtime::probe::HostProbe;
use crate::sandbox::Manager;

/// State every handler sees.
pub struct Api {
    pub manager: Arc<Manager>,
    pub node_name: String,
    pub probe: HostProbe,
    /// SHA-256 (hex) of accepted API keys; empty means open (loopback only).
    pub key_hashes: Vec<String>,
    /// Timeout of a sandbox created without one.
    pub default_timeout_s: u64,
}

impl Api {
    fn authorize(&self, ex: &Exchange) -> Result<(), ApiError> {
        if self.key_hashes.is_empty() || ex.path() == "/v1/health" {
            return Ok(());
        }
        let key = ex
            .header("Authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| ex.header("X-API-Key"))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "this node needs an API key: send it as `Authorization: Bearer KEY`",
                )
            })?;
        let hash = hex::encode(Sha256::digest(key.trim().as_bytes()));
        if self
            .key_hashes
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&hash))
        {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "the API key is not valid for this node: check the key you send",
            ))
        }
    }

    fn route(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        let path = ex.path().to_owned();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = ex.method().clone();
        match (segments.as_slice(), &method) {
            (["v1", "health"], Method::Get) => Ok(Reply::Json(200, json!({"status": "ok"}))),
            (["v1", "node"], Method::Get) => self.node(),
            (["v1", "templates"], Method::Get) => self.templates(),
            (["v1", "sandboxes"], Method::Post) => sandboxes::create(self, ex),
            (["v1", "sandboxes"], Method::Get) => sandboxes::list(self, ex),
            (["v1", "sandboxes", id], Method::Get) => sandboxes::get(self, id),
            (["v1", "sandboxes", id], Method::Delete) => sandboxes::destroy(self, id),
            (["v1", "sandboxes", id, "timeout"], Method::Post) => {
                sandboxes::set_timeout(self, ex, id)
            }
            (["v1", "sandboxes", id, "logs"], Method::Get) => sandboxes::logs(self, ex, id),
            (["v1", "sandboxes", id, "pause"], Method::Post) => sandboxes::pause(self, id),
            (["v1", "sandboxes", id, "resume"], Method::Post) => sandboxes::resume(self, id),
            (["v1", "sandboxes", id, "exec"], Method::Post) => sandboxes::exec(self, ex, id),
            (["v1", "sandboxes", id, "processes" | "files" | "fs", ..], _) => {
                proxy::forward(self, ex, id)
            }
            (["v1", "snapshots"], Method::Post) => snapshots::create(self, ex),
            (["v1", "snapshots"], Method::Get) => snapshots::list(self),
            (["v1", "snapshots", name], Method::Get) => snapshots::get(self, name),
            (["v1", "snapshots", name], Method::Delete) => snapshots::delete(self, name),
            (["v1", "health" | "node" | "templates" | "sandboxes" | "snapshots"], _)
            | (["v1", "snapshots", _], _)
            | (["v1", "sandboxes", _], _)
            | (["v1", "sandboxes", _, "timeout" | "logs" | "exec"], _) => Err(
                ApiError::method_not_allowed(method.as_str(), &path, allowed(&segments)),
            ),
            _ => Err(ApiError::not_found(format!(
                "no endpoint at {path}: see docs/api.md for the API"
            ))),
        }
    }

    fn node(&self) -> Result<Reply, ApiError> {
        let manager = &self.manager;
        let sandboxes = manager.list().map_err(ApiError::from)?;
        let live: Vec<_> = sandboxes
            .iter()
            .filter(|s| !s.status.is_terminal())
            .collect();
        let capacity = manager.node().capacity();
        let layers = manager.snapshots().layer_usage().map_err(ApiError::from)?;
        let unresumable: Vec<Value> = manager
            .node()
            .unresumable()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|(what, reason)| json!({"what": what, "reason": reason}))
            .collect();
        Ok(Reply::Json(
            200,
            json!({
                "name": self.node_name,
                "version": env!("CARGO_PKG_VERSION"),
                "runtime": {
                    "name": manager.node().runtime().name(),
                    "accel": self.probe.accel.as_str(),
                    "reason": self.probe.reason,
                    "warning": self.probe.warning,
                },
                "capacity": {
                    "vcpus": capacity.vcpus,
                    "memory_mb": capacity.memory_mb,
                },
                "layers": {
                    "io": manager.node().layer_io(),
                    "count": layers.layers,
                    "bytes": layers.bytes,
                    "files": layers.files,
                    "headers": layers.headers,
                },
                "unresumable": unresumable,
                "usage": {
                    "sandboxes": live.len(),
                    "vcpus": live.iter().map(|s| u64::from(s.vcpus)).sum::<u64>(),
                    "memory_mb": live.iter().map(|s| u64::from(s.memory_mb)).sum::<u64>(),
                },
            }),
        ))
    }

    /// Base images and snapshots, each with its `type`.
    fn templates(&self) -> Result<Reply, ApiError> {
        let mut templates: Vec<Value> = self
            .manager
            .node()
            .templates()
            .list()
            .into_iter()
            .map(|name| json!({"name": name.as_str(), "type": "base"}))
            .collect();
        templates.extend(
            self.manager
                .snapshots()
                .list()?
                .iter()
                .map(snapshots::snapshot_json),
        );
        Ok(Reply::Json(200, json!({ "templates": templates })))
    }
}

fn allowed(segments: &[&str]) -> &'static str {
    match segments {
        ["v1", "sandboxes"] | ["v1", "snapshots"] => "GET, POST",
        ["v1", "snapshots", _] => "GET, DELETE",
        ["v1", "sandboxes", _] => "GET, DELETE",
        ["v1", "sandboxes", _, "logs"] => "GET",
        ["v1", "sandboxes", _, _] => "POST",
        _ => "GET",
    }
}

impl Handler for Api {
    /// Creating a sandbox, running code and moving files take long: they
    /// run on their own threads, so quick calls never wait behind them.
    fn is_long_running(&self, method: &Method, path: &str) -> bool {
        let segments = path.trim_end_matches('/').split('/').count();
        let path = path.trim_end_matches('/');
        (path.starts_with("/v1/sandboxes/") && segments > 4)
            || (*method == Method::Post && (path == "/v1/sandboxes" || path == "/v1/snapshots"))
    }

    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        self.authorize(ex)?;
        self.route(ex)
    }
}
