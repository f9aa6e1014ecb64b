//! Why a sandbox operation failed, and the HTTP answer each failure gets.

use serde_json::Value;
use thiserror::Error;
use wrenn_http::{ApiError, ErrorCode};

use super::envd::EnvdError;
use crate::network::NetError;
use crate::runtime::RuntimeError;

/// [`ApiError::detail`] of a refusal that comes from the sandbox's state
/// (busy, paused, not running).
pub const INVALID_STATE: &str = "invalid_state";
/// [`ApiError::detail`] of a failure of the guest agent (envd): it could not
/// be reached, or it failed inside the sandbox.
pub const AGENT_ERROR: &str = "agent_error";

/// A failed sandbox operation.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("sandbox {0} does not exist: list sandboxes with GET /v1/sandboxes")]
    NotFound(String),
    #[error("template {0:?} does not exist: list templates with GET /v1/templates, or build the base image with `make image`")]
    TemplateNotFound(String),
    #[error("snapshot {0} does not exist: list snapshots with GET /v1/snapshots")]
    SnapshotNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("sandbox {0} is busy with another operation: retry in a moment")]
    Busy(String),
    #[error("sandbox {id} is {status}, not running")]
    NotRunning { id: String, status: &'static str },
    #[error(
        "cannot {action} sandbox {id}: it is {status}; only a {wanted} sandbox can be {action}d"
    )]
    WrongState {
        id: String,
        status: &'static str,
        wanted: &'static str,
        action: &'static str,
    },
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Conflict(String),
    #[error("snapshot layers: {0}")]
    Layers(#[from] crate::store::Error),
    #[error("node state: {0}")]
    Store(#[from] lmdb_schema::Error),
    #[error("VM: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("network: {0}")]
    Network(#[from] NetError),
    #[error("{0}")]
    Envd(#[from] EnvdError),
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, such as "create the sandbox folder".
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {0} holds no network slot, so it cannot be reached: destroy it and create it again")]
    NoSlot(String),
    #[error("snapshot {name} has no {missing}: delete it (DELETE /v1/snapshots/{name}) and take it again")]
    BrokenSnapshot { name: String, missing: &'static str },
    #[error("the system has no randomness for {what}: {source}")]
    Randomness {
        what: &'static str,
        #[source]
        source: getrandom::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl SandboxError {
    /// An [`SandboxError::Io`] for `path`.
    pub fn io<'a>(
        action: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> SandboxError + 'a {
        move |source| SandboxError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the failure comes down to a full disk (or quota): anywhere
    /// in its chain of sources an I/O error says so.
    pub fn is_out_of_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                    || io.kind() == std::io::ErrorKind::StorageFull
                {
                    return true;
                }
            }
            cause = error.source();
        }
        false
    }
}

impl From<SandboxError> for ApiError {
    fn from(error: SandboxError) -> ApiError {
        let message = error.to_string();
        if error.is_out_of_space() {
            return ApiError::new(
                ErrorCode::InsufficientStorage,
                format!("{message}: the node's disk is full; free space on it (destroy sandboxes or delete snapshots) and retry"),
            );
        }
        match error {
            SandboxError::NotFound(_)
            | SandboxError::TemplateNotFound(_)
            | SandboxError::SnapshotNotFound(_) => ApiError::not_found(message),
            SandboxError::Invalid(_) => ApiError::invalid_argument(message),
            SandboxError::Busy(_)
            | SandboxError::NotRunning { .. }
            | SandboxError::WrongState { .. } => {
                ApiError::conflict(message).with_detail(INVALID_STATE)
            }
            SandboxError::Conflict(_) => ApiError::conflict(message),
            SandboxError::Capacity(_) => ApiError::unavailable(message),
            SandboxError::Envd(EnvdError::Status { status, body }) => envd_refusal(status, &body),
            SandboxError::Envd(_) => ApiError::unavailable(message).with_detail(AGENT_ERROR),
            SandboxError::Store(_)
            | SandboxError::Layers(_)
            | SandboxError::Runtime(_)
            | SandboxError::Network(_)
            | SandboxError::Io { .. }
            | SandboxError::Randomness { .. }
            | SandboxError::Internal(_) => ApiError::internal(message),
            SandboxError::NoSlot(_) | SandboxError::BrokenSnapshot { .. } => {
                ApiError::conflict(message)
            }
        }
    }
}

/// envd's error answer as an [`ApiError`] with the same status and message:
/// a refusal from inside the sandbox reaches the caller unchanged.
pub fn envd_refusal(status: u16, body: &Value) -> ApiError {
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("the sandbox's guest agent refused the request")
        .to_owned();
    let code = match status {
        400 => ErrorCode::InvalidArgument,
        401 | 403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        409 => ErrorCode::Conflict,
        413 => ErrorCode::PayloadTooLarge,
        503 => ErrorCode::Unavailable,
        507 => ErrorCode::InsufficientStorage,
        _ => ErrorCode::Internal,
    };
    match status {
        500.. => ApiError::new(code, message).with_detail(AGENT_ERROR),
        _ => ApiError::new(code, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_anywhere_in_the_chain_is_507() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let direct = SandboxError::io("write", std::path::Path::new("/x"))(full);
        assert_eq!(ApiError::from(direct).status(), 507);
        let store = crate::store::Error::io("write a layer", std::path::Path::new("/y"))(
            std::io::Error::from_raw_os_error(libc::EDQUOT),
        );
        let layered = SandboxError::Layers(store);
        assert!(layered.is_out_of_space());
        let answer = ApiError::from(layered);
        assert_eq!(answer.status(), 507);
        assert!(
            answer.message().contains("free space"),
            "{}",
            answer.message()
        );
    }

    #[test]
    fn other_io_failures_stay_500_and_name_the_path() {
        let err = SandboxError::io("create the sandbox folder", std::path::Path::new("/z"))(
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(!err.is_out_of_space());
        let answer = ApiError::from(err);
        assert_eq!(answer.status(), 500);
        assert!(answer
            .message()
            .starts_with("cannot create the sandbox folder /z"));
    }
}
