//! The API's error type: every failure a handler reports, with its HTTP
//! status, a stable snake_case code and a message that tells the caller what
//! to do about it. Serialised as `{"error":{"code":..,"message":..}}`.
//!
//! Every Wrenn API answers errors in this shape, so clients handle them
//! alike. New codes are added here, for all servers at once.

use std::fmt;
use std::io;

use serde_json::{json, Value};

/// Stable, machine-readable error codes. Each one maps to one HTTP status.
/// More may be added: match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    BadRequest,
    InvalidJson,
    InvalidArgument,
    Unauthorized,
    PermissionDenied,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    TooManyRequests,
    HeaderFieldsTooLarge,
    Internal,
    NotImplemented,
    Unavailable,
    InsufficientStorage,
}

impl ErrorCode {
    /// The HTTP status code sent with this error.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::InvalidJson | Self::InvalidArgument => 400,
            Self::Unauthorized => 401,
            Self::PermissionDenied => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::TooManyRequests => 429,
            Self::HeaderFieldsTooLarge => 431,
            Self::Internal => 500,
            Self::NotImplemented => 501,
            Self::Unavailable => 503,
            Self::InsufficientStorage => 507,
        }
    }

    /// The snake_case code that appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidJson => "invalid_json",
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthorized => "unauthorized",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::TooManyRequests => "too_many_requests",
            Self::HeaderFieldsTooLarge => "header_fields_too_large",
            Self::Internal => "internal",
            Self::NotImplemented => "not_implemented",
            Self::Unavailable => "unavailable",
            Self::InsufficientStorage => "insufficient_storage",
        }
    }
}

/// An error answered to the client instead of the normal response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    allow: Option<&'static str>,
    /// A finer code for the same failure, which a wire format may show.
    detail: Option<&'static str>,
    /// The code and status shown instead of `code`'s, set by a wire format
    /// whose clients know other codes.
    shown: Option<(&'static str, u16)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            allow: None,
            detail: None,
            shown: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidJson, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, message)
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooManyRequests, message)
    }

    /// 431: the request head passed one of the server's limits.
    pub fn header_fields_too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::HeaderFieldsTooLarge, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotImplemented, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// 405 for a known path; `allow` lists the methods the path accepts.
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        Self {
            code: ErrorCode::MethodNotAllowed,
            message: format!("{method} is not supported on {path}; use {allow}"),
            allow: Some(allow),
            detail: None,
            shown: None,
        }
    }

    /// Maps an OS error to the closest API error. `context` says what the
    /// server was doing, e.g. "cannot open /etc/shadow"; the OS reason is
    /// appended.
    pub fn from_io(err: &io::Error, context: impl fmt::Display) -> Self {
        let code = match err.raw_os_error() {
            Some(libc::ENOENT) => ErrorCode::NotFound,
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
            Some(libc::EEXIST | libc::ENOTEMPTY | libc::EBUSY | libc::ETXTBSY) => {
                ErrorCode::Conflict
            }
            Some(
                libc::ENOTDIR | libc::EISDIR | libc::ENAMETOOLONG | libc::ELOOP | libc::EINVAL,
            ) => ErrorCode::InvalidArgument,
            Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::InsufficientStorage,
            _ => ErrorCode::Internal,
        };
        Self::new(code, format!("{context}: {}", describe_io(err)))
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// Names a finer kind of the same failure, such as `invalid_state` for
    /// a conflict with the sandbox's state. The answer is unchanged; a wire
    /// format whose clients tell such kinds apart reads it ([`Self::detail`])
    /// and shows it ([`Self::shown_as`]).
    pub fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The finer kind set by [`Self::with_detail`].
    pub fn detail(&self) -> Option<&'static str> {
        self.detail
    }

    /// The same error answered with another code and status: for a wire
    /// format whose clients know a different list of codes.
    pub fn shown_as(mut self, code: &'static str, status: u16) -> Self {
        self.shown = Some((code, status));
        self
    }

    /// The HTTP status sent.
    pub fn status(&self) -> u16 {
        match self.shown {
            Some((_, status)) => status,
            None => self.code.status(),
        }
    }

    /// The code in the JSON body.
    pub fn code_str(&self) -> &'static str {
        match self.shown {
            Some((code, _)) => code,
            None => self.code.as_str(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `Allow` header value for 405 answers.
    pub fn allow(&self) -> Option<&'static str> {
        self.allow
    }

    /// The JSON body sent to the client.
    pub fn to_json(&self) -> Value {
        json!({"error": {"code": self.code_str(), "message": self.message}})
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

/// A lower-case, human reason for an OS error, without Rust's "(os error N)".
pub fn describe_io(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_lowercase(),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_status_codes() {
        let cases = [
            (libc::ENOENT, 404),
            (libc::EACCES, 403),
            (libc::EEXIST, 409),
            (libc::ENOTDIR, 400),
            (libc::ENOSPC, 507),
            (libc::EIO, 500),
        ];
        for (errno, status) in cases {
            let err = ApiError::from_io(&io::Error::from_raw_os_error(errno), "cannot open /x");
            assert_eq!(err.status(), status, "errno {errno}");
            assert!(err.message().starts_with("cannot open /x: "));
        }
    }

    #[test]
    fn every_code_has_its_status_and_name() {
        let cases = [
            (ErrorCode::Conflict, 409, "conflict"),
            (ErrorCode::PayloadTooLarge, 413, "payload_too_large"),
            (ErrorCode::TooManyRequests, 429, "too_many_requests"),
            (
                ErrorCode::HeaderFieldsTooLarge,
                431,
                "header_fields_too_large",
            ),
            (ErrorCode::Internal, 500, "internal"),
            (ErrorCode::NotImplemented, 501, "not_implemented"),
            (ErrorCode::Unavailable, 503, "unavailable"),
            (ErrorCode::InsufficientStorage, 507, "insufficient_storage"),
        ];
        for (code, status, name) in cases {
            assert_eq!((code.status(), code.as_str()), (status, name));
        }
    }

    #[test]
    fn json_shape_has_code_and_message() {
        let body = ApiError::not_found("no such process 7").to_json();
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["error"]["message"], "no such process 7");
    }
}
