//! The last step of every create and resume: waiting for the guest's envd
//! to answer and handing it the sandbox's token and environment; and
//! reaching envd afterwards, for the API's calls into a sandbox.

use std::path::Path;
use std::time::Duration;

use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus};
use serde_json::Value;

use super::envd::{EnvdClient, EnvdError, ExecResult, ENVD_PORT};
use super::error::SandboxError;
use super::manager::{handle_of, slot_of, Manager};
use crate::network;
use crate::runtime::{VmState, CONSOLE_LOG};

/// How long a new VM may take to have envd answer (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a boot checks that the VM still runs while envd is silent.
const BOOT_CHECK_EVERY: Duration = Duration::from_secs(2);

impl Manager {
    /// Waits for envd, hands it the token and environment, marks running.
    /// `guest_token` is the token envd holds now when it is not the
    /// sandbox's own (a VM restored from a snapshot holds the snapshot's).
    pub(super) fn finish_boot(
        &self,
        record: &mut SandboxRecord,
        guest_token: Option<String>,
    ) -> Result<(), SandboxError> {
        let addr = self.envd_addr(record)?;
        let envd = EnvdClient::new(addr, guest_token.or_else(|| record.envd_token.clone()));
        let ready = self.wait_envd(record, &envd)?;
        let token = record.envd_token.clone().unwrap_or_default();
        envd.init(&token, &record.env)?;
        record.set_status(SandboxStatus::Running, self.now_ms());
        self.registry.save(record)?;
        tracing::info!(sandbox = %record.id, ready_ms = ready.as_millis() as u64, "sandbox running");
        Ok(())
    }

    /// Waits for envd to answer, giving up early when the VM has stopped;
    /// a failure says how far the guest got, from its console.
    pub(super) fn wait_envd(
        &self,
        record: &SandboxRecord,
        envd: &EnvdClient,
    ) -> Result<Duration, SandboxError> {
        let started = std::time::Instant::now();
        loop {
            let left = BOOT_TIMEOUT.saturating_sub(started.elapsed());
            if envd.wait_ready(left.min(BOOT_CHECK_EVERY)).is_ok() {
                return Ok(started.elapsed());
            }
            let vm_gone = record
                .vmm
                .as_ref()
                .is_some_and(|vmm| self.runtime.attach(&handle_of(vmm)) == VmState::Gone);
            if !vm_gone && started.elapsed() < BOOT_TIMEOUT {
                continue;
            }
            let why = if vm_gone {
                format!(
                    "the VM ({} runtime) stopped after {}s, before its guest agent answered",
                    self.runtime.name(),
                    started.elapsed().as_secs()
                )
            } else {
                format!(
                    "no answer within {}s from the VM ({} runtime)",
                    BOOT_TIMEOUT.as_secs(),
                    self.runtime.name()
                )
            };
            let console = self.console_log(&record.id, 4096).unwrap_or_default();
            let text = String::from_utf8_lossy(&console);
            let last: Vec<&str> = text.lines().rev().take(3).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            return Err(SandboxError::Envd(EnvdError::Unreachable(format!(
                "{why}; the guest console's last lines: {:?}",
                last.join(" | ")
            ))));
        }
    }

    pub(super) fn envd_addr(
        &self,
        record: &SandboxRecord,
    ) -> Result<std::net::SocketAddr, SandboxError> {
        let addrs = network::addr::SlotAddrs::new(slot_of(record)?)?;
        Ok(std::net::SocketAddr::from((addrs.host_ip, ENVD_PORT)))
    }

    /// A client for the sandbox's envd; the sandbox must be running.
    /// A paused sandbox is resumed first: any call on it wakes it up.
    pub fn envd(&self, id: &SandboxId) -> Result<EnvdClient, SandboxError> {
        let record = self.running_record(id)?;
        Ok(EnvdClient::new(
            self.envd_addr(&record)?,
            record.envd_token.clone(),
        ))
    }

    /// Where `port` of the sandbox is reached from the host; the sandbox
    /// must be running, and a paused one is resumed first.
    pub fn guest_addr(
        &self,
        id: &SandboxId,
        port: u16,
    ) -> Result<std::net::SocketAddr, SandboxError> {
        let mut addr = self.envd_addr(&self.running_record(id)?)?;
        addr.set_port(port);
        Ok(addr)
    }

    /// The record of a running sandbox, resuming it first if it is paused.
    fn running_record(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        let mut record = self.get(id)?;
        if record.status == SandboxStatus::Paused {
            record = self.resume(id)?;
        }
        if record.status != SandboxStatus::Running {
            return Err(SandboxError::NotRunning {
                id: id.to_string(),
                status: record.status.as_str(),
            });
        }
        Ok(record)
    }

    /// Runs a command to completion in the sandbox.
    pub fn exec(
        &self,
        id: &SandboxId,
        process: Value,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<ExecResult, SandboxError> {
        Ok(self.envd(id)?.exec(process, stdin, timeout)?)
    }

    /// The guest's serial console, at most its last `limit` bytes.
    pub fn console_log(&self, id: &SandboxId, limit: u64) -> Result<Vec<u8>, SandboxError> {
        self.get(id)?;
        let path = self.sandbox_dir(id).join(CONSOLE_LOG);
        read_tail(&path, limit).map_err(SandboxError::io("read the console log", &path))
    }
}

fn read_tail(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(limit)))?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}
