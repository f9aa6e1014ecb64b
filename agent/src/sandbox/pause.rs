//! Pause and resume. A pause saves the VM's state, ends its process, frees
//! its network slot and turns its memory into layers (a diff against the
//! header it came from); a resume writes the memory back, restores the VM
//! in a fresh slot and waits for envd. A resume that fails goes back to
//! paused with the snapshot untouched.

use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus};

use super::error::SandboxError;
use super::manager::{handle_of, remove_file_logged, slot_of, vmm_of, Manager};
use super::node::stop_orphan_vm;
use super::registry::{allocate_slot, free_slot, log_event};
use super::undo::Undo;
use crate::store::{Header, MEMORY_BLOCK_SIZE};

impl Manager {
    /// Records `record` as paused, without VM or network slot, freeing the
    /// slot it held, in one transaction. With `memory`, its memory is now
    /// that header (retained) instead of the one it came from (released).
    pub(super) fn record_paused(
        &self,
        record: &mut SandboxRecord,
        event: Option<&str>,
        memory: Option<(&Header, Option<&Header>)>,
    ) -> Result<Vec<lmdb_schema::LayerId>, SandboxError> {
        let slot = record.slot.take();
        record.vmm = None;
        let now = self.now_ms();
        record.set_status(SandboxStatus::Paused, now);
        if let Some((header, _)) = memory {
            record.memory_header = Some(header.id().map_err(crate::store::Error::from)?);
        }
        let paused = record.clone();
        self.store.write_with(|txn| {
            let mut released = Vec::new();
            if let Some((header, parent)) = memory {
                self.layers.retain(txn, header)?;
                if let Some(parent) = parent {
                    released = self.layers.release(txn, parent)?;
                }
            }
            txn.sandboxes().put(&paused.id, &paused)?;
            if let Some(slot) = slot {
                free_slot(txn, slot, &paused.id)?;
            }
            if let Some(kind) = event {
                log_event(txn, &paused.id, kind, "", now)?;
            }
            Ok(released)
        })
    }

    /// Pauses a running sandbox: its VM state is written to disk, its VM
    /// process ends, its network slot is freed. Memory and disk stay in its
    /// folder until it resumes.
    pub fn pause(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        self.timings
            .time(super::timings::Op::Pause, || self.pause_untimed(id))
    }

    fn pause_untimed(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        let (_busy, record) = self
            .registry
            .claim_in(id, SandboxStatus::Running, "pause")?;
        self.pause_claimed(record)
    }

