//! Reading one request head (request line, header lines, blank line) off a
//! client connection under two limits: the longest line and the whole head.
//! tiny_http 0.12 reads heads with no limit at all, so the relay
//! (`relay.rs`) reads every head here first and hands tiny_http only heads
//! that passed.
//!
//! This is not an HTTP parser for handlers: it learns only what the relay
//! needs to find where the request ends (its body framing) and whether
//! another request may follow on the connection, by tiny_http's own rules
//! (first header of a name wins, `Transfer-Encoding` beats
//! `Content-Length`, lines end at CRLF only).

use std::borrow::Cow;
use std::io::{self, BufRead};

use crate::error::ApiError;

/// The limits one request head must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadLimits {
    /// Longest line, not counting its CRLF.
    pub line: usize,
    /// Whole head, every CRLF and the blank line included.
    pub head: usize,
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding`: chunks, then a zero-sized one.
    Chunked,
}

/// One request head that passed the limits.
#[derive(Debug)]
pub(crate) struct Head {
    /// The head as received, ending with the blank line.
    bytes: Vec<u8>,
    /// Where the request line (with its CRLF) ends in `bytes`.
    request_line_end: usize,
    pub framing: Framing,
    /// Whether the client may send another request after this one.
    pub keep_alive: bool,
    /// Whether tiny_http may read the next head on the same backend
    /// connection: it consumes exactly the bodies it was told the length of
    /// (even unread ones), but leaves an unread chunked body in the stream.
    pub reusable: bool,
}

/// Why no head was read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// A line passed `HeadLimits::line`.
    LineTooLong { limit: usize },
    /// The head passed `HeadLimits::head`.
    TooLarge { limit: usize },
    /// A line of the head holds a byte that is neither printable ASCII
    /// nor a tab (tiny_http would drop the connection without a word).
    NotAscii,
    /// The client closed the connection in the middle of a line or head.
    Truncated,
    /// Reading the connection failed.
    Io(io::Error),
}

impl HeadError {
    /// The 431 answered for a limit; `None` for failures nobody hears of.
    pub(crate) fn to_api_error(&self) -> Option<ApiError> {
        let message = match self {
            Self::LineTooLong { limit } => format!(
                "a request header line is longer than this server's limit of {limit} bytes \
                 per line; send a smaller header"
            ),
            Self::TooLarge { limit } => format!(
                "the request head (request line and headers) is larger than this server's \
                 limit of {limit} bytes; send fewer or smaller headers"
            ),
            Self::NotAscii => {
                return Some(ApiError::bad_request(
                    "the request line or a header holds a byte that is not printable ASCII; \
                     percent-encode the URL and send header values as ASCII",
                ))
            }
            Self::Truncated | Self::Io(_) => return None,
        };
        Some(ApiError::header_fields_too_large(message))
    }
}

/// The header a backend copy of a head that is not `reusable` starts with,
/// so tiny_http ends that backend connection after it and never reads as a
/// head bytes the relay did not check.
const BACKEND_CONNECTION: &[u8] = b"Connection: close\r\n";

impl Head {
    /// The head as received, ending with the blank line.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The head as tiny_http gets it: unchanged when `reusable`, else with
    /// `Connection: close` right after the request line (tiny_http heeds the
    /// first `Connection` header only).
    pub(crate) fn for_backend(&self) -> Cow<'_, [u8]> {
        if self.reusable {
            return Cow::Borrowed(&self.bytes);
        }
        let (line, rest) = self.bytes.split_at(self.request_line_end);
        let mut out = Vec::with_capacity(self.bytes.len() + BACKEND_CONNECTION.len());
        out.extend_from_slice(line);
        out.extend_from_slice(BACKEND_CONNECTION);
        out.extend_from_slice(rest);
        Cow::Owned(out)
    }
}

/// Reads the next request head. `Ok(None)`: the client closed the
/// connection cleanly before sending another request.
pub(crate) fn read_head<R: BufRead>(
    input: &mut R,
    limits: HeadLimits,
) -> Result<Option<Head>, HeadError> {
    let mut bytes = Vec::new();
    if !read_line(input, &mut bytes, limits)? {
        return Ok(None);
    }
    let request_line_end = bytes.len();
    loop {
        let start = bytes.len();
        if !read_line(input, &mut bytes, limits)? {
            return Err(HeadError::Truncated);
        }
        if bytes.len() - start == 2 {
            break;
        }
    }
    let printable = |b: &u8| matches!(*b, b'\t' | b'\r' | b'\n' | 0x20..=0x7e);
    if !bytes.iter().all(printable) {
        return Err(HeadError::NotAscii);
    }
    let (framing, keep_alive) = describe(&bytes, request_line_end);
    Ok(Some(Head {
        bytes,
        request_line_end,
        framing,
        keep_alive,
        reusable: keep_alive && framing != Framing::Chunked,
    }))
}

/// Appends one CRLF-ended line to `buf`, failing as soon as the line passes
/// `limits.line` or `buf` passes `limits.head`, before the rest arrives.
/// `Ok(false)`: end of input before the line's first byte.
pub(crate) fn read_line<R: BufRead>(
    input: &mut R,
    buf: &mut Vec<u8>,
    limits: HeadLimits,
) -> Result<bool, HeadError> {
    let start = buf.len();
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(HeadError::Io(err)),
        };
        if available.is_empty() {
            return match buf.len() == start {
                true => Ok(false),
                false => Err(HeadError::Truncated),
            };
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let taken = newline.map_or(available.len(), |at| at + 1);
        buf.extend_from_slice(&available[..taken]);
        input.consume(taken);
        let line = &buf[start..];
        // A bare LF belongs to the line (tiny_http ends lines at CRLF only).
        let complete = newline.is_some() && line.ends_with(b"\r\n");
        // An incomplete line may end with the CR of its CRLF.
        let content = line.len().saturating_sub(if complete { 2 } else { 1 });
        if content > limits.line {
            return Err(HeadError::LineTooLong { limit: limits.line });
        }
        if buf.len() > limits.head {
            return Err(HeadError::TooLarge { limit: limits.head });
        }
        if complete {
            return Ok(true);
        }
    }
}

/// The framing and keep-alive of a complete head, as tiny_http sees them.
fn describe(bytes: &[u8], request_line_end: usize) -> (Framing, bool) {
    let request_line = text(&bytes[..request_line_end]).trim();
    let version = request_line.split(' ').nth(2).unwrap_or("");
    let mut transfer_encoding = None;
    let mut content_length = None;
    let mut connection = None;
    for line in crlf_lines(&bytes[request_line_end..]) {
        let Some((name, value)) = text(line).trim().split_once(':') else {
            continue;
        };
        let slot = match name {
            _ if name.eq_ignore_ascii_case("transfer-encoding") => &mut transfer_encoding,
            _ if name.eq_ignore_ascii_case("content-length") => &mut content_length,
            _ if name.eq_ignore_ascii_case("connection") => &mut connection,
            _ => continue,
        };
        slot.get_or_insert(value.trim());
    }
    let connection = connection.unwrap_or("").to_ascii_lowercase();
    let keep_alive = match version {
        _ if connection.contains("close") || connection.contains("upgrade") => false,
        "HTTP/1.1" => true,
        "HTTP/1.0" => connection.contains("keep-alive"),
        // tiny_http answers 505 to other versions and then reads whatever
        // follows as a head: send it nothing more.
        _ => return (Framing::Empty, false),
    };
    let framing = match (transfer_encoding, content_length) {
        (Some(_), _) => Framing::Chunked,
        (None, Some(length)) => match length.parse::<u64>() {
            Ok(0) | Err(_) => Framing::Empty,
            Ok(n) => Framing::Length(n),
        },
        (None, None) => Framing::Empty,
    };
    (framing, keep_alive)
}

/// The lines of `bytes`, split at CRLF only (a bare LF stays in its line).
pub(crate) fn crlf_lines(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let end = bytes.windows(2).position(|w| w == b"\r\n");
        let (line, rest) = match end {
            Some(at) => (&bytes[..at], &bytes[at + 2..]),
            None => (bytes, &b""[..]),
        };
        bytes = rest;
        Some(line)
    })
}

/// A line as text; a line that is not ASCII never matches a header name.
fn text(line: &[u8]) -> &str {
    std::str::from_utf8(line).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits { line: 32, head: 96 };

    fn read(input: &[u8]) -> Result<Option<Head>, HeadError> {
        read_head(&mut io::BufReader::with_capacity(7, input), LIMITS)
    }

    #[test]
    fn a_head_ends_at_the_blank_line_and_the_body_stays_unread() {
        let input = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let mut reader = io::BufReader::new(&input[..]);
        let head = read_head(&mut reader, LIMITS).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.keep_alive);
        let mut rest = Vec::new();
        io::Read::read_to_end(&mut reader, &mut rest).unwrap();
        assert_eq!(rest, b"abc");
        assert_eq!(&head.for_backend()[..], &input[..input.len() - 3]);
        let chunked = read(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        let chunked = chunked.unwrap().unwrap();
        assert!(chunked.keep_alive && !chunked.reusable);
        assert_eq!(
            &chunked.for_backend()[..],
            b"POST /x HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn lines_and_heads_at_the_limits_pass_and_one_byte_more_fails() {
        let line = |n: usize| format!("X: {}\r\n", "a".repeat(n - 3));
        let ok = format!("GET / HTTP/1.1\r\n{}\r\n", line(32));
        assert!(read(ok.as_bytes()).unwrap().is_some());
        let long = format!("GET / HTTP/1.1\r\n{}\r\n", line(33));
        assert!(matches!(
            read(long.as_bytes()),
            Err(HeadError::LineTooLong { limit: 32 })
        ));
        // 16 + 3 * 26 + 2 = 96 bytes: exactly the head limit.
        let full = format!("GET / HTTP/1.1\r\n{}\r\n", line(24).repeat(3));
        assert_eq!(full.len(), 96);
        assert!(read(full.as_bytes()).unwrap().is_some());
        let over = format!("GET / HTTP/1.1\r\n{}X\r\n\r\n", line(24).repeat(3));
        assert!(matches!(
            read(over.as_bytes()),
            Err(HeadError::TooLarge { limit: 96 })
        ));
    }

    #[test]
    fn an_endless_line_fails_without_waiting_for_its_end() {
        let mut endless = io::Read::chain(&b"GET / HTTP/1.1\r\nX: "[..], io::repeat(b'a'));
        let mut reader = io::BufReader::with_capacity(8, &mut endless);
        assert!(matches!(
            read_head(&mut reader, LIMITS),
            Err(HeadError::LineTooLong { .. })
        ));
    }

    #[test]
    fn framing_and_keep_alive_follow_tiny_http() {
        let cases: [(&[u8], Framing, bool); 7] = [
            (b"GET / HTTP/1.1\r\n\r\n", Framing::Empty, true),
            (b"GET / HTTP/1.0\r\n\r\n", Framing::Empty, false),
            (
                b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
                Framing::Empty,
                false,
            ),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 9\r\nTransfer-Encoding: x\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                b"PUT / HTTP/1.1\r\ncontent-length: nine\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                b"PUT / HTTP/2.0\r\nContent-Length: 9\r\n\r\n",
                Framing::Empty,
                false,
            ),
        ];
        for (input, framing, keep_alive) in cases {
            let head = read(input).unwrap().unwrap();
            assert_eq!((head.framing, head.keep_alive), (framing, keep_alive));
        }
    }

    #[test]
    fn a_bare_lf_does_not_end_a_line_and_eof_is_told_apart() {
        let head = read(b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n").unwrap().unwrap();
        assert!(head.keep_alive);
        // As for tiny_http, this is one header named X, not a Content-Length.
        let hidden = read(b"PUT / HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\n");
        assert_eq!(hidden.unwrap().unwrap().framing, Framing::Empty);
        assert!(read(b"").unwrap().is_none());
        assert!(matches!(read(b"GET / HT"), Err(HeadError::Truncated)));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n"),
            Err(HeadError::Truncated)
        ));
    }
}
