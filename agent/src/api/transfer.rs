//! Snapshot templates between the nodes of a fleet (`docs/fleet.md`,
//! "Templates between nodes").
//!
//! The node that holds a snapshot serves, to the other nodes only (a
//! signed node call, no API key):
//! - `GET /v1/fleet/snapshots/{name}`: its [`Bundle`], every file with its
//!   SHA-256 and size;
//! - `GET /v1/fleet/snapshots/{name}/files/{sha256}`: one file, streamed,
//!   from the offset a `Range: bytes=N-` asks for, at most
//!   `[fleet] transfer_mib_per_s`.
//!
//! A node asked to create a sandbox of a snapshot it lacks fetches it
//! first ([`Fetcher::ensure`]): once per name however many creates ask at
//! once (the others wait for it), from a live node that gossip (or, for a
//! snapshot a second old, a question to every node) says has it. Files
//! land in `<state dir>/incoming/<name>-<digest>/` as `<sha256>.part`, are
//! checked, fsynced and renamed to `<sha256>`; a transfer cut short (the
//! node or the connection died) goes on from where the `.part` file ends.
//! The bundle must match the digest the fleet gossips; the snapshot is then
//! imported ([`crate::sandbox::Snapshots::import`]) and the folder removed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use wrenn_http::{ApiError, Exchange, Reply};

use super::fleet::NodeCall;
use super::Api;
use crate::fleet::{caller, Caller, Gossip, Member};
use crate::sandbox::bundle::{hash_file, Bundle, BundleFile};
use crate::sandbox::SandboxError;

