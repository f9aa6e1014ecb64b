//! Recovery and timeouts carried out by a real `Manager` on a real LMDB
//! store, with the host's parts faked: a runtime whose VMs are entries in a
//! table, a network that only records what it was asked, and a clock the
//! test sets. No root, no VM, milliseconds per test.
//!
//! What a restart finds is written straight into the store, as a crashed
//! agent would have left it. The kill -9 tests (`api_restart.rs`,
//! `api_pause.rs`) prove the same paths against real QEMU.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lmdb_schema::{
    SandboxId, SandboxRecord, SandboxStatus, SlotId, SlotRecord, Store, StoreOptions, TemplateKind,
    TemplateName, TemplateRecord, TimeoutAction, VmStateVersion, VmmProcess,
};
use wrenn_agent::clock::Clock;
use wrenn_agent::config::{Config, Overrides};
use wrenn_agent::network::{NetError, SlotNetwork};
use wrenn_agent::runtime::{
    DiskFormat, Runtime, RuntimeError, RuntimeKind, VmHandle, VmSpec, VmState,
};
use wrenn_agent::sandbox::templates::Templates;
use wrenn_agent::sandbox::{HostCapacity, Manager, Parts};
use wrenn_agent::store::LayerStore;

/// VMs by PID: what `attach` answers, and what was done to them.
#[derive(Default)]
struct FakeRuntime {
    vms: Mutex<HashMap<u32, VmState>>,
    stopped: Mutex<Vec<u32>>,
    /// The newest VM state version it restores; `None`: any.
    restores_up_to: Option<VmStateVersion>,
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Qemu
    }

    fn boot(&self, _: &VmSpec) -> Result<VmHandle, RuntimeError> {
        Err(RuntimeError::Start("the fake runtime boots nothing".into()))
    }

    fn attach(&self, handle: &VmHandle) -> VmState {
        let vms = self.vms.lock().expect("lock");
        vms.get(&handle.pid).copied().unwrap_or(VmState::Gone)
    }

    fn stop(&self, handle: &VmHandle) -> Result<(), RuntimeError> {
        self.vms.lock().expect("lock").remove(&handle.pid);
        self.stopped.lock().expect("lock").push(handle.pid);
        Ok(())
    }

    fn pause_to(&self, handle: &VmHandle, state: &Path) -> Result<(), RuntimeError> {
        std::fs::write(state, b"state").map_err(|source| RuntimeError::Prepare {
            path: state.to_path_buf(),
            source,
        })?;
        self.stop(handle)
    }

    fn restore(&self, _: &VmSpec, _: &Path) -> Result<VmHandle, RuntimeError> {
        Err(RuntimeError::Start(
            "the fake runtime restores nothing".into(),
        ))
    }

    fn restore_new(&self, _: &VmSpec, _: &Path) -> Result<VmHandle, RuntimeError> {
        Err(RuntimeError::Start(
            "the fake runtime restores nothing".into(),
        ))
    }

    fn control_socket(&self, dir: &Path) -> PathBuf {
        dir.join("fake.sock")
    }

    fn snapshot_disk_file(&self) -> (&'static str, DiskFormat) {
        ("disk.qcow2", DiskFormat::Qcow2)
    }

    fn snapshot_disk(&self, _: &Path, _: &Path, _: &Path) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn can_restore(&self, version: Option<VmStateVersion>) -> Result<(), String> {
        match (self.restores_up_to, version) {
            (Some(newest), Some(v)) if v > newest => Err(format!(
                "it is VM state {v}, newer than the {newest} this fake restores"
            )),
            _ => Ok(()),
        }
    }
}

/// Slots with a network, and the ones torn down.
#[derive(Default)]
struct FakeNetwork {
    existing: Mutex<Vec<u32>>,
    torn_down: Mutex<Vec<u32>>,
}

impl SlotNetwork for FakeNetwork {
    fn ensure_host(&self) -> Result<(), NetError> {
        Ok(())
    }

    fn setup(&self, slot: u32, _: bool) -> Result<String, NetError> {
        self.existing.lock().expect("lock").push(slot);
        Ok(format!("fake-{slot}"))
    }

    fn teardown(&self, slot: u32) -> Result<(), NetError> {
        self.existing.lock().expect("lock").retain(|&s| s != slot);
        self.torn_down.lock().expect("lock").push(slot);
        Ok(())
    }

    fn existing(&self) -> Result<Vec<u32>, NetError> {
        Ok(self.existing.lock().expect("lock").clone())
    }
}

