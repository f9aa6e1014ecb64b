//! `sandboxes` records: one per sandbox, keyed by [`SandboxId`].
//!
//! The agent writes a new status before it starts a side effect (a
//! transitional status such as `Pausing`) and writes the outcome after the
//! effect ends, so that after a crash it can finish or roll back the step.
//! This file only describes the data; the transitions are the agent's.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{decode_body, sealed::Upgrade, Record};
use crate::keys::sealed::KeyBytes;
use wrenn_layers::HeaderId;

use super::kinds::{RuntimeKind, VmStateVersion};
use crate::keys::{SandboxId, SlotId, TemplateName};

/// Where a sandbox is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SandboxStatus {
    /// Resources are being set up and the VM booted.
    Creating,
    /// The VM runs.
    Running,
    /// The VM is being snapshotted and stopped.
    Pausing,
    /// The VM is stopped; its snapshot is on disk.
    Paused,
    /// The VM is being restored from its snapshot.
    Resuming,
    /// The VM and its resources are being removed.
    Destroying,
    /// Everything is gone; only this record is left.
    Destroyed,
    /// A step failed; see [`SandboxRecord::error`]. Resources may still be
    /// held, so the sandbox still has to be destroyed.
    Error,
}

impl SandboxStatus {
    /// Whether nothing more can happen to the sandbox (only `Destroyed`).
    pub fn is_terminal(self) -> bool {
        self == SandboxStatus::Destroyed
    }

    /// Whether a step was in flight: `Creating`, `Pausing`, `Resuming` or
    /// `Destroying`. Found at start-up, such a sandbox needs recovery.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            SandboxStatus::Creating
                | SandboxStatus::Pausing
                | SandboxStatus::Resuming
                | SandboxStatus::Destroying
        )
    }

    /// The status in lowercase, as in APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Running => "running",
            SandboxStatus::Pausing => "pausing",
            SandboxStatus::Paused => "paused",
            SandboxStatus::Resuming => "resuming",
            SandboxStatus::Destroying => "destroying",
            SandboxStatus::Destroyed => "destroyed",
            SandboxStatus::Error => "error",
        }
    }
}

impl fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens when a sandbox's time is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeoutAction {
    /// Destroy it.
    Kill,
    /// Pause it (snapshot to disk).
    Pause,
}

impl TimeoutAction {
    /// The action in lowercase, as in APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutAction::Kill => "kill",
            TimeoutAction::Pause => "pause",
        }
    }
}

impl fmt::Display for TimeoutAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VMM process running a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    /// Its process id.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` when it was started: a process found
    /// under `pid` with another start time is not ours (the pid was reused).
    pub start_time_ticks: u64,
    /// Path of its control socket.
    pub control_socket: String,
}

/// One sandbox (record version 5 added `owner`, the fleet key's owner;
/// version 4 added the inactivity timer,
/// `idle_timeout_s` and `last_active_ms`; version 3 gave the runtime, the
/// memory header and the VM state version types of their own; version 2
/// added `memory_header`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its id; the same as the key.
    pub id: SandboxId,
    /// Where it is in its lifecycle.
    pub status: SandboxStatus,
    /// The template it was made from.
    pub template: TemplateName,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Caller-supplied labels.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for processes in the sandbox.
    pub env: BTreeMap<String, String>,
    /// Whether it may reach the internet.
    pub internet: bool,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When its time is up, milliseconds since the Unix epoch; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// What happens when its time is up.
    pub timeout_action: TimeoutAction,
    /// The network slot it holds, if any.
    pub slot: Option<SlotId>,
    /// The runtime that runs it (and that alone can resume it).
    pub runtime: RuntimeKind,
    /// Its VMM process while one exists.
    pub vmm: Option<VmmProcess>,
    /// The token for its guest agent (envd).
    pub envd_token: Option<String>,
    /// Why the last step failed, with status `Error`.
    pub error: Option<String>,
    /// Time of the last change, milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// The layer-store header of its memory: while paused, the memory
    /// itself; while running, the snapshot it was last restored from (the
    /// parent of its next pause). Each header named here holds references
    /// on its layers. `None`: booted cold and never paused.
    pub memory_header: Option<HeaderId>,
    /// While paused under the native runtime: the version of its saved VM
    /// state, so that a node can tell, before trying, whether its
    /// wrenn-vmm can resume it. `None` under QEMU, or never paused.
    pub vm_state_version: Option<VmStateVersion>,
    /// The inactivity timer: when set, every use of the sandbox (a command,
    /// a file call, a ping, WebSocket traffic) moves `expires_at_ms` to this
    /// many seconds after it, so `timeout_action` happens only once nobody
    /// has used it for that long. `None`: `expires_at_ms` is a fixed lease.
    pub idle_timeout_s: Option<u32>,
    /// The last use of the sandbox (or its creation or last resume),
    /// milliseconds since the Unix epoch.
    pub last_active_ms: u64,
    /// Who made it: the `owner` of the fleet manifest's API key it was
    /// created with. Only that owner's keys see it. `None`: created with a
    /// node key (or none), seen by node keys only.
    pub owner: Option<String>,
}

