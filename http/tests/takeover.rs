//! Connection takeovers on a real server (127.0.0.1, port 0): WebSockets
//! through the `tungstenite` client (handshake, echo, pings, limits, the
//! idle timeout), the takeover cap, upgrades after normal requests on the
//! same keep-alive connection, and a tunnel to a second TCP server.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace lints)

use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};
use wrenn_http::ws::{self, Limits};
use wrenn_http::{
    tunnel, ApiError, Exchange, Handler, Listen, Reply, RequestHead, Server, ServerConfig,
    Takeover, Upgraded,
};

/// The application: a JSON route, an echoing WebSocket, a tunnel to
/// `upstream`.
struct App {
    limits: Limits,
    upstream: Option<SocketAddr>,
}

impl Handler for App {
    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        match ex.path() {
            "/hello" => Ok(Reply::Json(200, json!({"hello": "world"}))),
            path => Err(ApiError::not_found(format!("no route at {path}"))),
        }
    }

    fn divert(&self, head: &RequestHead) -> Option<Takeover> {
        match head.path() {
            "/ws/echo" => {
                let limits = self.limits;
                Some(Box::new(move |up| echo(up, limits)))
            }
            "/tunnel" => {
                let upstream = self.upstream?;
                Some(Box::new(move |up: Upgraded| {
                    let to = TcpStream::connect(upstream).unwrap();
                    let first = up.head().raw().to_vec();
                    tunnel(up, to, &first).unwrap();
                }))
            }
            _ => None,
        }
    }
}

/// Echoes every message; the text "close" closes the socket instead.
fn echo(up: Upgraded, limits: Limits) {
    let Ok((outbox, inbox)) = ws::accept(up, limits) else {
        return;
    };
    while let Some(message) = inbox.recv() {
        let sent = match message {
            Message::Text(text) if text.as_str() == "close" => outbox.close(1000, "bye"),
            other => outbox.send(other),
        };
        if sent.is_err() {
            return;
        }
    }
}

fn start_with(limits: Limits, max_upgraded: usize, upstream: Option<SocketAddr>) -> SocketAddr {
    let config = ServerConfig {
        workers: 2,
        max_upgraded,
        ..ServerConfig::new("takeover", "0.0.0", Listen::Tcp("127.0.0.1:0".into()))
    };
    let server = Server::bind(config, App { limits, upstream }).expect("bind");
    let addr = server.local_addr().expect("a TCP address");
    thread::spawn(move || server.run());
    addr
}

fn start() -> SocketAddr {
    start_with(Limits::default(), 256, None)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A WebSocket client on `/ws/echo`.
fn open_ws(addr: SocketAddr) -> WebSocket<TcpStream> {
    let (socket, response) = tungstenite::client(format!("ws://{addr}/ws/echo"), connect(addr))
        .expect("the WebSocket handshake");
    assert_eq!(response.status(), 101);
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    socket
}

/// Reads messages until a close frame; its code and reason.
fn close_of(socket: &mut WebSocket<TcpStream>) -> (CloseCode, String) {
    loop {
        match socket.read().expect("a close frame") {
            Message::Close(Some(frame)) => return (frame.code, frame.reason.to_string()),
            Message::Close(None) => panic!("a close frame without a code"),
            _ => {}
        }
    }
}

/// Reads one response head off `stream`, byte by byte: status and head.
fn read_head(stream: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the head ended early");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head)
}

/// The value of `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Reads one whole response with a `Content-Length`: status and JSON body.
fn read_json_response(stream: &mut TcpStream) -> (u16, Value) {
    let (status, head) = read_head(stream);
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

/// Sends `request` on a fresh connection and reads the answer to the end
/// (the server must close): status and JSON body.
fn answer_to(addr: SocketAddr, request: &str) -> (u16, String, Value) {
    let mut stream = connect(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    stream.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), serde_json::from_str(body).unwrap())
}

fn hello(addr: SocketAddr) {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_json_response(&mut stream),
        (200, json!({"hello": "world"}))
    );
}

