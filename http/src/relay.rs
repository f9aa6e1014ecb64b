//! The relay in front of tiny_http: every client connection is read here
//! first, so that no request head past the server's limits ever reaches
//! tiny_http, which would read it whole into memory (docs/decisions.md,
//! "Request head limits").
//!
//! For each request on a client connection the relay reads the head under
//! the limits (`head.rs`), writes it to tiny_http's private backend socket
//! and forwards the body by its framing. One backend connection serves a
//! client connection's requests as long as tiny_http's framing is sure to
//! match the relay's (bodies with a length, which tiny_http always reads to
//! the end); a request with a chunked body gets `Connection: close` inserted
//! first, so tiny_http reads no head after it, and the next request goes to
//! a fresh backend connection once that one has been answered. A second
//! thread per client connection copies responses back in order. A head over
//! a limit is answered 431 with the JSON error body, after the answers to
//! the requests before it, and the connection is closed after a short,
//! bounded linger.
//!
//! Every head read is first shown to the handler's `divert`
//! (`takeover.rs`). A head the handler takes over is not forwarded: the
//! relay retires the current backend connection (so every earlier request
//! is answered first), then runs the takeover on this connection's thread
//! with the client socket and the bytes already buffered past the head, and
//! serves nothing more on the connection. At most `max_upgraded`
//! connections are taken over at once; past that the head is answered 503.
//!
//! It is not an HTTP implementation: tiny_http still parses each request and
//! writes each response; the relay only finds where requests begin and end.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{SocketAddr, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::head::{read_head, read_line, Framing, Head, HeadError, HeadLimits};
use crate::pool::Pool;
use crate::server::Permit;
use crate::takeover::{RequestHead, Takeover, Upgraded};

/// Client bytes buffered per connection while heads are read.
const READ_BUFFER: usize = 8 << 10;
/// Bytes moved per read when copying bodies and responses.
const COPY_BUFFER: usize = 64 << 10;
/// Stack of each relay thread (their buffers are on the heap).
const THREAD_STACK: usize = 256 << 10;
/// After a 431 the client's unread bytes are drained for at most this
/// long...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ...or this many bytes, so the answer is not lost to a TCP reset.
const LINGER_BYTES: u64 = 4 << 20;
/// Connecting to the backend is retried this long while it listens again.
const BACKEND_WAIT: Duration = Duration::from_secs(5);

/// What every connection of one server shares.
pub(crate) struct Relay {
    /// The server's name, for messages.
    name: &'static str,
    /// tiny_http's private socket.
    backend: SocketAddr,
    limits: HeadLimits,
    /// Threads for connections and their response copies.
    threads: Pool,
    /// Asks the handler whether it takes a connection over at a head.
    divert: Divert,
    /// Connections taken over at once, at most `max_upgraded`.
    upgraded: Arc<AtomicUsize>,
    max_upgraded: usize,
}

/// `Handler::divert` of the server's handler, without its type.
pub(crate) type Divert = Arc<dyn Fn(&RequestHead) -> Option<Takeover> + Send + Sync>;

