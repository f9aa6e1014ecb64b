//! The node's HTTP API (`docs/api.md`): authentication, routing, JSON shapes.
//!
//! Handlers validate input and call [`Manager`]; they never touch a VM, the
//! network or LMDB themselves. Calls on a sandbox's processes and files are
//! forwarded to its envd ([`proxy`]).

mod activity;
mod capsules;
mod drain;
mod fleet;
mod ports;
mod prometheus;
mod proxy;
mod sandboxes;
mod snapshots;
mod sockets;
pub mod transfer;

use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wrenn_http::{ApiError, Exchange, Handler, Method, Reply, RequestHead, Takeover};

use crate::fleet::caller::{self, Caller};
use crate::runtime::probe::HostProbe;
use crate::sandbox::{Manager, WarmState};

/// State every handler sees.
pub struct Api {
    pub manager: Arc<Manager>,
    pub node_name: String,
    pub probe: HostProbe,
    /// The fleet's gossip, when the node has a manifest.
    pub fleet: Option<Arc<crate::fleet::Gossip>>,
    /// SHA-256 (hex) of the node's own API keys (`[api] key_hashes`): an
    /// operator's, seeing every sandbox. The fleet manifest's keys are
    /// accepted too, each seeing its owner's. No key at all: open
    /// (loopback only).
    pub key_hashes: Vec<String>,
    /// Counts for `/metrics`.
    pub counters: ApiCounters,
    /// Timeout of a sandbox created without one.
    pub default_timeout_s: u64,
    /// The SDK's defaults: template and template aliases.
    pub capsules: crate::config::CapsulesConfig,
    /// The port proxy's domain: `{port}-{id}.{domain}`.
    pub proxy_domain: String,
    /// Fetches snapshots from other nodes, and paces sending them.
    pub fetcher: transfer::Fetcher,
}

/// What the API counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct ApiCounters {
    /// Requests sent on to another node of the fleet.
    pub forwarded: std::sync::atomic::AtomicU64,
    /// Requests refused for a missing or wrong key or caller signature.
    pub auth_failures: std::sync::atomic::AtomicU64,
}

impl Api {
    fn authorize(&self, ex: &Exchange) -> Result<Caller, ApiError> {
        if matches!(ex.path(), "/v1/health" | "/openapi.json") {
            return Ok(Caller::operator());
        }
        self.caller(ex.method().as_str(), ex.path(), |name| ex.header(name))
    }

