//! The fleet at the API: any node answers for every node.
//!
//! - A call that names a sandbox another node holds (by gossip) is joined,
//!   connection and all, to that node's API: the request head is rewritten
//!   to carry the caller signed ([`caller`]) instead of the API key, and
//!   then bytes flow both ways as they come, so bodies, event streams,
//!   WebSockets and the port proxy pass through without being buffered.
//!   Later requests on that connection go to the same node unchanged: it
//!   checks their keys itself and sends on what it does not hold.
//! - A create is placed: among the live nodes whose labels match
//!   `node_labels`, that have the template and room, the least loaded
//!   first, up to [`CANDIDATES`] are tried in turn; a refusal (full, over
//!   quota, template missing) moves on to the next.
//! - A list asks every live node for its part; a node that does not
//!   answer shows its sandboxes (as last gossiped) as `missing`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::Duration;

use lmdb_schema::SandboxId;
use serde::Deserialize;
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Reply, RequestHead, Takeover, Upgraded};

use super::{capsules, ports, speaks_sdk, Api, Wire};
use crate::fleet::caller::{self, Caller};
use crate::fleet::view::{self, Ask, OverQuota, SandboxEntry, Usage};
use crate::fleet::{Gossip, Member};
use crate::sandbox::{CreateRequest, SandboxError};

/// Nodes a create is offered to before the client is told no.
pub const CANDIDATES: usize = 3;
/// How long connecting to another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long another node may take to answer its part of a list.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long another node may take to say whether it holds a sandbox.
const LOCATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long another node may take to create a sandbox (a cold boot).
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Headers not sent on: the key is replaced by the signed caller.
const DROPPED: [&str; 3] = ["Authorization", "X-API-Key", caller::HEADER];

/// The takeover that sends a request on to the node holding the sandbox it
/// names, when another node holds it; `None` when this node answers.
pub(super) fn divert(api: &Api, head: &RequestHead) -> Option<Takeover> {
    let fleet = api.fleet.as_ref()?;
    // A forwarded request is answered here, whatever happens: no loops.
    if head.header(caller::HEADER).is_some() {
        return None;
    }
    let (id, proxied) = named_sandbox(api, head)?;
    let sandbox = SandboxId::parse(&id).ok()?;
    if api.manager.get(&sandbox).is_ok() {
        return None;
    }
    let members = fleet.members();
    let gossiped = members
        .iter()
        .find(|m| m.name != fleet.node_name() && m.sandbox(&id).is_some());
    let (holder, entry) = match gossiped {
        Some(m) => (m.clone(), m.sandbox(&id)),
        None => (
            locate(fleet, &format!("/v1/sandboxes/{id}"), &members)?,
            None,
        ),
    };
    let sdk = speaks_sdk(head.path());
    let refuse = move |err: ApiError| -> Option<Takeover> {
        let err = if sdk { capsules::present(err) } else { err };
        Some(Box::new(move |up: Upgraded| up.respond_error(&err)))
    };
    // The port proxy asks for no key (the id is the secret); the API does,
    // and a key that may not see the sandbox does not learn where it is.
    let mut add = Vec::new();
    if !proxied {
        let caller = match api.caller(head.method(), head.path(), |n| head.header(n)) {
            Ok(caller) => caller,
            Err(err) => return refuse(err),
        };
        // (The holder checks again, and alone when gossip has not told.)
        if entry
            .as_ref()
            .is_some_and(|e| !caller.may_see(e.owner.as_deref()))
        {
            return refuse(SandboxError::NotFound(id).into());
        }
        let signed = caller::sign(
            &fleet.manifest(),
            fleet.node_name(),
            &caller,
            false,
            head.method(),
            head.path(),
            crate::clock::now_ms(),
        );
        add.push((caller::HEADER, signed));
    }
    // A GET of a sandbox whose node is down answers what gossip last said.
    let missing = entry
        .as_ref()
        .filter(|_| head.method() == "GET" && is_sandbox_path(head.path()))
        .map(|entry| {
            let wire = if sdk { Wire::Sdk } else { Wire::Ours };
            missing_json(entry, &holder.name, wire)
        });
    let patience = connect_timeout(&holder);
    // Later requests on the connection reach that node as they are: it
    // checks their keys itself, and sends on what it does not hold.
    let first = match proxied {
        true => head.raw().to_vec(),
        false => ports::rewrite(head, None, ports::Close::AsTheClientAsks, &DROPPED, &add),
    };
    api.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(sandbox = %id, node = %holder.name, path = head.path(), "forwarding");
    Some(Box::new(move |up: Upgraded| {
        let upstream = match connect(&holder.api, patience) {
            Ok(stream) => stream,
            Err(why) => {
                if let Some(body) = missing {
                    return up.respond_json(200, &body);
                }
                let why = format!("not answering at {} ({why})", holder.api);
                let err = node_down(&id, &holder, &why);
                let err = if sdk { capsules::present(err) } else { err };
                return up.respond_error(&err);
            }
        };
        if let Err(e) = wrenn_http::tunnel(up, upstream, &first) {
            tracing::debug!(sandbox = %id, node = %holder.name, error = %e, "forwarded connection ended");
        }
    }))
}

