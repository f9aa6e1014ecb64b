//! The wire types of wrenn-vmm's control API (docs/vmm.md, "Control API"):
//! every request body the VMM accepts, what `GET /` answers, and the error
//! body. The VMM deserializes them; the agent serializes them; neither side
//! writes JSON by hand.
//!
//! - [`paths`]: the resources' paths.
//! - [`MachineConfig`], [`BootSource`], [`Drive`], [`NetworkInterface`]:
//!   the pre-boot configuration.
//! - [`InstanceAction`] with [`Action`]: start, pause, resume, shut down.
//! - [`SnapshotCreate`] with [`SnapshotType`]; [`SnapshotLoad`] with
//!   [`MemBackend`] and [`DriveOverride`].
//! - [`VmInfo`] with [`VmPhase`]: the answer of `GET /`.
//! - [`ErrorBody`]: `{"error": {"code", "message"}}` on every failure.
//! - [`state`]: the version of a saved VM state, and which versions a VMM
//!   reads.
//!
//! What this crate is not: the checks that need the host (files that must
//! open, ids that must match the path, MAC addresses) are the VMM's; here
//! only what the JSON itself can say is wrong is refused. Request bodies
//! refuse unknown fields, as the VMM always has; answers accept them, so an
//! older agent can read a newer VMM.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

pub mod state;

/// The paths of the API's resources.
pub mod paths {
    /// `GET`: [`VmInfo`](crate::VmInfo).
    pub const INFO: &str = "/";
    /// `PUT`: [`MachineConfig`](crate::MachineConfig).
    pub const MACHINE_CONFIG: &str = "/machine-config";
    /// `PUT`: [`BootSource`](crate::BootSource).
    pub const BOOT_SOURCE: &str = "/boot-source";
    /// `PUT`: [`InstanceAction`](crate::InstanceAction).
    pub const ACTIONS: &str = "/actions";
    /// `PUT`: [`SnapshotCreate`](crate::SnapshotCreate).
    pub const SNAPSHOT_CREATE: &str = "/snapshot/create";
    /// `PUT`: [`SnapshotLoad`](crate::SnapshotLoad).
    pub const SNAPSHOT_LOAD: &str = "/snapshot/load";
    /// The prefix of `PUT /drives/{drive_id}`: [`Drive`](crate::Drive).
    pub const DRIVES: &str = "/drives/";
    /// The prefix of `PUT /network-interfaces/{iface_id}`:
    /// [`NetworkInterface`](crate::NetworkInterface).
    pub const NETWORK_INTERFACES: &str = "/network-interfaces/";

    /// The path of the drive `drive_id`.
    pub fn drive(drive_id: &str) -> String {
        format!("{DRIVES}{drive_id}")
    }

    /// The path of the network interface `iface_id`.
    pub fn network_interface(iface_id: &str) -> String {
        format!("{NETWORK_INTERFACES}{iface_id}")
    }
}

/// `PUT /machine-config`: the vCPUs and memory of the VM to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
    /// Whether the VM can take diff snapshots (KVM's dirty log).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// `PUT /boot-source`: a Linux kernel or a flat 64-bit program. On the
/// wire, `{kernel_image_path, initrd_path, boot_args}` or `{program_path}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BootSourceWire", into = "BootSourceWire")]
pub enum BootSource {
    /// A bzImage or ELF vmlinux; the VMM's default command line when
    /// `boot_args` is `None`.
    Kernel {
        kernel_image_path: PathBuf,
        initrd_path: Option<PathBuf>,
        boot_args: Option<String>,
    },
    /// A flat program entered at 0x100000 in long mode (tests, benchmarks).
    Program { program_path: PathBuf },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSourceWire {
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_image_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    program_path: Option<PathBuf>,
}

impl TryFrom<BootSourceWire> for BootSource {
    type Error = String;

