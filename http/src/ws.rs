//! WebSockets (RFC 6455, on the `tungstenite` crate) over a connection a
//! handler took over (`Handler::divert`).
//!
//! `accept` answers the upgrade and starts one I/O thread for the socket;
//! the application gets an `Outbox` to send with (cloneable, for any number
//! of threads) and an `Inbox` to receive text and binary messages from.
//! Both are bounded queues of 64 messages: a sender waits while the outbox
//! is full, and the I/O thread stops reading the socket while the inbox is
//! full, so a slow side slows the other down instead of filling memory.
//!
//! The I/O thread reads and writes on one thread without busy-waiting: the
//! socket is non-blocking and the thread sleeps in `poll(2)` on it and on a
//! wake-up socket that the outbox and inbox poke. It answers Pings, sends
//! its own every `Limits::ping_every` if asked to, closes with 1001 (going
//! away) when nothing arrived for `Limits::idle`, with 1009 (too big) for a
//! message or frame over the limits, with 1002 or 1007 for protocol errors,
//! and with 1000 once the application dropped its outbox and inbox. The
//! close handshake gets 5 seconds; the connection then ends. A peer that
//! takes none of the frames sent to it for 120 seconds is dropped.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, WebSocket};

use crate::error::ApiError;
use crate::takeover::{RequestHead, Upgraded};

/// A WebSocket message (text, binary, ping, pong, close), as `tungstenite`
/// defines it.
pub use tungstenite::Message;

/// Messages each of the outbox and the inbox holds.
const QUEUE: usize = 64;
/// How long a close handshake may take before the connection just ends.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After a failure, how long the close frame may take to go out and the
/// peer's last bytes are drained (so closing does not reset the
/// connection before the peer read the close frame).
const LINGER: Duration = Duration::from_secs(2);
/// A socket that takes none of the frames waiting for it for this long is
/// dropped (a peer that stopped reading; as `ServerConfig::send_timeout`).
const WRITE_STALL: Duration = Duration::from_secs(120);
/// Stack of each I/O thread (its buffers are on the heap).
const IO_STACK: usize = 512 << 10;
/// The longest close reason a close frame carries (125 bytes less the code).
const MAX_REASON: usize = 123;

/// What one WebSocket may take and how long it may stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message received, all its frames together; a larger one
    /// closes the socket with 1009 (default 16 MiB).
    pub max_message: usize,
    /// Largest single frame received; a larger one closes the socket with
    /// 1009 (default 16 MiB).
    pub max_frame: usize,
    /// The socket is closed with 1001 when nothing (no message, no ping, no
    /// pong) arrived for this long (default 120 s). Time the application
    /// leaves the inbox full does not count.
    pub idle: Duration,
    /// Send a Ping this often, so a peer that answers Pongs stays within
    /// `idle` (default none).
    pub ping_every: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message: 16 << 20,
            max_frame: 16 << 20,
            idle: Duration::from_secs(120),
            ping_every: None,
        }
    }
}

/// The WebSocket is closed (or closing): nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the WebSocket is closed; nothing more can be sent on it")
    }
}

impl std::error::Error for Closed {}

/// Why `Inbox::recv_timeout` returned no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// No message arrived in time; the socket is still open.
    Timeout,
    /// The socket is closed and every message received was taken.
    Closed,
}

/// What the outbox carries to the I/O thread.
#[derive(Debug)]
enum Command {
    Send(Message),
    Close(CloseFrame),
}

/// What the I/O thread, the outboxes and the inbox share.
#[derive(Debug)]
struct Shared {
    /// Set once `close` was called or the I/O thread ended.
    closed: AtomicBool,
    /// Set by the I/O thread while it holds a message the full inbox did
    /// not take; whoever makes room then wakes it.
    waiting_for_inbox: AtomicBool,
    /// Set when the inbox was dropped: messages received are dropped.
    inbox_gone: AtomicBool,
    /// The writing end of the I/O thread's wake-up socket.
    wake: UnixStream,
    /// Its reading end, which the I/O thread polls; held here so that a
    /// wake-up after the thread ended finds a full socket, not a broken one.
    woken: UnixStream,
}

impl Shared {
    /// Wakes the I/O thread. A full wake-up socket already wakes it.
    fn wake(&self) {
        let _ = (&self.wake).write(&[1]);
    }
}

