//! Real-time NDJSON responses.
//!
//! tiny_http's own chunked encoder only emits a chunk when its internal buffer
//! fills, so small events would sit in memory. Streams therefore take the raw
//! connection writer (`Request::into_writer`), write the status line and
//! headers themselves and frame every batch of events as one HTTP chunk,
//! flushed right away. Streamed responses say `Connection: close`: the end of
//! the stream is the zero-length chunk, and the connection is not reused.
//!
//! A handler streams by taking the request (`Exchange::take_request`),
//! opening an `NdjsonStream` on it and answering `Reply::Streamed`. Its route
//! should be long-running (`Handler::is_long_running`), so the stream gets a
//! thread of its own instead of holding a pool worker.

use std::io::{self, Write};
use std::time::Duration;

use serde::Serialize;
use tiny_http::{HTTPVersion, Request};

/// A quiet stream sends a keepalive event this often, which also notices
/// clients that went away.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// A chunked `application/x-ndjson` response being written.
pub struct NdjsonStream {
    out: Box<dyn Write + Send>,
    chunked: bool,
    pending: Vec<u8>,
}

impl NdjsonStream {
    /// Sends the 200 status line and headers for `request` and flushes them.
    pub fn open(request: Request) -> io::Result<Self> {
        Self::open_as(request, "application/x-ndjson")
    }

    /// The same for another streamed type, such as `text/event-stream`
    /// (whose events the caller frames and sends with [`Self::send_raw`]).
    pub fn open_as(request: Request, content_type: &str) -> io::Result<Self> {
        let chunked = *request.http_version() >= HTTPVersion(1, 1);
        let mut out = request.into_writer();
        let head = if chunked {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        } else {
            "HTTP/1.0 200 OK\r\n"
        };
        out.write_all(head.as_bytes())?;
        write!(
            out,
            "Content-Type: {content_type}\r\n\
             Cache-Control: no-store\r\n\
             X-Accel-Buffering: no\r\n\
             Connection: close\r\n\r\n"
        )?;
        out.flush()?;
        Ok(Self {
            out,
            chunked,
            pending: Vec::with_capacity(4096),
        })
    }

    /// Adds one event line to the next chunk without sending it yet.
    pub fn queue<T: Serialize>(&mut self, event: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.pending, event).map_err(io::Error::other)?;
        self.pending.push(b'\n');
        Ok(())
    }

    /// Bytes queued and not yet sent.
    pub fn queued_len(&self) -> usize {
        self.pending.len()
    }

    /// Sends one event right away.
    pub fn send<T: Serialize>(&mut self, event: &T) -> io::Result<()> {
        self.queue(event)?;
        self.flush()
    }

    /// Sends `data` as it is, right away.
    pub fn send_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        self.flush()
    }

    /// Sends everything queued as one chunk and flushes the socket.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let mut frame = Vec::with_capacity(self.pending.len() + 16);
            write!(frame, "{:x}\r\n", self.pending.len())?;
            frame.extend_from_slice(&self.pending);
            frame.extend_from_slice(b"\r\n");
            self.out.write_all(&frame)?;
        } else {
            self.out.write_all(&self.pending)?;
        }
        self.pending.clear();
        self.out.flush()
    }

    /// Sends what is queued and the terminating zero-length chunk.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}
