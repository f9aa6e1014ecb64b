//! The HTTP server: a tiny_http listener, a bounded pool of worker threads
//! for short requests, and dedicated (capped) threads for long-running ones
//! (streams, uploads, downloads), so 20+ open streams never starve the pool.
//!
//! Accepted sockets inherit options set on the listener: a send timeout (a
//! client that stops reading a stream or download is dropped) and TCP
//! keepalive with a user timeout (a peer that vanished is noticed). There is
//! deliberately no receive timeout: on a listener it also applies to
//! `accept`, and tiny_http's accept loop stops at the first accept error.

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tiny_http::Request;

use crate::app::App;
use crate::auth;
use crate::error::ApiError;
use crate::fs::api as files;
use crate::http::{Exchange, Reply};
use crate::process::api as processes;
use crate::router::{self, Route};
use crate::system;

/// Worker threads for short requests.
const WORKERS: usize = 64;
/// Short requests waiting for a worker before the dispatcher blocks.
const QUEUE_DEPTH: usize = 256;
/// Long-running requests (streams, transfers) served at once.
const MAX_LONG_RUNNING: usize = 1024;
/// A write that makes no progress for this long fails (client not reading).
const SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP keepalive: first probe after this much silence...
const KEEPALIVE_IDLE_SECS: libc::c_int = 60;
/// ...then one probe every this many seconds...
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 10;
/// ...and the connection is dropped after this many unanswered probes.
const KEEPALIVE_PROBES: libc::c_int = 6;
/// Unacknowledged data for this long means the peer is gone (milliseconds).
const TCP_USER_TIMEOUT_MS: libc::c_int = 120_000;
/// Bodies announced larger than this are never read nor answered (4 TiB):
/// tiny_http would allocate the unread remainder when dropping them.
const MAX_DECLARED_BODY: usize = 1 << 42;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartupError {
    Bind { addr: String, source: io::Error },
    Server(String),
    Threads(io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind { addr, source } => write!(
                f,
                "cannot listen on {addr}: {source}; pick another address with --listen or ENVD_LISTEN"
            ),
            Self::Server(msg) => write!(f, "cannot start the HTTP server: {msg}"),
            Self::Threads(err) => write!(f, "cannot start worker threads: {err}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// Serves the API on `listen` until the process is killed.
pub fn run(listen: &str) -> Result<(), StartupError> {
    let app = Arc::new(App::default());
    let dispatcher = Dispatcher::start(Arc::clone(&app))?;
    let mut server = Arc::new(bind(listen)?);
    loop {
        match server.recv() {
            Ok(request) => dispatcher.dispatch(request),
            Err(err) => {
                // tiny_http's accept loop has stopped (e.g. out of file
                // descriptors). Keep serving its open connections and listen
                // again on a fresh socket.
                tracing::error!(error = %err, "accepting connections failed; listening again");
                keep_serving(Arc::clone(&server), dispatcher.clone());
                server = Arc::new(rebind(listen));
            }
        }
    }
}

/// Binds the listener with its socket options and wraps it in tiny_http.
fn bind(listen: &str) -> Result<tiny_http::Server, StartupError> {
    let bind_err = |source| StartupError::Bind {
        addr: listen.to_owned(),
        source,
    };
    let addrs: Vec<_> = listen.to_socket_addrs().map_err(bind_err)?.collect();
    let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
    set_socket_options(&listener).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| StartupError::Server(e.to_string()))?;
    tracing::info!(addr = %local, version = env!("CARGO_PKG_VERSION"), "envd listening");
    Ok(server)
}

fn rebind(listen: &str) -> tiny_http::Server {
    let mut delay = Duration::from_millis(100);
    loop {
        thread::sleep(delay);
        match bind(listen) {
            Ok(server) => return server,
            Err(err) => tracing::error!(error = %err, "listening again failed; retrying"),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Drains requests still arriving on an old server's open connections.
fn keep_serving(server: Arc<tiny_http::Server>, dispatcher: Dispatcher) {
    let spawned = thread::Builder::new()
        .name("envd-old-listener".to_owned())
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

/// Sets the options accepted sockets inherit from the listener.
fn set_socket_options(listener: &TcpListener) -> io::Result<()> {
    let send_timeout = libc::timeval {
        tv_sec: SEND_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    set_option(listener, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &send_timeout)?;
    set_option(listener, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1)?;
    set_option(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        &KEEPALIVE_IDLE_SECS,
    )?;
    set_option(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        &KEEPALIVE_INTERVAL_SECS,
    )?;
    set_option(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        &KEEPALIVE_PROBES,
    )?;
    set_option(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        &TCP_USER_TIMEOUT_MS,
    )
}

fn set_option<T>(
    listener: &TcpListener,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `listener`, and the value
    // pointer and length describe one `T` borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Work handed to the pool.
enum Job {
    Serve(Request, Result<Route, ApiError>),
    Reject(Request, ApiError),
}

/// Routes each request to the pool or to its own thread.
#[derive(Clone)]
struct Dispatcher {
    app: Arc<App>,
    jobs: SyncSender<Job>,
    long_running: Arc<AtomicUsize>,
}

impl Dispatcher {
    fn start(app: Arc<App>) -> Result<Self, StartupError> {
        let (jobs, queue) = sync_channel(QUEUE_DEPTH);
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..WORKERS {
            let (app, queue) = (Arc::clone(&app), Arc::clone(&queue));
            thread::Builder::new()
                .name(format!("envd-worker-{index}"))
                .spawn(move || work(&app, &queue))
                .map_err(StartupError::Threads)?;
        }
        Ok(Self {
            app,
            jobs,
            long_running: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn dispatch(&self, request: Request) {
        if request.body_length().is_some_and(|n| n > MAX_DECLARED_BODY) {
            tracing::warn!(url = %request.url(), length = ?request.body_length(),
                "ignoring a request whose announced body is absurdly large");
            // Dropping it would make tiny_http allocate the announced size
            // and abort envd; leaking it only parks this one connection.
            std::mem::forget(request);
            return;
        }
        let path = request.url().split('?').next().unwrap_or("").to_owned();
        let route = router::resolve(request.method(), &path);
        match &route {
            Ok(r) if r.is_long_running() => self.spawn_long(request, route),
            _ => self.enqueue(Job::Serve(request, route)),
        }
    }

    fn enqueue(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            tracing::error!("the worker pool is gone; dropping a request");
        }
    }

    fn spawn_long(&self, request: Request, route: Result<Route, ApiError>) {
        let Some(permit) = Permit::acquire(&self.long_running, MAX_LONG_RUNNING) else {
            let busy = ApiError::unavailable(format!(
                "envd is already serving {MAX_LONG_RUNNING} streams and transfers; close some and retry"
            ));
            return self.enqueue(Job::Reject(request, busy));
        };
        let app = Arc::clone(&self.app);
        let job = Arc::new(Mutex::new(Some((request, route))));
        let for_thread = Arc::clone(&job);
        let spawned = thread::Builder::new()
            .name("envd-stream".to_owned())
            .spawn(move || {
                let _permit = permit;
                if let Some((request, route)) = take(&for_thread) {
                    serve(&app, request, route);
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error = %err, "cannot start a thread for a long request");
            if let Some((request, _)) = take(&job) {
                let busy = ApiError::unavailable("envd cannot start more threads; retry shortly");
                self.enqueue(Job::Reject(request, busy));
            }
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// One slot of a capped counter, released on drop.
struct Permit(Arc<AtomicUsize>);

impl Permit {
    fn acquire(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
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

fn work(app: &App, queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(Job::Serve(request, route)) => serve(app, request, route),
            Ok(Job::Reject(request, err)) => {
                Exchange::new(request).finish(Err(err));
            }
            Err(_) => return,
        }
    }
}

/// Handles one request and writes the access-log line.
fn serve(app: &App, request: Request, route: Result<Route, ApiError>) {
    let started = Instant::now();
    let mut ex = Exchange::new(request);
    let method = ex.method().to_string();
    let path = ex.path().to_owned();
    let result =
        catch_unwind(AssertUnwindSafe(|| handle(app, &mut ex, route))).unwrap_or_else(|_| {
            Err(ApiError::internal(
                "envd hit an internal error; see its log",
            ))
        });
    let status = catch_unwind(AssertUnwindSafe(|| ex.finish(result))).unwrap_or(500);
    tracing::info!(%method, %path, status, ms = started.elapsed().as_millis() as u64, "request");
}

fn handle(app: &App, ex: &mut Exchange, route: Result<Route, ApiError>) -> Result<Reply, ApiError> {
    if !matches!(route, Ok(Route::Health)) {
        auth::check(app.settings.read().access_token.as_deref(), ex)?;
    }
    let settings = &app.settings;
    let registry = &app.processes;
    match route? {
        Route::Health => Ok(system::health()),
        Route::Metrics => system::metrics(&app.cpu),
        Route::Init => system::init(settings, ex),
        Route::ProcessStart => processes::start(registry, settings, ex),
        Route::ProcessList => Ok(processes::list(registry)),
        Route::ProcessInfo(sel) => processes::info(registry, &sel),
        Route::ProcessEvents(sel) => processes::events(registry, ex, &sel),
        Route::ProcessStdin(sel) => processes::write_stdin(registry, ex, &sel),
        Route::ProcessStdinClose(sel) => processes::close_stdin(registry, &sel),
        Route::ProcessSignal(sel) => processes::signal(registry, ex, &sel),
        Route::ProcessResize(sel) => processes::resize(registry, ex, &sel),
        Route::FileRead => files::download(settings, ex),
        Route::FileWrite => files::upload(settings, ex),
        Route::FileDelete => files::delete(settings, ex),
        Route::FsStat => files::stat(settings, ex),
        Route::FsList => files::list(settings, ex),
        Route::FsMkdir => files::mkdir(settings, ex),
        Route::FsMove => files::move_path(settings, ex),
        Route::FsWatch => files::watch(settings, ex),
    }
}