    /// [`Manager::pause`] of a sandbox the caller has claimed.
    pub(super) fn pause_claimed(
        &self,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, SandboxError> {
        let id = record.id.clone();
        record.set_status(SandboxStatus::Pausing, self.now_ms());
        self.registry.save(&record)?;
        tracing::info!(sandbox = %id, "pausing sandbox");
        self.finish_pause(&mut record)?;
        Ok(record)
    }

    /// Saves the VM state, ends the VM, frees the network, and turns the
    /// memory file into layers: a diff against the snapshot the sandbox
    /// came from, so a sandbox from a template stores only what it changed.
    pub(super) fn finish_pause(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        let state = self.state_file(&record.id);
        if let Some(vmm) = &record.vmm {
            self.runtime.pause_to(&handle_of(vmm), &state)?;
        }
        record.vm_state_version = self.runtime.state_version(&state);
        if let Some(slot) = record.slot {
            self.network.teardown(slot.0)?;
        }
        let memory = self.memory_file(&record.id);
        let snapshot = if memory.is_file() {
            let parent = self.load_memory(record.memory_header)?;
            let started = std::time::Instant::now();
            let header =
                self.layers
                    .snapshot_file(&memory, MEMORY_BLOCK_SIZE, parent.as_ref(), None)?;
            self.layers.save_header(&header)?;
            tracing::debug!(sandbox = %record.id, ms = started.elapsed().as_millis() as u64,
                stored_blocks = header.stored_blocks(), generation = header.generation(), "memory written to layers");
            Some((header, parent))
        } else {
            None
        };
        let released = self.record_paused(
            record,
            Some("pause"),
            snapshot.as_ref().map(|(h, p)| (h, p.as_ref())),
        )?;
        if let Some((header, _)) = &snapshot {
            self.layers.settle(header)?;
            // The layers hold it now; a resume writes it out again.
            remove_file_logged(&memory);
        }
        if !released.is_empty() || snapshot.as_ref().is_some_and(|(_, p)| p.is_some()) {
            self.collect_layers();
        }
        tracing::info!(sandbox = %record.id, "sandbox paused");
        Ok(())
    }

    /// Resumes a paused sandbox with every process and file as it was.
    pub fn resume(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        self.timings
            .time(super::timings::Op::Resume, || self.resume_untimed(id))
    }

    fn resume_untimed(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        let (_busy, record) = self
            .registry
            .claim_in(id, SandboxStatus::Paused, "resume")?;
        self.resume_claimed(record)
    }

    /// [`Manager::resume`] of a sandbox the caller has claimed.
    pub(super) fn resume_claimed(
        &self,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, SandboxError> {
        let id = &record.id.clone();
        let here = self.runtime.kind();
        if record.runtime != here {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} was paused under the {} runtime, but this node now runs {here}: \
                 start the agent with runtime = \"{}\" to resume it",
                record.runtime, record.runtime
            )));
        }
        self.runtime
            .can_restore(record.vm_state_version)
            .map_err(|why| {
                SandboxError::Conflict(format!(
                    "sandbox {id} cannot be resumed on this node: {why}"
                ))
            })?;
        let slots = self.registry.slots();
        let now = self.now_ms();
        let admitted = self.admit(id, record.memory_mb)?;
        record.set_status(SandboxStatus::Resuming, now);
        record.slot = Some(self.store.write_with(|txn| {
            let slot = allocate_slot(txn, slots.clone(), id, now)?;
            let mut resuming = record.clone();
            resuming.slot = Some(slot);
            txn.sandboxes().put(id, &resuming)?;
            Ok::<_, SandboxError>(slot)
        })?);
        drop(admitted);
        tracing::info!(sandbox = %id, slot = ?record.slot, "resuming sandbox");
        let mut undo = Undo::new(id);
        match self.bring_back(&mut record, &mut undo) {
            Ok(()) => {
                undo.commit();
                let at = self.now_ms();
                if let Err(e) = self
                    .store
                    .write_with(|txn| log_event(txn, id, "resume", "", at))
                {
                    tracing::warn!(sandbox = %id, error = %e, "cannot log the resume event");
                }
                Ok(record)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "resume failed; staying paused");
                undo.unwind();
                self.record_paused(&mut record, None, None)?;
                Err(e)
            }
        }
    }

    /// Memory, network, VM restored from its state, envd: the side effects
    /// of a resume, each pushing its undo. The layers, the disk and the VM
    /// state are never touched, so a failed resume leaves the sandbox as
    /// it was paused.
    pub(super) fn bring_back<'a>(
        &'a self,
        record: &mut SandboxRecord,
        undo: &mut Undo<'a>,
    ) -> Result<(), SandboxError> {
        let now = self.now_ms();
        record.last_active_ms = now;
        if let Some(idle_s) = record.idle_timeout_s {
            // An inactivity timer starts again at each resume.
            record.expires_at_ms = Some(now + u64::from(idle_s) * 1000);
        } else if record.is_expired(now) {
            // Paused by its timeout: a resumed sandbox gets a new lease.
            record.expires_at_ms = Some(now + self.config.sandbox.default_timeout_s * 1000);
        }
        let slot = slot_of(record)?;
        if let Some(memory) = self.load_memory(record.memory_header)? {
            let started = std::time::Instant::now();
            // A working copy: after a crash it is written again from layers.
            let file = self.memory_file(&record.id);
            self.layers.materialize_with(&memory, &file, false)?;
            undo.push("drop the memory file written from layers", move || {
                remove_file_logged(&file);
                Ok(())
            });
            tracing::debug!(sandbox = %record.id, ms = started.elapsed().as_millis() as u64, "memory written from layers");
        }
        // A VM left by an interrupted resume would hold the disk's lock.
        stop_orphan_vm(self.runtime.as_ref(), &self.sandbox_dir(&record.id));
        let netns = self.network.setup(slot, record.internet)?;
        self.undo_network(slot, undo);
        let spec = self.vm_spec(record, netns)?;
        self.undo_any_vm(&spec.dir, undo);
        let handle = self.runtime.restore(&spec, &self.state_file(&record.id))?;
        self.undo_vm(&handle, undo);
        record.vmm = Some(vmm_of(&handle));
        self.registry.save(record)?;
        self.finish_boot(record, None)
    }

    /// Undoes a resume that did not complete: VM stopped, network removed,
    /// slot freed, status paused. The layers, disk and VM state are
    /// untouched; a memory file written from layers is dropped.
    pub(super) fn back_to_paused(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        match record.vmm.take() {
            Some(vmm) => {
                if let Err(e) = self.runtime.stop(&handle_of(&vmm)) {
                    tracing::error!(sandbox = %record.id, error = %e, "cannot stop VM");
                }
            }
            // A crash between starting QEMU and recording it leaves only
            // the PID file to find the VM by; left running, it would hold
            // the disk's lock against the next resume.
            None => stop_orphan_vm(self.runtime.as_ref(), &self.sandbox_dir(&record.id)),
        }
        if let Some(slot) = record.slot {
            if let Err(e) = self.network.teardown(slot.0) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot remove network");
            }
        }
        self.record_paused(record, None, None)?;
        if record.memory_header.is_some() {
            remove_file_logged(&self.memory_file(&record.id));
        }
        Ok(())
    }
}