    fn try_from(wire: BootSourceWire) -> Result<BootSource, String> {
        match (wire.kernel_image_path, wire.program_path) {
            (Some(kernel_image_path), None) => Ok(BootSource::Kernel {
                kernel_image_path,
                initrd_path: wire.initrd_path,
                boot_args: wire.boot_args,
            }),
            (None, Some(program_path)) => {
                if wire.initrd_path.is_some() || wire.boot_args.is_some() {
                    return Err("initrd_path and boot_args go with kernel_image_path; a \
                                program_path boots alone"
                        .into());
                }
                Ok(BootSource::Program { program_path })
            }
            _ => Err(
                "give exactly one of kernel_image_path (a Linux kernel) and \
                      program_path (a flat 64-bit program)"
                    .into(),
            ),
        }
    }
}

impl From<BootSource> for BootSourceWire {
    fn from(boot: BootSource) -> BootSourceWire {
        match boot {
            BootSource::Kernel {
                kernel_image_path,
                initrd_path,
                boot_args,
            } => BootSourceWire {
                kernel_image_path: Some(kernel_image_path),
                initrd_path,
                boot_args,
                program_path: None,
            },
            BootSource::Program { program_path } => BootSourceWire {
                kernel_image_path: None,
                initrd_path: None,
                boot_args: None,
                program_path: Some(program_path),
            },
        }
    }
}

/// A layered disk: a base header of the layer store, the folder of its
/// layers, and the sandbox's overlay that takes the guest's writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayeredDisk {
    pub header_path: PathBuf,
    pub layers_dir: PathBuf,
    pub overlay_path: PathBuf,
}

/// Where a drive's bytes are: on the wire exactly one of `path_on_host`
/// and `layered`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveSource {
    /// A raw image file.
    Raw(PathBuf),
    /// A layered disk.
    Layered(LayeredDisk),
}

impl DriveSource {
    fn from_wire(
        drive_id: &str,
        path_on_host: Option<PathBuf>,
        layered: Option<LayeredDisk>,
    ) -> Result<DriveSource, String> {
        match (path_on_host, layered) {
            (Some(path), None) => Ok(DriveSource::Raw(path)),
            (None, Some(layered)) => Ok(DriveSource::Layered(layered)),
            (Some(_), Some(_)) => Err(format!(
                "drive {drive_id:?} has both path_on_host and layered: give path_on_host for a \
                 raw image or layered {{header_path, layers_dir, overlay_path}} for a layered \
                 disk, not both"
            )),
            (None, None) => Err(format!(
                "drive {drive_id:?} has neither path_on_host nor layered: give path_on_host for \
                 a raw image or layered {{header_path, layers_dir, overlay_path}} for a layered \
                 disk"
            )),
        }
    }

    fn into_wire(self) -> (Option<PathBuf>, Option<LayeredDisk>) {
        match self {
            DriveSource::Raw(path) => (Some(path), None),
            DriveSource::Layered(layered) => (None, Some(layered)),
        }
    }
}

/// `PUT /drives/{drive_id}`: a virtio-blk drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DriveWire", into = "DriveWire")]
pub struct Drive {
    /// The same as in the path.
    pub drive_id: String,
    pub source: DriveSource,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveWire {
    drive_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_on_host: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layered: Option<LayeredDisk>,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
}

impl TryFrom<DriveWire> for Drive {
    type Error = String;

    fn try_from(wire: DriveWire) -> Result<Drive, String> {
        let source = DriveSource::from_wire(&wire.drive_id, wire.path_on_host, wire.layered)?;
        Ok(Drive {
            drive_id: wire.drive_id,
            source,
            is_root_device: wire.is_root_device,
            is_read_only: wire.is_read_only,
        })
    }
}

impl From<Drive> for DriveWire {
    fn from(drive: Drive) -> DriveWire {
        let (path_on_host, layered) = drive.source.into_wire();
        DriveWire {
            drive_id: drive.drive_id,
            path_on_host,
            layered,
            is_root_device: drive.is_root_device,
            is_read_only: drive.is_read_only,
        }
    }
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net interface on a tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The same as in the path.
    pub iface_id: String,
    /// The tap, opened at start in the VMM's network namespace.
    pub host_dev_name: String,
    /// A unicast MAC, `xx:xx:xx:xx:xx:xx`.
    pub guest_mac: String,
}

/// What `PUT /actions` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Builds the VM from its configuration and runs it.
    InstanceStart,
    /// Stops every vCPU where it is.
    Pause,
    /// Runs a paused VM again.
    Resume,
    /// Stops the guest for good; the process ends after the answer.
    Shutdown,
}

