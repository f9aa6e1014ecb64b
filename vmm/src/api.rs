//! The control API's HTTP side: JSON bodies on a Unix socket, one VM per
//! process. Resources follow Firecracker's, so tools written for it read
//! naturally here (the wire types are the `vmm-api` crate's):
//!
//! | method and path | body | does |
//! |---|---|---|
//! | `GET /` | | `{state, vcpu_count, mem_size_mib, exit}` |
//! | `PUT /machine-config` | `{vcpu_count, mem_size_mib, track_dirty_pages}` | sets the machine before start |
//! | `PUT /boot-source` | `{kernel_image_path, initrd_path, boot_args}` or `{program_path}` | what to boot |
//! | `PUT /actions` | `{action_type: "InstanceStart" \| "Pause" \| "Resume" \| "Shutdown"}` | lifecycle; after `Shutdown` the process ends |
//! | `PUT /snapshot/create` | `{snapshot_path, snapshot_type: "Full" \| "Diff"}` | saves a paused VM into the folder `snapshot_path` |
//! | `PUT /drives/{drive_id}` | `{drive_id, path_on_host, is_root_device, is_read_only}` or, instead of `path_on_host`, `layered: {header_path, layers_dir, overlay_path}` | adds or replaces a virtio-blk drive before start |
//! | `PUT /network-interfaces/{iface_id}` | `{iface_id, host_dev_name, guest_mac}` | adds or replaces a virtio-net interface on a tap before start |
//! | `PUT /snapshot/load` | `{snapshot_path, mem_backend: {backend_type: "File" \| "Copy" \| "Uffd", backend_path}, drive_overrides, resume_vm}` | restores into a VM that has not started |
//!
//! A request goes through three steps: this module reads it, the parser
//! ([`crate::request::parse`]) turns it into a [`VmmAction`], and the
//! owner of the VM ([`Controller::execute`]) runs it. Answers are 204 on
//! success (`GET /` is 200), else 4xx or 5xx with `{"error": {"code",
//! "message"}}`; the status is chosen here, by the error's variant.

use std::io::Read;
use std::sync::Arc;

use wrenn_http::{ApiError, ErrorCode, Exchange, Handler, Reply};

use crate::controller::{Controller, Outcome};
use crate::error::Error;
use crate::request::{self, VmmAction};
use crate::virtio::DeviceError;

/// The largest request body read; the API's are a few hundred bytes.
const MAX_BODY: u64 = 1 << 20;

/// The API's request handler.
pub struct Api {
    pub controller: Arc<Controller>,
}

impl Api {
    fn serve(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        let mut body = Vec::new();
        ex.body()?
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if body.len() as u64 > MAX_BODY {
            return Err(ApiError::too_large(format!(
                "the request body is larger than {MAX_BODY} bytes; send a smaller document"
            )));
        }
        let action: VmmAction = request::parse(ex.method(), ex.path(), &body)?;
        match self.controller.execute(action)? {
            Outcome::Done => Ok(Reply::NoContent),
            Outcome::Info(info) => {
                let json = serde_json::to_value(info).map_err(|e| {
                    ApiError::internal(format!("cannot encode the VM's state: {e}"))
                })?;
                Ok(Reply::Json(200, json))
            }
        }
    }
}

impl Handler for Api {
    fn handle(&self, ex: &mut Exchange) -> Result<Reply, ApiError> {
        self.serve(ex)
    }
}

/// The error code (and so the HTTP status) of each failure.
pub fn error_code(error: &Error) -> ErrorCode {
    match error {
        Error::WrongState { .. } | Error::NoBootSource | Error::GuestEnded { .. } => {
            ErrorCode::Conflict
        }
        Error::SnapshotNoSpace { .. } => ErrorCode::InsufficientStorage,
        Error::Vcpus(_)
        | Error::MemorySize(_)
        | Error::Kernel(_)
        | Error::Acpi(_)
        | Error::Snapshot(_)
        | Error::StateFile(_)
        | Error::ProgramTooLarge { .. }
        | Error::ReadProgram { .. } => ErrorCode::InvalidArgument,
        Error::Virtio(DeviceError::Event { .. } | DeviceError::Thread(_)) => ErrorCode::Internal,
        Error::Virtio(_) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        ApiError::new(error_code(&error), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_variant_answers_its_status() {
        let no_space = Error::SnapshotNoSpace {
            dir: "/s".into(),
            available: 0,
            needed: 1 << 20,
            source: Box::new(Error::Snapshot("/s/memory: no space left".into())),
        };
        let cases = [
            (
                Error::WrongState {
                    action: "pause the VM",
                    now: "not started",
                    remedy: "start it first",
                },
                409,
            ),
            (Error::NoBootSource, 409),
            (
                Error::GuestEnded {
                    reason: "Reset".into(),
                },
                409,
            ),
            (no_space, 507),
            (Error::Snapshot("damaged".into()), 400),
            (Error::Vcpus(0), 400),
            (Error::Unusable, 500),
        ];
        for (error, status) in cases {
            let message = error.to_string();
            let answer = ApiError::from(error);
            assert_eq!(answer.status(), status, "{message}");
            assert_eq!(answer.message(), message);
        }
    }
}
