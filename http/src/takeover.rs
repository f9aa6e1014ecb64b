//! Connection takeover: a handler may take a client connection away from
//! the relay at a request head (a WebSocket upgrade, a tunnel to another
//! server) instead of letting tiny_http answer it.
//!
//! The relay shows every request head it reads to `Handler::divert` as a
//! `RequestHead`, before forwarding it. A `Takeover` returned there gets the
//! connection as an `Upgraded` once every earlier request on it has been
//! answered, and runs on the connection's own relay thread; the relay serves
//! nothing more on that connection. The request's body (if any) is not read
//! by the relay: it is the first thing an `Upgraded` reads, right after the
//! bytes the relay had already buffered. At most
//! `ServerConfig::max_upgraded` connections are taken over at once; more
//! are answered 503 with the JSON error body.
//!
//! `tunnel` is one ready-made takeover: it copies bytes both ways between
//! the client and another TCP server (an HTTP or WebSocket port proxy).
//! `ws::accept` is another: it completes a WebSocket handshake.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::error::ApiError;
use crate::head::crlf_lines;
use crate::relay::{json_response_bytes, linger, Client};
use crate::server::Permit;

/// Bytes moved per read by `tunnel`.
const TUNNEL_BUFFER: usize = 64 << 10;
/// Stack of `tunnel`'s second thread (its buffer is on the heap).
const TUNNEL_STACK: usize = 256 << 10;

/// What a handler does with a connection it takes over: a closure that is
/// given the connection once every earlier request on it was answered, and
/// runs on the connection's relay thread (it may block there, or hand the
/// connection to threads of its own and return).
pub type Takeover = Box<dyn FnOnce(Upgraded) + Send>;

/// Where a piece of a head is, as byte offsets into it.
type Span = Range<usize>;

/// One request head as the client sent it, shown to `Handler::divert`
/// before anything else reads the request. Header names and values that
/// are not UTF-8 are skipped; `raw` still has them.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The head as received, ending with the blank line.
    raw: Vec<u8>,
    /// Where the method is in `raw`.
    method: Span,
    /// Where the request target (path and query) is in `raw`.
    target: Span,
    /// Where each header's name and value (trimmed) are in `raw`, in order.
    headers: Vec<(Span, Span)>,
}

impl RequestHead {
    /// Finds the method, the target and the headers of a complete head
    /// (request line, header lines, blank line), as `head.rs` read it.
    pub(crate) fn parse(raw: Vec<u8>) -> Self {
        let (method, target, headers) = Self::find_parts(&raw);
        Self {
            method,
            target,
            headers,
            raw,
        }
    }

    /// Where the method, the target and each header are in `raw`.
    fn find_parts(raw: &[u8]) -> (Span, Span, Vec<(Span, Span)>) {
        let mut lines = crlf_lines(raw);
        let request_line = lines.next().unwrap_or_default();
        let mut words = words(raw, request_line);
        let method = words.next().unwrap_or_default();
        let target = words.next().unwrap_or_default();
        let headers = lines
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                let name = trimmed(raw, &line[..colon]);
                let value = trimmed(raw, &line[colon + 1..]);
                let valid = |r: &Span| std::str::from_utf8(&raw[r.clone()]).is_ok();
                (!name.is_empty() && valid(&name) && valid(&value)).then_some((name, value))
            })
            .collect();
        (method, target, headers)
    }

    /// The text at `range` of the head ("" where it is not UTF-8).
    fn text(&self, range: &Span) -> &str {
        std::str::from_utf8(&self.raw[range.clone()]).unwrap_or("")
    }

    /// The request method, as sent (`GET`).
    pub fn method(&self) -> &str {
        self.text(&self.method)
    }

    /// The request target as sent, still percent-encoded, query included
    /// (`/ws/echo?x=1`).
    pub fn target(&self) -> &str {
        self.text(&self.target)
    }

    /// The target without its query (`/ws/echo`).
    pub fn path(&self) -> &str {
        let target = self.target();
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    /// The query after the `?`, still percent-encoded; `None` without a
    /// `?` (see `Query::parse` to decode it).
    pub fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, query)| query)
    }

    /// The value of the first header called `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// Every header as `(name, value)`, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers
            .iter()
            .map(|(name, value)| (self.text(name), self.text(value)))
    }

    /// Whether this asks for a WebSocket: `GET` with `Upgrade: websocket`
    /// and a `Connection` header that lists `upgrade` (RFC 6455, 4.2.1).
    /// It does not check the version or the key; `ws::accept` does.
    pub fn is_websocket_upgrade(&self) -> bool {
        let lists = |name, token: &str| {
            self.header(name).is_some_and(|value| {
                value
                    .split(',')
                    .any(|item| item.trim().eq_ignore_ascii_case(token))
            })
        };
        self.method() == "GET" && lists("upgrade", "websocket") && lists("connection", "upgrade")
    }

    /// The head as received: request line, headers and the blank line.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