struct FakeClock(AtomicU64);

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A manager on a fresh state folder, with its fakes.
struct Node {
    manager: Manager,
    store: Arc<Store>,
    runtime: Arc<FakeRuntime>,
    network: Arc<FakeNetwork>,
    clock: Arc<FakeClock>,
    first_slot: u32,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Self::with_runtime(FakeRuntime::default())
    }

    fn with_runtime(runtime: FakeRuntime) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let overrides = Overrides {
            state_dir: Some(dir.path().to_path_buf()),
            images_dir: Some(dir.path().join("images")),
            ..Overrides::default()
        };
        let config = Config::load(None, &overrides).expect("embedded config");
        let first_slot = config.network.first_slot;
        let store = Arc::new(Store::open(dir.path(), StoreOptions::new()).expect("open the state"));
        let layers = LayerStore::open(dir.path(), Arc::clone(&store)).expect("open the layers");
        let runtime = Arc::new(runtime);
        let network = Arc::new(FakeNetwork::default());
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let manager = Manager::new(Parts {
            store: Arc::clone(&store),
            layers: Arc::new(layers),
            runtime: Arc::clone(&runtime) as Arc<dyn Runtime>,
            network: Arc::clone(&network) as Arc<dyn SlotNetwork>,
            clock: Arc::clone(&clock) as Arc<dyn Clock>,
            templates: Templates::new(config.images_dir()),
            config,
            capacity: HostCapacity {
                vcpus: 2,
                memory_mb: 8192,
            },
        });
        Node {
            manager,
            store,
            runtime,
            network,
            clock,
            first_slot,
            dir,
        }
    }

    /// Writes what a crashed agent left: the record, its slot, its VM (in
    /// `vm` state, if any) and its network.
    fn left_behind(&self, status: SandboxStatus, vm: Option<VmState>) -> SandboxRecord {
        let n = self.store.read(|txn| txn.sandboxes().len()).expect("count") as u32;
        let id = SandboxId::generate().expect("id");
        let slot = SlotId(self.first_slot + n);
        let pid = 40_000 + n;
        let record = SandboxRecord {
            id: id.clone(),
            status,
            template: TemplateName::parse("base").expect("name"),
            vcpus: 1,
            memory_mb: 512,
            metadata: BTreeMap::new(),
            env: BTreeMap::new(),
            internet: false,
            created_at_ms: 0,
            expires_at_ms: None,
            timeout_action: TimeoutAction::Kill,
            slot: Some(slot),
            runtime: RuntimeKind::Qemu,
            vmm: vm.map(|_| VmmProcess {
                pid,
                start_time_ticks: 1,
                control_socket: "fake.sock".into(),
            }),
            envd_token: None,
            error: None,
            updated_at_ms: 0,
            memory_header: None,
            vm_state_version: None,
            idle_timeout_s: None,
            last_active_ms: 0,
            owner: None,
        };
        self.store
            .write(|txn| {
                txn.sandboxes().put(&id, &record)?;
                txn.slots().put(
                    &slot,
                    &SlotRecord {
                        sandbox: id.clone(),
                        allocated_at_ms: 0,
                    },
                )
            })
            .expect("write the record");
        if let Some(state) = vm {
            self.runtime.vms.lock().expect("lock").insert(pid, state);
        }
        self.network.existing.lock().expect("lock").push(slot.0);
        std::fs::create_dir_all(self.sandbox_dir(&id)).expect("sandbox folder");
        record
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.dir.path().join("sandboxes").join(id.as_str())
    }

    fn record(&self, id: &SandboxId) -> Option<SandboxRecord> {
        self.store
            .read(|txn| txn.sandboxes().get(id))
            .expect("read")
    }

    fn slot_holder(&self, slot: SlotId) -> Option<SandboxId> {
        self.store
            .read(|txn| txn.slots().get(&slot))
            .expect("read")
            .map(|s| s.sandbox)
    }

    fn events_of(&self, id: &SandboxId) -> Vec<String> {
        self.store
            .read(|txn| {
                txn.events()
                    .iter()?
                    .map(|e| e.map(|(_, e)| e))
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("events")
            .into_iter()
            .filter(|e| e.sandbox.as_ref() == Some(id))
            .map(|e| e.kind)
            .collect()
    }
}

#[test]
fn a_running_sandbox_whose_vm_died_is_marked_failed_with_its_network_removed() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Running, Some(VmState::Gone));
    node.manager.node().reconcile().expect("reconcile");
    let record = node
        .record(&left.id)
        .expect("the record stays until destroyed");
    assert_eq!(record.status, SandboxStatus::Error);
    assert_eq!(
        record.error.as_deref(),
        Some("the VM stopped while the agent was not running")
    );
    assert!(record.vmm.is_none());
    assert!(node
        .network
        .torn_down
        .lock()
        .expect("lock")
        .contains(&left.slot.expect("slot").0));
}