/// An accepted client connection.
pub(crate) enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Client {
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
            Self::Unix(s) => s.try_clone().map(Self::Unix),
        }
    }

    /// Shuts the socket down, ignoring failures (a peer already gone).
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = self.shutdown_checked(how);
    }

    pub(crate) fn shutdown_checked(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(timeout),
            Self::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(nonblocking),
            Self::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Client {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Relay {
    /// The relay for one server; `divert` is asked about every head, and
    /// at most `max_upgraded` connections are taken over at once.
    pub(crate) fn new(
        name: &'static str,
        backend: SocketAddr,
        limits: HeadLimits,
        divert: Divert,
        max_upgraded: usize,
    ) -> Self {
        Self {
            name,
            backend,
            limits,
            threads: Pool::new(format!("{name}-conn"), THREAD_STACK),
            divert,
            upgraded: Arc::new(AtomicUsize::new(0)),
            max_upgraded,
        }
    }

    /// Serves one client connection on a thread of its own.
    pub(crate) fn spawn(self: &Arc<Self>, client: Client) {
        let relay = Arc::clone(self);
        if let Err(err) = self.threads.run(move || relay.serve(client)) {
            tracing::error!(error = %err, "cannot start a thread for a connection; closing it");
        }
    }

    fn serve(&self, client: Client) {
        let Ok(out) = client.try_clone() else {
            return;
        };
        let Some(responses) = Responses::start(&self.threads, &out) else {
            return;
        };
        let mut input = BufReader::with_capacity(READ_BUFFER, client);
        let mut backend = None;
        loop {
            let head = match read_head(&mut input, self.limits) {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(err) => {
                    // The answers to earlier requests go out first.
                    if backend.take().is_some_and(|b| !responses.retire(b)) {
                        return;
                    }
                    return self.refuse(input, out, &err);
                }
            };
            if let Some(takeover) = self.diverted(&head) {
                // The answers to earlier requests go out first; the response
                // thread then ends with `responses`.
                if backend.take().is_some_and(|b| !responses.retire(b)) {
                    return;
                }
                drop((responses, out));
                return self.take_over(input, takeover);
            }
            let to_backend = match &mut backend {
                Some(to_backend) => to_backend,
                None => match self.open(&responses) {
                    Some(opened) => backend.insert(opened),
                    None => return self.unavailable(input, out),
                },
            };
            if !head.reusable {
                // tiny_http will close this backend connection itself.
                to_backend.planned.store(true, Ordering::Release);
            }
            let forwarded = to_backend
                .write_all(&head.for_backend())
                .map_err(HeadError::Io)
                .and_then(|()| forward_body(&mut input, to_backend, head.framing, self.limits));
            // Returning drops the backend writer: tiny_http reads no
            // further, answers what it has, and the response thread copies
            // that to the client before the connection closes.
            if forwarded.is_err() || !head.keep_alive {
                return;
            }
            if !head.reusable && backend.take().is_some_and(|b| !responses.retire(b)) {
                return;
            }
        }
    }

    /// The takeover the handler wants at `head`, if any (a handler that
    /// panics wants none).
    fn diverted(&self, head: &Head) -> Option<(RequestHead, Takeover)> {
        let request = RequestHead::parse(head.bytes().to_vec());
        match catch_unwind(AssertUnwindSafe(|| (self.divert)(&request))) {
            Ok(takeover) => takeover.map(|t| (request, t)),
            Err(_) => {
                tracing::error!(
                    server = self.name,
                    "the handler panicked in divert; not taking over"
                );
                None
            }
        }
    }

    /// Hands the connection, with what the relay read past the head, to
    /// the takeover on this thread; over `max_upgraded` it answers 503.
    fn take_over(&self, input: BufReader<Client>, (head, takeover): (RequestHead, Takeover)) {
        let buffered = input.buffer().to_vec();
        let client = input.into_inner();
        let Some(slot) = Permit::acquire(&self.upgraded, self.max_upgraded) else {
            let busy = ApiError::unavailable(format!(
                "{} already has {} upgraded connections (WebSockets, tunnels) open; \
                 retry later",
                self.name, self.max_upgraded
            ));
            tracing::warn!(server = self.name, error = %busy, "refusing a connection takeover");
            return Upgraded::new(client, buffered, head, None).respond_error(&busy);
        };
        let upgraded = Upgraded::new(client, buffered, head, Some(slot));
        if catch_unwind(AssertUnwindSafe(|| takeover(upgraded))).is_err() {
            tracing::error!(
                server = self.name,
                "a connection takeover panicked; its connection is closed"
            );
        }
    }

    /// A fresh backend connection, registered with the response thread.
    fn open(&self, responses: &Responses) -> Option<BackendWriter> {
        let stream = self.connect()?;
        let planned = Arc::new(AtomicBool::new(false));
        let response = stream.try_clone().ok()?;
        responses.jobs.send((response, Arc::clone(&planned))).ok()?;
        Some(BackendWriter {
            stream,
            gone: false,
            planned,
        })
    }

    fn unavailable(&self, input: BufReader<Client>, out: Client) {
        let busy = ApiError::unavailable(format!(
            "{} is not accepting requests right now; retry shortly",
            self.name
        ));
        answer(input, out, 503, "Service Unavailable", &busy);
    }

    fn connect(&self) -> Option<UnixStream> {
        let deadline = Instant::now() + BACKEND_WAIT;
        let mut delay = Duration::from_millis(10);
        loop {
            match UnixStream::connect_addr(&self.backend) {
                Ok(stream) => return Some(stream),
                Err(err) if Instant::now() >= deadline => {
                    tracing::error!(error = %err, "cannot reach the request handlers");
                    return None;
                }
                Err(_) => thread::sleep(delay),
            }
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Answers a head over a limit with 431; other failures just close.
    fn refuse(&self, input: BufReader<Client>, out: Client, err: &HeadError) {
        let Some(api_error) = err.to_api_error() else {
            if let HeadError::Io(io_err) = err {
                tracing::debug!(error = %io_err, "reading a request failed; closing the connection");
            }
            return;
        };
        tracing::warn!(server = self.name, error = %api_error, "refusing a request head");
        let reason = match api_error.status() {
            400 => "Bad Request",
            _ => "Request Header Fields Too Large",
        };
        answer(input, out, api_error.status(), reason, &api_error);
    }
}

/// Writes a JSON error response on `out`, then closes the connection.
fn answer(input: BufReader<Client>, mut out: Client, status: u16, reason: &str, err: &ApiError) {
    if out
        .write_all(&error_response_bytes(status, reason, err))
        .is_ok()
    {
        out.shutdown(Shutdown::Write);
        linger(input.into_inner());
    }
}

/// A whole HTTP/1.1 response carrying `err` as its JSON body, with
/// `Connection: close`.
pub(crate) fn error_response_bytes(status: u16, reason: &str, err: &ApiError) -> Vec<u8> {
    json_response_bytes(status, reason, &err.to_json())
}

/// A whole `Connection: close` response with JSON body `body`.
pub(crate) fn json_response_bytes(status: u16, reason: &str, body: &serde_json::Value) -> Vec<u8> {
    let mut body = body.to_string();
    body.push('\n');
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads and drops what the client still sends, for a bounded time and
/// amount: closing a socket with unread input resets the connection, and
/// the client could lose the answer it has not read yet.
pub(crate) fn linger(mut client: Client) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = [0; 4096];
    let mut drained = 0u64;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n as u64,
        }
    }
}

/// Copies the body of one request from the client to the backend.
fn forward_body(
    input: &mut BufReader<Client>,
    out: &mut BackendWriter,
    framing: Framing,
    limits: HeadLimits,
) -> Result<(), HeadError> {
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(length) => copy_exactly(input, out, length),
        Framing::Chunked => forward_chunks(input, out, limits),
    }
}

/// Forwards a chunked body: size lines and trailers are held to the head
/// limits, chunk data is copied as it comes.
fn forward_chunks(
    input: &mut BufReader<Client>,
    out: &mut BackendWriter,
    limits: HeadLimits,
) -> Result<(), HeadError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(input, &mut line, limits)? {
            return Err(HeadError::Truncated);
        }
        out.write_all(&line).map_err(HeadError::Io)?;
        let size = chunk_size(&line).ok_or(HeadError::Truncated)?;
        if size == 0 {
            return forward_trailers(input, out, limits);
        }
        // The chunk and the CRLF after it.
        copy_exactly(input, out, size.saturating_add(2))?;
    }
}

