//! Request head limits on a real server (127.0.0.1, port 0) with raw TCP
//! clients: heads over the line or head limit are answered 431 with the
//! JSON error body and the connection is closed, heads at the limits are
//! served, keep-alive connections (pipelined ones too) still carry many
//! requests, and a client trickling an endless header is cut off at the
//! limit instead of being read until memory runs out.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, Listen, Method, Reply, Server, ServerConfig};

const LINE: usize = 16 << 10;
const HEAD: usize = 64 << 10;

fn toy(ex: &mut Exchange) -> Result<Reply, ApiError> {
    match (ex.method(), ex.path()) {
        (Method::Get, "/hello") => Ok(Reply::Json(200, json!({"hello": "world"}))),
        (Method::Post, "/echo") => Ok(Reply::Json(200, ex.json::<Value>()?)),
        (_, path) => Err(ApiError::not_found(format!("no toy at {path}"))),
    }
}

/// A server with `config`'s limits; returns its address.
fn start(config: impl FnOnce(ServerConfig) -> ServerConfig) -> SocketAddr {
    let base = ServerConfig::new("limits", "0.0.0", Listen::Tcp("127.0.0.1:0".into()));
    let server = Server::bind(config(base), toy).expect("bind");
    let addr = server.local_addr().expect("a TCP address");
    thread::spawn(move || server.run());
    addr
}

