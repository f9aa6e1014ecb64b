//! The control API: HTTP with JSON bodies on a Unix socket, one VM per
//! process. Resources follow Firecracker's, so tools written for it read
//! naturally here:
//!
//! | method and path | body | does |
//! |---|---|---|
//! | `GET /` | | `{state, vcpu_count, mem_size_mib, exit}` |
//! | `PUT /machine-config` | `{vcpu_count, mem_size_mib, track_dirty_pages}` | sets the machine before start |
//! | `PUT /boot-source` | `{kernel_image_path, initrd_path, boot_args}` or `{program_path}` | what to boot |
//! | `PUT /actions` | `{action_type: "InstanceStart" \| "Pause" \| "Resume" \| "Shutdown"}` | lifecycle; after `Shutdown` the process ends |
//! | `PUT /snapshot/create` | `{snapshot_path, snapshot_type: "Full" \| "Diff"}` | saves a paused VM into the folder `snapshot_path` |
//! | `PUT /drives/{drive_id}` | `{drive_id, path_on_host, is_root_device, is_read_only}` or, instead of `path_on_host`, `layered: {header_path, layers_dir, overlay_path}` | adds or replaces a virtio-blk drive before start: a raw image, or a layered disk (a base header of the layer store; writes go to the overlay) |
//! | `PUT /network-interfaces/{iface_id}` | `{iface_id, host_dev_name, guest_mac}` | adds or replaces a virtio-net interface on a tap before start |
//! | `PUT /snapshot/load` | `{snapshot_path, mem_backend: {backend_type: "File" \| "Copy" \| "Uffd", backend_path}, drive_overrides: [{drive_id, path_on_host} or {drive_id, layered}], resume_vm}` | restores into a VM that has not started |
//!
//! Answers are 204 on success (`GET /` is 200), else 4xx with
//! `{"error": {"code", "message"}}`.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use wrenn_http::{ApiError, Exchange, Handler, Method, Reply};

use crate::controller::{BootSource, Controller, Memory, Phase};
use crate::error::Error;
use crate::machine::MachineConfig;
use crate::snapshot::MemoryFrom;
use crate::virtio::block::{DriveConfig, DriveSource, LayeredSource};
use crate::virtio::net::{MacAddr, NetConfig};
use crate::virtio::{DeviceError, DriveOverrides};