/// `PUT /actions`: `{"action_type": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: Action,
}

/// A full snapshot, or only the pages written since the previous one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`: saves the paused VM into the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// Where a loaded snapshot's memory comes from. On the wire
/// `{backend_type, backend_path}`, `backend_path` only for `Uffd`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "MemBackendWire", into = "MemBackendWire")]
pub enum MemBackend {
    /// The snapshot's memory file, mapped privately (read when touched).
    #[default]
    File,
    /// The snapshot's memory file, copied into anonymous memory.
    Copy,
    /// A page server listening on this Unix socket (userfaultfd).
    Uffd { socket: PathBuf },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackendWire {
    backend_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_path: Option<PathBuf>,
}

impl TryFrom<MemBackendWire> for MemBackend {
    type Error = String;

    fn try_from(wire: MemBackendWire) -> Result<MemBackend, String> {
        match (wire.backend_type.as_str(), wire.backend_path) {
            ("File", None) => Ok(MemBackend::File),
            ("Copy", None) => Ok(MemBackend::Copy),
            ("Uffd", Some(socket)) => Ok(MemBackend::Uffd { socket }),
            ("Uffd", None) => {
                Err("mem_backend Uffd needs backend_path: the page server's socket".into())
            }
            ("File" | "Copy", Some(_)) => Err("backend_path is only for the Uffd backend; File \
                                               and Copy read the snapshot's memory file"
                .into()),
            (other, _) => Err(format!(
                "mem_backend.backend_type {other:?} is not File, Copy or Uffd"
            )),
        }
    }
}

impl From<MemBackend> for MemBackendWire {
    fn from(backend: MemBackend) -> MemBackendWire {
        let (backend_type, backend_path) = match backend {
            MemBackend::File => ("File", None),
            MemBackend::Copy => ("Copy", None),
            MemBackend::Uffd { socket } => ("Uffd", Some(socket)),
        };
        MemBackendWire {
            backend_type: backend_type.into(),
            backend_path,
        }
    }
}

/// A drive of a loaded snapshot opened from another source than the one
/// the snapshot names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DriveOverrideWire", into = "DriveOverrideWire")]
pub struct DriveOverride {
    pub drive_id: String,
    pub source: DriveSource,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveOverrideWire {
    drive_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_on_host: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layered: Option<LayeredDisk>,
}

impl TryFrom<DriveOverrideWire> for DriveOverride {
    type Error = String;

    fn try_from(wire: DriveOverrideWire) -> Result<DriveOverride, String> {
        let source = DriveSource::from_wire(&wire.drive_id, wire.path_on_host, wire.layered)?;
        Ok(DriveOverride {
            drive_id: wire.drive_id,
            source,
        })
    }
}

impl From<DriveOverride> for DriveOverrideWire {
    fn from(item: DriveOverride) -> DriveOverrideWire {
        let (path_on_host, layered) = item.source.into_wire();
        DriveOverrideWire {
            drive_id: item.drive_id,
            path_on_host,
            layered,
        }
    }
}

/// `PUT /snapshot/load`: restores a snapshot into a VM that has not
/// started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    /// `File` when absent (or null).
    #[serde(default, deserialize_with = "null_is_default")]
    pub mem_backend: MemBackend,
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
    /// Run the VM after the load; else it is paused.
    #[serde(default)]
    pub resume_vm: bool,
}

fn null_is_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Where the VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmPhase {
    /// Being configured; nothing runs yet.
    NotStarted,
    Running,
    Paused,
    /// The guest ended (reset, halt, triple fault, shutdown) or failed.
    Exited {
        reason: String,
    },
}

impl VmPhase {
    /// The `state` string on the wire.
    pub fn as_str(&self) -> &'static str {
        self.name().as_str()
    }

