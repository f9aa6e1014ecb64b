//! The HTTP server: a tiny_http listener, a bounded pool of worker threads
//! for short requests, and dedicated (capped) threads for long-running ones
//! (streams, uploads, downloads), so 20+ open streams never starve the pool.
//!
//! The application plugs in as a `Handler`: it says, from the method and path
//! alone, which requests are long-running, and answers each `Exchange` with a
//! `Reply` or an `ApiError`. Routes, authentication and state are all the
//! handler's; the server only moves requests to threads, catches panics
//! (answered 500) and writes one access-log line per request.
//!
//! Clients never talk to tiny_http directly: the relay (`relay.rs`) reads
//! each request head under the configured limits and forwards it to
//! tiny_http on a private backend socket. tiny_http stops accepting there
//! after its first accept error (for example out of file descriptors); the
//! server then keeps serving the requests already read and binds the backend
//! socket again.

use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tiny_http::{Method, Request};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::exchange::{Exchange, Reply};
use crate::listener;
use crate::relay::Divert;
use crate::takeover::{RequestHead, Takeover};

/// An application served by a `Server`: its routes, its authentication and
/// its state. Closures `Fn(&mut Exchange) -> Result<Reply, ApiError>` are
/// handlers whose requests are all short.
pub trait Handler: Send + Sync + 'static {
    /// Whether a request may run for long (a stream, an upload, a download,
    /// a big tree operation), decided from the method and the path (still
    /// percent-encoded, without the query) before it is dispatched. Such
    /// requests get a thread of their own, at most `max_long_running` at
    /// once, instead of a pool worker. By default none is.
    fn is_long_running(&self, method: &Method, path: &str) -> bool {
        let _ = (method, path);
        false
    }

    /// Answers one request: a `Reply`, or an `ApiError` sent as JSON. A
    /// handler that streams takes the request and answers `Reply::Streamed`.
    fn handle(&self, exchange: &mut Exchange) -> Result<Reply, ApiError>;

    /// Whether to take the connection over at this request head instead of
    /// answering it with `handle`: for WebSocket upgrades (`ws::accept`) and
    /// tunnels to other servers (`takeover::tunnel`). Asked for every head
    /// before the request is forwarded, so it should only look at the head.
    /// A `Takeover` returned here gets the connection, with the request's
    /// unread body, once every earlier request on it has been answered; at
    /// most `max_upgraded` at once, more are answered 503. By default no
    /// request is taken over.
    fn divert(&self, head: &RequestHead) -> Option<Takeover> {
        let _ = head;
        None
    }
}

impl<F> Handler for F
where
    F: Fn(&mut Exchange) -> Result<Reply, ApiError> + Send + Sync + 'static,
{
    fn handle(&self, exchange: &mut Exchange) -> Result<Reply, ApiError> {
        self(exchange)
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartupError {
    Bind {
        addr: String,
        /// The configured `bind_hint`, said after the reason.
        hint: Option<&'static str>,
        source: io::Error,
    },
    Server(String),
    Threads(io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind { addr, hint, source } => {
                write!(f, "cannot listen on {addr}: {source}")?;
                match hint {
                    Some(hint) => write!(f, "; {hint}"),
                    None => Ok(()),
                }
            }
            Self::Server(msg) => write!(f, "cannot start the HTTP server: {msg}"),
            Self::Threads(err) => write!(f, "cannot start worker threads: {err}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// A server that is listening, with its worker pool started.
pub struct Server<H: Handler> {
    dispatcher: Dispatcher<H>,
    bound: listener::Bound,
}

impl<H: Handler> Server<H> {
    /// Starts the worker pool and listens as `config` says.
    pub fn bind(config: ServerConfig, handler: H) -> Result<Self, StartupError> {
        let dispatcher = Dispatcher::start(Arc::new(Shared { config, handler }))?;
        let shared = Arc::clone(&dispatcher.shared);
        let divert: Divert = Arc::new(move |head| shared.handler.divert(head));
        let bound = listener::bind(&dispatcher.shared.config, divert)?;
        Ok(Self { dispatcher, bound })
    }

    /// The TCP address listened on (the real port when port 0 was asked
    /// for); `None` on a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.bound.local_addr
    }

    /// Serves requests until the process exits. After an accept failure on
    /// the backend socket the requests already read are still served and
    /// the backend socket is bound again; clients keep the same address.
    pub fn run(self) -> ! {
        let Self { dispatcher, bound } = self;
        let mut server = Arc::new(bound.backend);
        loop {
            match server.recv() {
                Ok(request) => dispatcher.dispatch(request),
                Err(err) => {
                    // tiny_http's accept loop has stopped (e.g. out of file
                    // descriptors). Keep serving its open connections and
                    // listen again on a fresh socket.
                    tracing::error!(error = %err, "accepting connections failed; listening again");
                    keep_serving(server, dispatcher.clone());
                    server = Arc::new(listener::rebind(&bound.backend_addr));
                }
            }
        }
    }
}

/// Drains requests still arriving on an old server's open connections.
fn keep_serving<H: Handler>(server: Arc<listener::Backend>, dispatcher: Dispatcher<H>) {
    let spawned = thread::Builder::new()
        .name(format!("{}-old-listener", dispatcher.shared.config.name))
        .spawn(move || loop {
            match server.recv() {
                Ok(request) => dispatcher.dispatch(request),
                Err(_) => thread::sleep(Duration::from_secs(1)),
            }
        });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot keep serving old connections");
    }
}

/// What every thread of the server shares.
struct Shared<H> {
    config: ServerConfig,
    handler: H,
}

/// Work handed to the pool.
enum Job {
    Serve(Request),
    Reject(Request, ApiError),
}

/// Routes each request to the pool or to its own thread.
struct Dispatcher<H> {
    shared: Arc<Shared<H>>,
    jobs: SyncSender<Job>,
    long_running: Arc<AtomicUsize>,
}

impl<H> Clone for Dispatcher<H> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            jobs: self.jobs.clone(),
            long_running: Arc::clone(&self.long_running),
        }
    }
}

