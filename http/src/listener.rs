//! Listening sockets: binds the configured address with the socket options
//! accepted connections inherit, accepts its connections for the relay
//! (`relay.rs`), and binds tiny_http on a private backend socket that only
//! the relay connects to.
//!
//! Accepted sockets inherit options set on the listener: a send timeout (a
//! client that stops reading a stream or download is dropped) and, on TCP,
//! keepalive with a user timeout (a peer that vanished is noticed). There is
//! deliberately no receive timeout: an idle keep-alive connection is not an
//! error.
//!
//! The backend socket is a Linux abstract Unix socket (no file to clean up),
//! one name per server. tiny_http stops accepting on it after its first
//! accept error (for example out of file descriptors); the server then binds
//! the same name again, and the relay retries its connects meanwhile. The
//! public listener's own accept errors are retried in place.

use std::io;
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::config::{Listen, ServerConfig};
use crate::head::HeadLimits;
use crate::relay::{Client, Divert, Relay};
use crate::server::StartupError;

/// Backend sockets made by this process so far, for unique names.
static BACKENDS: AtomicUsize = AtomicUsize::new(0);

/// tiny_http serving the backend socket. Never dropped: tiny_http's `Drop`
/// unwraps the socket's path, which an abstract socket does not have, and a
/// server lives as long as its process anyway.
pub(crate) struct Backend(ManuallyDrop<tiny_http::Server>);

impl Deref for Backend {
    type Target = tiny_http::Server;

    fn deref(&self) -> &tiny_http::Server {
        &self.0
    }
}

/// A server's sockets once it listens.
pub(crate) struct Bound {
    pub backend: Backend,
    /// The backend socket's address, to bind it again.
    pub backend_addr: net::SocketAddr,
    /// The public TCP address (the real port when port 0 was asked for).
    pub local_addr: Option<SocketAddr>,
}