    /// Who makes a request: a caller forwarded by another node of the
    /// fleet (signed, [`caller`]), else the API key's, in `X-API-Key` or
    /// `Authorization: Bearer`.
    fn caller<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Result<Caller, ApiError> {
        let found = self.find_caller(method, path, header);
        if found.is_err() {
            self.counters
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    fn find_caller<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Result<Caller, ApiError> {
        let manifest = self.fleet.as_ref().map(|f| f.manifest());
        if let Some(value) = header(caller::HEADER) {
            let manifest = manifest.as_ref().ok_or_else(|| {
                ApiError::unauthorized(
                    "this node is in no fleet and takes no forwarded requests: send an API key",
                )
            })?;
            return caller::verify(manifest, value, method, path, crate::clock::now_ms())
                .map_err(ApiError::unauthorized);
        }
        let fleet_keys = manifest.as_ref().map_or(&[][..], |m| &m.keys[..]);
        if self.key_hashes.is_empty() && fleet_keys.is_empty() {
            return Ok(Caller::operator());
        }
        let key = header("Authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| header("X-API-Key"))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "this node needs an API key: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`",
                )
            })?;
        let hash = hex::encode(Sha256::digest(key.trim().as_bytes()));
        if self
            .key_hashes
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&hash))
        {
            return Ok(Caller::operator());
        }
        match fleet_keys.iter().find(|k| k.hash == hash) {
            Some(key) => Ok(Caller::of_key(key)),
            None => Err(ApiError::unauthorized(
                "the API key is not valid for this node: check the key you send",
            )),
        }
    }

    fn route(&self, ex: &mut Exchange, caller: &Caller) -> Result<Reply, ApiError> {
        let path = ex.path().to_owned();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = ex.method().clone();
        match segments.as_slice() {
            ["v1", "sandboxes", rest @ ..] => {
                self.sandbox_route(ex, Wire::Ours, rest, &path, caller)
            }
            ["v1", "capsules", rest @ ..] => self.sandbox_route(ex, Wire::Sdk, rest, &path, caller),
            ["v1", "health"] if method == Method::Get => {
                Ok(Reply::Json(200, json!({"status": "ok"})))
            }
            ["v1", "node"] if method == Method::Get => self.node(),
            ["openapi.json"] if method == Method::Get => openapi(),
            ["v1", "events", "stream"] if method == Method::Get => activity::stream(self, ex),
            ["v1", "nodes"] if method == Method::Get => self.nodes(),
            ["metrics"] if method == Method::Get => prometheus::metrics(self, ex),
            ["v1", "templates"] if method == Method::Get => self.templates(caller),
            ["v1", "snapshots"] if method == Method::Post => snapshots::create(self, ex, caller),
            ["v1", "fleet", "snapshots", name] if method == Method::Get => {
                transfer::bundle(self, name, caller)
            }
            ["v1", "fleet", "snapshots", name, "files", sha] if method == Method::Get => {
                transfer::file(self, ex, name, sha, caller)
            }
            ["v1", "nodes", name, "drain"] if method == Method::Post => {
                drain::drain(self, name, caller)
            }
            ["v1", "nodes", name, "undrain"] if method == Method::Post => {
                drain::undrain(self, name, caller)
            }
            ["v1", "fleet", "sandboxes", id] if method == Method::Get => {
                drain::bundle(self, id, caller)
            }
            ["v1", "fleet", "sandboxes", id, "files", sha] if method == Method::Get => {
                drain::file(self, ex, id, sha, caller)
            }
            ["v1", "fleet", "sandboxes", id, "adopt"] if method == Method::Post => {
                drain::adopt(self, ex, id, caller)
            }
            ["v1", "snapshots"] if method == Method::Get => snapshots::list(self, ex, caller),
            ["v1", "snapshots", name] if method == Method::Get => {
                snapshots::get(self, ex, name, caller)
            }
            ["v1", "snapshots", name] if method == Method::Delete => {
                snapshots::delete(self, name, caller)
            }
            ["v1", "health" | "node" | "templates" | "snapshots"]
            | ["v1", "snapshots", _]
            | ["v1", "events", "stream"]
            | ["metrics"]
            | ["v1", "nodes"]
            | ["v1", "nodes", _, "drain" | "undrain"]
            | ["v1", "fleet", "snapshots", _]
            | ["v1", "fleet", "snapshots", _, "files", _]
            | ["v1", "fleet", "sandboxes", _]
            | ["v1", "fleet", "sandboxes", _, "files", _]
            | ["v1", "fleet", "sandboxes", _, "adopt"] => Err(ApiError::method_not_allowed(
                method.as_str(),
                &path,
                allowed(&segments),
            )),
            _ => Err(not_found(&path)),
        }
    }

    /// The one routing table of sandbox operations, for both wires: the
    /// same `Manager` call answers `/v1/sandboxes/...` and
    /// `/v1/capsules/...`; only the shapes differ. `rest` is the path after
    /// the prefix.
    fn sandbox_route(
        &self,
        ex: &mut Exchange,
        wire: Wire,
        rest: &[&str],
        path: &str,
        caller: &Caller,
    ) -> Result<Reply, ApiError> {
        use Method::{Delete, Get, Post};
        use Wire::{Ours, Sdk};
        let method = ex.method().clone();
        match (rest, wire) {
            ([], _) | (["stats" | "usage"], Sdk) => {}
            ([id, ..], _) => self.check_owner(caller, id)?,
        }
        match (rest, &method, wire) {
            ([], Post, _) => sandboxes::create(self, ex, wire, caller),
            ([], Get, _) => sandboxes::list(self, ex, wire, caller),
            (["stats"], Get, Sdk) => activity::stats(self, ex),
            (["usage"], Get, Sdk) => activity::usage(self, ex),
            ([id], Get, _) => sandboxes::get(self, id, wire),
            ([id], Delete, _) => sandboxes::destroy(self, id),
            ([id, "pause"], Post, _) => sandboxes::pause(self, id, wire, caller),
            ([id, "resume"], Post, _) => sandboxes::resume(self, id, wire),
            ([id, "exec"], Post, Ours) => sandboxes::exec(self, ex, id),
            ([id, "exec"], Post, Sdk) => capsules::exec(self, ex, id),
            ([id, "timeout"], Post, Ours) => sandboxes::set_timeout(self, ex, id),
            ([id, "logs"], Get, Ours) => sandboxes::logs(self, ex, id),
            ([id, "processes" | "files" | "fs", ..], _, Ours) => proxy::forward(self, ex, id),
            ([id, "ping"], Post, Sdk) => capsules::ping(self, id),
            ([id, "metrics"], Get, Sdk) => activity::metrics(self, ex, id),
            ([id, "processes"], Get, Sdk) => capsules::processes(self, id),
            ([id, "processes", pid], Delete, Sdk) => capsules::kill(self, ex, id, pid),
            ([id, "files", op @ ..], Post, Sdk) if !op.is_empty() => {
                capsules::files(self, ex, id, op)
            }
            ([], _, _) => Err(ApiError::method_not_allowed(
                method.as_str(),
                path,
                "GET, POST",
            )),
            ([_], _, _) => Err(ApiError::method_not_allowed(
                method.as_str(),
                path,
                "GET, DELETE",
            )),
            ([_, "pause" | "resume" | "exec"], _, _)
            | ([_, "timeout"], _, Ours)
            | ([_, "ping"], _, Sdk) => {
                Err(ApiError::method_not_allowed(method.as_str(), path, "POST"))
            }
            ([_, "logs"], _, Ours) | ([_, "processes" | "metrics"], _, Sdk) => {
                Err(ApiError::method_not_allowed(method.as_str(), path, "GET"))
            }
            ([_, "processes", _], _, Sdk) => Err(ApiError::method_not_allowed(
                method.as_str(),
                path,
                "DELETE",
            )),
            ([_, "files", _, ..], _, Sdk) => {
                Err(ApiError::method_not_allowed(method.as_str(), path, "POST"))
            }
            _ => Err(not_found(path)),
        }
    }

    /// A sandbox's JSON as answered: in a fleet, with the node holding it.
    pub(crate) fn listed(&self, mut sandbox: Value) -> Value {
        if self.fleet.is_some() {
            sandbox["node"] = Value::String(self.node_name.clone());
        }
        sandbox
    }

    /// A caller sees only its owner's sandboxes: others' are not found.
    fn check_owner(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        if caller.owner.is_none() {
            return Ok(());
        }
        let record = self.manager.get(&sandboxes::parse_id(id)?)?;
        match caller.may_see(record.owner.as_deref()) {
            true => Ok(()),
            false => Err(crate::sandbox::SandboxError::NotFound(id.to_owned()).into()),
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
                "drain": drain::state_json(self),
                "usage": {
                    "sandboxes": live.len(),
                    "vcpus": live.iter().map(|s| u64::from(s.vcpus)).sum::<u64>(),
                    "memory_mb": live.iter().map(|s| u64::from(s.memory_mb)).sum::<u64>(),
                },
            }),
        ))
    }

    /// `GET /v1/nodes`: the fleet's members as this node sees them (itself
    /// first); a node without a manifest lists only itself.
    fn nodes(&self) -> Result<Reply, ApiError> {
        let Some(fleet) = &self.fleet else {
            return Ok(Reply::Json(
                200,
                json!({"cluster": null, "nodes": [{"name": self.node_name, "state": "live"}]}),
            ));
        };
        let counters = fleet.counters();
        Ok(Reply::Json(
            200,
            json!({
                "cluster": fleet.manifest().cluster,
                "version": fleet.manifest().version,
                "refused": fleet.refused(),
                "gossip": {
                    "sent": counters.sent.load(std::sync::atomic::Ordering::Relaxed),
                    "received": counters.received.load(std::sync::atomic::Ordering::Relaxed),
                    "rejected": counters.rejected.load(std::sync::atomic::Ordering::Relaxed),
                },
                "nodes": fleet.members(),
            }),
        ))
    }

    /// Base images and snapshots, each with its `type`.
    fn templates(&self, caller: &Caller) -> Result<Reply, ApiError> {
        let mut templates: Vec<Value> = self
            .manager
            .node()
            .templates()
            .list()
            .into_iter()
            .map(|name| {
                let mut base = snapshots::base_json(name.as_str());
                base["warm"] = match self.manager.warm_state(&name) {
                    WarmState::None => Value::Null,
                    WarmState::Preparing => json!({"state": "preparing"}),
                    WarmState::Ready { snapshot } => {
                        json!({"state": "ready", "snapshot": snapshot.as_str()})
                    }
                    WarmState::Failed { reason } => json!({"state": "failed", "reason": reason}),
                };
                base
            })
            .collect();
        templates.extend(
            self.manager
                .snapshots()
                .list()?
                .iter()
                .filter(|s| caller.may_see(s.record.owner.as_deref()))
                .map(snapshots::snapshot_json),
        );
        Ok(Reply::Json(200, json!({ "templates": templates })))
    }
}

fn allowed(segments: &[&str]) -> &'static str {
    match segments {
        ["v1", "snapshots"] => "GET, POST",
        ["v1", "snapshots", _] => "GET, DELETE",
        ["v1", "nodes", _, _] | ["v1", "fleet", "sandboxes", _, "adopt"] => "POST",
        _ => "GET",
    }
}

/// `GET /openapi.json`: both route families (docs/openapi.json).
fn openapi() -> Result<Reply, ApiError> {
    const SPEC: &str = include_str!("../../../docs/openapi.json");
    serde_json::from_str(SPEC)
        .map(|spec| Reply::Json(200, spec))
        .map_err(|e| ApiError::internal(format!("the built-in OpenAPI document is broken: {e}")))
}

fn not_found(path: &str) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint at {path}: see docs/api.md for the API"
    ))
}

/// Which clients' shapes a sandbox route speaks: our `/v1/sandboxes` API
/// (`docs/api.md`) or the `wrenn` SDK's `/v1/capsules` (`docs/sdk.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Ours,
    Sdk,
}

impl Wire {
    /// A sandbox in this wire's shape.
    pub fn sandbox(self, record: &lmdb_schema::SandboxRecord) -> Value {
        match self {
            Wire::Ours => sandboxes::sandbox_json(record),
            Wire::Sdk => capsules::capsule_json(record),
        }
    }
}

/// Paths whose clients are the SDK: its error codes are answered there.
fn speaks_sdk(path: &str) -> bool {
    path.starts_with("/v1/capsules")
        || path.starts_with("/v1/snapshots")
        || path.starts_with("/v1/events")
}

impl Handler for Api {
    /// Creating a sandbox, running code and moving files take long: they
    /// run on their own threads, so quick calls never wait behind them.
    fn is_long_running(&self, method: &Method, path: &str) -> bool {
        let segments = path.trim_end_matches('/').split('/').count();
        let path = path.trim_end_matches('/');
        let sandbox_call = path.starts_with("/v1/sandboxes/") || path.starts_with("/v1/capsules/");
        (sandbox_call && segments > 4)
            || path == "/v1/events/stream"
            || (*method == Method::Post
                && matches!(path, "/v1/sandboxes" | "/v1/capsules" | "/v1/snapshots"))
    }

    /// Connections that leave HTTP request/response: the port proxy (by
    /// Host name or `/proxy/...`) and the SDK's WebSockets.
    fn divert(&self, head: &RequestHead) -> Option<Takeover> {
        if let Some(forward) = fleet::divert(self, head) {
            return Some(forward);
        }
        if let Some((port, id)) = ports::host_target(head, &self.proxy_domain) {
            return Some(ports::takeover(Arc::clone(&self.manager), id, port, None));
        }
        if let Some((port, id, target)) = ports::path_target(head) {
            return Some(ports::takeover(
                Arc::clone(&self.manager),
                id,
                port,
                Some(target),
            ));
        }
        if !head.is_websocket_upgrade() {
            return None;
        }
        let segments: Vec<&str> = head
            .path()
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .collect();
        let (id, socket) = match segments.as_slice() {
            ["v1", "capsules", id, rest @ ..] => {
                ((*id).to_owned(), sockets::Socket::for_path(rest)?)
            }
            _ => return None,
        };
        let checked = self
            .caller(head.method(), head.path(), |name| head.header(name))
            .and_then(|caller| self.check_owner(&caller, &id));
        if let Err(err) = checked {
            let err = capsules::present(err);
            return Some(Box::new(move |up: wrenn_http::Upgraded| {
                up.respond_error(&err)
            }));
        }
        Some(sockets::takeover(Arc::clone(&self.manager), id, socket))
    }

    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        let result = self
            .authorize(ex)
            .and_then(|caller| self.route(ex, &caller));
        match speaks_sdk(ex.path()) {
            true => result.map_err(capsules::present),
            false => result,
        }
    }
}
