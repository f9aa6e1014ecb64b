//! The control API's parser: one request (method, path, body) becomes one
//! [`VmmAction`], or the 4xx that says what is wrong with it. A pure
//! function: it opens no file and touches no VM, so every resource's good
//! and bad bodies are unit-tested here. What needs the host (a drive's file
//! opens, a tap name is free) or the VM's state is checked by the owner,
//! [`crate::controller::Controller`], when it executes the action.
//!
//! The wire types are the `vmm-api` crate's; this module turns them into
//! the VMM's own (a [`DriveConfig`], a [`MacAddr`], a [`MemoryFrom`]).

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use vmm_api::{paths, Action, SnapshotType};
use wrenn_http::{parse_json, ApiError, Method};

use crate::controller::{BootSource, Memory};
use crate::machine::MachineConfig;
use crate::snapshot::MemoryFrom;
use crate::virtio::block::{DriveConfig, DriveSource, LayeredSource};
use crate::virtio::net::{MacAddr, NetConfig};
use crate::virtio::DriveOverrides;

/// The kernel command line when `PUT /boot-source` gives none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=-1";

/// One thing the API asks of the VM.
#[derive(Debug)]
pub enum VmmAction {
    /// `GET /`.
    GetInfo,
    /// `PUT /machine-config`.
    SetMachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    SetBootSource(BootSource),
    /// `PUT /drives/{id}`.
    SetDrive(DriveConfig),
    /// `PUT /network-interfaces/{id}`.
    SetNetworkInterface(NetConfig),
    /// `PUT /actions` `InstanceStart`.
    Start,
    /// `PUT /actions` `Pause`.
    Pause,
    /// `PUT /actions` `Resume`.
    Resume,
    /// `PUT /actions` `Shutdown`.
    Shutdown,
    /// `PUT /snapshot/create`.
    CreateSnapshot { dir: PathBuf, diff: bool },
    /// `PUT /snapshot/load`.
    LoadSnapshot {
        dir: PathBuf,
        memory: Memory,
        drives: DriveOverrides,
        resume: bool,
    },
}

/// Parses one request.
pub fn parse(method: &Method, path: &str, body: &[u8]) -> Result<VmmAction, ApiError> {
    let path = path.trim_end_matches('/');
    if let Some(id) = path.strip_prefix(paths::DRIVES) {
        put_only(method, path)?;
        return drive(id, json(body)?);
    }
    if let Some(id) = path.strip_prefix(paths::NETWORK_INTERFACES) {
        put_only(method, path)?;
        return network_interface(id, json(body)?);
    }
    match path {
        "" => {
            if *method != Method::Get {
                return Err(ApiError::method_not_allowed(method.as_str(), "/", "GET"));
            }
            Ok(VmmAction::GetInfo)
        }
        paths::MACHINE_CONFIG => {
            put_only(method, path)?;
            let body: vmm_api::MachineConfig = json(body)?;
            Ok(VmmAction::SetMachineConfig(MachineConfig {
                vcpus: body.vcpu_count,
                memory_mb: body.mem_size_mib,
                track_dirty_pages: body.track_dirty_pages,
            }))
        }
        paths::BOOT_SOURCE => {
            put_only(method, path)?;
            Ok(VmmAction::SetBootSource(match json(body)? {
                vmm_api::BootSource::Kernel {
                    kernel_image_path,
                    initrd_path,
                    boot_args,
                } => BootSource::Kernel {
                    kernel: kernel_image_path,
                    initrd: initrd_path,
                    cmdline: boot_args.unwrap_or_else(|| DEFAULT_BOOT_ARGS.into()),
                },
                vmm_api::BootSource::Program { program_path } => BootSource::Program(program_path),
            }))
        }
        paths::ACTIONS => {
            put_only(method, path)?;
            let body: vmm_api::InstanceAction = json(body)?;
            Ok(match body.action_type {
                Action::InstanceStart => VmmAction::Start,
                Action::Pause => VmmAction::Pause,
                Action::Resume => VmmAction::Resume,
                Action::Shutdown => VmmAction::Shutdown,
            })
        }
        paths::SNAPSHOT_CREATE => {
            put_only(method, path)?;
            let body: vmm_api::SnapshotCreate = json(body)?;
            Ok(VmmAction::CreateSnapshot {
                dir: body.snapshot_path,
                diff: body.snapshot_type == SnapshotType::Diff,
            })
        }
        paths::SNAPSHOT_LOAD => {
            put_only(method, path)?;
            snapshot_load(json(body)?)
        }
        _ => Err(ApiError::not_found(format!(
            "no resource at {path}: see docs/vmm.md for the control API"
        ))),
    }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_json(body)
}

fn put_only(method: &Method, path: &str) -> Result<(), ApiError> {
    if *method == Method::Put {
        return Ok(());
    }
    Err(ApiError::method_not_allowed(method.as_str(), path, "PUT"))
}