/// The live node that answers 200 to `GET path` (a sandbox or a snapshot)
/// when gossip does not say yet which holds it (it was made elsewhere less
/// than a second ago): every other live node is asked, at once.
pub(super) fn locate(fleet: &Gossip, path: &str, members: &[Member]) -> Option<Member> {
    locate_with(fleet, path, members).map(|(m, _)| m)
}

/// [`locate`], with what that node answered.
fn locate_with(fleet: &Gossip, path: &str, members: &[Member]) -> Option<(Member, Value)> {
    let call = NodeCall {
        method: "GET",
        path,
        target: path,
        placed: false,
        body: None,
        timeout: LOCATE_TIMEOUT,
    };
    let live: Vec<Member> = members.iter().filter(|m| m.is_live()).cloned().collect();
    ask_others(fleet, &live, &call, &Caller::operator())
        .into_iter()
        .find(|(_, (status, _))| *status == 200)
        .map(|(m, (_, body))| (m.clone(), body))
}

/// When no node gossips template `name` yet (a snapshot taken a second
/// ago), the node that has it is shown in `members` as gossip soon will:
/// this node, from its own records, or the node that answers for it.
fn learn_template(api: &Api, fleet: &Gossip, members: &mut [Member], name: &str) {
    if members.iter().any(|m| m.has_template(name)) {
        return;
    }
    if let Ok(snapshot) = api.manager.snapshots().get(name) {
        if let Some(me) = members.iter_mut().find(|m| m.name == fleet.node_name()) {
            me.published.insert(
                format!("tpl:{name}"),
                view::snapshot_value(&snapshot.record),
            );
        }
        return;
    }
    // Its bundle says what gossip will (a node call: any node may ask).
    let path = format!("/v1/fleet/snapshots/{name}");
    let Some((holder, bundle)) = locate_with(fleet, &path, members) else {
        return;
    };
    if let Some(member) = members.iter_mut().find(|m| m.name == holder.name) {
        let number = |key: &str| bundle[key].as_u64().unwrap_or_default();
        let text = |key: &str| bundle[key].as_str().unwrap_or_default().to_owned();
        member.published.insert(
            format!("tpl:{name}"),
            format!(
                "snapshot|{}|{}|{}|{}|{}|{}",
                number("size_bytes"),
                number("vcpus").max(1),
                number("memory_mb").max(1),
                bundle["owner"].as_str().unwrap_or("-"),
                text("base"),
                text("digest"),
            ),
        );
    }
}