    fn name(&self) -> PhaseName {
        match self {
            VmPhase::NotStarted => PhaseName::NotStarted,
            VmPhase::Running => PhaseName::Running,
            VmPhase::Paused => PhaseName::Paused,
            VmPhase::Exited { .. } => PhaseName::Exited,
        }
    }
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PhaseName {
    NotStarted,
    Running,
    Paused,
    Exited,
}

impl PhaseName {
    fn as_str(self) -> &'static str {
        match self {
            PhaseName::NotStarted => "not_started",
            PhaseName::Running => "running",
            PhaseName::Paused => "paused",
            PhaseName::Exited => "exited",
        }
    }
}

/// `GET /`: `{state, vcpu_count, mem_size_mib, exit}`, `exit` the reason
/// once the state is `exited` (else null).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "VmInfoWire", into = "VmInfoWire")]
pub struct VmInfo {
    pub phase: VmPhase,
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
}

#[derive(Serialize, Deserialize)]
struct VmInfoWire {
    state: PhaseName,
    vcpu_count: u8,
    mem_size_mib: u32,
    #[serde(default)]
    exit: Option<String>,
}

impl TryFrom<VmInfoWire> for VmInfo {
    type Error = String;

    fn try_from(wire: VmInfoWire) -> Result<VmInfo, String> {
        let phase = match (wire.state, wire.exit) {
            (PhaseName::NotStarted, _) => VmPhase::NotStarted,
            (PhaseName::Running, _) => VmPhase::Running,
            (PhaseName::Paused, _) => VmPhase::Paused,
            (PhaseName::Exited, reason) => VmPhase::Exited {
                reason: reason.unwrap_or_default(),
            },
        };
        Ok(VmInfo {
            phase,
            vcpu_count: wire.vcpu_count,
            mem_size_mib: wire.mem_size_mib,
        })
    }
}

impl From<VmInfo> for VmInfoWire {
    fn from(info: VmInfo) -> VmInfoWire {
        let state = info.phase.name();
        let exit = match info.phase {
            VmPhase::Exited { reason } => Some(reason),
            _ => None,
        };
        VmInfoWire {
            state,
            vcpu_count: info.vcpu_count,
            mem_size_mib: info.mem_size_mib,
            exit,
        }
    }
}