/// The API's request handler.
pub struct Api {
    pub controller: Arc<Controller>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfigBody {
    vcpu_count: u8,
    mem_size_mib: u32,
    #[serde(default)]
    track_dirty_pages: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSourceBody {
    kernel_image_path: Option<PathBuf>,
    initrd_path: Option<PathBuf>,
    boot_args: Option<String>,
    program_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    snapshot_path: PathBuf,
    #[serde(default = "full")]
    snapshot_type: String,
}

fn full() -> String {
    "Full".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: String,
    /// For `Uffd`: the page server's Unix socket.
    backend_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
    #[serde(default)]
    resume_vm: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveOverride {
    drive_id: String,
    path_on_host: Option<PathBuf>,
    layered: Option<LayeredBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveBody {
    drive_id: String,
    path_on_host: Option<PathBuf>,
    layered: Option<LayeredBody>,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
}

/// A layered disk: a base header of the layer store and an overlay.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayeredBody {
    header_path: PathBuf,
    layers_dir: PathBuf,
    overlay_path: PathBuf,
}

/// The drive's source: exactly one of `path_on_host` and `layered`.
fn drive_source(
    drive_id: &str,
    path_on_host: Option<PathBuf>,
    layered: Option<LayeredBody>,
) -> Result<DriveSource, ApiError> {
    match (path_on_host, layered) {
        (Some(path), None) => Ok(DriveSource::Raw { path }),
        (None, Some(l)) => Ok(DriveSource::Layered(LayeredSource {
            header: l.header_path,
            layers_dir: l.layers_dir,
            overlay: l.overlay_path,
        })),
        (Some(_), Some(_)) => Err(ApiError::invalid_argument(format!(
            "drive {drive_id:?} has both path_on_host and layered: give path_on_host for a raw \
             image or layered {{header_path, layers_dir, overlay_path}} for a layered disk, not \
             both"
        ))),
        (None, None) => Err(ApiError::invalid_argument(format!(
            "drive {drive_id:?} has neither path_on_host nor layered: give path_on_host for a \
             raw image or layered {{header_path, layers_dir, overlay_path}} for a layered disk"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkInterfaceBody {
    iface_id: String,
    host_dev_name: String,
    guest_mac: String,
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

const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=-1";

impl Api {
    fn route(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        let path = ex.path().trim_end_matches('/').to_owned();
        let method = ex.method().clone();
        let controller = &self.controller;
        if let Some(id) = path.strip_prefix("/drives/") {
            if method != Method::Put {
                return Err(ApiError::method_not_allowed(method.as_str(), &path, "PUT"));
            }
            let body: DriveBody = ex.json()?;
            check_id("drive", id, &body.drive_id)?;
            let source = drive_source(&body.drive_id, body.path_on_host, body.layered)?;
            controller.set_drive(DriveConfig {
                drive_id: body.drive_id,
                source,
                is_root_device: body.is_root_device,
                read_only: body.is_read_only,
            })?;
            return Ok(Reply::NoContent);
        }
        if let Some(id) = path.strip_prefix("/network-interfaces/") {
            if method != Method::Put {
                return Err(ApiError::method_not_allowed(method.as_str(), &path, "PUT"));
            }
            let body: NetworkInterfaceBody = ex.json()?;
            check_id("network interface", id, &body.iface_id)?;
            let mac: MacAddr = body.guest_mac.parse().map_err(Error::Virtio)?;
            controller.set_net(NetConfig {
                iface_id: body.iface_id,
                tap_name: body.host_dev_name,
                mac,
            })?;
            return Ok(Reply::NoContent);
        }
        match (path.as_str(), &method) {
            ("", Method::Get) => {
                let config = controller.config();
                let phase = controller.phase();
                let exit = match &phase {
                    Phase::Exited(why) => Some(why.clone()),
                    _ => None,
                };
                Ok(Reply::Json(
                    200,
                    json!({
                        "state": phase.as_str(),
                        "vcpu_count": config.vcpus,
                        "mem_size_mib": config.memory_mb,
                        "exit": exit,
                    }),
                ))
            }
            ("/machine-config", Method::Put) => {
                let body: MachineConfigBody = ex.json()?;
                controller.set_config(MachineConfig {
                    vcpus: body.vcpu_count,
                    memory_mb: body.mem_size_mib,
                    track_dirty_pages: body.track_dirty_pages,
                })?;
                Ok(Reply::NoContent)
            }
            ("/boot-source", Method::Put) => {
                let body: BootSourceBody = ex.json()?;
                let boot = match (body.kernel_image_path, body.program_path) {
                    (Some(kernel), None) => BootSource::Kernel {
                        kernel,
                        initrd: body.initrd_path,
                        cmdline: body.boot_args.unwrap_or_else(|| DEFAULT_BOOT_ARGS.into()),
                    },
                    (None, Some(program)) => BootSource::Program(program),
                    _ => {
                        return Err(ApiError::invalid_argument(
                            "give exactly one of kernel_image_path (a Linux kernel) and \
                             program_path (a flat 64-bit program)",
                        ))
                    }
                };
                controller.set_boot(boot)?;
                Ok(Reply::NoContent)
            }
            ("/actions", Method::Put) => {
                let body: ActionBody = ex.json()?;
                match body.action_type.as_str() {
                    "InstanceStart" => controller.start()?,
                    "Pause" => controller.pause()?,
                    "Resume" => controller.resume()?,
                    "Shutdown" => controller.shutdown()?,
                    other => {
                        return Err(ApiError::invalid_argument(format!(
                            "action_type {other:?} is not one of InstanceStart, Pause, Resume, \
                             Shutdown"
                        )))
                    }
                }
                Ok(Reply::NoContent)
            }
            ("/snapshot/create", Method::Put) => {
                let body: SnapshotCreateBody = ex.json()?;
                let diff = match body.snapshot_type.as_str() {
                    "Full" => false,
                    "Diff" => true,
                    other => {
                        return Err(ApiError::invalid_argument(format!(
                            "snapshot_type {other:?} is not Full or Diff"
                        )))
                    }
                };
                controller.snapshot(&body.snapshot_path, diff)?;
                Ok(Reply::NoContent)
            }
            ("/snapshot/load", Method::Put) => {
                let body: SnapshotLoadBody = ex.json()?;
                let backend = body.mem_backend.as_ref();
                let memory = match backend.map(|b| (b.backend_type.as_str(), &b.backend_path)) {
                    None | Some(("File", None)) => Memory::From(MemoryFrom::File),
                    Some(("Copy", None)) => Memory::From(MemoryFrom::Copy),
                    Some(("Uffd", Some(socket))) => Memory::Served(socket.clone()),
                    Some(("Uffd", None)) => {
                        return Err(ApiError::invalid_argument(
                            "mem_backend Uffd needs backend_path: the page server's socket",
                        ))
                    }
                    Some(("File" | "Copy", Some(_))) => {
                        return Err(ApiError::invalid_argument(
                            "backend_path is only for the Uffd backend; File and Copy read the \
                             snapshot's memory file",
                        ))
                    }
                    Some((other, _)) => {
                        return Err(ApiError::invalid_argument(format!(
                            "mem_backend.backend_type {other:?} is not File, Copy or Uffd"
                        )))
                    }
                };
                let mut drives = DriveOverrides::new();
                for item in body.drive_overrides {
                    let source = drive_source(&item.drive_id, item.path_on_host, item.layered)?;
                    if drives.insert(item.drive_id.clone(), source).is_some() {
                        return Err(ApiError::invalid_argument(format!(
                            "drive_overrides names drive {:?} twice",
                            item.drive_id
                        )));
                    }
                }
                controller.load(&body.snapshot_path, memory, &drives, body.resume_vm)?;
                Ok(Reply::NoContent)
            }
            (
                "" | "/machine-config" | "/boot-source" | "/actions" | "/snapshot/create"
                | "/snapshot/load",
                _,
            ) => Err(ApiError::method_not_allowed(
                method.as_str(),
                &path,
                if path.is_empty() { "GET" } else { "PUT" },
            )),
            _ => Err(ApiError::not_found(format!(
                "no resource at {path}: see docs/vmm.md for the control API"
            ))),
        }
    }
}

impl Handler for Api {
    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        self.route(ex)
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        let message = error.to_string();
        match error {
            Error::State(_) => ApiError::conflict(message),
            Error::Vcpus(_)
            | Error::MemorySize(_)
            | Error::Kernel(_)
            | Error::Acpi(_)
            | Error::Snapshot(_)
            | Error::StateFile(_) => ApiError::invalid_argument(message),
            Error::ProgramTooLarge { .. } => ApiError::invalid_argument(message),
            Error::Virtio(DeviceError::Event { .. } | DeviceError::Thread(_)) => {
                ApiError::internal(message)
            }
            Error::Virtio(_) => ApiError::invalid_argument(message),
            _ => ApiError::internal(message),
        }
    }
}