fn start_default() -> SocketAddr {
    start(|config| {
        assert_eq!((config.max_header_line, config.max_head), (LINE, HEAD));
        config
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// One response: status, lower-case headers and the JSON body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }
}

/// Reads one response with a Content-Length body off `reader`.
fn read_answer(reader: &mut impl BufRead) -> Answer {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("no status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length = headers.iter().find(|(n, _)| n == "content-length");
    let length: usize = length.and_then(|(_, v)| v.parse().ok()).expect("a length");
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    let body = serde_json::from_slice(&body).expect("a JSON body");
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends `request` from a thread of its own (the server may answer before
/// reading all of it) and reads the answer and then the end of the
/// connection.
fn send_refused(addr: SocketAddr, request: Vec<u8>) -> Answer {
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&request);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut reader = BufReader::new(stream);
    let answer = read_answer(&mut reader);
    assert_closed(&mut reader);
    sender.join().unwrap();
    answer
}

fn assert_closed(reader: &mut impl Read) {
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "more after the answer: {rest:?}");
}

fn assert_refused(answer: &Answer, limit: usize) {
    assert_eq!(answer.status, 431);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(answer.body["error"]["code"], "header_fields_too_large");
    let message = answer.body["error"]["message"].as_str().expect("a message");
    assert!(message.contains(&format!("{limit} bytes")), "{message}");
    assert!(message.contains("send"), "{message}");
}

/// A GET whose head is exactly `total` bytes, no line longer than `line`.
fn head_of(total: usize, line: usize) -> Vec<u8> {
    let mut head = b"GET /hello HTTP/1.1\r\nHost: x\r\n".to_vec();
    let mut n = 0;
    while head.len() + 2 < total {
        let room = total - 2 - head.len();
        // A header line "X-Pad-N: aaa\r\n" of at most `room` bytes, keeping
        // what remains either zero or enough for another line.
        let mut len = room.min(line + 2);
        if room - len != 0 && room - len < 16 {
            len -= 16;
        }
        let name = format!("X-Pad-{n}: ");
        head.extend_from_slice(name.as_bytes());
        head.extend(std::iter::repeat_n(b'a', len - name.len() - 2));
        head.extend_from_slice(b"\r\n");
        n += 1;
    }
    head.extend_from_slice(b"\r\n");
    assert_eq!(head.len(), total);
    head
}

#[test]
fn a_megabyte_header_is_refused_with_431_naming_the_line_limit() {
    let addr = start_default();
    let mut request = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1_000_000));
    request.extend_from_slice(b"\r\n\r\n");
    assert_refused(&send_refused(addr, request), LINE);
}

#[test]
fn a_head_exactly_at_both_limits_is_served() {
    let addr = start_default();
    let head = head_of(HEAD, LINE);
    let longest = head.split(|&b| b == b'\n').map(|l| l.len()).max();
    assert_eq!(
        longest,
        Some(LINE + 1),
        "one line of exactly LINE bytes + CR"
    );
    let mut stream = connect(addr);
    stream.write_all(&head).unwrap();
    let answer = read_answer(&mut BufReader::new(stream));
    assert_eq!(
        (answer.status, answer.body),
        (200, json!({"hello": "world"}))
    );
}

#[test]
fn many_small_headers_over_the_head_limit_are_refused_with_431() {
    let addr = start_default();
    let mut request = head_of(HEAD + 1, 100);
    request.extend_from_slice(b"GET /hello HTTP/1.1\r\n\r\n");
    assert_refused(&send_refused(addr, request), HEAD);
}

#[test]
fn one_line_a_byte_over_the_line_limit_is_refused_with_431() {
    let addr = start_default();
    let mut request = b"GET /hello HTTP/1.1\r\n".to_vec();
    let name = b"X-Long: ";
    request.extend_from_slice(name);
    request.extend(std::iter::repeat_n(b'a', LINE + 1 - name.len()));
    request.extend_from_slice(b"\r\n\r\n");
    assert_refused(&send_refused(addr, request), LINE);
}

#[test]
fn a_keep_alive_connection_serves_many_requests_each_under_its_own_limit() {
    let addr = start_default();
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    // Each head is near the head limit: together they pass it many times.
    let big = head_of(HEAD - 100, LINE);
    for _ in 0..5 {
        writer.write_all(&big).unwrap();
        let answer = read_answer(&mut reader);
        assert_eq!(
            (answer.status, answer.body),
            (200, json!({"hello": "world"}))
        );
    }
    // A body on the same connection, then two pipelined requests.
    let body = br#"{"a":[1,2]}"#;
    let post = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(post.as_bytes()).unwrap();
    writer.write_all(body).unwrap();
    let chunked = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\n{\"b\":\r\n2\r\n3}\r\n0\r\n\r\n";
    writer.write_all(chunked).unwrap();
    writer
        .write_all(b"GET /nope HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
        .unwrap();
    let answers: Vec<_> = (0..4).map(|_| read_answer(&mut reader)).collect();
    assert_eq!(
        (answers[0].status, &answers[0].body),
        (200, &json!({"a": [1, 2]}))
    );
    assert_eq!(
        (answers[1].status, &answers[1].body),
        (200, &json!({"b": 3}))
    );
    assert_eq!(answers[2].status, 404);
    assert_eq!(answers[3].status, 200);
    // The connection is still open for more.
    writer.write_all(b"GET /hello HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut reader).status, 200);
}

#[test]
fn a_client_trickling_an_endless_header_is_cut_off_at_the_limit() {
    let addr = start(|config| ServerConfig {
        max_header_line: 1024,
        max_head: 4096,
        ..config
    });
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent_by, stop_by) = (Arc::clone(&sent), Arc::clone(&stop));
    let trickle = thread::spawn(move || {
        let mut piece = b"GET /hello HTTP/1.1\r\nX-Endless: ".to_vec();
        while !stop_by.load(Ordering::Acquire) && writer.write_all(&piece).is_ok() {
            sent_by.fetch_add(piece.len(), Ordering::AcqRel);
            piece = vec![b'a'; 64];
            thread::sleep(Duration::from_millis(2));
        }
    });
    let started = Instant::now();
    let mut reader = BufReader::new(stream);
    let answer = read_answer(&mut reader);
    let sent_at_answer = sent.load(Ordering::Acquire);
    assert_refused(&answer, 1024);
    assert!(
        sent_at_answer < 4096,
        "answered only after {sent_at_answer} bytes"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_closed(&mut reader);
    stop.store(true, Ordering::Release);
    trickle.join().unwrap();
}

#[test]
fn an_unread_chunked_body_is_never_read_as_a_head() {
    let addr = start_default();
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    // /hello ignores its body: 200 KB without a CRLF, which tiny_http would
    // take for the next head if it read on after the request.
    let chunk = vec![b'a'; 200_000];
    writer
        .write_all(b"GET /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    writer
        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
        .unwrap();
    writer.write_all(&chunk).unwrap();
    writer
        .write_all(b"\r\n0\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
        .unwrap();
    for _ in 0..2 {
        let answer = read_answer(&mut reader);
        assert_eq!(
            (answer.status, answer.body),
            (200, json!({"hello": "world"}))
        );
    }
}

#[test]
fn a_header_byte_outside_printable_ascii_is_refused_with_400() {
    let addr = start_default();
    for value in [&b"f\xa3\xc0T"[..], b"bell\x07"] {
        let mut request = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Key: ".to_vec();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n\r\n");
        let answer = send_refused(addr, request);
        assert_eq!(answer.status, 400);
        assert_eq!(answer.body["error"]["code"], "bad_request");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("ASCII"), "{message}");
    }
    // A tab inside a value is fine.
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Key: a\tb\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut BufReader::new(stream)).status, 200);
}