/// Sends messages on one WebSocket; clone it for more senders. Sending
/// waits while 64 messages are queued for the socket.
#[derive(Debug, Clone)]
pub struct Outbox {
    commands: SyncSender<Command>,
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues `message` for the socket, waiting while the queue is full.
    /// `Err(Closed)` once `close` was called or the socket is gone.
    pub fn send(&self, message: Message) -> Result<(), Closed> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        self.commands
            .send(Command::Send(message))
            .map_err(|_| Closed)?;
        self.shared.wake();
        Ok(())
    }

    /// Sends a text message.
    pub fn text(&self, text: &str) -> Result<(), Closed> {
        self.send(Message::text(text))
    }

    /// Sends `value` as a text message of JSON.
    pub fn json(&self, value: &serde_json::Value) -> Result<(), Closed> {
        self.send(Message::text(value.to_string()))
    }

    /// Sends a binary message.
    pub fn binary(&self, data: Vec<u8>) -> Result<(), Closed> {
        self.send(Message::binary(data))
    }

    /// Closes the socket with `code` and `reason` (cut to 123 bytes) once
    /// the messages queued before have gone out; later sends fail. A code
    /// that may not be sent (1005, 1006, 1015, below 1000...) is sent as
    /// 1000. `Err(Closed)` if it was closed already.
    pub fn close(&self, code: u16, reason: &str) -> Result<(), Closed> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Err(Closed);
        }
        let frame = close_frame(CloseCode::from(code), reason);
        self.commands
            .send(Command::Close(frame))
            .map_err(|_| Closed)?;
        self.shared.wake();
        Ok(())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The last one gone may mean the socket should close.
        self.shared.wake();
    }
}

/// The text and binary messages received on one WebSocket, in order (the
/// I/O thread handles pings, pongs and the close handshake itself).
#[derive(Debug)]
pub struct Inbox {
    messages: Receiver<Message>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// The next message, waiting for it; `None` once the socket is closed
    /// and every message received was taken.
    pub fn recv(&self) -> Option<Message> {
        let message = self.messages.recv().ok();
        self.made_room();
        message
    }

    /// The next message, waiting at most `timeout` for it.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Message, Recv> {
        match self.messages.recv_timeout(timeout) {
            Ok(message) => {
                self.made_room();
                Ok(message)
            }
            Err(RecvTimeoutError::Timeout) => Err(Recv::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Recv::Closed),
        }
    }

    /// Wakes the I/O thread if it waits for room in the inbox.
    fn made_room(&self) {
        if self.shared.waiting_for_inbox.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared.inbox_gone.store(true, Ordering::Release);
        self.shared.waiting_for_inbox.store(false, Ordering::SeqCst);
        self.shared.wake();
    }
}

/// Completes the WebSocket handshake on a connection taken over at its
/// head and starts the socket's I/O thread (named `ws-io`).
///
/// The head must be a WebSocket upgrade (`GET`, `Upgrade: websocket`,
/// `Connection: Upgrade`) with `Sec-WebSocket-Version: 13` and a
/// `Sec-WebSocket-Key`; otherwise the client is answered 400 with the JSON
/// error, which is also returned. The answer is `101 Switching Protocols`
/// with no subprotocol and no extensions. An error after that (writing the
/// 101, starting the thread) closes the connection and is only returned.
pub fn accept(mut up: Upgraded, limits: Limits) -> Result<(Outbox, Inbox), ApiError> {
    let key = match handshake_key(up.head()) {
        Ok(key) => key.to_owned(),
        Err(err) => {
            up.respond_error(&err);
            return Err(err);
        }
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    let io_err = |err: io::Error| ApiError::from_io(&err, "cannot start the WebSocket");
    up.write_all(answer.as_bytes()).map_err(io_err)?;
    up.set_nonblocking(true).map_err(io_err)?;
    let (wake_read, wake_write) = UnixStream::pair().map_err(io_err)?;
    wake_read.set_nonblocking(true).map_err(io_err)?;
    wake_write.set_nonblocking(true).map_err(io_err)?;
    let part = up.take_buffered();
    let config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_frame));
    let ws = WebSocket::from_partially_read(up, part, Role::Server, Some(config));
    let (commands, commands_rx) = sync_channel(QUEUE);
    let (inbox, messages) = sync_channel(QUEUE);
    let shared = Arc::new(Shared {
        closed: AtomicBool::new(false),
        waiting_for_inbox: AtomicBool::new(false),
        inbox_gone: AtomicBool::new(false),
        wake: wake_write,
        woken: wake_read,
    });
    let now = Instant::now();
    let io = Io {
        ws,
        commands: commands_rx,
        inbox,
        shared: Arc::clone(&shared),
        limits,
        pending: None,
        blocked_write: false,
        blocked_since: None,
        last_received: now,
        next_ping: limits.ping_every.map(|every| now + every),
        close_by: None,
        outboxes_gone: false,
    };
    thread::Builder::new()
        .name("ws-io".into())
        .stack_size(IO_STACK)
        .spawn(move || io.run())
        .map_err(|err| {
            ApiError::unavailable(format!(
                "cannot start a thread for the WebSocket ({err}); retry later"
            ))
        })?;
    let outbox = Outbox {
        commands,
        shared: Arc::clone(&shared),
    };
    Ok((outbox, Inbox { messages, shared }))
}

