//! A toy application on a real server (127.0.0.1, port 0, real HTTP through
//! ureq): JSON replies, the error shape, the handler's own 404, the JSON body
//! cap, NDJSON events arriving one by one, the long-running cap, closures as
//! handlers and a Unix socket listener.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use wrenn_http::{
    ApiError, Exchange, Handler, Listen, Method, NdjsonStream, Reply, Server, ServerConfig,
};

/// The toy application: a few routes, and a stream that sends its second
/// event only when the test says so.
struct Toy {
    next_event: Mutex<Receiver<()>>,
}

impl Handler for Toy {
    fn is_long_running(&self, method: &Method, path: &str) -> bool {
        *method == Method::Get && path == "/events"
    }

    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        match (ex.method(), ex.path()) {
            (Method::Get, "/hello") => {
                let name = ex.query().text("name")?.unwrap_or("world").to_owned();
                Ok(Reply::Json(200, json!({ "hello": name })))
            }
            (Method::Post, "/echo") => Ok(Reply::Json(200, ex.json::<Value>()?)),
            (Method::Get, "/busy") => Err(ApiError::too_many_requests("slow down")),
            (Method::Get, "/panic") => panic!("the toy handler panics on purpose"),
            (Method::Get, "/events") => {
                let mut stream = NdjsonStream::open(ex.take_request()?)
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                let next = self.next_event.lock().unwrap();
                let sent = stream
                    .send(&json!({"n": 1}))
                    .and_then(|()| {
                        next.recv().ok();
                        stream.send(&json!({"n": 2}))
                    })
                    .and_then(|()| stream.finish());
                sent.map_err(|e| ApiError::internal(e.to_string()))?;
                Ok(Reply::Streamed)
            }
            (_, path) => Err(ApiError::not_found(format!("no toy at {path}"))),
        }
    }
}

fn config(listen: Listen) -> ServerConfig {
    ServerConfig {
        workers: 2,
        max_long_running: 1,
        max_json_body: 1024,
        ..ServerConfig::new("toy", "0.0.0", listen)
    }
}

/// Starts the toy server; the sender releases the second event of a stream.
fn start() -> (String, Sender<()>) {
    let (release, next_event) = channel();
    let toy = Toy {
        next_event: Mutex::new(next_event),
    };
    let server = Server::bind(config(Listen::Tcp("127.0.0.1:0".into())), toy).expect("bind");
    let base = base_url(server.local_addr().expect("a TCP address"));
    thread::spawn(move || server.run());
    (base, release)
}

fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// Status and JSON body, for success and error statuses alike.
fn json_of(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(err) => panic!("request failed: {err}"),
    };
    let status = response.status();
    assert_eq!(response.content_type(), "application/json");
    (status, response.into_json().expect("a JSON body"))
}

#[test]
fn json_replies_errors_and_unknown_routes() {
    let (base, _release) = start();
    let agent = agent();

    let (status, body) = json_of(agent.get(&format!("{base}/hello?name=a%20b")).call());
    assert_eq!((status, body), (200, json!({"hello": "a b"})));

    let (status, body) = json_of(agent.get(&format!("{base}/busy")).call());
    assert_eq!(status, 429);
    assert_eq!(
        body,
        json!({"error": {"code": "too_many_requests", "message": "slow down"}})
    );

    let (status, body) = json_of(agent.get(&format!("{base}/nope")).call());
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no toy at /nope");

    let (status, body) = json_of(agent.get(&format!("{base}/panic")).call());
    assert_eq!(status, 500);
    assert_eq!(
        body["error"]["message"],
        "toy hit an internal error; see its log"
    );
}

#[test]
fn json_bodies_are_parsed_and_capped() {
    let (base, _release) = start();
    let agent = agent();
    let url = format!("{base}/echo");

    let (status, body) = json_of(agent.post(&url).send_json(json!({"a": [1, 2]})));
    assert_eq!((status, body), (200, json!({"a": [1, 2]})));

    let big = json!({ "pad": "x".repeat(2000) });
    let (status, body) = json_of(agent.post(&url).send_json(big));
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (status, body) = json_of(agent.post(&url).send_string("{not json"));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_json");
}

#[test]
fn ndjson_events_arrive_one_by_one_and_long_requests_are_capped() {
    let (base, release) = start();
    let agent = agent();
    let response = agent.get(&format!("{base}/events")).call().expect("stream");
    assert_eq!(response.content_type(), "application/x-ndjson");
    let mut lines = BufReader::new(response.into_reader());

    // The first event arrives while the handler still holds the second.
    let mut line = String::new();
    lines.read_line(&mut line).expect("first event");
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap(),
        json!({"n": 1})
    );

    // The only long-running slot is taken: a second stream is refused.
    let (status, body) = json_of(agent.get(&format!("{base}/events")).call());
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "unavailable");

    release.send(()).unwrap();
    line.clear();
    lines.read_line(&mut line).expect("second event");
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap(),
        json!({"n": 2})
    );
    let mut rest = String::new();
    lines.read_to_string(&mut rest).expect("end of stream");
    assert_eq!(rest, "");
}

#[test]
fn a_closure_serves_on_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("wrenn-http-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let _ = std::fs::remove_file(&path);
    let handler = |ex: &mut Exchange| -> Result<Reply, ApiError> {
        Ok(Reply::Json(200, json!({ "path": ex.path() })))
    };
    let server = Server::bind(config(Listen::Unix(path.clone())), handler).expect("bind");
    assert_eq!(server.local_addr(), None);
    thread::spawn(move || server.run());

    let mut socket = UnixStream::connect(&path).expect("connect");
    socket
        .write_all(b"GET /vmm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{\"path\":\"/vmm\"}\n"), "{answer}");
    std::fs::remove_dir_all(&dir).ok();
}
