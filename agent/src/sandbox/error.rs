//! Why a sandbox operation failed, and the HTTP answer each failure gets.

use serde_json::Value;
use thiserror::Error;
use wrenn_http::{ApiError, ErrorCode};

use super::envd::EnvdError;
use crate::network::NetError;
use crate::runtime::RuntimeError;

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
    #[error("{0}")]
    Internal(String),
}

impl From<SandboxError> for ApiError {
    fn from(error: SandboxError) -> ApiError {
        let message = error.to_string();
        match error {
            SandboxError::NotFound(_)
            | SandboxError::TemplateNotFound(_)
            | SandboxError::SnapshotNotFound(_) => ApiError::not_found(message),
            SandboxError::Invalid(_) => ApiError::invalid_argument(message),
            SandboxError::Busy(_)
            | SandboxError::NotRunning { .. }
            | SandboxError::WrongState { .. }
            | SandboxError::Conflict(_) => ApiError::conflict(message),
            SandboxError::Capacity(_) => ApiError::unavailable(message),
            SandboxError::Envd(EnvdError::Status { status, body }) => envd_refusal(status, &body),
            SandboxError::Envd(_) => ApiError::unavailable(message),
            SandboxError::Store(_)
            | SandboxError::Layers(_)
            | SandboxError::Runtime(_)
            | SandboxError::Network(_)
            | SandboxError::Internal(_) => ApiError::internal(message),
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
    ApiError::new(code, message)
}
