//! A create request checked against the host and the template, and the VM
//! spec a sandbox's record turns into.

use std::collections::BTreeMap;

use lmdb_schema::{
    SandboxId, SandboxRecord, SandboxStatus, TemplateName, TemplateRecord, TimeoutAction,
};

use super::error::SandboxError;
use super::manager::Manager;
use crate::runtime::{DiskFormat, VmSpec};

/// What a caller asks for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub template: String,
    /// `None`: the template's (a snapshot's are fixed), else 1.
    pub vcpus: Option<u32>,
    /// `None`: the template's (a snapshot's are fixed), else 512.
    pub memory_mb: Option<u32>,
    /// Seconds until `timeout_action`; `None`: never.
    pub timeout_s: Option<u64>,
    /// When set, the timeout is an inactivity timer of this many seconds:
    /// each use of the sandbox starts it again (`Manager::touch`).
    pub idle_timeout_s: Option<u32>,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub internet: bool,
    pub timeout_action: TimeoutAction,
    /// The fleet key's owner it is created for (`SandboxRecord::owner`).
    pub owner: Option<String>,
}

/// Host resources that requests are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub vcpus: u32,
    pub memory_mb: u64,
}

impl HostCapacity {
    pub fn probe() -> HostCapacity {
        let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kb = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        HostCapacity {
            vcpus,
            memory_mb: memory_kb / 1024,
        }
    }
}

impl Manager {
    /// Checks `request` and resolves its template, vCPUs and memory.
    pub(super) fn validate(
        &self,
        request: &CreateRequest,
    ) -> Result<(TemplateName, Option<TemplateRecord>, u32, u32), SandboxError> {
        let name = TemplateName::parse(&request.template)
            .map_err(|e| SandboxError::Invalid(format!("template: {e}")))?;
        let snapshot = self.snapshot_record(&name)?;
        if snapshot.is_none() && !self.templates.exists(&name) {
            return Err(SandboxError::TemplateNotFound(name.to_string()));
        }
        if let Some(t) = &snapshot {
            self.check_snapshot_runtime(t)?;
        }
        let (vcpus, memory_mb) = match &snapshot {
            Some(t) => {
                let (vcpus, memory_mb) = (t.vcpus.unwrap_or(1), t.memory_mb.unwrap_or(512));
                for (field, asked, fixed) in [
                    ("vcpus", request.vcpus, vcpus),
                    ("memory_mb", request.memory_mb, memory_mb),
                ] {
                    if asked.is_some_and(|asked| asked != fixed) {
                        return Err(SandboxError::Invalid(format!(
                            "{field} is {}, but snapshot {name} was taken with {field} {fixed}: \
                             a sandbox from a snapshot has the snapshot's {field}; leave \
                             {field} out",
                            asked.unwrap_or_default()
                        )));
                    }
                }
                (vcpus, memory_mb)
            }
            None => (request.vcpus.unwrap_or(1), request.memory_mb.unwrap_or(512)),
        };
        let limits = &self.config.sandbox;
        let max_vcpus = limits.max_vcpus.min(self.capacity.vcpus);
        if vcpus == 0 || vcpus > max_vcpus {
            return Err(SandboxError::Invalid(format!(
                "vcpus is {vcpus}: it must be between 1 and {max_vcpus} (the CPUs of this host)"
            )));
        }
        let max_memory = self
            .capacity
            .memory_mb
            .saturating_sub(limits.host_reserved_memory_mb);
        if memory_mb < 128 || u64::from(memory_mb) > max_memory {
            return Err(SandboxError::Invalid(format!(
                "memory_mb is {memory_mb}: it must be between 128 and {max_memory} (this host's \
                 memory less {} MiB kept for the host)",
                limits.host_reserved_memory_mb
            )));
        }
        if let Some(timeout_s) = request.timeout_s {
            if timeout_s == 0 || timeout_s > limits.max_timeout_s {
                return Err(SandboxError::Invalid(format!(
                    "timeout_s is {timeout_s}: it must be between 1 and {}",
                    limits.max_timeout_s
                )));
            }
        }
        Ok((name, snapshot, vcpus, memory_mb))
    }