#[test]
fn a_running_sandbox_whose_vm_runs_is_kept_as_it_is() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Running, Some(VmState::Running));
    node.manager.node().reconcile().expect("reconcile");
    assert_eq!(node.record(&left.id), Some(left.clone()));
    assert!(node.runtime.stopped.lock().expect("lock").is_empty());
    assert!(node.network.torn_down.lock().expect("lock").is_empty());
    assert!(node.sandbox_dir(&left.id).is_dir());
}

#[test]
fn an_interrupted_create_without_a_vm_is_rolled_back_and_its_slot_freed() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Creating, None);
    let slot = left.slot.expect("slot");
    node.manager.node().reconcile().expect("reconcile");
    assert!(node.record(&left.id).is_none());
    assert_eq!(node.slot_holder(slot), None);
    assert!(!node.sandbox_dir(&left.id).exists());
    assert!(node
        .network
        .torn_down
        .lock()
        .expect("lock")
        .contains(&slot.0));
    assert_eq!(node.events_of(&left.id), ["rolled_back"]);
}

#[test]
fn an_interrupted_destroy_finishes_and_stops_the_vm() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Destroying, Some(VmState::Running));
    node.manager.node().reconcile().expect("reconcile");
    assert!(node.record(&left.id).is_none());
    let pid = left.vmm.as_ref().expect("vmm").pid;
    assert_eq!(*node.runtime.stopped.lock().expect("lock"), [pid]);
}

#[test]
fn an_interrupted_resume_goes_back_to_paused_and_frees_its_slot() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Resuming, Some(VmState::Gone));
    let slot = left.slot.expect("slot");
    node.manager.node().reconcile().expect("reconcile");
    let record = node.record(&left.id).expect("record");
    assert_eq!(record.status, SandboxStatus::Paused);
    assert_eq!((record.slot, record.vmm), (None, None));
    assert_eq!(node.slot_holder(slot), None);
    assert!(node
        .network
        .torn_down
        .lock()
        .expect("lock")
        .contains(&slot.0));
}

#[test]
fn a_pause_whose_state_was_saved_finishes_without_the_vm() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Pausing, None);
    std::fs::write(node.sandbox_dir(&left.id).join("vmstate"), b"state").expect("state");
    node.manager.node().reconcile().expect("reconcile");
    let record = node.record(&left.id).expect("record");
    assert_eq!(record.status, SandboxStatus::Paused);
    assert_eq!(record.slot, None);
    assert_eq!(node.events_of(&left.id), ["pause"]);
}

#[test]
fn a_pause_whose_vm_still_runs_saves_it_and_finishes() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Pausing, Some(VmState::Paused));
    node.manager.node().reconcile().expect("reconcile");
    assert_eq!(
        node.record(&left.id).expect("record").status,
        SandboxStatus::Paused
    );
    assert!(node.sandbox_dir(&left.id).join("vmstate").is_file());
    let pid = left.vmm.as_ref().expect("vmm").pid;
    assert_eq!(*node.runtime.stopped.lock().expect("lock"), [pid]);
}

#[test]
fn a_pause_whose_vm_died_before_saving_is_marked_failed() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Pausing, Some(VmState::Gone));
    node.manager.node().reconcile().expect("reconcile");
    let record = node.record(&left.id).expect("record");
    assert_eq!(record.status, SandboxStatus::Error);
    assert!(record
        .error
        .as_deref()
        .is_some_and(|e| e.contains("before its state was saved")));
}

#[test]
fn networks_of_slots_no_sandbox_holds_are_removed_at_start() {
    let node = Node::new();
    let kept = node.left_behind(SandboxStatus::Running, Some(VmState::Running));
    let stray = node.first_slot + 7;
    node.network.existing.lock().expect("lock").push(stray);
    let foreign = node.first_slot + 10_000;
    node.network.existing.lock().expect("lock").push(foreign);
    node.manager.node().reconcile().expect("reconcile");
    let torn_down = node.network.torn_down.lock().expect("lock").clone();
    assert_eq!(torn_down, [stray], "only this node's unheld slot goes");
    assert!(node.record(&kept.id).is_some());
}

