//! The sandbox state machine: the only code that moves a sandbox between
//! states. Every step writes the sandbox's LMDB record before its side effect
//! starts and again after it ends, so [`Manager::reconcile`] can finish or
//! roll back whatever a crashed agent left half done.
//!
//! `creating → running ⇄ paused → destroyed`, or `error` when the VM died
//! under us or a restart found it unrecoverable. A destroyed sandbox's
//! record is deleted; its events remain in the log.
//!
//! The [`Manager`] is split by job, one file each, all `impl Manager`:
//!
//! - here: the manager, create, destroy, timeouts, and the pieces every
//!   step shares (tear-down, forgetting a record, layer collection);
//! - [`super::spec`]: a create request checked and turned into a VM spec;
//! - [`super::boot`]: waiting for the guest's envd, and reaching it;
//! - [`super::pause`]: pause and resume;
//! - [`super::node`]: what the node does for all sandboxes: recovery at
//!   start (after [`super::recovery::plan`]), timeouts, shutdown;
//! - [`super::snapshots`]: snapshot templates;
//! - [`super::registry`]: records, busy claims, slots, events.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lmdb_schema::{SandboxId, SandboxRecord, SandboxStatus, Store, TemplateRecord, VmmProcess};

use super::error::SandboxError;
use super::node::{stop_orphan_vm, Node};
use super::registry::{allocate_slot, free_slot, log_event, Registry};
use super::snapshots::Snapshots;
use super::spec::{CreateRequest, HostCapacity};
use super::templates::Templates;
use super::undo::Undo;
use crate::clock::Clock;
use crate::config::Config;
use crate::network::SlotNetwork;
use crate::runtime::{Runtime, VmHandle, MEMORY_FILE};
use crate::store::{Header, HeaderId, LayerStore};

/// The VM's saved device and CPU state, in the sandbox folder.
const VM_STATE: &str = "vmstate";

/// What a [`Manager`] is made of: its state, and the parts of the host it
/// drives, each behind a trait so that tests can put fakes in.
pub struct Parts {
    pub store: Arc<Store>,
    pub layers: Arc<LayerStore>,
    pub runtime: Arc<dyn Runtime>,
    pub network: Arc<dyn SlotNetwork>,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub templates: Templates,
    pub capacity: HostCapacity,
}

/// Owns every sandbox of this node.
pub struct Manager {
    pub(super) store: Arc<Store>,
    pub(super) layers: Arc<LayerStore>,
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) network: Arc<dyn SlotNetwork>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) config: Config,
    pub(super) templates: Templates,
    pub(super) capacity: HostCapacity,
    pub(super) sandboxes_dir: PathBuf,
    pub(super) snapshots_dir: PathBuf,
    pub(super) registry: Registry,
    pub(super) metrics: super::metrics::Metrics,
    /// Where each base template's warm-up stands ([`super::warm`]).
    pub(super) warm: super::warm::WarmTable,
    /// Held from the room check of a create or resume until its record
    /// holds the room ([`Manager::admit`]).
    pub(super) admission: std::sync::Mutex<()>,
    /// How long creates, pauses, resumes and destroys take.
    pub(super) timings: super::timings::Timings,
}

impl Manager {
    pub fn new(parts: Parts) -> Manager {
        let state_dir = &parts.config.node.state_dir;
        let net = &parts.config.network;
        Manager {
            registry: Registry::new(
                Arc::clone(&parts.store),
                net.first_slot..net.first_slot + net.slots,
                Arc::clone(&parts.clock),
            ),
            sandboxes_dir: state_dir.join("sandboxes"),
            snapshots_dir: state_dir.join("snapshots"),
            store: parts.store,
            layers: parts.layers,
            runtime: parts.runtime,
            network: parts.network,
            clock: parts.clock,
            config: parts.config,
            templates: parts.templates,
            capacity: parts.capacity,
            metrics: super::metrics::Metrics::default(),
            warm: super::warm::WarmTable::default(),
            admission: std::sync::Mutex::default(),
            timings: super::timings::Timings::default(),
        }
    }

    /// How long the lifecycle's operations took so far.
    pub fn timings(&self) -> &super::timings::Timings {
        &self.timings
    }

    /// Where snapshots fetched from other nodes are put together
    /// (`api::transfer`).
    pub fn incoming_dir(&self) -> PathBuf {
        self.config.node.state_dir.join("incoming")
    }