impl<H: Handler> Dispatcher<H> {
    fn start(shared: Arc<Shared<H>>) -> Result<Self, StartupError> {
        let (jobs, queue) = sync_channel(shared.config.queue_depth);
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..shared.config.workers {
            let (shared, queue) = (Arc::clone(&shared), Arc::clone(&queue));
            thread::Builder::new()
                .name(format!("{}-worker-{index}", shared.config.name))
                .spawn(move || work(&shared, &queue))
                .map_err(StartupError::Threads)?;
        }
        Ok(Self {
            shared,
            jobs,
            long_running: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn dispatch(&self, request: Request) {
        let max_body = self.shared.config.max_declared_body;
        if request.body_length().is_some_and(|n| n > max_body) {
            tracing::warn!(url = %request.url(), length = ?request.body_length(),
                "ignoring a request whose announced body is absurdly large");
            // Dropping it would make tiny_http allocate the announced size
            // and abort the server; leaking it only parks this one connection.
            std::mem::forget(request);
            return;
        }
        let path = request.url().split('?').next().unwrap_or("");
        if self.shared.handler.is_long_running(request.method(), path) {
            self.spawn_long(request);
        } else {
            self.enqueue(Job::Serve(request));
        }
    }

    fn enqueue(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            tracing::error!("the worker pool is gone; dropping a request");
        }
    }

    fn spawn_long(&self, request: Request) {
        let config = &self.shared.config;
        let Some(permit) = Permit::acquire(&self.long_running, config.max_long_running) else {
            let busy = ApiError::unavailable(format!(
                "{} is already serving {} streams and transfers; close some and retry",
                config.name, config.max_long_running
            ));
            return self.enqueue(Job::Reject(request, busy));
        };
        let shared = Arc::clone(&self.shared);
        let job = Arc::new(Mutex::new(Some(request)));
        let for_thread = Arc::clone(&job);
        let spawned = thread::Builder::new()
            .name(format!("{}-stream", config.name))
            .spawn(move || {
                let _permit = permit;
                if let Some(request) = take(&for_thread) {
                    serve(&shared, request);
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start a thread for a long request");
            if let Some(request) = take(&job) {
                let busy = ApiError::unavailable(format!(
                    "{} cannot start more threads; retry shortly",
                    config.name
                ));
                self.enqueue(Job::Reject(request, busy));
            }
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// One slot of a capped counter, released on drop.
pub(crate) struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// A slot of `counter` if fewer than `max` are taken.
    pub(crate) fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(counter)))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn work<H: Handler>(shared: &Shared<H>, queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(Job::Serve(request)) => serve(shared, request),
            Ok(Job::Reject(request, err)) => {
                Exchange::new(request, &shared.config).finish(Err(err));
            }
            Err(_) => return,
        }
    }
}

/// Handles one request and writes the access-log line.
fn serve<H: Handler>(shared: &Shared<H>, request: Request) {
    let started = Instant::now();
    let mut ex = Exchange::new(request, &shared.config);
    let method = ex.method().to_string();
    let path = ex.path().to_owned();
    let result =
        catch_unwind(AssertUnwindSafe(|| shared.handler.handle(&mut ex))).unwrap_or_else(|_| {
            Err(ApiError::internal(format!(
                "{} hit an internal error; see its log",
                shared.config.name
            )))
        });
    let status = catch_unwind(AssertUnwindSafe(|| ex.finish(result))).unwrap_or(500);
    tracing::info!(%method, %path, status, ms = started.elapsed().as_millis() as u64, "request");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_capped_and_released_on_drop() {
        let counter = Arc::new(AtomicUsize::new(0));
        let first = Permit::acquire(&counter, 2).expect("first");
        let second = Permit::acquire(&counter, 2).expect("second");
        assert!(Permit::acquire(&counter, 2).is_none());
        drop(first);
        assert!(Permit::acquire(&counter, 2).is_some());
        drop(second);
        assert_eq!(counter.load(Ordering::Acquire), 0);
    }
}