/// Forwards the trailer lines after the last chunk, up to the blank line.
fn forward_trailers(
    input: &mut BufReader<Client>,
    out: &mut BackendWriter,
    limits: HeadLimits,
) -> Result<(), HeadError> {
    let mut trailers = Vec::new();
    loop {
        let start = trailers.len();
        if !read_line(input, &mut trailers, limits)? {
            return Err(HeadError::Truncated);
        }
        out.write_all(&trailers[start..]).map_err(HeadError::Io)?;
        if trailers.len() - start == 2 {
            return Ok(());
        }
    }
}

/// The size on a chunk-size line (hex, maybe followed by `;extensions`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let digits = text.split([';', '\r']).next()?.trim();
    u64::from_str_radix(digits, 16).ok()
}

fn copy_exactly(
    input: &mut BufReader<Client>,
    out: &mut BackendWriter,
    length: u64,
) -> Result<(), HeadError> {
    let copied = pump(&mut input.take(length), out).map_err(HeadError::Io)?;
    match copied == length {
        true => Ok(()),
        false => Err(HeadError::Truncated),
    }
}

/// Copies `from` to `to` until the end, in reads of up to 64 KiB (a
/// `BufReader` with nothing buffered reads straight into them); returns the
/// bytes copied.
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0; COPY_BUFFER];
    let mut copied = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        to.write_all(&buf[..n])?;
        copied += n as u64;
    }
}

