//! The sandbox state machine: the only code that moves a sandbox between
//! states. Every step writes the sandbox's LMDB record before its side effect
//! starts and again after it ends, so [`Manager::reconcile`] can finish or
//! roll back whatever a crashed agent left half done.
//!
//! `creating → running → destroyed`, or `error` when the VM died under us.
//! A destroyed sandbox's record is deleted; its events remain in the log.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lmdb_schema::{
    EventRecord, SandboxId, SandboxRecord, SandboxStatus, SlotId, SlotRecord, Store, TemplateName,
    TemplateRecord, TimeoutAction, VmmProcess, WriteTxn,
};
use serde_json::Value;

use super::envd::{EnvdClient, EnvdError, ExecResult, ENVD_PORT};
use super::error::SandboxError;
use super::recovery::{self, Observed, Recovery};
use super::templates::Templates;
use crate::clock::now_ms;
use crate::config::Config;
use crate::network;
use crate::runtime::{
    process, runtime_of_snapshot_disk, Runtime, VmHandle, VmSpec, VmState, CONSOLE_LOG, MEMORY_FILE,
};
use crate::store::{Header, HeaderId, LayerStore, MEMORY_BLOCK_SIZE};

/// The VM's saved device and CPU state, in the sandbox folder.
const VM_STATE: &str = "vmstate";
/// How long a new VM may take to have envd answer (TCG boots take seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a boot checks that the VM still runs while envd is silent.
const BOOT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// What a caller asks for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub template: String,
    /// `None`: the template's (a snapshot's are fixed), else 1.
    pub vcpus: Option<u32>,
    /// `None`: the template's (a snapshot's are fixed), else 512.
    pub memory_mb: Option<u32>,
    pub timeout_s: u64,
    pub metadata: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub internet: bool,
    pub timeout_action: TimeoutAction,
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

/// Owns every sandbox of this node.
pub struct Manager {
    store: Arc<Store>,
    pub(super) layers: Arc<LayerStore>,
    runtime: Arc<dyn Runtime>,
    config: Config,
    templates: Templates,
    capacity: HostCapacity,
    sandboxes_dir: PathBuf,
    pub(super) snapshots_dir: PathBuf,
    /// Sandboxes with an operation in flight; a second one is refused.
    busy: Mutex<HashSet<SandboxId>>,
}