/// How long a node may take to answer for a bundle.
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a file transfer may stall before it is given up (and resumed
/// at the next try).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Incoming folders older than this are left over from snapshots that
/// went away before their transfer ended: removed at start.
const STALE_INCOMING: Duration = Duration::from_secs(24 * 3600);
/// Bytes a throttled body sends between two checks of its pace.
const PACE_CHUNK: usize = 64 << 10;

/// What transfers count, for `/metrics`.
#[derive(Debug, Default)]
pub struct TransferCounters {
    /// Snapshots fetched from another node and imported.
    pub fetches: AtomicU64,
    /// Bytes received for them.
    pub fetched_bytes: AtomicU64,
    /// Files whose transfer went on from a `.part` file.
    pub resumed: AtomicU64,
    /// Fetches that failed.
    pub failures: AtomicU64,
    /// Bytes of snapshot files sent to other nodes.
    pub served_bytes: AtomicU64,
}

/// Fetches snapshots for this node, once per name at a time.
#[derive(Debug, Default)]
pub struct Fetcher {
    flights: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    pub counters: Arc<TransferCounters>,
    /// Sending pace, bytes per second; 0: no limit.
    pub rate: u64,
}

impl Fetcher {
    /// A fetcher that sends at most `mib_per_s` per transfer (0: no limit).
    pub fn new(mib_per_s: u64) -> Fetcher {
        Fetcher {
            rate: mib_per_s.saturating_mul(1 << 20),
            ..Fetcher::default()
        }
    }

    /// The lock of `name`'s transfer.
    fn flight(&self, name: &str) -> Arc<Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(flights.entry(name.to_owned()).or_default())
    }

    /// Makes sure this node has snapshot `template` when another node of
    /// the fleet has it: fetches and imports it, or waits for the fetch
    /// already under way. A template no node has is left for the create to
    /// refuse.
    pub fn ensure(
        &self,
        api: &Api,
        fleet: &Gossip,
        template: &str,
        caller: &Caller,
    ) -> Result<(), ApiError> {
        if is_here(api, template) {
            return Ok(());
        }
        let flight = self.flight(template);
        let _only = flight.lock().unwrap_or_else(PoisonError::into_inner);
        if is_here(api, template) {
            return Ok(());
        }
        let sources = sources(fleet, template);
        if sources.is_empty() {
            return Ok(());
        }
        let mut failures = Vec::new();
        for (source, digest) in &sources {
            if let Some(owner) = source.snapshot_owner(template) {
                if !caller.may_see(owner.as_deref()) {
                    return Err(SandboxError::TemplateNotFound(template.to_owned()).into());
                }
            }
            match self.fetch(api, fleet, source, template, digest.as_deref()) {
                Ok(()) => return Ok(()),
                Err(why) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(snapshot = template, node = %source.name, "fetching the snapshot failed: {why}");
                    failures.push(format!("from {}: {why}", source.name));
                }
            }
        }
        Err(ApiError::unavailable(format!(
            "snapshot {template} is on other nodes and could not be fetched here ({}); retry, \
             and the transfer goes on where it stopped",
            failures.join("; ")
        ))
        .with_detail("transfer_failed"))
    }

    /// Fetches snapshot `name` from `source` and imports it.
    fn fetch(
        &self,
        api: &Api,
        fleet: &Gossip,
        source: &Member,
        name: &str,
        gossiped: Option<&str>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let path = format!("/v1/fleet/snapshots/{name}");
        let call = NodeCall {
            method: "GET",
            path: &path,
            target: &path,
            placed: false,
            body: None,
            timeout: BUNDLE_TIMEOUT,
        };
        let bundle: Bundle = match call.send(fleet, source, &Caller::operator()) {
            (200, body) => serde_json::from_value(body).map_err(|e| format!("its bundle: {e}"))?,
            (status, body) => return Err(format!("bundle: {status} {}", error_text(&body))),
        };
        if !bundle.is_consistent() {
            return Err("its bundle does not match its own digest".into());
        }
        if let Some(gossiped) = gossiped.filter(|g| *g != bundle.digest) {
            return Err(format!(
                "its bundle has digest {} and the fleet gossips {gossiped} (the snapshot was \
                 replaced meanwhile)",
                bundle.digest
            ));
        }
        let staging = api
            .manager
            .incoming_dir()
            .join(format!("{name}-{}", &bundle.digest[..16]));
        fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        let mut received = 0u64;
        for file in &bundle.files {
            received += self.fetch_file(api, fleet, source, &path, &staging, file)?;
        }
        api.manager
            .snapshots()
            .import(&bundle, &staging, &source.name)
            .map_err(|e| e.to_string())?;
        if let Err(e) = fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), error = %e, "cannot remove a finished transfer's folder");
        }
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed();
        tracing::info!(
            snapshot = name,
            node = %source.name,
            bytes = bundle.bytes(),
            received,
            ms = took.as_millis() as u64,
            "snapshot fetched"
        );
        Ok(())
    }

    /// One file of the bundle at `from` (a path on `source`, such as
    /// `/v1/fleet/snapshots/{name}`) into `staging/<sha256>`, going on from
    /// `<sha256>.part`; the bytes received.
    pub(super) fn fetch_file(
        &self,
        api: &Api,
        fleet: &Gossip,
        source: &Member,
        from: &str,
        staging: &Path,
        wanted: &BundleFile,
    ) -> Result<u64, String> {
        let (sha256, size) = (wanted.sha256.as_str(), wanted.size);
        let done = staging.join(sha256);
        if done.exists() {
            return Ok(0);
        }
        // A layer or header this node already holds is not fetched again.
        if let Some(local) = local_copy(api, sha256) {
            if fs::hard_link(&local, &done).is_ok() {
                return Ok(0);
            }
        }
        let part = staging.join(format!("{sha256}.part"));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| format!("{}: {e}", part.display()))?;
        let mut offset = file
            .metadata()
            .map_err(|e| format!("{}: {e}", part.display()))?
            .len();
        if offset > size {
            file.set_len(0).map_err(|e| e.to_string())?;
            offset = 0;
        }
        let mut received = 0;
        if offset < size {
            if offset > 0 {
                self.counters.resumed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(from, file = sha256, offset, size, "resuming a transfer");
            }
            received = self.download(fleet, source, from, sha256, offset, &mut file)?;
        }
        file.sync_all().map_err(|e| e.to_string())?;
        drop(file);
        let (actual, len) = hash_file(&part).map_err(|e| e.to_string())?;
        if actual != sha256 || len != size {
            let _ = fs::remove_file(&part);
            return Err(format!(
                "file {sha256} arrived as {len} bytes hashing to {actual}: it is fetched \
                 again at the next try"
            ));
        }
        fs::rename(&part, &done).map_err(|e| e.to_string())?;
        File::open(staging)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())?;
        Ok(received)
    }

    /// Appends the bytes of file `sha256` from `offset` on to `out`.
    fn download(
        &self,
        fleet: &Gossip,
        source: &Member,
        from: &str,
        sha256: &str,
        offset: u64,
        out: &mut File,
    ) -> Result<u64, String> {
        let path = format!("{from}/files/{sha256}");
        let signed = caller::sign(
            &fleet.manifest(),
            fleet.node_name(),
            &Caller::operator(),
            false,
            "GET",
            &path,
            crate::clock::now_ms(),
        );
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout_read(STALL_TIMEOUT)
            .build();
        let response = agent
            .get(&format!("{}{path}", source.api))
            .set(caller::HEADER, &signed)
            .set("Range", &format!("bytes={offset}-"))
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(status, r) => {
                    let body: Value = r.into_json().unwrap_or(Value::Null);
                    format!("file {sha256}: {status} {}", error_text(&body))
                }
                other => format!("file {sha256}: {other}"),
            })?;
        if offset > 0 && response.status() != 206 {
            return Err(format!(
                "file {sha256}: asked from byte {offset}, answered {} without a range",
                response.status()
            ));
        }
        let mut body = response.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| format!("file {sha256} at byte {}: {e}", offset + received))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            received += n as u64;
            self.counters
                .fetched_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(received)
    }
}