#[test]
fn text_and_binary_are_echoed_and_pings_get_pongs() {
    let addr = start();
    hello(addr);
    let mut socket = open_ws(addr);
    socket.send(Message::text("hi there")).unwrap();
    assert_eq!(socket.read().unwrap(), Message::text("hi there"));
    let blob: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    socket.send(Message::binary(blob.clone())).unwrap();
    assert_eq!(socket.read().unwrap(), Message::binary(blob));
    socket
        .send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    assert_eq!(
        socket.read().unwrap(),
        Message::Pong(b"are you there".to_vec().into())
    );
    // Many messages in a row, more than the queues hold, all come back.
    for n in 0..500 {
        socket.send(Message::text(n.to_string())).unwrap();
    }
    for n in 0..500 {
        assert_eq!(socket.read().unwrap(), Message::text(n.to_string()));
    }
    socket.send(Message::text("close")).unwrap();
    assert_eq!(close_of(&mut socket), (CloseCode::Normal, "bye".into()));
    // The close handshake completes and the server closes the connection.
    loop {
        match socket.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(err) => panic!("expected a clean close, got {err}"),
        }
    }
    hello(addr);
}

#[test]
fn a_client_close_is_answered() {
    let addr = start();
    let mut socket = open_ws(addr);
    socket.close(None).unwrap();
    loop {
        match socket.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(err) => panic!("expected a clean close, got {err}"),
        }
    }
}

#[test]
fn a_message_over_the_limit_closes_with_1009() {
    let limits = Limits {
        max_message: 1024,
        ..Limits::default()
    };
    let addr = start_with(limits, 256, None);
    let mut socket = open_ws(addr);
    socket.send(Message::text("a".repeat(1024))).unwrap();
    assert_eq!(socket.read().unwrap(), Message::text("a".repeat(1024)));
    socket.send(Message::text("a".repeat(1025))).unwrap();
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("1024"), "{reason}");
}

#[test]
fn a_frame_over_the_frame_limit_closes_with_1009() {
    let limits = Limits {
        max_frame: 100,
        ..Limits::default()
    };
    let addr = start_with(limits, 256, None);
    let mut socket = open_ws(addr);
    socket.send(Message::binary(vec![7; 101])).unwrap();
    assert_eq!(close_of(&mut socket).0, CloseCode::Size);
}

#[test]
fn an_idle_socket_is_closed_with_1001_and_pings_keep_it_alive() {
    let idle = Limits {
        idle: Duration::from_millis(300),
        ..Limits::default()
    };
    let addr = start_with(idle, 256, None);
    let mut socket = open_ws(addr);
    let opened = Instant::now();
    let (code, reason) = close_of(&mut socket);
    assert_eq!(code, CloseCode::Away);
    assert!(reason.contains("idle"), "{reason}");
    assert!(opened.elapsed() >= Duration::from_millis(250));

    let pinging = Limits {
        ping_every: Some(Duration::from_millis(50)),
        ..idle
    };
    let addr = start_with(pinging, 256, None);
    let mut socket = open_ws(addr);
    let mut pings = 0;
    // tungstenite answers each ping with a pong on its next read, which
    // keeps the server from closing the socket as idle.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        match socket.read().unwrap() {
            Message::Ping(_) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings");
}