/// `call` sent to each of `members` but this node, all at once; each with
/// its answer.
pub(super) fn ask_others<'m>(
    fleet: &Gossip,
    members: &'m [Member],
    call: &NodeCall,
    caller: &Caller,
) -> Vec<(&'m Member, (u16, Value))> {
    let others: Vec<&Member> = members
        .iter()
        .filter(|m| m.name != fleet.node_name())
        .collect();
    std::thread::scope(|scope| {
        let asks: Vec<_> = others
            .iter()
            .map(|m| scope.spawn(|| call.send(fleet, m, caller)))
            .collect();
        let answers = asks
            .into_iter()
            .map(|a| a.join().unwrap_or((500, Value::Null)));
        others.into_iter().zip(answers).collect()
    })
}

/// The sandbox id a request head names, and whether it is the port proxy.
fn named_sandbox(api: &Api, head: &RequestHead) -> Option<(String, bool)> {
    if let Some((_, id)) = ports::host_target(head, &api.proxy_domain) {
        return Some((id, true));
    }
    if let Some((_, id, _)) = ports::path_target(head) {
        return Some((id, true));
    }
    let mut segments = head.path().trim_end_matches('/').split('/').skip(1);
    match (segments.next(), segments.next(), segments.next()) {
        (Some("v1"), Some("sandboxes" | "capsules"), Some(id))
            if id.starts_with(SandboxId::PREFIX) =>
        {
            Some((id.to_owned(), false))
        }
        _ => None,
    }
}

/// `/v1/sandboxes/{id}` or `/v1/capsules/{id}`, nothing after.
fn is_sandbox_path(path: &str) -> bool {
    path.trim_end_matches('/').split('/').count() == 4
}

fn node_down(id: &str, holder: &Member, why: &str) -> ApiError {
    ApiError::unavailable(format!(
        "sandbox {id} is on node {} ({}, {why}): it is missing until that node is back; retry \
         then, or create another sandbox",
        holder.name, holder.state
    ))
    .with_detail("node_unavailable")
}

/// A sandbox of a node that does not answer, as last gossiped.
fn missing_json(entry: &SandboxEntry, node: &str, wire: Wire) -> Value {
    let mut body = json!({
        "id": entry.id,
        "status": "missing",
        "node": node,
        "vcpus": entry.vcpus,
        "memory_mb": entry.memory_mb,
        "last_status": entry.status,
    });
    if wire == Wire::Sdk {
        body["metadata"] = json!({});
    }
    body
}