fn drive(id: &str, body: vmm_api::Drive) -> Result<VmmAction, ApiError> {
    check_id("drive", id, &body.drive_id)?;
    Ok(VmmAction::SetDrive(DriveConfig {
        drive_id: body.drive_id,
        source: drive_source(body.source),
        is_root_device: body.is_root_device,
        read_only: body.is_read_only,
    }))
}

fn network_interface(id: &str, body: vmm_api::NetworkInterface) -> Result<VmmAction, ApiError> {
    check_id("network interface", id, &body.iface_id)?;
    let mac: MacAddr = body
        .guest_mac
        .parse()
        .map_err(|e: crate::virtio::DeviceError| ApiError::invalid_argument(e.to_string()))?;
    crate::virtio::net::check_tap_name(&body.iface_id, &body.host_dev_name)
        .map_err(|e| ApiError::invalid_argument(e.to_string()))?;
    Ok(VmmAction::SetNetworkInterface(NetConfig {
        iface_id: body.iface_id,
        tap_name: body.host_dev_name,
        mac,
    }))
}

fn snapshot_load(body: vmm_api::SnapshotLoad) -> Result<VmmAction, ApiError> {
    let memory = match body.mem_backend {
        vmm_api::MemBackend::File => Memory::From(MemoryFrom::File),
        vmm_api::MemBackend::Copy => Memory::From(MemoryFrom::Copy),
        vmm_api::MemBackend::Uffd { socket } => Memory::Served(socket),
    };
    let mut drives = DriveOverrides::new();
    for item in body.drive_overrides {
        if drives
            .insert(item.drive_id.clone(), drive_source(item.source))
            .is_some()
        {
            return Err(ApiError::invalid_argument(format!(
                "drive_overrides names drive {:?} twice; give each drive once",
                item.drive_id
            )));
        }
    }
    Ok(VmmAction::LoadSnapshot {
        dir: body.snapshot_path,
        memory,
        drives,
        resume: body.resume_vm,
    })
}

fn drive_source(source: vmm_api::DriveSource) -> DriveSource {
    match source {
        vmm_api::DriveSource::Raw(path) => DriveSource::Raw { path },
        vmm_api::DriveSource::Layered(l) => DriveSource::Layered(LayeredSource {
            header: l.header_path,
            layers_dir: l.layers_dir,
            overlay: l.overlay_path,
        }),
    }
}