/// Whether this node has template `name`: a snapshot or a base image.
fn is_here(api: &Api, name: &str) -> bool {
    if api.manager.snapshots().get(name).is_ok() {
        return true;
    }
    lmdb_schema::TemplateName::parse(name).is_ok_and(|n| api.manager.node().templates().exists(&n))
}

/// Live nodes that have snapshot `name`, with the digest they gossip;
/// asked of every node when gossip knows of none (taken a second ago).
fn sources(fleet: &Gossip, name: &str) -> Vec<(Member, Option<String>)> {
    let members = fleet.members();
    let gossiped: Vec<(Member, Option<String>)> = members
        .iter()
        .filter(|m| m.name != fleet.node_name() && m.is_live())
        .filter_map(|m| Some((m.clone(), m.snapshot_digest(name)?)))
        .collect();
    if !gossiped.is_empty() {
        return gossiped;
    }
    super::fleet::locate(fleet, &format!("/v1/snapshots/{name}"), &members)
        .map(|m| vec![(m, None)])
        .unwrap_or_default()
}

/// A layer or header file of this node with content `sha256`.
fn local_copy(api: &Api, sha256: &str) -> Option<PathBuf> {
    let layers = api.manager.layer_store();
    if let Ok(id) = crate::store::LayerId::parse(sha256) {
        let path = layers.layer_path(&id);
        if path.is_file() {
            return Some(path);
        }
    }
    crate::store::HeaderId::parse(sha256)
        .map(|id| layers.header_path(&id))
        .filter(|p| p.is_file())
}

fn error_text(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned)
}