/// The listener clients connect to.
enum Public {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Public {
    fn accept(&self) -> io::Result<Client> {
        match self {
            Self::Tcp(l) => {
                let (stream, _) = l.accept()?;
                // The relay writes what tiny_http wrote, already whole:
                // holding a small write back for an ACK only adds latency.
                stream.set_nodelay(true)?;
                Ok(Client::Tcp(stream))
            }
            Self::Unix(l) => l.accept().map(|(s, _)| Client::Unix(s)),
        }
    }
}

/// Binds the public listener with its socket options and the backend
/// socket, and starts accepting connections; `divert` is asked about
/// every request head.
pub(crate) fn bind(config: &ServerConfig, divert: Divert) -> Result<Bound, StartupError> {
    let bind_err = |source| StartupError::Bind {
        addr: config.listen.to_string(),
        hint: config.bind_hint,
        source,
    };
    let (public, local_addr) = match &config.listen {
        Listen::Tcp(addr) => {
            let addrs: Vec<_> = addr.to_socket_addrs().map_err(bind_err)?.collect();
            let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
            set_tcp_options(&listener, config).map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?;
            (Public::Tcp(listener), Some(local))
        }
        Listen::Unix(path) => {
            let listener = UnixListener::bind(path).map_err(bind_err)?;
            set_send_timeout(&listener, config.send_timeout).map_err(bind_err)?;
            (Public::Unix(listener), None)
        }
    };
    let backend_addr = backend_address(config.name)?;
    let backend = bind_backend(&backend_addr)?;
    let limits = HeadLimits {
        line: config.max_header_line,
        head: config.max_head,
    };
    let relay = Arc::new(Relay::new(
        config.name,
        backend_addr.clone(),
        limits,
        divert,
        config.max_upgraded,
    ));
    thread::Builder::new()
        .name(format!("{}-accept", config.name))
        .spawn(move || accept_loop(&public, &relay))
        .map_err(StartupError::Threads)?;
    let shown = local_addr.map_or_else(|| config.listen.to_string(), |a| a.to_string());
    tracing::info!(addr = %shown, version = config.version, "{} listening", config.name);
    Ok(Bound {
        backend,
        backend_addr,
        local_addr,
    })
}

/// Binds the backend socket again, retrying with a growing delay until it
/// works (the old one is gone once tiny_http's accept loop has stopped).
pub(crate) fn rebind(addr: &net::SocketAddr) -> Backend {
    let mut delay = Duration::from_millis(100);
    loop {
        thread::sleep(delay);
        match bind_backend(addr) {
            Ok(backend) => return backend,
            Err(err) => tracing::error!(error = %err, "listening again failed; retrying"),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A backend address no other server of this process or another uses.
fn backend_address(name: &str) -> Result<net::SocketAddr, StartupError> {
    let seq = BACKENDS.fetch_add(1, Ordering::Relaxed);
    let id = format!("wrenn-http/{name}/{}/{seq}", std::process::id());
    net::SocketAddr::from_abstract_name(id).map_err(|e| StartupError::Server(e.to_string()))
}

fn bind_backend(addr: &net::SocketAddr) -> Result<Backend, StartupError> {
    let listener = UnixListener::bind_addr(addr)
        .map_err(|e| StartupError::Server(format!("cannot bind the backend socket: {e}")))?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| StartupError::Server(e.to_string()))?;
    Ok(Backend(ManuallyDrop::new(server)))
}

/// Hands every accepted connection to the relay; accept errors (e.g. out
/// of file descriptors) are retried after a growing pause.
fn accept_loop(public: &Public, relay: &Arc<Relay>) {
    let mut delay = Duration::from_millis(10);
    loop {
        match public.accept() {
            Ok(client) => {
                delay = Duration::from_millis(10);
                relay.spawn(client);
            }
            Err(err) => {
                tracing::error!(error = %err, "accepting a connection failed; retrying");
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Sets the options accepted TCP sockets inherit from the listener.
fn set_tcp_options(listener: &TcpListener, config: &ServerConfig) -> io::Result<()> {
    set_send_timeout(listener, config.send_timeout)?;
    set_option(listener, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &1)?;
    let tcp_options = [
        (libc::TCP_KEEPIDLE, config.keepalive_idle.as_secs().into()),
        (
            libc::TCP_KEEPINTVL,
            config.keepalive_interval.as_secs().into(),
        ),
        (libc::TCP_KEEPCNT, config.keepalive_probes.into()),
        (libc::TCP_USER_TIMEOUT, config.tcp_user_timeout.as_millis()),
    ];
    for (name, value) in tcp_options {
        set_option(listener, libc::IPPROTO_TCP, name, &clamp(value))?;
    }
    Ok(())
}

/// Sets the send timeout accepted sockets inherit from the listener.
fn set_send_timeout(socket: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let send_timeout = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    set_option(socket, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &send_timeout)
}

/// A socket option value, saturated at the largest `c_int`.
fn clamp(value: u128) -> libc::c_int {
    libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX)
}

fn set_option<T>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `socket`, and the value
    // pointer and length describe one `T` borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn get_option<T: Default>(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: the fd is a live socket owned by `socket`, and the pointer
        // and length describe `value`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&mut value as *mut T).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn tcp_listeners_get_the_configured_options() {
        let config = ServerConfig::new("test", "0", Listen::Tcp("127.0.0.1:0".into()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_tcp_options(&listener, &config).unwrap();
        let tcp = |name| get_option::<libc::c_int>(&listener, libc::IPPROTO_TCP, name);
        assert_eq!(tcp(libc::TCP_KEEPIDLE), 60);
        assert_eq!(tcp(libc::TCP_KEEPINTVL), 10);
        assert_eq!(tcp(libc::TCP_KEEPCNT), 6);
        assert_eq!(tcp(libc::TCP_USER_TIMEOUT), 120_000);
        let keepalive: libc::c_int = get_option(&listener, libc::SOL_SOCKET, libc::SO_KEEPALIVE);
        assert_eq!(keepalive, 1);
        let timeout: libc::timeval = get_option(&listener, libc::SOL_SOCKET, libc::SO_SNDTIMEO);
        assert_eq!((timeout.tv_sec, timeout.tv_usec), (120, 0));
    }
}