/// The id in a resource's path: it must be the body's, and a short name.
fn check_id(what: &str, in_path: &str, in_body: &str) -> Result<(), ApiError> {
    if in_path != in_body {
        return Err(ApiError::invalid_argument(format!(
            "the path names {what} {in_path:?} but the body's id is {in_body:?}; they must be the same"
        )));
    }
    let ok = !in_body.is_empty()
        && in_body.len() <= 64
        && in_body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(ApiError::invalid_argument(format!(
            "{what} {in_body:?}: use 1 to 64 letters, digits, '_' or '-'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<VmmAction, ApiError> {
        parse(&Method::Put, path, body.as_bytes())
    }

    /// Fails unless the request is refused with `status` and `words` in
    /// its message.
    fn refused(result: Result<VmmAction, ApiError>, status: u16, words: &str) {
        let err = result.expect_err("refused");
        assert_eq!(err.status(), status, "{err}");
        assert!(err.message().contains(words), "{err}");
    }

    #[test]
    fn get_root_is_the_info_and_other_methods_on_it_are_405() {
        assert!(matches!(
            parse(&Method::Get, "/", b""),
            Ok(VmmAction::GetInfo)
        ));
        assert!(matches!(
            parse(&Method::Get, "", b""),
            Ok(VmmAction::GetInfo)
        ));
        refused(put("/", "{}"), 405, "GET");
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        refused(parse(&Method::Get, "/nothing", b""), 404, "no resource");
        refused(put("/snapshot", "{}"), 404, "no resource");
        for path in [
            "/machine-config",
            "/boot-source",
            "/actions",
            "/snapshot/create",
            "/snapshot/load",
            "/drives/rootfs",
            "/network-interfaces/eth0",
        ] {
            for method in [Method::Get, Method::Delete, Method::Post] {
                refused(parse(&method, path, b"{}"), 405, "use PUT");
            }
        }
    }

    #[test]
    fn machine_config_is_parsed_and_bad_bodies_are_400() {
        let Ok(VmmAction::SetMachineConfig(config)) =
            put("/machine-config", r#"{"vcpu_count":2,"mem_size_mib":64}"#)
        else {
            panic!("machine config");
        };
        assert_eq!((config.vcpus, config.memory_mb), (2, 64));
        assert!(!config.track_dirty_pages);
        refused(put("/machine-config", "{"), 400, "not valid JSON");
        refused(put("/machine-config", ""), 400, "empty");
        refused(
            put("/machine-config", r#"{"vcpu_count":300,"mem_size_mib":64}"#),
            400,
            "invalid request",
        );
        refused(
            put(
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":64,"x":1}"#,
            ),
            400,
            "unknown field",
        );
    }

    #[test]
    fn boot_source_gets_the_default_command_line_and_needs_exactly_one_image() {
        let Ok(VmmAction::SetBootSource(BootSource::Kernel { cmdline, .. })) =
            put("/boot-source", r#"{"kernel_image_path":"/k"}"#)
        else {
            panic!("kernel");
        };
        assert_eq!(cmdline, DEFAULT_BOOT_ARGS);
        assert!(matches!(
            put("/boot-source", r#"{"program_path":"/p"}"#),
            Ok(VmmAction::SetBootSource(BootSource::Program(_)))
        ));
        refused(put("/boot-source", "{}"), 400, "exactly one");
    }

    #[test]
    fn actions_map_one_to_one_and_unknown_ones_are_400() {
        for (name, want) in [
            ("InstanceStart", "Start"),
            ("Pause", "Pause"),
            ("Resume", "Resume"),
            ("Shutdown", "Shutdown"),
        ] {
            let action = put("/actions", &format!(r#"{{"action_type":"{name}"}}"#)).expect(name);
            assert_eq!(format!("{action:?}"), want);
        }
        refused(put("/actions", r#"{"action_type":"Jump"}"#), 400, "Jump");
        refused(put("/actions", r#"{}"#), 400, "action_type");
    }

    #[test]
    fn snapshot_create_is_full_unless_diff() {
        assert!(matches!(
            put("/snapshot/create", r#"{"snapshot_path":"/s"}"#),
            Ok(VmmAction::CreateSnapshot { diff: false, .. })
        ));
        assert!(matches!(
            put(
                "/snapshot/create",
                r#"{"snapshot_path":"/s","snapshot_type":"Diff"}"#
            ),
            Ok(VmmAction::CreateSnapshot { diff: true, .. })
        ));
        refused(
            put(
                "/snapshot/create",
                r#"{"snapshot_path":"/s","snapshot_type":"Half"}"#,
            ),
            400,
            "Half",
        );
    }

    #[test]
    fn snapshot_load_takes_a_backend_and_each_drive_override_once() {
        let Ok(VmmAction::LoadSnapshot {
            memory,
            drives,
            resume,
            ..
        }) = put(
            "/snapshot/load",
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"},
                "drive_overrides":[{"drive_id":"rootfs","path_on_host":"/d"}],"resume_vm":true}"#,
        )
        else {
            panic!("load");
        };
        assert!(matches!(memory, Memory::Served(p) if p == std::path::Path::new("/u")));
        assert_eq!(
            drives.get("rootfs"),
            Some(&DriveSource::Raw { path: "/d".into() })
        );
        assert!(resume);
        assert!(matches!(
            put("/snapshot/load", r#"{"snapshot_path":"/s"}"#),
            Ok(VmmAction::LoadSnapshot {
                memory: Memory::From(MemoryFrom::File),
                resume: false,
                ..
            })
        ));
        refused(
            put(
                "/snapshot/load",
                r#"{"snapshot_path":"/s","drive_overrides":[
                    {"drive_id":"a","path_on_host":"/1"},{"drive_id":"a","path_on_host":"/2"}]}"#,
            ),
            400,
            "twice",
        );
        refused(
            put(
                "/snapshot/load",
                r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd"}}"#,
            ),
            400,
            "backend_path",
        );
    }

    #[test]
    fn a_drive_id_must_match_its_path_and_be_a_short_name() {
        let Ok(VmmAction::SetDrive(drive)) = put(
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/d","is_root_device":true}"#,
        ) else {
            panic!("drive");
        };
        assert!(drive.is_root_device && !drive.read_only);
        refused(
            put(
                "/drives/rootfs",
                r#"{"drive_id":"data","path_on_host":"/d","is_root_device":true}"#,
            ),
            400,
            "must be the same",
        );
        refused(
            put(
                "/drives/a.b",
                r#"{"drive_id":"a.b","path_on_host":"/d","is_root_device":true}"#,
            ),
            400,
            "1 to 64",
        );
        refused(
            put(
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","is_root_device":true}"#,
            ),
            400,
            "neither path_on_host nor layered",
        );
    }

    #[test]
    fn a_network_interface_needs_a_unicast_mac_and_a_tap_name() {
        let Ok(VmmAction::SetNetworkInterface(net)) = put(
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#,
        ) else {
            panic!("net");
        };
        assert_eq!(net.mac, MacAddr([6, 0, 0xac, 0x10, 0, 2]));
        refused(
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:zz:00:00:01"}"#,
            ),
            400,
            "not a MAC address",
        );
        refused(
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"a/b","guest_mac":"06:00:00:00:00:01"}"#,
            ),
            400,
            "tap name",
        );
    }
}