/// The space-separated words of `line`, a slice of `raw`, as ranges of it.
fn words<'a>(raw: &'a [u8], line: &'a [u8]) -> impl Iterator<Item = Span> + 'a {
    let base = offset(raw, line);
    let mut at = 0;
    std::iter::from_fn(move || {
        while line.get(at) == Some(&b' ') {
            at += 1;
        }
        let start = at;
        while line.get(at).is_some_and(|&b| b != b' ') {
            at += 1;
        }
        (at > start).then(|| base + start..base + at)
    })
}

/// `part` (a slice of `raw`) without surrounding blanks, as a range of `raw`.
fn trimmed(raw: &[u8], part: &[u8]) -> Span {
    let base = offset(raw, part);
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = part.iter().position(|b| !blank(b)).unwrap_or(part.len());
    let end = part
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |at| at + 1);
    base + start..base + end
}

/// Where `part`, a slice of `raw`, starts in it.
fn offset(raw: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).saturating_sub(raw.as_ptr() as usize)
}

/// A client connection taken over from the relay, with the head that asked
/// for it. Reads return first the bytes the relay had read past the head
/// (the start of the body or of the new protocol), then the socket's.
/// The connection closes when the last clone is dropped.
pub struct Upgraded {
    client: Client,
    /// Bytes the relay read past the head; reads return them first.
    buffered: Vec<u8>,
    /// How many of `buffered` have been read.
    consumed: usize,
    head: Arc<RequestHead>,
    /// This connection's place under `max_upgraded`, given back when the
    /// last clone is dropped.
    _slot: Option<Arc<Permit>>,
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded")
            .field("fd", &self.as_raw_fd())
            .field("buffered", &(self.buffered.len() - self.consumed))
            .field("target", &self.head.target())
            .finish()
    }
}

impl Upgraded {
    pub(crate) fn new(
        client: Client,
        buffered: Vec<u8>,
        head: RequestHead,
        slot: Option<Permit>,
    ) -> Self {
        Self {
            client,
            buffered,
            consumed: 0,
            head: Arc::new(head),
            _slot: slot.map(Arc::new),
        }
    }

    /// The request head that asked for this connection.
    pub fn head(&self) -> &RequestHead {
        &self.head
    }

    /// A second handle on the same connection (say, one for a thread that
    /// writes while this one reads). The clone shares the socket but not
    /// the buffered bytes: those stay with `self`, so read from the
    /// original and use clones for writing (or reading only once the
    /// original's buffer is known to be empty).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            client: self.client.try_clone()?,
            buffered: Vec::new(),
            consumed: 0,
            head: Arc::clone(&self.head),
            _slot: self._slot.clone(),
        })
    }

    /// Makes reads fail with `WouldBlock`/`TimedOut` after `timeout`
    /// without data; `None` waits forever (the default). Shared by clones.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.client.set_read_timeout(timeout)
    }

    /// Shuts down reading, writing or both, for every clone.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.client.shutdown_checked(how)
    }

    /// Puts the socket (all clones) in non-blocking mode or takes it out.
    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.client.set_nonblocking(nonblocking)
    }

    /// Takes the bytes the relay buffered and nobody read yet.
    pub(crate) fn take_buffered(&mut self) -> Vec<u8> {
        let mut buffered = std::mem::take(&mut self.buffered);
        buffered.drain(..self.consumed);
        self.consumed = 0;
        buffered
    }

    /// Answers the request with `err` (its status, `Content-Type:
    /// application/json`, the JSON error body, `Connection: close`), then
    /// closes the connection after a short, bounded wait for the client to
    /// read it.
    pub fn respond_error(self, err: &ApiError) {
        self.respond_json(err.status(), &err.to_json());
    }

    /// Answers the request with `status` and JSON `body` (and
    /// `Connection: close`), then closes the connection like
    /// [`Upgraded::respond_error`].
    pub fn respond_json(mut self, status: u16, body: &serde_json::Value) {
        let reason = tiny_http::StatusCode(status).default_reason_phrase();
        let response = json_response_bytes(status, reason, body);
        if self.client.write_all(&response).is_ok() {
            self.client.shutdown(Shutdown::Write);
            linger(self.client);
        }
    }
}