/// `host:port` of an API URL `http://host:port`.
fn api_addr(api: &str) -> Result<SocketAddr, String> {
    let rest = api
        .strip_prefix("http://")
        .ok_or_else(|| format!("{api} is not an http:// URL"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    host.to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{host} has no address"))
}

/// How long to try to reach `member`. Gossip's verdict lags a node's
/// restart, so a node it calls dead is tried all the same, only not for
/// as long.
fn connect_timeout(member: &Member) -> Duration {
    match member.is_live() {
        true => CONNECT_TIMEOUT,
        false => Duration::from_secs(1),
    }
}

fn connect(api: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addr = api_addr(api)?;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| wrenn_http::describe_io(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// What placement reads of a create body (both wires).
#[derive(Debug, Default, Deserialize)]
struct Shape {
    template: Option<String>,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    #[serde(default)]
    node_labels: BTreeMap<String, String>,
}

/// `POST /v1/sandboxes` or `/v1/capsules` in a fleet: places the create on
/// a node and answers what that node answered, with its name.
pub(super) fn place(
    api: &Api,
    fleet: &Gossip,
    raw: &[u8],
    wire: Wire,
    caller: &Caller,
    ex: &Exchange,
) -> Result<Reply, ApiError> {
    let shape: Shape = match raw.iter().all(u8::is_ascii_whitespace) {
        true => Shape::default(),
        false => wrenn_http::parse_json(raw)?,
    };
    let template = match wire {
        Wire::Ours => shape.template.clone().unwrap_or_else(|| "base".into()),
        Wire::Sdk => capsules::template_name(&api.capsules, shape.template.clone()),
    };
    let mut members = fleet.members();
    learn_template(api, fleet, &mut members, &template);
    let (vcpus, memory_mb) = members
        .iter()
        .find_map(|m| m.snapshot_shape(&template))
        .map_or(
            (shape.vcpus.unwrap_or(1), shape.memory_mb.unwrap_or(512)),
            |fixed| fixed,
        );
    check(api, caller, Ask::Run { vcpus, memory_mb })?;
    if !members.iter().any(|m| m.has_template(&template)) {
        return Err(SandboxError::TemplateNotFound(template).into());
    }
    let (candidates, mut refusals) = candidates(&members, &template, memory_mb, &shape.node_labels);
    // The refusal told if every node said the same: over quota, or a
    // snapshot this caller may not see (404).
    let mut same: Option<(u16, Value)> = None;
    let mut differ = false;
    for member in candidates {
        let outcome = if member.name == fleet.node_name() {
            match super::sandboxes::create_here(api, raw, wire, caller) {
                Ok(record) => return Ok(Reply::Json(201, api.listed(wire.sandbox(&record)))),
                Err(err) => {
                    let err = if wire == Wire::Sdk {
                        capsules::present(err)
                    } else {
                        err
                    };
                    Err((err.status(), err.to_json()))
                }
            }
        } else {
            forward_create(fleet, member, raw, ex, caller)
        };
        match outcome {
            Ok(body) => return Ok(Reply::Json(201, body)),
            Err((status, body)) if is_refusal(status) => {
                let message = body["error"]["message"].as_str().unwrap_or("refused");
                tracing::info!(node = %member.name, status, "create refused there; trying the next node: {message}");
                refusals.push(format!("{} refused: {message}", member.name));
                differ |= same.as_ref().is_some_and(|(s, _)| *s != status);
                same = Some((status, body));
            }
            // Bad input is bad on every node: the client hears it now.
            Err((status, body)) => return Ok(Reply::Json(status, body)),
        }
    }
    if let Some((status @ (404 | 429), body)) = same.filter(|_| !differ) {
        return Ok(Reply::Json(status, body));
    }
    Err(ApiError::unavailable(format!(
        "no node of the fleet can take a sandbox of template {template} with {vcpus} vCPUs and \
         {memory_mb} MiB{}: {}; pause or destroy sandboxes, ask for less, or add a node",
        match shape.node_labels.is_empty() {
            true => String::new(),
            false => format!(" and labels {:?}", shape.node_labels),
        },
        refusals.join("; ")
    ))
    .with_detail("no_capacity"))
}

/// The nodes a create may go to, at most [`CANDIDATES`]: those that have
/// the template before those that would fetch it (a snapshot, from a node
/// that has it: seconds), each least loaded first (by name when equal, so
/// that placement is stable); and why each other node may not.
pub(super) fn candidates<'m>(
    members: &'m [Member],
    template: &str,
    memory_mb: u32,
    labels: &BTreeMap<String, String>,
) -> (Vec<&'m Member>, Vec<String>) {
    let mut refusals = Vec::new();
    let mut fit: Vec<(bool, &Member)> = Vec::new();
    for member in members {
        let holds = member.has_template(template);
        let why = match () {
            _ if !member.is_live() => Some(format!("is {}", member.state)),
            _ if member.drain_state().is_some() => Some(format!(
                "is {} (POST /v1/nodes/{}/undrain takes it back)",
                member.drain_state().unwrap_or_default(),
                member.name
            )),
            _ if !view::labels_match(&member.labels, labels) => {
                Some(format!("has labels {:?}", member.labels))
            }
            _ if !holds && !can_fetch(members, member, template) => {
                Some(format!("lacks template {template}"))
            }
            _ => member.lacks_room(memory_mb),
        };
        match why {
            Some(why) => refusals.push(format!("{} {why}", member.name)),
            None => fit.push((holds, member)),
        }
    }
    fit.sort_by(|(a_holds, a), (b_holds, b)| {
        b_holds
            .cmp(a_holds)
            .then_with(|| b.free_memory_mb().cmp(&a.free_memory_mb()))
            .then_with(|| a.name.cmp(&b.name))
    });
    let fit = fit.into_iter().map(|(_, m)| m).take(CANDIDATES).collect();
    (fit, refusals)
}

/// Whether `member` can fetch snapshot `template` from another live node
/// that has it: it runs the same runtime and has the same base image
/// (by its root file system's checksum, where both say). A warm snapshot
/// is each node's own and never travels.
fn can_fetch(members: &[Member], member: &Member, template: &str) -> bool {
    if crate::sandbox::is_warm_name(template) {
        return false;
    }
    members.iter().any(|source| {
        source.name != member.name
            && source.is_live()
            && source.snapshot_digest(template).is_some()
            && source.runtime_kind() == member.runtime_kind()
            && source.snapshot_base(template).is_some_and(|base| {
                member.has_template(&base)
                    && match (source.base_sha256(&base), member.base_sha256(&base)) {
                        (Some(theirs), Some(ours)) => theirs == ours,
                        _ => true,
                    }
            })
    })
}

/// A create refused for want of room, quota or template: another node may
/// take it.
fn is_refusal(status: u16) -> bool {
    matches!(status, 404 | 409 | 429 | 502 | 503)
}

/// Sends the create to `member` as placed there; its created sandbox, or
/// its status and error body.
fn forward_create(
    fleet: &Gossip,
    member: &Member,
    raw: &[u8],
    ex: &Exchange,
    caller: &Caller,
) -> Result<Value, (u16, Value)> {
    let call = NodeCall {
        method: "POST",
        path: ex.path(),
        target: ex.path(),
        placed: true,
        body: Some(raw),
        timeout: CREATE_TIMEOUT,
    };
    match call.send(fleet, member, caller) {
        (status, body) if status < 300 => Ok(body),
        failed => Err(failed),
    }
}

/// One call from this node to another's API, as `caller`, signed.
pub(super) struct NodeCall<'a> {
    pub method: &'a str,
    /// The path the signature covers.
    pub path: &'a str,
    /// Path and query string.
    pub target: &'a str,
    /// A create placed there: it runs there or is refused.
    pub placed: bool,
    /// A JSON body.
    pub body: Option<&'a [u8]>,
    /// For the whole answer.
    pub timeout: Duration,
}

impl NodeCall<'_> {
    /// The answer's status and JSON body; a node that does not answer is a
    /// 503 naming it.
    pub(super) fn send(&self, fleet: &Gossip, member: &Member, caller: &Caller) -> (u16, Value) {
        let signed = caller::sign(
            &fleet.manifest(),
            fleet.node_name(),
            caller,
            self.placed,
            self.method,
            self.path,
            crate::clock::now_ms(),
        );
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout(member))
            .timeout(self.timeout)
            .build();
        let request = agent
            .request(self.method, &format!("{}{}", member.api, self.target))
            .set(caller::HEADER, &signed);
        let answer = match self.body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_bytes(body),
            None => request.call(),
        };
        let unreachable = |why: String| {
            let err = ApiError::unavailable(format!(
                "node {} does not answer at {}: {why}",
                member.name, member.api
            ))
            .with_detail("node_unavailable");
            (err.status(), err.to_json())
        };
        match answer {
            Ok(response) => {
                let status = response.status();
                match status {
                    204 => (status, Value::Null),
                    _ => match response.into_json::<Value>() {
                        Ok(body) => (status, body),
                        Err(e) => unreachable(e.to_string()),
                    },
                }
            }
            Err(ureq::Error::Status(status, response)) => {
                (status, response.into_json().unwrap_or(Value::Null))
            }
            Err(e) => unreachable(e.to_string()),
        }
    }
}