/// Marks a sandbox busy for as long as it lives.
pub(super) struct BusyGuard<'a> {
    manager: &'a Manager,
    id: SandboxId,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.manager
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Manager {
    pub fn new(
        store: Arc<Store>,
        layers: Arc<LayerStore>,
        runtime: Arc<dyn Runtime>,
        config: Config,
        templates: Templates,
        capacity: HostCapacity,
    ) -> Manager {
        let sandboxes_dir = config.node.state_dir.join("sandboxes");
        let snapshots_dir = config.node.state_dir.join("snapshots");
        Manager {
            store,
            layers,
            runtime,
            config,
            templates,
            capacity,
            sandboxes_dir,
            snapshots_dir,
            busy: Mutex::new(HashSet::new()),
        }
    }

    pub fn runtime(&self) -> &dyn Runtime {
        self.runtime.as_ref()
    }

    pub fn capacity(&self) -> HostCapacity {
        self.capacity
    }

    /// How layers are read and written: `io_uring` or `pread`.
    pub fn layer_io(&self) -> &'static str {
        self.layers.backend().as_str()
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    pub(super) fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir.join(id.as_str())
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn memory_file(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(MEMORY_FILE)
    }

    /// The network slots this node may use.
    fn slot_range(&self) -> std::ops::Range<u32> {
        let net = &self.config.network;
        net.first_slot..net.first_slot + net.slots
    }

    pub(super) fn claim(&self, id: &SandboxId) -> Result<BusyGuard<'_>, SandboxError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(id.clone()) {
            return Err(SandboxError::Busy(id.to_string()));
        }
        Ok(BusyGuard {
            manager: self,
            id: id.clone(),
        })
    }

    /// Checks `request` and resolves its template, vCPUs and memory.
    fn validate(
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
        if request.timeout_s == 0 || request.timeout_s > limits.max_timeout_s {
            return Err(SandboxError::Invalid(format!(
                "timeout_s is {}: it must be between 1 and {}",
                request.timeout_s, limits.max_timeout_s
            )));
        }
        Ok((name, snapshot, vcpus, memory_mb))
    }

    /// Creates a sandbox and returns it once its envd answers.
    pub fn create(&self, request: CreateRequest) -> Result<SandboxRecord, SandboxError> {
        let (template, snapshot, vcpus, memory_mb) = self.validate(&request)?;
        let memory = match &snapshot {
            Some(t) => Some(self.snapshot_memory(t)?),
            None => None,
        };
        let id = SandboxId::generate()?;
        let _busy = self.claim(&id)?;
        let now = now_ms();
        let mut record = SandboxRecord {
            id: id.clone(),
            status: SandboxStatus::Creating,
            template,
            vcpus,
            memory_mb,
            metadata: request.metadata,
            env: request.env,
            internet: request.internet,
            created_at_ms: now,
            expires_at_ms: Some(now + request.timeout_s * 1000),
            timeout_action: request.timeout_action,
            slot: None,
            runtime: self.runtime.name().to_owned(),
            vmm: None,
            envd_token: Some(random_token()?),
            error: None,
            updated_at_ms: now,
            memory_header: memory.as_ref().map(|(id, _)| id.0),
        };
        let slots = self.slot_range();
        record.slot = Some(self.store.write_with(|txn| {
            let slot = allocate_slot(txn, slots.clone(), &id)?;
            let mut r = record.clone();
            r.slot = Some(slot);
            if let Some((_, header)) = &memory {
                // The template's layers are now this sandbox's too.
                self.layers.retain(txn, header)?;
            }
            txn.sandboxes().put(&id, &r)?;
            log_event(txn, &id, "create", "")?;
            Ok::<_, SandboxError>(slot)
        })?);
        tracing::info!(sandbox = %id, slot = ?record.slot, template = %record.template, "creating sandbox");
        let brought_up = match (&snapshot, &memory) {
            (Some(t), Some((_, header))) => self.bring_up_from(&mut record, t, header),
            _ => self.bring_up(&mut record),
        };
        match brought_up {
            Ok(()) => Ok(record),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "create failed; rolling back");
                self.tear_down(&record);
                self.forget(&record, "create_failed", &e.to_string())?;
                Err(e)
            }
        }
    }

    /// Network, VM, envd: the side effects of a create, each recorded.
    fn bring_up(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        let slot = record.slot.map(|s| s.0).ok_or_else(|| {
            SandboxError::Internal(format!("sandbox {} has no network slot", record.id))
        })?;
        let net = network::setup(slot, record.internet)?;
        let spec = self.vm_spec(record, net.netns)?;
        let handle = self.runtime.boot(&spec)?;
        record.vmm = Some(vmm_of(&handle));
        self.save(record)?;
        self.finish_boot(record, None)
    }

    /// Network, memory, VM restored from snapshot `template`, envd: the
    /// side effects of a create from a snapshot.
    fn bring_up_from(
        &self,
        record: &mut SandboxRecord,
        template: &TemplateRecord,
        memory: &Header,
    ) -> Result<(), SandboxError> {
        let slot = record.slot.map(|s| s.0).ok_or_else(|| {
            SandboxError::Internal(format!("sandbox {} has no network slot", record.id))
        })?;
        let state = template.vm_state.as_deref().ok_or_else(|| {
            SandboxError::Internal(format!("snapshot {} has no VM state", template.name))
        })?;
        let dir = self.sandbox_dir(&record.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| SandboxError::Internal(format!("{}: {e}", dir.display())))?;
        self.layers
            .materialize_with(memory, &self.memory_file(&record.id), false)?;
        let net = network::setup(slot, record.internet)?;
        let spec = self.vm_spec(record, net.netns)?;
        let handle = self.runtime.restore_new(&spec, Path::new(state))?;
        record.vmm = Some(vmm_of(&handle));
        self.save(record)?;
        self.finish_boot(record, template.envd_token.clone())
    }

    /// A snapshot restores only under the runtime that took it: the VM
    /// state formats differ, and so do the disks (qcow2 or raw).
    fn check_snapshot_runtime(&self, snapshot: &TemplateRecord) -> Result<(), SandboxError> {
        let taken_by = runtime_of_snapshot_disk(Path::new(&snapshot.rootfs));
        let here = self.runtime.name();
        if taken_by == here {
            return Ok(());
        }
        Err(SandboxError::Conflict(format!(
            "snapshot {} was taken by the {taken_by} runtime, but this node runs {here}: \
             create it on a node that runs {taken_by} (runtime = \"{taken_by}\"), or take \
             the snapshot again here",
            snapshot.name
        )))
    }

    fn vm_spec(&self, record: &SandboxRecord, netns: String) -> Result<VmSpec, SandboxError> {
        let (paths, base_format) = match self.snapshot_record(&record.template)? {
            Some(t) => {
                let format = match runtime_of_snapshot_disk(Path::new(&t.rootfs)) {
                    "qemu" => "qcow2",
                    _ => "raw",
                };
                let files = super::templates::TemplateFiles {
                    kernel: t.kernel.into(),
                    initramfs: t.initramfs.into(),
                    rootfs: t.rootfs.into(),
                };
                (files, format)
            }
            None => (self.templates.files(&record.template)?, "raw"),
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

    pub(super) fn state_file(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(VM_STATE)
    }

    /// Claims `id` for `action`, which needs it to be in `wanted` state.
    pub(super) fn claim_in(
        &self,
        id: &SandboxId,
        wanted: SandboxStatus,
        action: &'static str,
    ) -> Result<(BusyGuard<'_>, SandboxRecord), SandboxError> {
        let busy = self.claim(id)?;
        let record = self.get(id)?;
        if record.status != wanted {
            return Err(SandboxError::WrongState {
                id: id.to_string(),
                status: record.status.as_str(),
                wanted: wanted.as_str(),
                action,
            });
        }
        Ok((busy, record))
    }

    /// Records `record` as paused, without VM or network slot, freeing the
    /// slot it held, in one transaction. With `memory`, its memory is now
    /// that header (retained) instead of the one it came from (released).
    fn record_paused(
        &self,
        record: &mut SandboxRecord,
        event: Option<&str>,
        memory: Option<(&Header, Option<&Header>)>,
    ) -> Result<Vec<lmdb_schema::LayerId>, SandboxError> {
        let slot = record.slot.take();
        record.vmm = None;
        record.set_status(SandboxStatus::Paused, now_ms());
        if let Some((header, _)) = memory {
            record.memory_header = Some(header.id().map_err(crate::store::Error::from)?.0);
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
                log_event(txn, &paused.id, kind, "")?;
            }
            Ok(released)
        })
    }

    /// The header a record names, loaded and checked.
    pub(super) fn load_memory(&self, id: Option<[u8; 32]>) -> Result<Option<Header>, SandboxError> {
        Ok(id
            .map(|id| self.layers.load_header(&HeaderId(id)))
            .transpose()?)
    }

    /// Deletes headers and layers no snapshot uses any more, logging
    /// failures: the next collection retries.
    pub(super) fn collect_layers(&self) {
        if let Err(e) = self.prune_headers() {
            tracing::error!(error = %e, "cannot remove unused memory headers");
        }
        match self.layers.collect_garbage() {
            Ok(report) if !report.deleted.is_empty() || !report.strays.is_empty() => {
                tracing::debug!(
                    deleted = report.deleted.len(),
                    strays = report.strays.len(),
                    "layers collected"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot collect unused layers"),
        }
    }

    /// Pauses a running sandbox: its VM state is written to disk, its VM
    /// process ends, its network slot is freed. Memory and disk stay in its
    /// folder until it resumes.
    pub fn pause(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        let (_busy, record) = self.claim_in(id, SandboxStatus::Running, "pause")?;
        self.pause_claimed(record)
    }

    /// [`Manager::pause`] of a sandbox the caller has claimed.
    pub(super) fn pause_claimed(
        &self,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, SandboxError> {
        let id = record.id.clone();
        record.set_status(SandboxStatus::Pausing, now_ms());
        self.save(&record)?;
        tracing::info!(sandbox = %id, "pausing sandbox");
        self.finish_pause(&mut record)?;
        Ok(record)
    }

    /// Saves the VM state, ends the VM, frees the network, and turns the
    /// memory file into layers: a diff against the snapshot the sandbox
    /// came from, so a sandbox from a template stores only what it changed.
    fn finish_pause(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        if let Some(vmm) = &record.vmm {
            self.runtime
                .pause_to(&handle_of(vmm), &self.state_file(&record.id))?;
        }
        if let Some(slot) = record.slot {
            network::teardown(slot.0)?;
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
        let (_busy, record) = self.claim_in(id, SandboxStatus::Paused, "resume")?;
        self.resume_claimed(record)
    }

    /// [`Manager::resume`] of a sandbox the caller has claimed.
    pub(super) fn resume_claimed(
        &self,
        mut record: SandboxRecord,
    ) -> Result<SandboxRecord, SandboxError> {
        let id = &record.id.clone();
        let here = self.runtime.name();
        if record.runtime != here {
            return Err(SandboxError::Conflict(format!(
                "sandbox {id} was paused under the {} runtime, but this node now runs {here}: \
                 start the agent with runtime = \"{}\" to resume it",
                record.runtime, record.runtime
            )));
        }
        let slots = self.slot_range();
        record.set_status(SandboxStatus::Resuming, now_ms());
        record.slot = Some(self.store.write_with(|txn| {
            let slot = allocate_slot(txn, slots.clone(), id)?;
            let mut resuming = record.clone();
            resuming.slot = Some(slot);
            txn.sandboxes().put(id, &resuming)?;
            Ok::<_, SandboxError>(slot)
        })?);
        tracing::info!(sandbox = %id, slot = ?record.slot, "resuming sandbox");
        match self.bring_back(&mut record) {
            Ok(()) => Ok(record),
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "resume failed; staying paused");
                self.back_to_paused(&mut record)?;
                Err(e)
            }
        }
    }

    fn bring_back(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        let now = now_ms();
        if record.is_expired(now) {
            // Paused by its timeout: a resumed sandbox gets a new lease.
            record.expires_at_ms = Some(now + self.config.sandbox.default_timeout_s * 1000);
        }
        let slot = record.slot.map(|s| s.0).ok_or_else(|| {
            SandboxError::Internal(format!("sandbox {} has no network slot", record.id))
        })?;
        if let Some(memory) = self.load_memory(record.memory_header)? {
            let started = std::time::Instant::now();
            // A working copy: after a crash it is written again from layers.
            self.layers
                .materialize_with(&memory, &self.memory_file(&record.id), false)?;
            tracing::debug!(sandbox = %record.id, ms = started.elapsed().as_millis() as u64, "memory written from layers");
        }
        // A VM left by an interrupted resume would hold the disk's lock.
        stop_orphan_vm(self.runtime.as_ref(), &self.sandbox_dir(&record.id));
        let net = network::setup(slot, record.internet)?;
        let spec = self.vm_spec(record, net.netns)?;
        let handle = self.runtime.restore(&spec, &self.state_file(&record.id))?;
        record.vmm = Some(vmm_of(&handle));
        self.save(record)?;
        self.finish_boot(record, None)
    }

    /// Undoes a resume that did not complete: VM stopped, network removed,
    /// slot freed, status paused. The layers, disk and VM state are
    /// untouched; a memory file written from layers is dropped.
    fn back_to_paused(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
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
            if let Err(e) = network::teardown(slot.0) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot remove network");
            }
        }
        self.record_paused(record, None, None)?;
        if record.memory_header.is_some() {
            remove_file_logged(&self.memory_file(&record.id));
        }
        Ok(())
    }

    /// Waits for envd, hands it the token and environment, marks running.
    /// `guest_token` is the token envd holds now when it is not the
    /// sandbox's own (a VM restored from a snapshot holds the snapshot's).
    fn finish_boot(
        &self,
        record: &mut SandboxRecord,
        guest_token: Option<String>,
    ) -> Result<(), SandboxError> {
        let addr = self.envd_addr(record)?;
        let envd = EnvdClient::new(addr, guest_token.or_else(|| record.envd_token.clone()));
        let ready = self.wait_envd(record, &envd)?;
        let token = record.envd_token.clone().unwrap_or_default();
        envd.init(&token, &record.env)?;
        record.set_status(SandboxStatus::Running, now_ms());
        self.save(record)?;
        tracing::info!(sandbox = %record.id, ready_ms = ready.as_millis() as u64, "sandbox running");
        Ok(())
    }

    /// Waits for envd to answer, giving up early when the VM has stopped;
    /// a failure says how far the guest got, from its console.
    fn wait_envd(
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

    fn envd_addr(&self, record: &SandboxRecord) -> Result<std::net::SocketAddr, SandboxError> {
        let slot = record.slot.ok_or_else(|| {
            SandboxError::Internal(format!("sandbox {} has no network slot", record.id))
        })?;
        let addrs = network::addr::SlotAddrs::new(slot.0)?;
        Ok(std::net::SocketAddr::from((addrs.host_ip, ENVD_PORT)))
    }

    pub(super) fn save(&self, record: &SandboxRecord) -> Result<(), SandboxError> {
        let mut record = record.clone();
        record.updated_at_ms = now_ms();
        self.store
            .write(|txn| txn.sandboxes().put(&record.id, &record))?;
        Ok(())
    }

    /// Stops the VM, removes the network and the folder. Best effort: every
    /// piece is tried, failures are logged.
    fn tear_down(&self, record: &SandboxRecord) {
        let dir = self.sandbox_dir(&record.id);
        if record.vmm.is_none() {
            // A crash between starting QEMU and recording it leaves only
            // the PID file to find the VM by.
            stop_orphan_vm(self.runtime.as_ref(), &dir);
        }
        if let Some(vmm) = &record.vmm {
            if let Err(e) = self.runtime.stop(&handle_of(vmm)) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot stop VM");
            }
        }
        if let Some(slot) = record.slot {
            if let Err(e) = network::teardown(slot.0) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot remove network");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(sandbox = %record.id, error = %e, dir = %dir.display(), "cannot remove folder");
            }
        }
    }

    /// Deletes the record, frees its slot and its references on layers,
    /// logging why.
    fn forget(&self, record: &SandboxRecord, kind: &str, detail: &str) -> Result<(), SandboxError> {
        // A header that cannot be read any more holds no references we could
        // give back: the record goes anyway, and collection keeps the layers.
        let memory = self.load_memory(record.memory_header).unwrap_or_else(|e| {
            tracing::error!(sandbox = %record.id, error = %e, "cannot read the memory header");
            None
        });
        let released = self.store.write_with(|txn| {
            let released = match &memory {
                Some(header) => self.layers.release(txn, header)?,
                None => Vec::new(),
            };
            txn.sandboxes().delete(&record.id)?;
            if let Some(slot) = record.slot {
                free_slot(txn, slot, &record.id)?;
            }
            log_event(txn, &record.id, kind, detail)?;
            Ok::<_, SandboxError>(released)
        })?;
        if !released.is_empty() || memory.is_some() {
            self.collect_layers();
        }
        Ok(())
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        self.store
            .read(|txn| txn.sandboxes().get(id))?
            .ok_or_else(|| SandboxError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>, SandboxError> {
        Ok(self
            .store
            .read(|txn| txn.sandboxes().iter()?.map(|r| r.map(|(_, v)| v)).collect())?)
    }

    /// Destroys a sandbox: VM, network, files, record.
    pub fn destroy(&self, id: &SandboxId) -> Result<(), SandboxError> {
        let _busy = self.claim(id)?;
        let mut record = self.get(id)?;
        record.set_status(SandboxStatus::Destroying, now_ms());
        self.save(&record)?;
        tracing::info!(sandbox = %id, "destroying sandbox");
        self.tear_down(&record);
        self.forget(&record, "destroy", "")
    }

    /// Sets a new timeout, counted from now.
    pub fn set_timeout(
        &self,
        id: &SandboxId,
        timeout_s: u64,
    ) -> Result<SandboxRecord, SandboxError> {
        let max = self.config.sandbox.max_timeout_s;
        if timeout_s == 0 || timeout_s > max {
            return Err(SandboxError::Invalid(format!(
                "timeout_s is {timeout_s}: it must be between 1 and {max}"
            )));
        }
        self.store.write_with(|txn| {
            let mut record = txn
                .sandboxes()
                .get(id)?
                .ok_or_else(|| SandboxError::NotFound(id.to_string()))?;
            let now = now_ms();
            record.expires_at_ms = Some(now + timeout_s * 1000);
            record.updated_at_ms = now;
            txn.sandboxes().put(id, &record)?;
            Ok(record)
        })
    }

    /// A client for the sandbox's envd; the sandbox must be running.
    /// A paused sandbox is resumed first: any call on it wakes it up.
    pub fn envd(&self, id: &SandboxId) -> Result<EnvdClient, SandboxError> {
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
        Ok(EnvdClient::new(
            self.envd_addr(&record)?,
            record.envd_token.clone(),
        ))
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
        read_tail(&path, limit)
            .map_err(|e| SandboxError::Internal(format!("{}: {e}", path.display())))
    }

    /// Destroys every running sandbox whose timeout has passed.
    pub fn reap_expired(&self) {
        let now = now_ms();
        let expired: Vec<(SandboxId, TimeoutAction)> = match self.list() {
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
                TimeoutAction::Kill => self.destroy(&id),
                TimeoutAction::Pause => self.pause(&id).map(drop),
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
        let running: Vec<SandboxId> = match self.list() {
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
            let marked = self.pause(&id).and_then(|_| {
                let name = resume_mark(&id);
                Ok(self.store.write(|txn| txn.meta().set_setting(&name, "1"))?)
            });
            if let Err(e) = marked {
                tracing::error!(sandbox = %id, error = %e, "cannot pause before shutdown");
            }
        }
    }

    /// Resumes the sandboxes that [`Manager::pause_all_for_shutdown`] paused.
    pub fn resume_marked(&self) {
        let marks = self
            .store
            .read(|txn| txn.meta().settings())
            .unwrap_or_default();
        for name in marks.keys().filter(|n| n.starts_with(RESUME_MARK)) {
            let id = SandboxId::parse(&name[RESUME_MARK.len()..]);
            if let Ok(id) = &id {
                tracing::info!(sandbox = %id, "resuming after the agent's restart");
                if let Err(e) = self.resume(id) {
                    tracing::error!(sandbox = %id, error = %e, "cannot resume");
                }
            }
            if let Err(e) = self.store.write(|txn| txn.meta().remove_setting(name)) {
                tracing::error!(error = %e, "cannot clear resume mark {name}");
            }
        }
    }

    /// After a start: finishes or rolls back what a previous agent left half
    /// done, re-attaches to running VMs, and removes what belongs to no
    /// sandbox (namespaces, folders, VM processes).
    pub fn reconcile(&self) -> Result<(), SandboxError> {
        network::ensure_host()?;
        for mut record in self.list()? {
            // One sandbox that cannot be put right must not keep the node
            // from starting: it is marked failed, with the reason.
            if let Err(e) = self.reconcile_one(&mut record) {
                tracing::error!(sandbox = %record.id, error = %e, "cannot reconcile; marking it failed");
                record.error = Some(format!("could not recover after an agent restart: {e}"));
                record.set_status(SandboxStatus::Error, now_ms());
                self.save(&record)?;
            }
        }
        self.remove_orphans()
    }

    /// What is on the host for `record`: its VM, its saved state, its
    /// memory file.
    fn observe(&self, record: &SandboxRecord) -> Observed {
        Observed {
            vm: record
                .vmm
                .as_ref()
                .map(|vmm| self.runtime.attach(&handle_of(vmm))),
            state_file: self.state_file(&record.id).is_file(),
            memory_file: self.memory_file(&record.id).exists(),
        }
    }

    /// Carries out the [`recovery::plan`] for `record`.
    fn reconcile_one(&self, record: &mut SandboxRecord) -> Result<(), SandboxError> {
        let id = record.id.clone();
        let step = recovery::plan(record, self.observe(record));
        if step != Recovery::Keep {
            tracing::info!(sandbox = %id, status = record.status.as_str(), step = ?step, "recovering after a restart");
        }
        match step {
            Recovery::Keep | Recovery::Reattach => {}
            Recovery::FinishCreate => {
                // A VM from a snapshot may still hold the snapshot's token.
                let guest_token = self
                    .snapshot_record(&record.template)?
                    .and_then(|t| t.envd_token);
                let finished = match guest_token {
                    Some(token) => self
                        .finish_boot(record, Some(token))
                        .or_else(|_| self.finish_boot(record, None)),
                    None => self.finish_boot(record, None),
                };
                if let Err(e) = finished {
                    tracing::warn!(sandbox = %id, error = %e, "cannot finish; rolling back");
                    self.tear_down(record);
                    self.forget(record, "create_failed", &e.to_string())?;
                }
            }
            Recovery::RollBack { event } => {
                self.tear_down(record);
                self.forget(record, event, record.status.as_str())?;
            }
            Recovery::FinishPause { vm } => {
                if !vm {
                    record.vmm = None;
                }
                self.finish_pause(record)?;
            }
            Recovery::FinishResume => {
                if let Err(e) = self.finish_boot(record, None) {
                    tracing::warn!(sandbox = %id, error = %e, "cannot finish; back to paused");
                    self.back_to_paused(record)?;
                }
            }
            Recovery::BackToPaused => self.back_to_paused(record)?,
            Recovery::DropMemoryFile => remove_file_logged(&self.memory_file(&id)),
            Recovery::Fail { reason } => {
                tracing::warn!(sandbox = %id, reason, "marking the sandbox as failed");
                self.tear_down(record);
                record.vmm = None;
                record.error = Some(reason.to_owned());
                record.set_status(SandboxStatus::Error, now_ms());
                self.save(record)?;
            }
        }
        Ok(())
    }

    fn remove_orphans(&self) -> Result<(), SandboxError> {
        let records = self.list()?;
        let held: HashSet<u32> = records
            .iter()
            .filter(|r| r.status != SandboxStatus::Error)
            .filter_map(|r| r.slot.map(|s| s.0))
            .collect();
        let mine = self.slot_range();
        for slot in network::list_existing()? {
            if mine.contains(&slot) && !held.contains(&slot) {
                tracing::info!(
                    slot,
                    "removing the network of a sandbox that no longer exists"
                );
                network::teardown(slot)?;
            }
        }
        let known: HashSet<String> = records.iter().map(|r| r.id.to_string()).collect();
        let Ok(entries) = std::fs::read_dir(&self.sandboxes_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            tracing::info!(dir = %entry.path().display(), "removing the folder of a sandbox that no longer exists");
            stop_orphan_vm(self.runtime.as_ref(), &entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
        Ok(())
    }
}

/// Stops every VM process of the sandbox folder `dir`: the one its PID file
/// names, and any QEMU or wrenn-vmm whose command line names the folder (one
/// started by an agent that died before the PID file was written).
fn stop_orphan_vm(runtime: &dyn Runtime, dir: &Path) {
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

/// Takes the lowest free slot of `range` for `id`.
fn allocate_slot(
    txn: &mut WriteTxn<'_>,
    range: std::ops::Range<u32>,
    id: &SandboxId,
) -> Result<SlotId, SandboxError> {
    let slot = txn.slots().first_free(range.clone())?.ok_or_else(|| {
        SandboxError::Capacity(format!(
            "all {} network slots are in use: destroy or pause a sandbox, or raise network.slots",
            range.len()
        ))
    })?;
    txn.slots().put(
        &slot,
        &SlotRecord {
            sandbox: id.clone(),
            allocated_at_ms: now_ms(),
        },
    )?;
    Ok(slot)
}

/// How to reach the VM a record names.
fn handle_of(vmm: &VmmProcess) -> VmHandle {
    VmHandle {
        pid: vmm.pid,
        start_time_ticks: vmm.start_time_ticks,
        control_socket: PathBuf::from(&vmm.control_socket),
    }
}

fn vmm_of(handle: &VmHandle) -> VmmProcess {
    VmmProcess {
        pid: handle.pid,
        start_time_ticks: handle.start_time_ticks,
        control_socket: handle.control_socket.to_string_lossy().into_owned(),
    }
}

/// Prefix of the `meta` settings that mark sandboxes paused by a shutdown.
const RESUME_MARK: &str = "resume.";

fn resume_mark(id: &SandboxId) -> String {
    format!("{RESUME_MARK}{id}")
}

fn free_slot(txn: &mut WriteTxn<'_>, slot: SlotId, id: &SandboxId) -> Result<(), SandboxError> {
    let holder = txn.slots().get(&slot)?;
    if holder.is_some_and(|h| &h.sandbox == id) {
        txn.slots().delete(&slot)?;
    }
    Ok(())
}

fn log_event(
    txn: &mut WriteTxn<'_>,
    id: &SandboxId,
    kind: &str,
    detail: &str,
) -> Result<(), SandboxError> {
    txn.events().append(&EventRecord {
        at_ms: now_ms(),
        sandbox: Some(id.clone()),
        kind: kind.to_owned(),
        detail: detail.to_owned(),
    })?;
    Ok(())
}

fn random_token() -> Result<String, SandboxError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|e| SandboxError::Internal(format!("no randomness for a token: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Removes a file whose loss only costs disk, logging a failure.
pub(super) fn remove_file_logged(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(path = %path.display(), error = %e, "cannot remove file");
        }
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
