//! The end-to-end tests' view of envd, on the shared client
//! (`envd_api::client`): health checks, running a command to completion and
//! starting a background one. Every call connects from the calling thread,
//! so it works from a thread that entered the guest's network namespace.

use std::time::Duration;

use envd_api::client::{Client, Error, Finished, Timeouts};
use envd_api::StartRequest;

/// envd's port inside every guest.
pub use envd_api::PORT as ENVD_PORT;

/// What a finished process printed and how it ended.
pub type Output = Finished;

/// A client for one envd at `http://HOST:PORT`.
pub struct Envd {
    client: Client,
}

impl Envd {
    pub fn new(host: &str, port: u16) -> Envd {
        let timeouts = Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(120),
            ..Timeouts::default()
        };
        Envd {
            client: Client::for_host(host, port).with_timeouts(timeouts),
        }
    }

    /// The shared client, for calls without a helper here.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether `GET /health` answers 200.
    pub fn healthy(&self) -> bool {
        self.client.healthy()
    }

    /// Polls `/health` until it answers or `timeout` passes.
    pub fn wait_healthy(&self, timeout: Duration) -> bool {
        self.client.wait_ready(timeout).is_ok()
    }

    /// Runs `cmd args` in the foreground and gathers its event stream.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output, Error> {
        self.client
            .exec(&StartRequest::command(cmd, args), None, None)
    }

    /// Starts a background process; returns its pid.
    pub fn spawn_background(&self, cmd: &str, args: &[&str]) -> Result<u32, Error> {
        let started = self
            .client
            .start_background(&StartRequest::command(cmd, args))?;
        Ok(started.pid)
    }
}