/// Refuses a create over the caller's quota across the fleet, counting
/// what gossip says the owner holds elsewhere and what this node holds.
pub(super) fn check_quota(
    api: &Api,
    caller: &Caller,
    request: &CreateRequest,
) -> Result<(), ApiError> {
    let (vcpus, memory_mb) = match api.manager.snapshots().get(&request.template) {
        Ok(snapshot) => (
            snapshot.record.vcpus.unwrap_or(1),
            snapshot.record.memory_mb.unwrap_or(512),
        ),
        Err(_) => (request.vcpus.unwrap_or(1), request.memory_mb.unwrap_or(512)),
    };
    check(api, caller, Ask::Run { vcpus, memory_mb })
}

/// Refuses `ask` when it would take the caller's key past its quota across
/// the fleet (a key without a quota, or a node without a fleet: never).
pub(super) fn check(api: &Api, caller: &Caller, ask: Ask) -> Result<(), ApiError> {
    let (Some(owner), Some(fleet)) = (&caller.owner, &api.fleet) else {
        return Ok(());
    };
    let local = api.manager.list()?;
    let snapshots: Vec<_> = api
        .manager
        .snapshots()
        .list()?
        .into_iter()
        .map(|s| s.record)
        .collect();
    let usage = Usage::of_owner(
        &fleet.members(),
        owner,
        fleet.node_name(),
        &local,
        &snapshots,
    );
    view::check_quota(&caller.quota, &usage, ask).map_err(|over| over_quota(caller, &over))
}

