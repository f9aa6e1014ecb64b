//! Per-sandbox resource samples for `GET /v1/capsules/{id}/metrics`: a ring
//! buffer per sandbox, fed every [`INTERVAL`] by the sampler thread (and on
//! demand when a buffer is still empty). CPU comes from the guest (envd's
//! `/metrics`), memory is the VM process's resident set on the host, disk
//! the blocks the sandbox's files hold on the host.
//!
//! Samples live in memory only: they are a view of the last day, not state
//! (a restarted agent starts empty buffers).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use lmdb_schema::{SandboxId, SandboxStatus};
use serde::Serialize;

use super::error::SandboxError;
use super::manager::Manager;

/// How often the sampler measures each running sandbox.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept per sandbox: a day at [`INTERVAL`].
const KEPT: usize = 8640;

/// One measurement of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub timestamp_unix: u64,
    /// Busy share of the guest's vCPUs, 0 to 100.
    pub cpu_pct: f64,
    /// Resident memory of the VM process on the host.
    pub mem_bytes: u64,
    /// Bytes the sandbox's files hold on the host's disk.
    pub disk_bytes: u64,
}

/// The buffers of every sandbox.
#[derive(Default)]
pub struct Metrics {
    buffers: Mutex<HashMap<SandboxId, VecDeque<Point>>>,
}

impl Metrics {
    fn push(&self, id: &SandboxId, point: Point) {
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let buffer = buffers.entry(id.clone()).or_default();
        if buffer.len() == KEPT {
            buffer.pop_front();
        }
        buffer.push_back(point);
    }

    /// The samples of `id` taken at or after `since_unix`, oldest first.
    pub fn since(&self, id: &SandboxId, since_unix: u64) -> Vec<Point> {
        let buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        buffers
            .get(id)
            .map(|b| {
                b.iter()
                    .filter(|p| p.timestamp_unix >= since_unix)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the buffers of sandboxes not in `live`.
    fn retain(&self, live: &[SandboxId]) {
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        buffers.retain(|id, _| live.contains(id));
    }
}

impl Manager {
    /// The samples kept for every sandbox.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Measures one running sandbox now and keeps the sample.
    pub fn sample(&self, id: &SandboxId) -> Result<Point, SandboxError> {
        let record = self.get(id)?;
        if record.status != SandboxStatus::Running {
            return Err(SandboxError::NotRunning {
                id: id.to_string(),
                status: record.status.as_str(),
            });
        }
        let envd = super::envd::EnvdClient::new(self.envd_addr(&record)?, record.envd_token);
        let guest: serde_json::Value = envd
            .api()
            .request("GET", "/metrics")
            .call()
            .map_err(|e| envd_api::client::Error::Unreachable(e.to_string()))?
            .into_json()
            .map_err(|e| envd_api::client::Error::Protocol(e.to_string()))?;
        let point = Point {
            timestamp_unix: self.now_ms() / 1000,
            cpu_pct: guest["cpu_used_pct"]
                .as_f64()
                .unwrap_or(0.0)
                .clamp(0.0, 100.0),
            mem_bytes: record.vmm.as_ref().map_or(0, |vmm| resident_bytes(vmm.pid)),
            disk_bytes: allocated_bytes(&self.sandbox_dir(id)),
        };
        self.metrics.push(id, point);
        Ok(point)
    }

    /// One round of the sampler thread: every running sandbox.
    pub fn sample_running(&self) {
        let Ok(all) = self.list() else { return };
        let live: Vec<SandboxId> = all
            .iter()
            .filter(|r| !r.status.is_terminal())
            .map(|r| r.id.clone())
            .collect();
        self.metrics.retain(&live);
        for record in all.iter().filter(|r| r.status == SandboxStatus::Running) {
            if let Err(e) = self.sample(&record.id) {
                tracing::debug!(sandbox = %record.id, error = %e, "no metrics sample this round");
            }
        }
    }
}

/// `VmRSS` of process `pid`, in bytes (0 when it cannot be read).
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Blocks held by the files under `dir`, in bytes.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
