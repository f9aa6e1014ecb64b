//! Listening sockets: binds the configured address with the socket options
//! accepted connections inherit, and wraps the listener in tiny_http.
//!
//! Accepted sockets inherit options set on the listener: a send timeout (a
//! client that stops reading a stream or download is dropped) and, on TCP,
//! keepalive with a user timeout (a peer that vanished is noticed). There is
//! deliberately no receive timeout: on a listener it also applies to
//! `accept`, and tiny_http's accept loop stops at the first accept error.

use std::io;
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::thread;
use std::time::Duration;

use crate::config::{Listen, ServerConfig};
use crate::server::StartupError;

/// Binds the listener with its socket options and wraps it in tiny_http.
/// `again` says the server is listening again after an accept failure: a
/// Unix socket file it left behind is then replaced.
pub(crate) fn bind(config: &ServerConfig, again: bool) -> Result<tiny_http::Server, StartupError> {
    let bind_err = |source| StartupError::Bind {
        addr: config.listen.to_string(),
        hint: config.bind_hint,
        source,
    };
    let (server, local) = match &config.listen {
        Listen::Tcp(addr) => {
            let addrs: Vec<_> = addr.to_socket_addrs().map_err(bind_err)?.collect();
            let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
            set_tcp_options(&listener, config).map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?.to_string();
            (tiny_http::Server::from_listener(listener, None), local)
        }
        Listen::Unix(path) => {
            if again {
                // Ours, from before the failure; nothing listens on it now.
                let _ = std::fs::remove_file(path);
            }
            let listener = UnixListener::bind(path).map_err(bind_err)?;
            set_send_timeout(&listener, config.send_timeout).map_err(bind_err)?;
            let local = config.listen.to_string();
            (tiny_http::Server::from_listener(listener, None), local)
        }
    };
    let server = server.map_err(|e| StartupError::Server(e.to_string()))?;
    tracing::info!(addr = %local, version = config.version, "{} listening", config.name);
    Ok(server)
}

/// Listens again, retrying with a growing delay until it works.
pub(crate) fn rebind(config: &ServerConfig) -> tiny_http::Server {
    let mut delay = Duration::from_millis(100);
    loop {
        thread::sleep(delay);
        match bind(config, true) {
            Ok(server) => return server,
            Err(err) => tracing::error!(error = %err, "listening again failed; retrying"),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
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