fn over_quota(caller: &Caller, over: &OverQuota) -> ApiError {
    let (what, free) = match over.resource {
        "paused" => ("paused sandboxes", "resume or destroy paused sandboxes"),
        "snapshot_bytes" => ("bytes of snapshots", "delete snapshots"),
        _ => ("", "destroy or pause sandboxes"),
    };
    let asked = match over.resource {
        "snapshot_bytes" => String::new(),
        _ => format!(" ({} more asked)", over.asked),
    };
    ApiError::too_many_requests(format!(
        "key {} may hold {} {} across the fleet and holds {}{asked}: {free}, or ask the \
         fleet's operator for a larger quota",
        caller.key.as_deref().unwrap_or("-"),
        over.limit,
        if what.is_empty() { over.resource } else { what },
        over.used,
    ))
    .with_detail("quota_exceeded")
}

/// The fleet's sandboxes: `local` (this node's, already filtered) and
/// every other live node's answer to the same list, asked as `caller`;
/// the sandboxes of a node that does not answer, as last gossiped, with
/// status `missing`.
pub(super) fn list(
    fleet: &Gossip,
    ex: &Exchange,
    wire: Wire,
    caller: &Caller,
    status: Option<&str>,
    mut local: Vec<Value>,
) -> Vec<Value> {
    let call = NodeCall {
        method: "GET",
        path: ex.path(),
        target: ex.url().unwrap_or(ex.path()),
        placed: false,
        body: None,
        timeout: LIST_TIMEOUT,
    };
    let members = fleet.members();
    for (member, (code, body)) in ask_others(fleet, &members, &call, caller) {
        let part = match code {
            200 => match wire {
                Wire::Ours => body.get("sandboxes").and_then(Value::as_array).cloned(),
                Wire::Sdk => body.as_array().cloned(),
            },
            _ => {
                tracing::warn!(node = %member.name, status = code, "a node did not answer its part of a list: {body}");
                None
            }
        };
        match part {
            Some(sandboxes) => local.extend(sandboxes),
            None => local.extend(
                member
                    .sandboxes()
                    .filter(|e| caller.may_see(e.owner.as_deref()))
                    .filter(|_| status.is_none_or(|s| s == "missing"))
                    .map(|e| missing_json(&e, &member.name, wire)),
            ),
        }
    }
    local
}