/// The body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A failure: a stable snake_case code (`invalid_argument`, `not_found`,
/// `method_not_allowed`, `conflict`, `insufficient_storage`, `internal`,
/// ...) and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The codes a client acts on.
pub mod codes {
    /// No such resource: a VMM older than its client answers this for a
    /// resource it does not know.
    pub const NOT_FOUND: &str = "not_found";
    /// The VM is in the wrong state for the request.
    pub const CONFLICT: &str = "conflict";
    /// The snapshot's file system is full.
    pub const INSUFFICIENT_STORAGE: &str = "insufficient_storage";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Serializes `value`, checks the JSON is `wire`, and that `wire`
    /// deserializes back to `value`.
    fn round_trip<T>(value: &T, wire: Value)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(value).expect("serialize");
        let parsed: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(parsed, wire, "{text}");
        let back: T = serde_json::from_str(&wire.to_string()).expect("deserialize");
        assert_eq!(&back, value);
    }

    fn refused<T: for<'de> Deserialize<'de> + std::fmt::Debug>(wire: Value, words: &str) {
        let err = serde_json::from_value::<T>(wire.clone()).expect_err(&wire.to_string());
        assert!(err.to_string().contains(words), "{wire}: {err}");
    }

    #[test]
    fn machine_config_keeps_its_wire_shape_and_defaults_dirty_tracking_off() {
        let config = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            track_dirty_pages: true,
        };
        round_trip(
            &config,
            json!({"vcpu_count": 2, "mem_size_mib": 256, "track_dirty_pages": true}),
        );
        let short: MachineConfig =
            serde_json::from_value(json!({"vcpu_count": 1, "mem_size_mib": 16})).expect("short");
        assert!(!short.track_dirty_pages);
        refused::<MachineConfig>(
            json!({"vcpu_count": 1, "mem_size_mib": 16, "cpus": 2}),
            "unknown field",
        );
    }

    #[test]
    fn boot_source_is_a_kernel_or_a_program_never_both() {
        let kernel = BootSource::Kernel {
            kernel_image_path: "/k".into(),
            initrd_path: Some("/i".into()),
            boot_args: Some("console=ttyS0".into()),
        };
        round_trip(
            &kernel,
            json!({"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0"}),
        );
        let bare = BootSource::Kernel {
            kernel_image_path: "/k".into(),
            initrd_path: None,
            boot_args: None,
        };
        round_trip(&bare, json!({"kernel_image_path": "/k"}));
        let program = BootSource::Program {
            program_path: "/p".into(),
        };
        round_trip(&program, json!({"program_path": "/p"}));
        refused::<BootSource>(json!({}), "exactly one");
        refused::<BootSource>(
            json!({"kernel_image_path": "/k", "program_path": "/p"}),
            "exactly one",
        );
        refused::<BootSource>(
            json!({"program_path": "/p", "initrd_path": "/i"}),
            "go with kernel_image_path",
        );
        refused::<BootSource>(json!({"program_path": "/p", "x": 1}), "unknown field");
    }

    #[test]
    fn a_drive_is_raw_or_layered_and_says_which_field_is_wrong() {
        let raw = Drive {
            drive_id: "rootfs".into(),
            source: DriveSource::Raw("/d.raw".into()),
            is_root_device: true,
            is_read_only: false,
        };
        round_trip(
            &raw,
            json!({"drive_id": "rootfs", "path_on_host": "/d.raw", "is_root_device": true,
                   "is_read_only": false}),
        );
        let layered = Drive {
            drive_id: "data".into(),
            source: DriveSource::Layered(LayeredDisk {
                header_path: "/h".into(),
                layers_dir: "/l".into(),
                overlay_path: "/o".into(),
            }),
            is_root_device: false,
            is_read_only: true,
        };
        round_trip(
            &layered,
            json!({"drive_id": "data", "is_root_device": false, "is_read_only": true,
                   "layered": {"header_path": "/h", "layers_dir": "/l", "overlay_path": "/o"}}),
        );
        let short: Drive = serde_json::from_value(
            json!({"drive_id": "d", "path_on_host": "/x", "is_root_device": false}),
        )
        .expect("is_read_only defaults");
        assert!(!short.is_read_only);
        refused::<Drive>(
            json!({"drive_id": "d", "is_root_device": true, "path_on_host": "/x",
                   "layered": {"header_path": "/h", "layers_dir": "/l", "overlay_path": "/o"}}),
            "not both",
        );
        refused::<Drive>(
            json!({"drive_id": "d", "is_root_device": true}),
            "neither path_on_host nor layered",
        );
        refused::<Drive>(
            json!({"drive_id": "d", "is_root_device": true,
                   "layered": {"header_path": "/h", "layers_dir": "/l"}}),
            "overlay_path",
        );
        refused::<Drive>(
            json!({"drive_id": "d", "is_root_device": true, "path_on_host": "/x", "rate": 1}),
            "unknown field",
        );
    }

    #[test]
    fn network_interface_keeps_its_wire_shape() {
        let net = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: "06:00:ac:10:00:02".into(),
        };
        round_trip(
            &net,
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
        );
        refused::<NetworkInterface>(json!({"iface_id": "eth0"}), "missing field");
    }

    #[test]
    fn actions_are_the_action_type_strings_of_today() {
        for (action, name) in [
            (Action::InstanceStart, "InstanceStart"),
            (Action::Pause, "Pause"),
            (Action::Resume, "Resume"),
            (Action::Shutdown, "Shutdown"),
        ] {
            round_trip(
                &InstanceAction {
                    action_type: action,
                },
                json!({ "action_type": name }),
            );
        }
        refused::<InstanceAction>(json!({"action_type": "Jump"}), "Jump");
        refused::<InstanceAction>(json!({"action_type": "pause"}), "pause");
    }

    #[test]
    fn snapshot_create_defaults_to_full() {
        let diff = SnapshotCreate {
            snapshot_path: "/s".into(),
            snapshot_type: SnapshotType::Diff,
        };
        round_trip(
            &diff,
            json!({"snapshot_path": "/s", "snapshot_type": "Diff"}),
        );
        let full: SnapshotCreate =
            serde_json::from_value(json!({"snapshot_path": "/s"})).expect("default");
        assert_eq!(full.snapshot_type, SnapshotType::Full);
        refused::<SnapshotCreate>(
            json!({"snapshot_path": "/s", "snapshot_type": "Half"}),
            "Half",
        );
    }

    #[test]
    fn snapshot_load_names_its_memory_backend_and_drive_overrides() {
        let load = SnapshotLoad {
            snapshot_path: "/s".into(),
            mem_backend: MemBackend::File,
            drive_overrides: vec![DriveOverride {
                drive_id: "rootfs".into(),
                source: DriveSource::Raw("/d".into()),
            }],
            resume_vm: true,
        };
        round_trip(
            &load,
            json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "File"},
                   "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/d"}],
                   "resume_vm": true}),
        );
        let served = SnapshotLoad {
            snapshot_path: "/s".into(),
            mem_backend: MemBackend::Uffd {
                socket: "/uffd.sock".into(),
            },
            drive_overrides: vec![],
            resume_vm: false,
        };
        round_trip(
            &served,
            json!({"snapshot_path": "/s",
                   "mem_backend": {"backend_type": "Uffd", "backend_path": "/uffd.sock"},
                   "drive_overrides": [], "resume_vm": false}),
        );
        round_trip(&MemBackend::Copy, json!({"backend_type": "Copy"}));
        for short in [
            json!({"snapshot_path": "/s"}),
            json!({"snapshot_path": "/s", "mem_backend": null}),
        ] {
            let load: SnapshotLoad = serde_json::from_value(short).expect("defaults");
            assert_eq!(load.mem_backend, MemBackend::File);
            assert!(load.drive_overrides.is_empty() && !load.resume_vm);
        }
        refused::<MemBackend>(json!({"backend_type": "Uffd"}), "needs backend_path");
        refused::<MemBackend>(
            json!({"backend_type": "File", "backend_path": "/x"}),
            "only for the Uffd backend",
        );
        refused::<MemBackend>(json!({"backend_type": "Disk"}), "\"Disk\" is not File");
        refused::<SnapshotLoad>(
            json!({"snapshot_path": "/s", "drive_overrides": [{"drive_id": "d"}]}),
            "neither path_on_host nor layered",
        );
        refused::<SnapshotLoad>(json!({"snapshot_path": "/s", "x": 1}), "unknown field");
    }

    #[test]
    fn vm_info_carries_the_exit_reason_only_once_exited() {
        for (phase, state) in [
            (VmPhase::NotStarted, "not_started"),
            (VmPhase::Running, "running"),
            (VmPhase::Paused, "paused"),
        ] {
            assert_eq!(phase.as_str(), state);
            round_trip(
                &VmInfo {
                    phase,
                    vcpu_count: 1,
                    mem_size_mib: 128,
                },
                json!({"state": state, "vcpu_count": 1, "mem_size_mib": 128, "exit": null}),
            );
        }
        round_trip(
            &VmInfo {
                phase: VmPhase::Exited {
                    reason: "Reset".into(),
                },
                vcpu_count: 2,
                mem_size_mib: 64,
            },
            json!({"state": "exited", "vcpu_count": 2, "mem_size_mib": 64, "exit": "Reset"}),
        );
        let newer: VmInfo = serde_json::from_value(
            json!({"state": "paused", "vcpu_count": 1, "mem_size_mib": 16, "uptime_ms": 5}),
        )
        .expect("an answer may grow fields");
        assert_eq!(newer.phase, VmPhase::Paused);
        refused::<VmInfo>(
            json!({"state": "flying", "vcpu_count": 1, "mem_size_mib": 16}),
            "flying",
        );
    }

    #[test]
    fn the_error_body_is_error_code_and_message() {
        round_trip(
            &ErrorBody {
                error: ErrorDetail {
                    code: codes::CONFLICT.into(),
                    message: "busy".into(),
                },
            },
            json!({"error": {"code": "conflict", "message": "busy"}}),
        );
    }

    #[test]
    fn resource_paths_are_built_in_one_place() {
        assert_eq!(paths::drive("rootfs"), "/drives/rootfs");
        assert_eq!(paths::network_interface("eth0"), "/network-interfaces/eth0");
    }
}