/// Removes incoming folders left by transfers that never ended.
pub fn clean_incoming(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_INCOMING);
        if old {
            tracing::info!(dir = %entry.path().display(), "removing a transfer left unfinished for a day");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Only another node of the fleet fetches snapshot or sandbox files.
pub(super) fn node_only(api: &Api, caller: &Caller) -> Result<(), ApiError> {
    match (&api.fleet, caller.is_forwarded() && caller.key.is_none()) {
        (Some(_), true) => Ok(()),
        _ => Err(ApiError::permission_denied(
            "snapshot and sandbox transfers are between the nodes of a fleet: to use a \
             snapshot, create a sandbox from it on any node; to move a node's sandboxes, \
             drain it (POST /v1/nodes/{name}/drain)",
        )),
    }
}

/// `GET /v1/fleet/snapshots/{name}`.
pub(super) fn bundle(api: &Api, name: &str, caller: &Caller) -> Result<Reply, ApiError> {
    node_only(api, caller)?;
    let bundle = api.manager.snapshots().bundle(name)?;
    let body = serde_json::to_value(&bundle)
        .map_err(|e| ApiError::internal(format!("cannot encode the bundle of {name}: {e}")))?;
    Ok(Reply::Json(200, body))
}

/// `GET /v1/fleet/snapshots/{name}/files/{sha256}`, from the `Range`
/// asked for.
pub(super) fn file(
    api: &Api,
    ex: &Exchange,
    name: &str,
    sha256: &str,
    caller: &Caller,
) -> Result<Reply, ApiError> {
    node_only(api, caller)?;
    let (path, size) = api.manager.snapshots().bundle_file(name, sha256)?;
    serve(api, ex, &path, size)
}

/// File `path` of `size` bytes, paced and counted, from the first byte
/// the request's `Range` asks for: 206 with its `Content-Range`, or 200
/// without one.
pub(super) fn serve(api: &Api, ex: &Exchange, path: &Path, size: u64) -> Result<Reply, ApiError> {
    let start = match ex.header("Range") {
        None => 0,
        Some(range) => parse_range(range, size)?,
    };
    let mut file = File::open(path)
        .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", path.display())))?;
    file.seek(SeekFrom::Start(start))
        .map_err(|e| ApiError::internal(format!("cannot seek in {}: {e}", path.display())))?;
    let len = size - start;
    let body = Paced {
        inner: file.take(len),
        rate: api.fetcher.rate,
        started: Instant::now(),
        sent: 0,
        counters: Arc::clone(&api.fetcher.counters),
    };
    let mut headers = vec![("Accept-Ranges", "bytes".to_owned())];
    let status = match ex.header("Range") {
        Some(_) => {
            let last = (start + len).saturating_sub(1);
            headers.push(("Content-Range", format!("bytes {start}-{last}/{size}")));
            206
        }
        None => 200,
    };
    Ok(Reply::Stream {
        status,
        len,
        headers,
        body: Box::new(body),
    })
}

/// The first byte of `Range: bytes=N-` (or `bytes=N-M`, read to the end).
fn parse_range(range: &str, size: u64) -> Result<u64, ApiError> {
    let start = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "Range is {range:?}: ask for `bytes=N-`, N the first byte wanted"
            ))
        })?;
    if start > size {
        return Err(ApiError::invalid_argument(format!(
            "Range starts at byte {start} of a file of {size} bytes: ask for less"
        )));
    }
    Ok(start)
}

/// A body sent at most `rate` bytes per second (0: no limit), counted.
struct Paced<R> {
    inner: R,
    rate: u64,
    started: Instant,
    sent: u64,
    counters: Arc<TransferCounters>,
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = match self.rate {
            0 => buf.len(),
            _ => buf.len().min(PACE_CHUNK),
        };
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let n = self.inner.read(&mut buf[..want])?;
        self.sent += n as u64;
        self.counters
            .served_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_from_their_first_byte() {
        assert_eq!(parse_range("bytes=0-", 10).unwrap(), 0);
        assert_eq!(parse_range("bytes=7-", 10).unwrap(), 7);
        assert_eq!(parse_range("bytes=3-5", 10).unwrap(), 3);
        assert_eq!(parse_range("bytes=10-", 10).unwrap(), 10);
        for bad in ["bytes=11-", "items=1-", "bytes=-5", "bytes=x-"] {
            let err = parse_range(bad, 10).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
        }
    }

    #[test]
    fn a_paced_body_keeps_to_its_rate_and_counts_what_it_sends() {
        let counters = Arc::new(TransferCounters::default());
        let mut body = Paced {
            inner: std::io::repeat(7).take(512 << 10),
            rate: 1 << 20,
            started: Instant::now(),
            sent: 0,
            counters: Arc::clone(&counters),
        };
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), 512 << 10);
        // Half a MiB at 1 MiB/s: the last chunk waits for its turn.
        assert!(body.started.elapsed() >= Duration::from_millis(400));
        assert_eq!(counters.served_bytes.load(Ordering::Relaxed), 512 << 10);
    }
}