    /// Whether one more sandbox of `memory_mb` fits beside those that run
    /// or are starting (`[sandbox] max_running`, and memory, which is never
    /// overcommitted). The guard is held until the caller's record says
    /// the sandbox runs, so that two creates cannot both take the last room.
    pub(super) fn admit(
        &self,
        id: &SandboxId,
        memory_mb: u32,
    ) -> Result<std::sync::MutexGuard<'_, ()>, SandboxError> {
        let guard = self
            .admission
            .lock()
            .map_err(|_| SandboxError::Internal("the admission lock is poisoned".into()))?;
        let running: Vec<_> = self
            .registry
            .list()?
            .into_iter()
            .filter(|r| &r.id != id && holds_room(r.status))
            .collect();
        let limits = &self.config.sandbox;
        let node = self.config.node_name();
        if limits.max_running > 0 && running.len() >= limits.max_running as usize {
            return Err(SandboxError::Capacity(format!(
                "node {node} runs {} sandboxes, its limit (max_running): pause or destroy one, \
                 or create it on another node",
                running.len()
            )));
        }
        let used: u64 = running.iter().map(|r| u64::from(r.memory_mb)).sum();
        let room = self
            .capacity
            .memory_mb
            .saturating_sub(limits.host_reserved_memory_mb);
        if used + u64::from(memory_mb) > room {
            return Err(SandboxError::Capacity(format!(
                "node {node} has {} MiB of its {room} MiB for sandboxes free, {memory_mb} MiB \
                 asked: pause or destroy sandboxes, ask for less memory, or create it on \
                 another node",
                room.saturating_sub(used)
            )));
        }
        Ok(guard)
    }

    /// A snapshot restores only under the runtime that took it: the VM
    /// state formats differ, and so do the disks (qcow2 or raw).
    pub(super) fn check_snapshot_runtime(
        &self,
        snapshot: &TemplateRecord,
    ) -> Result<(), SandboxError> {
        self.runtime
            .can_restore(snapshot.vm_state_version)
            .map_err(|why| {
                SandboxError::Conflict(format!(
                    "snapshot {} cannot be restored on this node: {why}",
                    snapshot.name
                ))
            })?;
        let here = self.runtime.kind();
        let taken_by = match snapshot.runtime {
            Some(taken_by) if taken_by != here => taken_by,
            _ => return Ok(()),
        };
        Err(SandboxError::Conflict(format!(
            "snapshot {} was taken by the {taken_by} runtime, but this node runs {here}: \
             create it on a node that runs {taken_by} (runtime = \"{taken_by}\"), or take \
             the snapshot again here",
            snapshot.name
        )))
    }

    pub(super) fn vm_spec(
        &self,
        record: &SandboxRecord,
        netns: String,
    ) -> Result<VmSpec, SandboxError> {
        let (paths, base_format) = match self.snapshot_record(&record.template)? {
            Some(t) => {
                let format = t.disk_format;
                let files = super::templates::TemplateFiles {
                    kernel: t.kernel.into(),
                    initramfs: t.initramfs.into(),
                    rootfs: t.rootfs.into(),
                };
                (files, format)
            }
            None => (self.templates.files(&record.template)?, DiskFormat::Raw),
        };
        Ok(VmSpec {
            sandbox_id: record.id.to_string(),
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
            kernel: paths.kernel,
            initramfs: paths.initramfs,
            base_rootfs: paths.rootfs,
            base_format,
            dir: self.sandbox_dir(&record.id),
            netns,
            extra_cmdline: String::new(),
        })
    }
}

/// Whether a sandbox in `status` holds memory on the node.
fn holds_room(status: SandboxStatus) -> bool {
    matches!(
        status,
        SandboxStatus::Creating
            | SandboxStatus::Running
            | SandboxStatus::Pausing
            | SandboxStatus::Resuming
    )
}
