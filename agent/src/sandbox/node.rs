//! What the node does for all its sandboxes: recovery at start (carrying
//! out [`super::recovery::plan`] for each record, then removing what
//! belongs to none), the timeout reaper, and pausing everything on
//! shutdown to resume it at the next start.

use std::collections::HashSet;
use std::path::Path;

use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus, TimeoutAction};

use super::error::SandboxError;
use super::manager::{handle_of, remove_file_logged, Manager};
use super::recovery::{self, Observed, Recovery};
use super::registry::{resume_mark, RESUME_MARK};
use super::spec::HostCapacity;
use super::templates::Templates;
use crate::runtime::{process, Runtime, VmHandle};

/// What the node does for all its sandboxes ([`Manager::node`]).
pub struct Node<'a> {
    pub(super) m: &'a Manager,
}

/// The `meta` setting that holds this node's drain state.
const DRAIN_SETTING: &str = "fleet.drain";

impl Node<'_> {
    /// This node's drain state (`draining`, `drained`), kept across
    /// restarts; `None`: it takes sandboxes.
    pub fn drain_state(&self) -> Option<String> {
        self.m
            .store
            .read(|txn| txn.meta().setting(DRAIN_SETTING))
            .ok()
            .flatten()
    }

    /// Sets (or, with `None`, clears) this node's drain state.
    pub fn set_drain_state(&self, state: Option<&str>) -> Result<(), SandboxError> {
        self.m.store.write(|txn| match state {
            Some(state) => txn.meta().set_setting(DRAIN_SETTING, state),
            None => txn.meta().remove_setting(DRAIN_SETTING).map(|_| ()),
        })?;
        Ok(())
    }

    /// The runtime that runs this node's VMs.
    pub fn runtime(&self) -> &dyn Runtime {
        self.m.runtime.as_ref()
    }

    /// The host resources requests are checked against.
    pub fn capacity(&self) -> HostCapacity {
        self.m.capacity
    }

    /// The limits sandboxes are checked against (`[sandbox]`).
    pub fn limits(&self) -> &crate::config::SandboxConfig {
        &self.m.config.sandbox
    }

    /// The base images sandboxes boot from.
    pub fn templates(&self) -> &Templates {
        &self.m.templates
    }

    /// How layers are read and written: `io_uring` or `pread`.
    pub fn layer_io(&self) -> &'static str {
        self.m.layers.backend().as_str()
    }

    /// Destroys every running sandbox whose timeout has passed.
    pub fn reap_expired(&self) {
        let now = self.m.now_ms();
        let expired: Vec<(SandboxId, TimeoutAction)> = match self.m.list() {
            Ok(all) => all
                .into_iter()
                .filter(|r| r.status == SandboxStatus::Running && r.is_expired(now))
                .map(|r| (r.id, r.timeout_action))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reaper cannot list sandboxes");
                return;
            }
        };
        for (id, action) in expired {
            tracing::info!(sandbox = %id, action = action.as_str(), "timeout passed");
            let done = match action {
                TimeoutAction::Kill => self.m.destroy(&id),
                TimeoutAction::Pause => self.m.pause(&id).map(drop),
            };
            match done {
                Ok(()) | Err(SandboxError::Busy(_)) | Err(SandboxError::NotFound(_)) => {}
                Err(e) => tracing::error!(sandbox = %id, error = %e, "timeout action failed"),
            }
        }
    }

    /// Before the agent exits: pauses every running sandbox and remembers
    /// which, so that [`Manager::resume_marked`] brings them back on the next
    /// start (a node reboot loses nothing).
    pub fn pause_all_for_shutdown(&self) {
        let running: Vec<SandboxId> = match self.m.list() {
            Ok(all) => all
                .into_iter()
                .filter(|r| r.status == SandboxStatus::Running)
                .map(|r| r.id)
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot list sandboxes to pause them");
                return;
            }
        };
        for id in running {
            let marked = self.m.pause(&id).and_then(|_| {
                let name = resume_mark(&id);
                Ok(self
                    .m
                    .store
                    .write(|txn| txn.meta().set_setting(&name, "1"))?)
            });
            if let Err(e) = marked {
                tracing::error!(sandbox = %id, error = %e, "cannot pause before shutdown");
            }
        }
    }

    /// Resumes the sandboxes that [`Manager::pause_all_for_shutdown`] paused.
    pub fn resume_marked(&self) {
        let marks = self
            .m
            .store
            .read(|txn| txn.meta().settings())
            .unwrap_or_default();
        for name in marks.keys().filter(|n| n.starts_with(RESUME_MARK)) {
            let id = SandboxId::parse(&name[RESUME_MARK.len()..]);
            if let Ok(id) = &id {
                tracing::info!(sandbox = %id, "resuming after the agent's restart");
                if let Err(e) = self.m.resume(id) {
                    tracing::error!(sandbox = %id, error = %e, "cannot resume");
                }
            }
            if let Err(e) = self.m.store.write(|txn| txn.meta().remove_setting(name)) {
                tracing::error!(error = %e, "cannot clear resume mark {name}");
            }
        }
    }

    /// After a start: finishes or rolls back what a previous agent left half
    /// done, re-attaches to running VMs, and removes what belongs to no
    /// sandbox (namespaces, folders, VM processes).
    pub fn reconcile(&self) -> Result<(), SandboxError> {
        self.m.network.ensure_host()?;
        for mut record in self.m.list()? {
            // One sandbox that cannot be put right must not keep the node
            // from starting: it is marked failed, with the reason.
            if let Err(e) = self.reconcile_one(&mut record) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot reconcile; marking it failed");
                record.error = Some(format!("could not recover after an agent restart: {e}"));
                record.set_status(SandboxStatus::Error, self.m.now_ms());
                self.m.registry.save(&record)?;
            }
        }
        for (what, why) in self.unresumable()? {
            tracing::warn!(%what, "cannot be resumed by this node's VMM: {why}");
        }
        self.remove_orphans()
    }

    /// The paused sandboxes and the snapshots whose saved VM state this
    /// node's runtime cannot restore, each with why: `("sandbox sb-…",
    /// reason)` or `("snapshot name", reason)`.
    pub fn unresumable(&self) -> Result<Vec<(String, String)>, SandboxError> {
        let runtime = &self.m.runtime;
        let mut found = Vec::new();
        for record in self.m.list()? {
            if record.status != SandboxStatus::Paused || record.runtime != runtime.kind() {
                continue;
            }
            if let Err(why) = runtime.can_restore(record.vm_state_version) {
                found.push((format!("sandbox {}", record.id), why));
            }
        }
        for snapshot in self.m.snapshots().list()? {
            let record = snapshot.record;
            if record.runtime != Some(runtime.kind()) {
                continue;
            }
            if let Err(why) = runtime.can_restore(record.vm_state_version) {
                found.push((format!("snapshot {}", record.name), why));
            }
        }
        Ok(found)
    }

    /// What is on the host for `record`: its VM, its saved state, its
    /// memory file.
    fn observe(&self, record: &SandboxRecord) -> Observed {
        Observed {
            vm: record
                .vmm
                .as_ref()
                .map(|vmm| self.m.runtime.attach(&handle_of(vmm))),
            state_file: self.m.state_file(&record.id).is_file(),
            memory_file: self.m.memory_file(&record.id).exists(),
        }
    }

    /// Carries out the [`recovery::plan`] for `record`.
    fn reconcile_one(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        let id = record.id.clone();
        let step = recovery::plan(record, self.observe(record));
        if step != Recovery::Keep {
            tracing::info!(sandbox = %id, status = record.status.as_str(), "{}", step.describe());
        }
        match step {
            Recovery::Keep | Recovery::Reattach => {}
            Recovery::FinishCreate => {
                // A VM from a snapshot may still hold the snapshot's token.
                let guest_token = self
                    .m
                    .snapshot_record(&record.template)?
                    .and_then(|t| t.envd_token);
                let finished = match guest_token {
                    Some(token) => self
                        .m
                        .finish_boot(record, Some(token))
                        .or_else(|_| self.m.finish_boot(record, None)),
                    None => self.m.finish_boot(record, None),
                };
                if let Err(e) = finished {
                    tracing::warn!(sandbox = %id, error = %e, "cannot finish; rolling back");
                    self.m.tear_down(record);
                    self.m.forget(record, "create_failed", &e.to_string())?;
                }
            }
            Recovery::RollBack { event } => {
                self.m.tear_down(record);
                self.m.forget(record, event, record.status.as_str())?;
            }
            Recovery::FinishPause { vm } => {
                if !vm {
                    record.vmm = None;
                }
                self.m.finish_pause(record)?;
            }
            Recovery::FinishResume => {
                if let Err(e) = self.m.finish_boot(record, None) {
                    tracing::warn!(sandbox = %id, error = %e, "cannot finish; back to paused");
                    self.m.back_to_paused(record)?;
                }
            }
            Recovery::BackToPaused => self.m.back_to_paused(record)?,
            Recovery::DropMemoryFile => remove_file_logged(&self.m.memory_file(&id)),
            Recovery::Fail { reason } => {
                tracing::warn!(sandbox = %id, reason, "marking the sandbox as failed");
                self.m.tear_down(record);
                record.vmm = None;
                record.error = Some(reason.to_owned());
                record.set_status(SandboxStatus::Error, self.m.now_ms());
                self.m.registry.save(record)?;
            }
        }
        Ok(())
    }

    fn remove_orphans(&self) -> Result<(), SandboxError> {
        let records = self.m.list()?;
        let held: HashSet<u32> = records
            .iter()
            .filter(|r| r.status != SandboxStatus::Error)
            .filter_map(|r| r.slot.map(|s| s.0))
            .collect();
        let mine = self.m.registry.slots();
        for slot in self.m.network.existing()? {
            if mine.contains(&slot) && !held.contains(&slot) {
                tracing::info!(
                    slot,
                    "removing the network of a sandbox that no longer exists"
                );
                self.m.network.teardown(slot)?;
            }
        }
        let known: HashSet<String> = records.iter().map(|r| r.id.to_string()).collect();
        let Ok(entries) = std::fs::read_dir(&self.m.sandboxes_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            tracing::info!(dir = %entry.path().display(), "removing the folder of a sandbox that no longer exists");
            stop_orphan_vm(self.m.runtime.as_ref(), &entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
        Ok(())
    }
}

/// Stops every VM process of the sandbox folder `dir`: the one its PID file
/// names, and any QEMU or wrenn-vmm whose command line names the folder (one
/// started by an agent that died before the PID file was written).
pub(super) fn stop_orphan_vm(runtime: &dyn Runtime, dir: &Path) {
    for pid in process::vm_pids_in(dir) {
        let Some(ticks) = process::start_time_ticks(pid) else {
            continue;
        };
        let handle = VmHandle {
            pid,
            start_time_ticks: ticks,
            control_socket: runtime.control_socket(dir),
        };
        tracing::info!(pid, dir = %dir.display(), "stopping a VM no record names");
        if let Err(e) = runtime.stop(&handle) {
            tracing::error!(pid, error = %e, "cannot stop an orphaned VM");
        }
    }
}