#[test]
fn the_reaper_destroys_a_sandbox_once_the_clock_passes_its_timeout() {
    let node = Node::new();
    let left = node.left_behind(SandboxStatus::Running, Some(VmState::Running));
    let mut leased = left.clone();
    leased.expires_at_ms = Some(2_000_000);
    node.store
        .write(|txn| txn.sandboxes().put(&left.id, &leased))
        .expect("lease");
    node.manager.node().reap_expired();
    assert!(node.record(&left.id).is_some(), "reaped before its time");
    node.clock.0.store(2_000_000, Ordering::Relaxed);
    node.manager.node().reap_expired();
    assert!(node.record(&left.id).is_none());
    assert_eq!(node.events_of(&left.id), ["destroy"]);
}

fn version(major: u16, minor: u16) -> Option<VmStateVersion> {
    Some(VmStateVersion { major, minor })
}

/// A node whose runtime restores VM states up to 1.0.
fn node_restoring_up_to_1_0() -> Node {
    Node::with_runtime(FakeRuntime {
        restores_up_to: version(1, 0),
        ..FakeRuntime::default()
    })
}

/// Marks `record` paused with its state at `state_version`, slot freed.
fn paused_at(node: &Node, record: &SandboxRecord, state_version: Option<VmStateVersion>) {
    let mut paused = record.clone();
    paused.status = SandboxStatus::Paused;
    paused.slot = None;
    paused.vmm = None;
    paused.vm_state_version = state_version;
    node.store
        .write(|txn| {
            txn.slots().delete(&record.slot.expect("slot"))?;
            txn.sandboxes().put(&record.id, &paused)
        })
        .expect("pause");
}

#[test]
fn sandboxes_and_snapshots_this_vmm_cannot_resume_are_named_at_start_with_why() {
    let node = node_restoring_up_to_1_0();
    let old = node.left_behind(SandboxStatus::Running, Some(VmState::Gone));
    paused_at(&node, &old, version(1, 0));
    let new = node.left_behind(SandboxStatus::Running, Some(VmState::Gone));
    paused_at(&node, &new, version(1, 1));
    let snapshot = TemplateRecord {
        name: TemplateName::parse("from-a-newer-node").expect("name"),
        kind: TemplateKind::Snapshot,
        vcpus: Some(1),
        memory_mb: Some(512),
        kernel: "vmlinuz".into(),
        initramfs: "initramfs".into(),
        rootfs: "disk.qcow2".into(),
        disk_format: DiskFormat::Qcow2,
        runtime: Some(RuntimeKind::Qemu),
        size_bytes: 0,
        sha256: None,
        parent_sandbox: None,
        created_at_ms: 0,
        memory_header: None,
        vm_state: Some("vmstate".into()),
        disk_base: Some("rootfs.ext4".into()),
        envd_token: None,
        vm_state_version: version(2, 0),
        owner: None,
    };
    node.store
        .write(|txn| txn.templates().put(&snapshot.name, &snapshot))
        .expect("snapshot");
    node.manager.node().reconcile().expect("reconcile");

    let unresumable = node.manager.node().unresumable().expect("list");
    let named: Vec<&str> = unresumable.iter().map(|(what, _)| what.as_str()).collect();
    let sandbox = format!("sandbox {}", new.id);
    assert_eq!(named, [sandbox.as_str(), "snapshot from-a-newer-node"]);
    assert!(unresumable[0].1.contains("VM state 1.1"), "{unresumable:?}");
    assert!(unresumable[1].1.contains("VM state 2.0"), "{unresumable:?}");
    // Both stay as they are: a newer VMM can still resume them.
    assert_eq!(
        node.record(&new.id).expect("record").status,
        SandboxStatus::Paused
    );
}

#[test]
fn a_resume_this_vmm_cannot_do_is_refused_before_anything_starts() {
    let node = node_restoring_up_to_1_0();
    let left = node.left_behind(SandboxStatus::Running, Some(VmState::Gone));
    let slot = left.slot.expect("slot");
    paused_at(&node, &left, version(1, 1));
    let err = node.manager.resume(&left.id).expect_err("refused");
    let answer = wrenn_http::ApiError::from(err);
    assert_eq!(answer.status(), 409);
    assert!(
        answer.message().contains("cannot be resumed on this node"),
        "{}",
        answer.message()
    );
    let record = node.record(&left.id).expect("record");
    assert_eq!((record.status, record.slot), (SandboxStatus::Paused, None));
    assert_eq!(node.slot_holder(slot), None, "no slot was taken");
    assert!(node.runtime.stopped.lock().expect("lock").is_empty());
}