/// Version 4, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct SandboxRecordV4 {
    id: SandboxId,
    status: SandboxStatus,
    template: TemplateName,
    vcpus: u32,
    memory_mb: u32,
    metadata: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    internet: bool,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    timeout_action: TimeoutAction,
    slot: Option<SlotId>,
    runtime: RuntimeKind,
    vmm: Option<VmmProcess>,
    envd_token: Option<String>,
    error: Option<String>,
    updated_at_ms: u64,
    memory_header: Option<HeaderId>,
    vm_state_version: Option<VmStateVersion>,
    idle_timeout_s: Option<u32>,
    last_active_ms: u64,
}

impl From<SandboxRecordV4> for SandboxRecord {
    fn from(v4: SandboxRecordV4) -> SandboxRecord {
        SandboxRecord {
            id: v4.id,
            status: v4.status,
            template: v4.template,
            vcpus: v4.vcpus,
            memory_mb: v4.memory_mb,
            metadata: v4.metadata,
            env: v4.env,
            internet: v4.internet,
            created_at_ms: v4.created_at_ms,
            expires_at_ms: v4.expires_at_ms,
            timeout_action: v4.timeout_action,
            slot: v4.slot,
            runtime: v4.runtime,
            vmm: v4.vmm,
            envd_token: v4.envd_token,
            error: v4.error,
            updated_at_ms: v4.updated_at_ms,
            memory_header: v4.memory_header,
            vm_state_version: v4.vm_state_version,
            idle_timeout_s: v4.idle_timeout_s,
            last_active_ms: v4.last_active_ms,
            owner: None,
        }
    }
}

/// Version 3, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct SandboxRecordV3 {
    id: SandboxId,
    status: SandboxStatus,
    template: TemplateName,
    vcpus: u32,
    memory_mb: u32,
    metadata: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    internet: bool,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    timeout_action: TimeoutAction,
    slot: Option<SlotId>,
    runtime: RuntimeKind,
    vmm: Option<VmmProcess>,
    envd_token: Option<String>,
    error: Option<String>,
    updated_at_ms: u64,
    memory_header: Option<HeaderId>,
    vm_state_version: Option<VmStateVersion>,
}

impl From<SandboxRecordV3> for SandboxRecordV4 {
    fn from(v3: SandboxRecordV3) -> SandboxRecordV4 {
        SandboxRecordV4 {
            id: v3.id,
            status: v3.status,
            template: v3.template,
            vcpus: v3.vcpus,
            memory_mb: v3.memory_mb,
            metadata: v3.metadata,
            env: v3.env,
            internet: v3.internet,
            created_at_ms: v3.created_at_ms,
            expires_at_ms: v3.expires_at_ms,
            timeout_action: v3.timeout_action,
            slot: v3.slot,
            runtime: v3.runtime,
            vmm: v3.vmm,
            envd_token: v3.envd_token,
            error: v3.error,
            last_active_ms: v3.updated_at_ms,
            updated_at_ms: v3.updated_at_ms,
            memory_header: v3.memory_header,
            vm_state_version: v3.vm_state_version,
            idle_timeout_s: None,
        }
    }
}

/// Version 2, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct SandboxRecordV2 {
    id: SandboxId,
    status: SandboxStatus,
    template: TemplateName,
    vcpus: u32,
    memory_mb: u32,
    metadata: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    internet: bool,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    timeout_action: TimeoutAction,
    slot: Option<SlotId>,
    runtime: String,
    vmm: Option<VmmProcess>,
    envd_token: Option<String>,
    error: Option<String>,
    updated_at_ms: u64,
    memory_header: Option<[u8; 32]>,
}

impl TryFrom<SandboxRecordV2> for SandboxRecordV3 {
    type Error = String;

