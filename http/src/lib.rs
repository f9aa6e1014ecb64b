//! wrenn-http: the HTTP mechanics every Wrenn API server shares (envd in the
//! guest, the node agent on the host), on tiny_http 0.12 without an async
//! runtime. An application brings its routes, authentication and state as a
//! `Handler`; this crate brings the rest. docs/decisions.md (envd) says why
//! each piece exists.
//!
//! ```no_run
//! use wrenn_http::{ApiError, Exchange, Listen, Reply, Server, ServerConfig};
//!
//! fn hello(ex: &mut Exchange) -> Result<Reply, ApiError> {
//!     match ex.path() {
//!         "/hello" => Ok(Reply::Json(200, serde_json::json!({"hello": "world"}))),
//!         path => Err(ApiError::not_found(format!("no endpoint at {path}"))),
//!     }
//! }
//!
//! let listen = Listen::Tcp("127.0.0.1:8080".into());
//! let config = ServerConfig::new("hello", "0.1.0", listen);
//! Server::bind(config, hello)?.run();
//! # Ok::<(), wrenn_http::StartupError>(())
//! ```

/// The global allocator each server binary installs (tiny_http allocates
/// the unread rest of a dropped request's body).
pub mod alloc;
/// `ServerConfig` and `Listen`: address, threads, limits, timeouts.
pub mod config;
/// `ApiError` and `ErrorCode`: `{"error":{"code","message"}}` with a status.
pub mod error;
/// `Exchange` (one request and its answer), `Reply`, JSON bodies, responses.
pub mod exchange;
/// Reading one request head under the line and head limits.
mod head;
/// Binding the public listener (TCP or Unix) and tiny_http's backend socket.
mod listener;
/// Reusable threads for the relay's connections.
mod pool;
/// `Query`: percent-decoded query strings.
pub mod query;
/// The relay in front of tiny_http: limits each request head, answers 431.
mod relay;
/// `Server` and `Handler`: worker pool, long-running threads, accept recovery.
pub mod server;
/// `NdjsonStream`: chunked NDJSON, flushed event by event.
pub mod stream;
/// Taking a connection over at a request head: `RequestHead`, `Takeover`,
/// `Upgraded`, and `tunnel` to another server.
pub mod takeover;
/// RFC 3339 timestamps for API responses (any time, before 1970 included).
pub mod timefmt;
/// WebSockets on a taken-over connection: `accept`, `Outbox`, `Inbox`.
pub mod ws;

pub use alloc::ServerAllocator;
pub use config::{Listen, ServerConfig};
pub use error::{describe_io, ApiError, ErrorCode};
pub use exchange::{error_response, json_response, parse_json, with_header, Exchange, Reply};
pub use query::{percent_decode, Query};
pub use server::{Handler, Server, StartupError};
pub use stream::NdjsonStream;
pub use takeover::{tunnel, RequestHead, Takeover, Upgraded};
/// The tiny_http types handlers see, and the crate itself (e.g. for
/// `TestRequest` in unit tests), so applications use the same version.
pub use tiny_http::{self, Method, Request};

/// The lib's own tests run under the allocator, as a server binary would.
#[cfg(test)]
#[global_allocator]
static GLOBAL: ServerAllocator = ServerAllocator;
