//! What a server is told before it starts: where it listens, how many
//! threads it runs, and the limits and timeouts it applies. `ServerConfig::new`
//! fills in the values envd has always used; a server changes the fields it
//! needs with struct-update syntax.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Worker threads for short requests.
const WORKERS: usize = 64;
/// Short requests waiting for a worker before the dispatcher blocks.
const QUEUE_DEPTH: usize = 256;
/// Long-running requests (streams, transfers) served at once.
const MAX_LONG_RUNNING: usize = 1024;
/// Connections taken over by the handler (WebSockets, tunnels) at once.
const MAX_UPGRADED: usize = 256;
/// Largest JSON request body accepted (1 MiB).
const MAX_JSON_BODY: usize = 1 << 20;
/// Longest line of a request head, the request line included (16 KiB).
const MAX_HEADER_LINE: usize = 16 << 10;
/// Largest request head: request line, headers and the blank line (64 KiB).
const MAX_HEAD: usize = 64 << 10;
/// A write that makes no progress for this long fails (client not reading).
const SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP keepalive: first probe after this much silence...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// ...then one probe every this often...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and the connection is dropped after this many unanswered probes.
const KEEPALIVE_PROBES: u32 = 6;
/// Unacknowledged data for this long means the peer is gone.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bodies announced larger than this are never read nor answered (4 TiB):
/// tiny_http would allocate the unread remainder when dropping them.
const MAX_DECLARED_BODY: usize = 1 << 42;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address such as `0.0.0.0:49983` (port 0 picks a free one).
    Tcp(String),
    /// A Unix socket at this path. The path must not exist at start (remove
    /// a stale socket first).
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => f.write_str(addr),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How a server listens and how much it takes on at once.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Names the server in log lines, thread names (`envd-worker-3`) and
    /// error messages ("envd is already serving ...").
    pub name: &'static str,
    /// Logged with the address whenever the server starts listening.
    pub version: &'static str,
    /// Where to listen.
    pub listen: Listen,
    /// Said after a failure to listen, to tell the operator how to pick
    /// another address (e.g. "pick another address with --listen").
    pub bind_hint: Option<&'static str>,
    /// Worker threads for short requests (default 64).
    pub workers: usize,
    /// Short requests waiting for a worker before the accept loop blocks
    /// (default 256).
    pub queue_depth: usize,
    /// Long-running requests (streams, transfers) served at once, each on a
    /// thread of its own; more are answered 503 (default 1024).
    pub max_long_running: usize,
    /// Connections taken over by `Handler::divert` (WebSockets, tunnels)
    /// open at once; a takeover past it is answered 503 (default 256).
    pub max_upgraded: usize,
    /// Largest JSON request body `Exchange::json` reads; larger ones are
    /// answered 413 (default 1 MiB).
    pub max_json_body: usize,
    /// Longest line of a request head, request line included, not counting
    /// its CRLF; a longer one is answered 431 and the connection closed
    /// (default 16 KiB).
    pub max_header_line: usize,
    /// Largest request head (request line, headers, CRLFs and the blank
    /// line), counted afresh for every request of a keep-alive connection;
    /// a larger one is answered 431 and the connection closed (default
    /// 64 KiB).
    pub max_head: usize,
    /// A write that makes no progress for this long fails: a client that
    /// stops reading is dropped (default 120 s; zero means never).
    pub send_timeout: Duration,
    /// TCP keepalive: first probe after this much silence (default 60 s)...
    pub keepalive_idle: Duration,
    /// ...then one probe every this often (default 10 s)...
    pub keepalive_interval: Duration,
    /// ...and the connection is dropped after this many unanswered probes
    /// (default 6).
    pub keepalive_probes: u32,
    /// Unacknowledged data for this long means the peer is gone (TCP user
    /// timeout, default 120 s).
    pub tcp_user_timeout: Duration,
    /// Requests that announce a body larger than this are never read nor
    /// answered, because dropping them would make tiny_http allocate the
    /// unread remainder (default 4 TiB; see `alloc`).
    pub max_declared_body: usize,
}

impl ServerConfig {
    /// A server called `name` (at `version`) listening on `listen`, with
    /// envd's values for everything else.
    pub fn new(name: &'static str, version: &'static str, listen: Listen) -> Self {
        Self {
            name,
            version,
            listen,
            bind_hint: None,
            workers: WORKERS,
            queue_depth: QUEUE_DEPTH,
            max_long_running: MAX_LONG_RUNNING,
            max_upgraded: MAX_UPGRADED,
            max_json_body: MAX_JSON_BODY,
            max_header_line: MAX_HEADER_LINE,
            max_head: MAX_HEAD,
            send_timeout: SEND_TIMEOUT,
            keepalive_idle: KEEPALIVE_IDLE,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_probes: KEEPALIVE_PROBES,
            tcp_user_timeout: TCP_USER_TIMEOUT,
            max_declared_body: MAX_DECLARED_BODY,
        }
    }
}