#[test]
fn an_upgrade_after_requests_on_the_same_connection_works() {
    let addr = start();
    // A normal request, then the upgrade, on one keep-alive connection.
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_json_response(&mut stream).0, 200);
    let (mut socket, _) = tungstenite::client(format!("ws://{addr}/ws/echo"), stream).unwrap();
    socket.send(Message::text("after a request")).unwrap();
    assert_eq!(socket.read().unwrap(), Message::text("after a request"));

    // Pipelined: two requests and the upgrade in one write, the first
    // WebSocket frame right behind it. The answers come in order.
    let mut stream = connect(addr);
    let upgrade = "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut client = WebSocket::from_raw_socket(Cursor::new(Vec::new()), Role::Client, None);
    client.send(Message::text("pipelined")).unwrap();
    let frame = client.get_ref().get_ref().clone();
    let mut all = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2);
    all.extend_from_slice(upgrade.as_bytes());
    all.extend_from_slice(&frame);
    stream.write_all(&all).unwrap();
    assert_eq!(read_json_response(&mut stream).0, 200);
    assert_eq!(read_json_response(&mut stream).0, 200);
    let (status, head) = read_head(&mut stream);
    assert_eq!(status, 101);
    // The key and answer from RFC 6455, section 1.3.
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let mut socket = WebSocket::from_raw_socket(stream, Role::Client, None);
    assert_eq!(socket.read().unwrap(), Message::text("pipelined"));
    hello(addr);
}

#[test]
fn requests_that_are_not_websocket_upgrades_get_400() {
    let addr = start();
    let (status, head, body) = answer_to(addr, "GET /ws/echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 400);
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/ws/echo") && message.contains("Upgrade"),
        "{message}"
    );

    let old = "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
               Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (status, _, body) = answer_to(addr, old);
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("13"));
    let keyless = old.replace("Sec-WebSocket-Version: 8", "Sec-WebSocket-Version: 13");
    let keyless = keyless.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    let (status, _, body) = answer_to(addr, &keyless);
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Sec-WebSocket-Key"));
    hello(addr);
}

#[test]
fn takeovers_over_the_cap_get_503_until_one_ends() {
    let addr = start_with(Limits::default(), 1, None);
    let mut first = open_ws(addr);
    let upgrade = "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (status, head, body) = answer_to(addr, upgrade);
    assert_eq!(status, 503);
    assert_eq!(header(&head, "content-type"), Some("application/json"));
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("retry later"));
    // Normal requests are not counted.
    hello(addr);
    first.send(Message::text("close")).unwrap();
    close_of(&mut first);
    drop(first);
    // The slot comes back once the first socket's thread is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tungstenite::client(format!("ws://{addr}/ws/echo"), connect(addr)) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(err) => panic!("the slot never came back: {err}"),
        }
    }
}

/// A one-shot upstream server: reads a request with a `Content-Length`
/// body, sends it to the test, answers with a fixed response carrying it.
fn upstream() -> (SocketAddr, Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, requests): (Sender<Vec<u8>>, _) = channel();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let head = read_request_head(&mut stream);
        let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\nupstream got {}",
            "upstream got ".len() + body.len(),
            String::from_utf8_lossy(&body)
        );
        stream.write_all(answer.as_bytes()).unwrap();
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        seen.send(request).unwrap();
        // Half-close: the tunnel passes the end of the answer on, and the
        // client's end of file comes back once it is done.
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
    (addr, requests)
}

/// Reads one request head off `stream`, byte by byte.
fn read_request_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn a_tunnel_passes_the_request_and_the_answer_through() {
    let (up_addr, requests) = upstream();
    let addr = start_with(Limits::default(), 256, Some(up_addr));
    let request = "POST /tunnel?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world";
    let mut stream = connect(addr);
    // The body comes in a second write, after the relay read the head.
    let (head, body) = request.split_at(request.len() - 11);
    stream.write_all(head.as_bytes()).unwrap();
    thread::sleep(Duration::from_millis(50));
    stream.write_all(body.as_bytes()).unwrap();
    let (status, answer) = read_head(&mut stream);
    assert_eq!(status, 200);
    assert_eq!(header(&answer, "connection"), Some("close"));
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "upstream got hello world");
    assert_eq!(
        requests.recv_timeout(Duration::from_secs(10)).unwrap(),
        request.as_bytes()
    );
    drop(stream);
    hello(addr);
}
