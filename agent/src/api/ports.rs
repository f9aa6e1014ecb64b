//! The port proxy: `http://{port}-{sandbox id}.{proxy domain}` (routed on
//! the Host header) and `/proxy/{id}/{port}/{path}` reach that TCP port of
//! the sandbox. The client's connection is joined to one in the guest and
//! bytes flow both ways as they come, so HTTP bodies stream and WebSocket
//! upgrades (Jupyter's kernel channels) pass through.
//!
//! Like the hosted service, the proxy asks for no API key: the sandbox id
//! in the name is the secret. A paused sandbox resumes on its first
//! request. While nothing listens on the port the answer is 502, so that
//! clients that wait for a server (the SDK's code runner) retry.

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lmdb_schema::{SandboxId, SandboxStatus};
use wrenn_http::{ApiError, RequestHead, Takeover, Upgraded};

use crate::sandbox::{Manager, SandboxError};

/// How long connecting to the guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a proxied connection checks that its sandbox still runs.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// `(port, sandbox id)` when the Host header names a sandbox's port:
/// `8000-sb-abc.localhost:8080` under the domain `localhost`.
pub(super) fn host_target(head: &RequestHead, domain: &str) -> Option<(u16, String)> {
    let host = head.header("Host")?.trim().to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => host,
    };
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    if !id.starts_with(SandboxId::PREFIX) || id.contains('.') {
        return None;
    }
    Some((port.parse().ok()?, id.to_owned()))
}

/// `(port, sandbox id, target in the guest)` for `/proxy/{id}/{port}/...`.
pub(super) fn path_target(head: &RequestHead) -> Option<(u16, String, String)> {
    let rest = head.target().strip_prefix("/proxy/")?;
    let (id, rest) = rest.split_once('/')?;
    let (port, target) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let target = match target.strip_prefix('?') {
        Some(query) => format!("/?{query}"),
        None => target.to_owned(),
    };
    Some((port.parse().ok()?, id.to_owned(), target))
}

/// The takeover that joins the connection to `port` of sandbox `id`;
/// `target` rewrites the request line (path-style proxy).
pub(super) fn takeover(
    manager: Arc<Manager>,
    id: String,
    port: u16,
    target: Option<String>,
) -> Takeover {
    Box::new(move |up: Upgraded| {
        let upstream = match connect(&manager, &id, port) {
            Ok(stream) => stream,
            Err(err) => return up.respond_error(&super::capsules::present(err)),
        };
        let first = match &target {
            None => up.head().raw().to_vec(),
            Some(target) => rewrite(up.head(), Some(target), Close::AfterAnswer, &[], &[]),
        };
        let ended = Arc::new(AtomicBool::new(false));
        watch(&manager, &id, &up, &upstream, &ended);
        if let Err(e) = wrenn_http::tunnel(up, upstream, &first) {
            tracing::debug!(sandbox = %id, port, error = %e, "proxied connection ended");
        }
        ended.store(true, Ordering::Release);
    })
}

/// Ends a proxied connection once its sandbox stops running: a destroyed
/// or paused VM sends no FIN, and the client would wait on it forever.
fn watch(
    manager: &Arc<Manager>,
    id: &str,
    up: &Upgraded,
    upstream: &TcpStream,
    ended: &Arc<AtomicBool>,
) {
    let (Ok(client), Ok(guest), Ok(sandbox)) =
        (up.try_clone(), upstream.try_clone(), SandboxId::parse(id))
    else {
        return;
    };
    let (manager, ended) = (Arc::clone(manager), Arc::clone(ended));
    let spawned = std::thread::Builder::new()
        .name("proxy-watch".into())
        .spawn(move || {
            while !ended.load(Ordering::Acquire) {
                std::thread::sleep(WATCH_EVERY);
                let running = manager
                    .get(&sandbox)
                    .is_ok_and(|r| r.status == SandboxStatus::Running);
                if !running {
                    let _ = guest.shutdown(Shutdown::Both);
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch a proxied connection; it ends with its peers");
    }
}

fn connect(manager: &Manager, id: &str, port: u16) -> Result<TcpStream, ApiError> {
    let sandbox = SandboxId::parse(id).map_err(|_| {
        ApiError::not_found(format!(
            "no sandbox {id}: the name is {{port}}-{{sandbox id}}.{{proxy domain}}"
        ))
    })?;
    let addr = manager.guest_addr(&sandbox, port).map_err(|e| match e {
        SandboxError::NotRunning { .. } | SandboxError::Busy(_) => {
            ApiError::unavailable(format!("{e}; retry when it is running"))
        }
        other => ApiError::from(other),
    })?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        ApiError::unavailable(format!(
            "nothing answers on port {port} of sandbox {id} ({}); start a server on \
             0.0.0.0:{port} in the sandbox, or retry if it is starting",
            wrenn_http::describe_io(&e)
        ))
        .shown_as("port_unreachable", 502)
    })?;
    let _ = manager.touch(&sandbox);
    Ok(stream)
}

/// Whether a rewritten request asks the server to close after answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    /// Later requests on the connection would reach the server without
    /// the rewrite: it must close after this one (an upgrade excepted).
    AfterAnswer,
    /// Later requests may reach the server as they are.
    AsTheClientAsks,
}

/// The head rewritten for another server: its request target replaced
/// (`None`: kept), headers `drop` left out and `add` added.
pub(super) fn rewrite(
    head: &RequestHead,
    target: Option<&str>,
    close: Close,
    drop: &[&str],
    add: &[(&str, String)],
) -> Vec<u8> {
    let keep = head.is_websocket_upgrade() || close == Close::AsTheClientAsks;
    let target = target.unwrap_or(head.target());
    let mut out = format!("{} {} HTTP/1.1\r\n", head.method(), target);
    for (name, value) in head.headers() {
        let dropped = drop.iter().any(|d| name.eq_ignore_ascii_case(d));
        if dropped || (!keep && name.eq_ignore_ascii_case("connection")) {
            continue;
        }
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    for (name, value) in add {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !keep {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}