/// The `Sec-WebSocket-Key` of a valid upgrade head, or the 400 to answer.
fn handshake_key(head: &RequestHead) -> Result<&str, ApiError> {
    if !head.is_websocket_upgrade() {
        return Err(ApiError::bad_request(format!(
            "{} takes WebSocket connections only: send GET with `Upgrade: websocket`, \
             `Connection: Upgrade`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`",
            head.path()
        )));
    }
    match head.header("sec-websocket-version") {
        Some("13") => {}
        version => {
            return Err(ApiError::bad_request(format!(
                "this server speaks WebSocket version 13 only (RFC 6455); the request asked \
                 for {}: send `Sec-WebSocket-Version: 13`",
                version.map_or("no version".to_owned(), |v| format!("version {v:?}"))
            )))
        }
    }
    match head.header("sec-websocket-key") {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(ApiError::bad_request(
            "a WebSocket upgrade needs a `Sec-WebSocket-Key` header (16 random bytes, base64)",
        )),
    }
}

/// A close frame with a code that may be sent and a reason that fits.
fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    let code = match code.is_allowed() {
        true => code,
        false => CloseCode::Normal,
    };
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].into(),
    }
}

/// Why the I/O loop stopped.
enum Stop {
    /// The connection is over (closed, dropped by the peer, or a close
    /// handshake ran out of time).
    Ended,
    /// The peer broke a limit or the protocol: close with this frame.
    Fail(CloseFrame),
}

/// The I/O thread of one WebSocket.
struct Io {
    ws: WebSocket<Upgraded>,
    commands: Receiver<Command>,
    inbox: SyncSender<Message>,
    shared: Arc<Shared>,
    limits: Limits,
    /// A message received that the full inbox did not take yet; the socket
    /// is not read meanwhile.
    pending: Option<Message>,
    /// Frames wait in tungstenite's buffer for the socket to take them;
    /// the outbox is not read meanwhile.
    blocked_write: bool,
    /// Since when the socket took none of the frames waiting for it.
    blocked_since: Option<Instant>,
    /// When the peer last sent anything.
    last_received: Instant,
    next_ping: Option<Instant>,
    /// Once a close handshake is under way: when to give up on it.
    close_by: Option<Instant>,
    /// Every outbox was dropped.
    outboxes_gone: bool,
}

impl Io {
    fn run(mut self) {
        let stop = loop {
            if let Err(stop) = self.turn() {
                break stop;
            }
        };
        self.shared.closed.store(true, Ordering::Release);
        if let Stop::Fail(frame) = stop {
            tracing::debug!(code = u16::from(frame.code), reason = %frame.reason,
                "closing a WebSocket");
            self.fail(frame);
        }
    }

    /// One round: hand on, read, write, check the clocks, then sleep until
    /// something can be done.
    fn turn(&mut self) -> Result<(), Stop> {
        self.deliver_pending();
        if self.pending.is_none() {
            self.read()?;
        }
        self.take_commands()?;
        self.check_clocks()?;
        self.flush()?;
        self.wait()
    }

