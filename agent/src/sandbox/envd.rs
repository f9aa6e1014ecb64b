//! The agent's use of envd, the guest agent inside every sandbox.
//!
//! The client itself, its error and the result of a run are
//! `envd_api::client`'s, shared with the tests; this module only fixes how
//! the agent calls it. The agent reaches envd over TCP at the sandbox's
//! host-side address (see `network`). Most API calls on a sandbox are
//! forwarded to envd as they are ([`EnvdClient::forward`]); running a
//! command to completion ([`EnvdClient::exec`]) gathers envd's typed event
//! stream. The wire format is in `docs/envd-api.md`.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use envd_api::client::Client;
use envd_api::{InitRequest, StartRequest};
use serde_json::Value;

use crate::clock::now_ms;

pub use envd_api::client::{Error as EnvdError, ExecResult};
/// envd's port in every guest.
pub use envd_api::PORT as ENVD_PORT;

/// A client for one sandbox's envd.
#[derive(Clone)]
pub struct EnvdClient {
    client: Client,
}

impl EnvdClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> EnvdClient {
        EnvdClient {
            client: Client::new(addr).with_token(token),
        }
    }

    /// The typed envd client, for the calls this wrapper does not name.
    pub fn api(&self) -> &Client {
        &self.client
    }

    /// Whether envd answers `/health` now.
    pub fn healthy(&self) -> bool {
        self.client.healthy()
    }

    /// Polls `/health` until envd answers or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, EnvdError> {
        self.client.wait_ready(timeout)
    }

    /// Sets the access token and default environment, and the guest's clock
    /// to the host's (`POST /init`).
    pub fn init(&self, token: &str, env: &BTreeMap<String, String>) -> Result<(), EnvdError> {
        let request = InitRequest {
            access_token: Some(token.to_owned()),
            env_vars: Some(env.clone()),
            default_user: None,
            timestamp_ms: Some(now_ms()),
        };
        self.client.init(&request).map(drop)
    }

    /// Forwards a request to envd and returns its response, whatever its
    /// status, for the caller to pass on. `path` includes the query.
    pub fn forward(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&mut dyn Read>,
    ) -> Result<ureq::Response, EnvdError> {
        self.client.forward(method, path, content_type, body)
    }

    /// Runs a process described by `process` (envd's `POST /processes`
    /// body) to its end, feeding it `stdin` if given, and killing it after
    /// `timeout`.
    pub fn exec(
        &self,
        process: Value,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecResult, EnvdError> {
        let request: StartRequest = serde_json::from_value(process)
            .map_err(|e| EnvdError::InvalidRequest(format!("process description: {e}")))?;
        let run = self.client.exec(&request, stdin, Some(timeout))?;
        Ok(ExecResult::from(run))
    }
}