impl Read for Upgraded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.buffered[self.consumed..];
        if left.is_empty() {
            return self.client.read(buf);
        }
        let n = left.len().min(buf.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.consumed += n;
        if self.consumed == self.buffered.len() {
            self.buffered = Vec::new();
            self.consumed = 0;
        }
        Ok(n)
    }
}

impl Write for Upgraded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.client.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Upgraded {
    fn as_raw_fd(&self) -> RawFd {
        self.client.as_fd().as_raw_fd()
    }
}

impl AsFd for Upgraded {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.client.as_fd()
    }
}

/// Connects the client to `upstream`, another server: writes `first` (the
/// request head the upstream should see, maybe rewritten from
/// `up.head().raw()`) to it, then copies bytes both ways until both
/// directions have ended, the client's side starting with the bytes the
/// relay had buffered (the start of the body). When one side stops sending
/// (end of file), the other side's writing half is shut down, so a client
/// that half-closes still gets its answer. An error in either direction
/// ends both; the first error is returned.
pub fn tunnel(up: Upgraded, upstream: TcpStream, first: &[u8]) -> io::Result<()> {
    let mut to_upstream = upstream.try_clone()?;
    to_upstream.write_all(first)?;
    let mut to_client = up.try_clone()?;
    let mut from_upstream = upstream;
    let back = thread::Builder::new()
        .name("tunnel".into())
        .stack_size(TUNNEL_STACK)
        .spawn(move || {
            let copied = copy(&mut from_upstream, &mut to_client);
            match copied {
                Ok(()) => {
                    let _ = to_client.shutdown(Shutdown::Write);
                }
                Err(_) => {
                    let _ = to_client.shutdown(Shutdown::Both);
                    let _ = from_upstream.shutdown(Shutdown::Both);
                }
            }
            copied
        })?;
    let mut from_client = up;
    let forward = copy(&mut from_client, &mut to_upstream);
    match forward {
        Ok(()) => {
            let _ = to_upstream.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = to_upstream.shutdown(Shutdown::Both);
            let _ = from_client.shutdown(Shutdown::Both);
        }
    }
    let backward = back
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the tunnel's copying thread panicked")));
    forward.and(backward)
}

/// Copies `from` to `to` until `from` ends.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0; TUNNEL_BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        RequestHead::parse(raw.as_bytes().to_vec())
    }

    #[test]
    fn heads_give_method_target_path_query_and_headers() {
        let h = head("GET /ws/echo?a=1&b HTTP/1.1\r\nHost: x\r\nX-Two:  a b \r\nhost: y\r\n\r\n");
        assert_eq!(h.method(), "GET");
        assert_eq!(h.target(), "/ws/echo?a=1&b");
        assert_eq!(h.path(), "/ws/echo");
        assert_eq!(h.query(), Some("a=1&b"));
        assert_eq!(
            h.header("HOST"),
            Some("x"),
            "the first header of a name wins"
        );
        assert_eq!(h.header("x-two"), Some("a b"));
        assert_eq!(h.header("missing"), None);
        let all: Vec<_> = h.headers().collect();
        assert_eq!(all, [("Host", "x"), ("X-Two", "a b"), ("host", "y")]);
        assert!(h.raw().ends_with(b"\r\n\r\n"));
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").query(), None);
    }

    #[test]
    fn websocket_upgrades_need_get_upgrade_and_connection_tokens() {
        let ws =
            "GET /ws HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\n";
        assert!(head(ws).is_websocket_upgrade());
        assert!(!head(&ws.replace("GET", "POST")).is_websocket_upgrade());
        assert!(!head(&ws.replace("keep-alive, Upgrade", "keep-alive")).is_websocket_upgrade());
        assert!(!head(&ws.replace("WebSocket", "h2c")).is_websocket_upgrade());
        assert!(!head("GET / HTTP/1.1\r\n\r\n").is_websocket_upgrade());
    }

    #[test]
    fn odd_heads_do_not_panic() {
        let h =
            RequestHead::parse(b"GET  /x\r\nBad\xff: v\r\n: empty\r\nNo colon\r\n\r\n".to_vec());
        assert_eq!((h.method(), h.target()), ("GET", "/x"));
        assert_eq!(h.headers().count(), 0);
        let empty = RequestHead::parse(Vec::new());
        assert_eq!(
            (empty.method(), empty.path(), empty.query()),
            ("", "", None)
        );
    }
}