/// A backend read side on which a reset is the end: tiny_http closing with
/// an unread body in its buffer resets the connection after its response.
struct ResetIsEnd<'a>(&'a mut UnixStream);

impl Read for ResetIsEnd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => Ok(0),
            result => result,
        }
    }
}

/// The relay's side of a backend connection. Once the backend stops
/// reading (tiny_http closed the connection), writes are dropped, so the
/// client's body is still consumed. Dropping it half-closes the connection:
/// tiny_http then ends it once it has answered.
struct BackendWriter {
    stream: UnixStream,
    gone: bool,
    /// Set before the half-close: the end of this backend's responses is
    /// the relay's doing, not tiny_http dropping the connection.
    planned: Arc<AtomicBool>,
}

impl Write for BackendWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.gone {
            match self.stream.write(buf) {
                Ok(n) => return Ok(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => return Err(err),
                Err(_) => self.gone = true,
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BackendWriter {
    fn drop(&mut self) {
        self.planned.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// The thread that copies the responses of each backend connection to the
/// client, one connection after the other, so they arrive in order.
struct Responses {
    jobs: Sender<(UnixStream, Arc<AtomicBool>)>,
    /// One message per backend connection that ended: whether all its
    /// responses reached the client.
    done: Receiver<bool>,
}

impl Responses {
    fn start(threads: &Pool, out: &Client) -> Option<Self> {
        let mut out = out.try_clone().ok()?;
        let (jobs, backends) = channel::<(UnixStream, Arc<AtomicBool>)>();
        let (finished, done) = channel();
        let spawned = threads.run(move || {
            for (mut backend, planned) in backends {
                let delivered = pump(&mut ResetIsEnd(&mut backend), &mut out).is_ok();
                // tiny_http closed on its own (a head it could not read,
                // an expectation it refused): it serves nothing more on
                // this client connection, so close that too.
                if !delivered || !planned.load(Ordering::Acquire) {
                    out.shutdown(Shutdown::Both);
                }
                if finished.send(delivered).is_err() {
                    return;
                }
            }
        });
        match spawned {
            Ok(_) => Some(Self { jobs, done }),
            Err(err) => {
                tracing::error!(error = %err, "cannot start a thread for a connection; closing it");
                None
            }
        }
    }

    /// Ends a backend connection and waits until its last response has been
    /// copied; `false` if the client did not get them all.
    fn retire(&self, backend: BackendWriter) -> bool {
        drop(backend);
        self.done.recv().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1f\r\n"), Some(31));
        assert_eq!(chunk_size(b"A;name=value\r\n"), Some(10));
        assert_eq!(chunk_size(b"0\r\n"), Some(0));
        assert_eq!(chunk_size(b"zz\r\n"), None);
        assert_eq!(chunk_size(b"ffffffffffffffffff\r\n"), None);
    }
}