    /// Reads messages until the socket has no more (or the inbox is full).
    fn read(&mut self) -> Result<(), Stop> {
        loop {
            match self.ws.read() {
                Ok(message) => {
                    self.last_received = Instant::now();
                    // Pings are answered by tungstenite (flushed below),
                    // pongs only count as life, a close is answered.
                    if matches!(message, Message::Text(_) | Message::Binary(_)) {
                        if let Err(message) = self.deliver(message) {
                            self.pending = Some(message);
                            return Ok(());
                        }
                    }
                }
                Err(WsError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(WsError::Io(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(WsError::Capacity(err)) => {
                    let reason = match err {
                        CapacityError::MessageTooLong { max_size, .. } => {
                            format!("message too big: this server takes up to {max_size} bytes")
                        }
                        other => other.to_string(),
                    };
                    return Err(Stop::Fail(close_frame(CloseCode::Size, &reason)));
                }
                Err(WsError::Utf8(_)) => {
                    let reason = "a text message is not valid UTF-8";
                    return Err(Stop::Fail(close_frame(CloseCode::Invalid, reason)));
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    return Err(Stop::Ended)
                }
                Err(WsError::Protocol(err)) => {
                    let reason = err.to_string();
                    return Err(Stop::Fail(close_frame(CloseCode::Protocol, &reason)));
                }
                Err(err) => {
                    if !matches!(err, WsError::ConnectionClosed | WsError::AlreadyClosed) {
                        tracing::debug!(error = %err, "a WebSocket ended");
                    }
                    return Err(Stop::Ended);
                }
            }
        }
    }

    /// Gives `message` to the inbox; `Err` with it while the inbox is full.
    fn deliver(&mut self, message: Message) -> Result<(), Message> {
        if self.shared.inbox_gone.load(Ordering::Acquire) {
            return Ok(());
        }
        let message = match self.inbox.try_send(message) {
            Err(TrySendError::Full(message)) => message,
            Ok(()) | Err(TrySendError::Disconnected(_)) => return Ok(()),
        };
        // Say so before trying again: a receiver that takes a message after
        // this sees the flag and wakes this thread.
        self.shared.waiting_for_inbox.store(true, Ordering::SeqCst);
        match self.inbox.try_send(message) {
            Err(TrySendError::Full(message)) => Err(message),
            Ok(()) | Err(TrySendError::Disconnected(_)) => {
                self.shared.waiting_for_inbox.store(false, Ordering::SeqCst);
                Ok(())
            }
        }
    }

    /// Hands on the message the inbox had no room for, if it has now.
    fn deliver_pending(&mut self) {
        if let Some(message) = self.pending.take() {
            match self.deliver(message) {
                // Waiting for the application was not the peer's silence.
                Ok(()) => self.last_received = Instant::now(),
                Err(message) => self.pending = Some(message),
            }
        }
    }

    /// Writes what the outboxes queued while the socket takes it.
    fn take_commands(&mut self) -> Result<(), Stop> {
        while !self.blocked_write {
            let command = match self.commands.try_recv() {
                Ok(command) => command,
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.outboxes_gone = true;
                    return Ok(());
                }
            };
            // Once closing, what was queued after the close is dropped.
            if !self.ws.can_write() {
                continue;
            }
            let written = match command {
                Command::Send(message) => self.ws.write(message),
                Command::Close(frame) => self.ws.close(Some(frame)),
            };
            self.written(written)?;
        }
        Ok(())
    }

    /// Sorts out the result of a write, close or flush.
    fn written(&mut self, result: tungstenite::Result<()>) -> Result<(), Stop> {
        match result {
            Ok(()) => Ok(()),
            // The frame is in tungstenite's buffer; it goes out once the
            // socket takes more.
            Err(WsError::Io(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                self.blocked_write = true;
                Ok(())
            }
            Err(WsError::Protocol(ProtocolError::SendAfterClosing)) => Ok(()),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Err(Stop::Ended),
            Err(err) => {
                tracing::debug!(error = %err, "writing to a WebSocket failed");
                Err(Stop::Ended)
            }
        }
    }

    /// Closes the socket when it is idle or unused, pings when it is time,
    /// and ends a close handshake that takes too long.
    fn check_clocks(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if let Some(by) = self.close_by {
            return match now >= by {
                true => Err(Stop::Ended),
                false => Ok(()),
            };
        }
        if !self.ws.can_write() {
            // A close handshake began (the peer's or one sent above).
            self.close_by = Some(now + CLOSE_WAIT);
            return Ok(());
        }
        let unused = self.outboxes_gone && self.shared.inbox_gone.load(Ordering::Acquire);
        let idle = self.pending.is_none() && now >= self.last_received + self.limits.idle;
        if unused || idle {
            let frame = match unused {
                true => close_frame(CloseCode::Normal, ""),
                false => close_frame(
                    CloseCode::Away,
                    &format!(
                        "nothing received for {} s; closing an idle connection",
                        self.limits.idle.as_secs()
                    ),
                ),
            };
            self.close_by = Some(now + CLOSE_WAIT);
            let closed = self.ws.close(Some(frame));
            return self.written(closed);
        }
        if let (Some(at), Some(every)) = (self.next_ping, self.limits.ping_every) {
            if now >= at {
                self.next_ping = Some(now + every);
                let pinged = self.ws.write(Message::Ping(Default::default()));
                return self.written(pinged);
            }
        }
        Ok(())
    }

    /// Pushes buffered frames (pongs and close replies too) to the socket.
    fn flush(&mut self) -> Result<(), Stop> {
        self.blocked_write = false;
        let flushed = self.ws.flush();
        self.written(flushed)?;
        let now = Instant::now();
        match (self.blocked_write, self.blocked_since) {
            (false, _) => self.blocked_since = None,
            (true, None) => self.blocked_since = Some(now),
            (true, Some(since)) if now >= since + WRITE_STALL => {
                tracing::debug!("a WebSocket peer stopped reading; dropping the connection");
                return Err(Stop::Ended);
            }
            (true, Some(_)) => {}
        }
        Ok(())
    }

    /// Sleeps until the socket can be read (unless the inbox is full) or
    /// written (if frames wait), the wake-up socket is poked, or a clock
    /// runs out.
    fn wait(&mut self) -> Result<(), Stop> {
        let mut events = 0;
        if self.pending.is_none() {
            events |= libc::POLLIN;
        }
        if self.blocked_write {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            poll_fd(self.ws.get_ref().as_raw_fd(), events),
            poll_fd(self.shared.woken.as_raw_fd(), libc::POLLIN),
        ];
        let timeout = self.next_deadline().map(|at| until(at, Instant::now()));
        if let Err(err) = poll(&mut fds, timeout) {
            tracing::error!(error = %err, "waiting on a WebSocket failed; closing it");
            return Err(Stop::Ended);
        }
        if fds[1].revents != 0 {
            let mut buf = [0; 64];
            while matches!((&self.shared.woken).read(&mut buf), Ok(n) if n > 0) {}
        }
        // A socket that is gone reports so even when not read: end rather
        // than wake up for it again and again.
        if self.pending.is_some() && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(Stop::Ended);
        }
        Ok(())
    }

    /// The next time a clock needs this thread.
    fn next_deadline(&self) -> Option<Instant> {
        if let Some(by) = self.close_by {
            return Some(by);
        }
        let idle = self
            .pending
            .is_none()
            .then(|| self.last_received + self.limits.idle);
        let stall = self.blocked_since.map(|since| since + WRITE_STALL);
        [idle, self.next_ping, stall].into_iter().flatten().min()
    }

    /// Closes with `frame` after a failure: pushes it out for a bounded
    /// time, stops writing, and drains what the peer still sends until it
    /// closes too or the time is up.
    fn fail(mut self, frame: CloseFrame) {
        let deadline = Instant::now() + LINGER;
        let mut result = self.ws.close(Some(frame));
        loop {
            match result {
                Err(WsError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                _ => break,
            }
            let fd = self.ws.get_ref().as_raw_fd();
            let mut fds = [poll_fd(fd, libc::POLLOUT)];
            let now = Instant::now();
            if now >= deadline || poll(&mut fds, Some(until(deadline, now))).is_err() {
                return;
            }
            result = self.ws.flush();
        }
        let socket = self.ws.get_mut();
        let _ = socket.shutdown(Shutdown::Write);
        let mut buf = vec![0; 16 << 10];
        loop {
            match socket.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
            let mut fds = [poll_fd(socket.as_raw_fd(), libc::POLLIN)];
            let now = Instant::now();
            if now >= deadline || poll(&mut fds, Some(until(deadline, now))).is_err() {
                return;
            }
        }
    }
}

fn poll_fd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Milliseconds from `now` to `at`, rounded up (so a wake-up is never
/// early and spinning), at most `i32::MAX`.
fn until(at: Instant, now: Instant) -> i32 {
    let ms = at.saturating_duration_since(now).as_micros().div_ceil(1000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

/// `poll(2)` on `fds` for at most `timeout` ms (`None`: no limit); a signal
/// counts as a wake-up.
fn poll(fds: &mut [libc::pollfd], timeout: Option<i32>) -> io::Result<()> {
    // SAFETY: `fds` is a live, writable slice of `pollfd` whose length is
    // passed along; poll(2) only writes their `revents` fields.
    let rc = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.unwrap_or(-1),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_get_sendable_codes_and_short_reasons() {
        let long = "é".repeat(100);
        let frame = close_frame(CloseCode::from(1006), &long);
        assert_eq!(frame.code, CloseCode::Normal);
        assert!(frame.reason.len() <= MAX_REASON);
        assert!(long.starts_with(frame.reason.as_str()));
        assert_eq!(
            close_frame(CloseCode::from(4000), "x").code,
            CloseCode::from(4000)
        );
    }

    #[test]
    fn deadlines_round_up_to_whole_milliseconds() {
        let now = Instant::now();
        assert_eq!(until(now, now), 0);
        assert_eq!(until(now + Duration::from_micros(1), now), 1);
        assert_eq!(until(now - Duration::from_secs(1), now), 0);
        assert_eq!(until(now + Duration::from_secs(1 << 40), now), i32::MAX);
    }
}