    /// The layer store that holds memory snapshots.
    pub fn layer_store(&self) -> &LayerStore {
        &self.layers
    }

    /// Snapshot templates: take, list, look up, delete.
    pub fn snapshots(&self) -> Snapshots<'_> {
        Snapshots { m: self }
    }

    /// What the node does for all its sandboxes: recovery, timeouts,
    /// shutdown; and what it runs them with.
    pub fn node(&self) -> Node<'_> {
        Node { m: self }
    }

    /// The time, from the injected clock.
    pub(super) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
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

    /// Creates a sandbox and returns it once its envd answers. A base
    /// template with a ready warm snapshot ([`super::warm`]) is created from
    /// that snapshot (the record names it as its template), else cold.
    pub fn create(&self, request: CreateRequest) -> Result<SandboxRecord, SandboxError> {
        self.timings
            .time(super::timings::Op::Create, || self.create_untimed(request))
    }

    fn create_untimed(&self, request: CreateRequest) -> Result<SandboxRecord, SandboxError> {
        if request
            .metadata
            .contains_key(super::warm::WARM_METADATA_KEY)
        {
            return Err(SandboxError::Invalid(format!(
                "metadata key {} is reserved for the node's warm-up sandboxes: use another key",
                super::warm::WARM_METADATA_KEY
            )));
        }
        if let Some(warm) = self.warm_request(&request) {
            tracing::info!(template = %request.template, snapshot = %warm.template, "creating from the warm snapshot");
            match self.create_exact(warm) {
                Err(e @ SandboxError::Invalid(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(template = %request.template, error = %e,
                        "create from the warm snapshot failed; booting cold");
                }
                done => return done,
            }
        }
        self.create_exact(request)
    }

    /// Creates a sandbox of exactly the template `request` names.
    pub(super) fn create_exact(
        &self,
        request: CreateRequest,
    ) -> Result<SandboxRecord, SandboxError> {
        let (template, snapshot, vcpus, memory_mb) = self.validate(&request)?;
        let memory = match &snapshot {
            Some(t) => Some(self.snapshot_memory(t)?),
            None => None,
        };
        let id = SandboxId::generate()?;
        let _busy = self.registry.claim(&id)?;
        let now = self.now_ms();
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
            expires_at_ms: request.timeout_s.map(|s| now + s * 1000),
            timeout_action: request.timeout_action,
            slot: None,
            runtime: self.runtime.kind(),
            vmm: None,
            envd_token: Some(random_token()?),
            error: None,
            updated_at_ms: now,
            memory_header: memory.as_ref().map(|(id, _)| *id),
            vm_state_version: None,
            idle_timeout_s: request.idle_timeout_s,
            last_active_ms: now,
            owner: request.owner,
        };
        let slots = self.registry.slots();
        let admitted = self.admit(&id, memory_mb)?;
        record.slot = Some(self.store.write_with(|txn| {
            let slot = allocate_slot(txn, slots.clone(), &id, now)?;
            let mut r = record.clone();
            r.slot = Some(slot);
            if let Some((_, header)) = &memory {
                // The template's layers are now this sandbox's too.
                self.layers.retain(txn, header)?;
            }
            txn.sandboxes().put(&id, &r)?;
            // What the usage figures (`/v1/capsules/usage`) count.
            let detail = format!("vcpus={} memory_mb={}", r.vcpus, r.memory_mb);
            log_event(txn, &id, "create", &detail, now)?;
            Ok::<_, SandboxError>(slot)
        })?);
        drop(admitted);
        tracing::info!(sandbox = %id, slot = ?record.slot, template = %record.template, "creating sandbox");
        let mut undo = Undo::new(&id);
        let brought_up = match (&snapshot, &memory) {
            (Some(t), Some((_, header))) => self.bring_up_from(&mut record, t, header, &mut undo),
            _ => self.bring_up(&mut record, &mut undo),
        };
        match brought_up {
            Ok(()) => {
                undo.commit();
                Ok(record)
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "create failed; rolling back");
                undo.unwind();
                self.forget(&record, "create_failed", &e.to_string())?;
                Err(e)
            }
        }
    }

    /// Network, VM, envd: the side effects of a create, each recorded,
    /// each pushing its undo.
    pub(super) fn bring_up<'a>(
        &'a self,
        record: &mut SandboxRecord,
        undo: &mut Undo<'a>,
    ) -> Result<(), SandboxError> {
        let slot = slot_of(record)?;
        self.undo_folder(&record.id, undo);
        let netns = self.network.setup(slot, record.internet)?;
        self.undo_network(slot, undo);
        let spec = self.vm_spec(record, netns)?;
        self.undo_any_vm(&spec.dir, undo);
        let handle = self.runtime.boot(&spec)?;
        self.undo_vm(&handle, undo);
        record.vmm = Some(vmm_of(&handle));
        self.registry.save(record)?;
        self.finish_boot(record, None)
    }

    /// Network, memory, VM restored from snapshot `template`, envd: the
    /// side effects of a create from a snapshot.
    pub(super) fn bring_up_from<'a>(
        &'a self,
        record: &mut SandboxRecord,
        template: &TemplateRecord,
        memory: &Header,
        undo: &mut Undo<'a>,
    ) -> Result<(), SandboxError> {
        let slot = slot_of(record)?;
        let state = template
            .vm_state
            .as_deref()
            .ok_or_else(|| SandboxError::BrokenSnapshot {
                name: template.name.to_string(),
                missing: "VM state",
            })?;
        let dir = self.sandbox_dir(&record.id);
        self.undo_folder(&record.id, undo);
        std::fs::create_dir_all(&dir)
            .map_err(SandboxError::io("create the sandbox folder", &dir))?;
        self.layers
            .materialize_with(memory, &self.memory_file(&record.id), false)?;
        let netns = self.network.setup(slot, record.internet)?;
        self.undo_network(slot, undo);
        let spec = self.vm_spec(record, netns)?;
        self.undo_any_vm(&spec.dir, undo);
        let handle = self.runtime.restore_new(&spec, Path::new(state))?;
        self.undo_vm(&handle, undo);
        record.vmm = Some(vmm_of(&handle));
        self.registry.save(record)?;
        self.finish_boot(record, template.envd_token.clone())
    }

    /// Undo: remove the sandbox's folder.
    pub(super) fn undo_folder<'a>(&'a self, id: &SandboxId, undo: &mut Undo<'a>) {
        let dir = self.sandbox_dir(id);
        undo.push(
            "remove the sandbox folder",
            move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(SandboxError::io("remove", &dir)(e))
                }
                _ => Ok(()),
            },
        );
    }

    /// Undo: remove the network of `slot`.
    pub(super) fn undo_network<'a>(&'a self, slot: u32, undo: &mut Undo<'a>) {
        undo.push("remove the network", move || {
            Ok(self.network.teardown(slot)?)
        });
    }

    /// Undo: stop any VM of the sandbox folder `dir`, found by its PID file
    /// or command line (one a failed start left running).
    pub(super) fn undo_any_vm<'a>(&'a self, dir: &Path, undo: &mut Undo<'a>) {
        let dir = dir.to_path_buf();
        undo.push("stop a VM left by a failed start", move || {
            stop_orphan_vm(self.runtime.as_ref(), &dir);
            Ok(())
        });
    }

    /// Undo: stop the VM `handle` names.
    pub(super) fn undo_vm<'a>(&'a self, handle: &VmHandle, undo: &mut Undo<'a>) {
        let handle = handle.clone();
        undo.push("stop the VM", move || Ok(self.runtime.stop(&handle)?));
    }

    pub(super) fn state_file(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(VM_STATE)
    }

    /// The header a record names, loaded and checked.
    pub(super) fn load_memory(&self, id: Option<HeaderId>) -> Result<Option<Header>, SandboxError> {
        Ok(id.map(|id| self.layers.load_header(&id)).transpose()?)
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

    /// Stops the VM, removes the network and the folder. Best effort: every
    /// piece is tried, failures are logged.
    pub(super) fn tear_down(&self, record: &SandboxRecord) {
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
            if let Err(e) = self.network.teardown(slot.0) {
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
    pub(super) fn forget(
        &self,
        record: &SandboxRecord,
        kind: &str,
        detail: &str,
    ) -> Result<(), SandboxError> {
        // A header that cannot be read any more holds no references we could
        // give back: the record goes anyway, and collection keeps the layers.
        let memory = self.load_memory(record.memory_header).unwrap_or_else(|e| {
            tracing::error!(sandbox = %record.id, error = %e, "cannot read the memory header");
            None
        });
        let now = self.now_ms();
        let released = self.store.write_with(|txn| {
            let released = match &memory {
                Some(header) => self.layers.release(txn, header)?,
                None => Vec::new(),
            };
            txn.sandboxes().delete(&record.id)?;
            if let Some(slot) = record.slot {
                free_slot(txn, slot, &record.id)?;
            }
            log_event(txn, &record.id, kind, detail, now)?;
            Ok::<_, SandboxError>(released)
        })?;
        if !released.is_empty() || memory.is_some() {
            self.collect_layers();
        }
        Ok(())
    }

    pub fn get(&self, id: &SandboxId) -> Result<SandboxRecord, SandboxError> {
        self.registry.get(id)
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>, SandboxError> {
        self.registry.list()
    }

    /// Destroys a sandbox: VM, network, files, record.
    pub fn destroy(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.timings
            .time(super::timings::Op::Destroy, || self.destroy_untimed(id))
    }

    fn destroy_untimed(&self, id: &SandboxId) -> Result<(), SandboxError> {
        let _busy = self.registry.claim(id)?;
        let mut record = self.get(id)?;
        record.set_status(SandboxStatus::Destroying, self.now_ms());
        self.registry.save(&record)?;
        tracing::info!(sandbox = %id, "destroying sandbox");
        self.tear_down(&record);
        self.forget(&record, "destroy", "")
    }

    /// The node's event log after `seq` (0: all that is kept), oldest
    /// first, with their sequence numbers.
    pub fn events_after(
        &self,
        seq: u64,
    ) -> Result<Vec<(u64, lmdb_schema::EventRecord)>, SandboxError> {
        let events = self.store.read(|txn| {
            txn.events()
                .after(lmdb_schema::EventSeq(seq))?
                .map(|item| item.map(|(seq, event)| (seq.0, event)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(events)
    }

    /// Records a use of the sandbox (a command, a file call, a ping,
    /// WebSocket traffic): a sandbox with an inactivity timer gets its full
    /// time again. Uses less than a second apart write nothing, so a busy
    /// sandbox costs one LMDB write per second at most. Sandboxes without
    /// the timer, and those not running, are left as they are.
    pub fn touch(&self, id: &SandboxId) -> Result<(), SandboxError> {
        let now = self.now_ms();
        self.store.write_with(|txn| {
            let Some(mut record) = txn.sandboxes().get(id)? else {
                return Err(SandboxError::NotFound(id.to_string()));
            };
            let Some(idle_s) = record.idle_timeout_s else {
                return Ok(());
            };
            if record.status != SandboxStatus::Running
                || now.saturating_sub(record.last_active_ms) < 1000
            {
                return Ok(());
            }
            record.last_active_ms = now;
            record.expires_at_ms = Some(now + u64::from(idle_s) * 1000);
            txn.sandboxes().put(id, &record)?;
            Ok(())
        })
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
            let now = self.now_ms();
            record.expires_at_ms = Some(now + timeout_s * 1000);
            // A fixed lease from now on: no inactivity timer moves it.
            record.idle_timeout_s = None;
            record.updated_at_ms = now;
            txn.sandboxes().put(id, &record)?;
            Ok(record)
        })
    }
}

/// The network slot `record` holds, or the error that says it holds none.
pub(super) fn slot_of(record: &SandboxRecord) -> Result<u32, SandboxError> {
    record
        .slot
        .map(|s| s.0)
        .ok_or_else(|| SandboxError::NoSlot(record.id.to_string()))
}

/// How to reach the VM a record names.
pub(super) fn handle_of(vmm: &VmmProcess) -> VmHandle {
    VmHandle {
        pid: vmm.pid,
        start_time_ticks: vmm.start_time_ticks,
        control_socket: PathBuf::from(&vmm.control_socket),
    }
}

pub(super) fn vmm_of(handle: &VmHandle) -> VmmProcess {
    VmmProcess {
        pid: handle.pid,
        start_time_ticks: handle.start_time_ticks,
        control_socket: handle.control_socket.to_string_lossy().into_owned(),
    }
}

fn random_token() -> Result<String, SandboxError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|source| SandboxError::Randomness {
        what: "a token",
        source,
    })?;
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