    fn try_from(v2: SandboxRecordV2) -> Result<SandboxRecordV3, String> {
        let runtime = RuntimeKind::parse(&v2.runtime).ok_or_else(|| {
            format!(
                "sandbox {} names runtime {:?}, which is neither qemu nor native",
                v2.id, v2.runtime
            )
        })?;
        Ok(SandboxRecordV3 {
            id: v2.id,
            status: v2.status,
            template: v2.template,
            vcpus: v2.vcpus,
            memory_mb: v2.memory_mb,
            metadata: v2.metadata,
            env: v2.env,
            internet: v2.internet,
            created_at_ms: v2.created_at_ms,
            expires_at_ms: v2.expires_at_ms,
            timeout_action: v2.timeout_action,
            slot: v2.slot,
            runtime,
            vmm: v2.vmm,
            envd_token: v2.envd_token,
            error: v2.error,
            updated_at_ms: v2.updated_at_ms,
            memory_header: v2.memory_header.map(HeaderId),
            vm_state_version: None,
        })
    }
}

/// Version 1, frozen: decoded and upgraded, never written.
#[derive(Deserialize)]
struct SandboxRecordV1 {
    id: SandboxId,
    status: SandboxStatus,
    template: TemplateName,
    vcpus: u32,
    memory_mb: u32,
    metadata: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    internet: bool,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    timeout_action: TimeoutAction,
    slot: Option<SlotId>,
    runtime: String,
    vmm: Option<VmmProcess>,
    envd_token: Option<String>,
    error: Option<String>,
    updated_at_ms: u64,
}

impl From<SandboxRecordV1> for SandboxRecordV2 {
    fn from(v1: SandboxRecordV1) -> SandboxRecordV2 {
        SandboxRecordV2 {
            id: v1.id,
            status: v1.status,
            template: v1.template,
            vcpus: v1.vcpus,
            memory_mb: v1.memory_mb,
            metadata: v1.metadata,
            env: v1.env,
            internet: v1.internet,
            created_at_ms: v1.created_at_ms,
            expires_at_ms: v1.expires_at_ms,
            timeout_action: v1.timeout_action,
            slot: v1.slot,
            runtime: v1.runtime,
            vmm: v1.vmm,
            envd_token: v1.envd_token,
            error: v1.error,
            updated_at_ms: v1.updated_at_ms,
            memory_header: None,
        }
    }
}

impl SandboxRecord {
    /// Whether its time is up at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Sets `status` and `updated_at_ms`.
    pub fn set_status(&mut self, status: SandboxStatus, now_ms: u64) {
        self.status = status;
        self.updated_at_ms = now_ms;
    }
}

impl Upgrade for SandboxRecord {
    fn own_key(&self) -> Option<Cow<'_, [u8]>> {
        Some(self.id.to_bytes())
    }

    fn upgrade(version: u8, body: &[u8]) -> Option<Result<Self, String>> {
        match version {
            1 => Some(
                decode_body::<SandboxRecordV1>(body)
                    .and_then(|v1| SandboxRecordV3::try_from(SandboxRecordV2::from(v1)))
                    .map(|v3| SandboxRecord::from(SandboxRecordV4::from(v3))),
            ),
            2 => Some(
                decode_body::<SandboxRecordV2>(body)
                    .and_then(SandboxRecordV3::try_from)
                    .map(|v3| SandboxRecord::from(SandboxRecordV4::from(v3))),
            ),
            3 => Some(
                decode_body::<SandboxRecordV3>(body)
                    .map(|v3| SandboxRecord::from(SandboxRecordV4::from(v3))),
            ),
            4 => Some(decode_body::<SandboxRecordV4>(body).map(SandboxRecord::from)),
            _ => None,
        }
    }
}

impl Record for SandboxRecord {
    const DATABASE: &'static str = "sandboxes";
    const CURRENT_VERSION: u8 = 5;
    type Key = SandboxId;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::records::samples;

    #[test]
    fn round_trip() {
        let record = samples::sandbox();
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], 5);
        assert_eq!(decode::<SandboxRecord>(&record.id, &bytes).unwrap(), record);
    }

    #[test]
    fn status_helpers() {
        use SandboxStatus::*;
        let all = [
            Creating, Running, Pausing, Paused, Resuming, Destroying, Destroyed, Error,
        ];
        let terminal: Vec<_> = all.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [&Destroyed]);
        let moving: Vec<_> = all.iter().filter(|s| s.is_transitional()).collect();
        assert_eq!(moving, [&Creating, &Pausing, &Resuming, &Destroying]);
        assert_eq!(Paused.to_string(), "paused");
        assert_eq!(TimeoutAction::Kill.to_string(), "kill");
    }

    #[test]
    fn expiry_and_status_change() {
        let mut record = samples::sandbox();
        assert!(!record.is_expired(1_700_000_299_999));
        assert!(record.is_expired(1_700_000_300_000));
        record.expires_at_ms = None;
        assert!(!record.is_expired(u64::MAX));
        record.set_status(SandboxStatus::Pausing, 42);
        assert_eq!(record.status, SandboxStatus::Pausing);
        assert_eq!(record.updated_at_ms, 42);
    }
}
