//! Sandbox-level handlers: `/health`, `/metrics` and `/init` (token, default
//! environment and user, and the clock after a VM restore).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envd_api::{Health, InitRequest, InitResponse};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use serde_json::json;
use wrenn_http::{ApiError, Exchange, Reply};

use crate::metrics::{self, CpuSampler};
use crate::settings::SharedSettings;
use crate::users;

/// Clock differences below this are left alone by `/init`: the host's
/// timestamp is already stale by the request's latency, so stepping the
/// clock for such small differences would only add jitter.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// `GET /health`
pub fn health() -> Reply {
    let health = Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    Reply::Json(200, json!(health))
}

/// `GET /metrics`
pub fn metrics(cpu: &CpuSampler) -> Result<Reply, ApiError> {
    Ok(Reply::Json(200, json!(metrics::collect(cpu)?)))
}

/// `POST /init`: validates everything first, then applies it all at once.
pub fn init(settings: &SharedSettings, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let request: InitRequest = ex.json()?;
    if request.access_token.as_deref().is_some_and(str::is_empty) {
        return Err(ApiError::invalid_argument(
            "access_token is empty; send a non-empty token or leave the field out",
        ));
    }
    if let Some(env) = &request.env_vars {
        validate_env(env)?;
    }
    if let Some(user) = &request.default_user {
        users::lookup(user)?;
    }
    let clock_set = match request.timestamp_ms {
        Some(ms) => set_clock(ms)?,
        None => false,
    };
    let mut current = settings.write();
    if let Some(token) = request.access_token {
        current.access_token = Some(token);
    }
    if let Some(env) = request.env_vars {
        current.env_vars = env;
    }
    if let Some(user) = request.default_user {
        current.default_user = user;
    }
    tracing::info!(default_user = %current.default_user, env_vars = current.env_vars.len(),
        token_set = current.access_token.is_some(), clock_set, "sandbox initialised");
    let answer = InitResponse {
        status: "ok".to_owned(),
        clock_set,
    };
    Ok(Reply::Json(200, json!(answer)))
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(ApiError::invalid_argument(format!(
                "env_vars entry '{}' is invalid; names are non-empty without '=' and nothing may contain NUL",
                key.escape_debug()
            )));
        }
    }
    Ok(())
}

/// Sets the system clock to `ms` since the epoch unless it is already
/// within `CLOCK_TOLERANCE`. Returns whether it was changed.
fn set_clock(ms: u64) -> Result<bool, ApiError> {
    if ms == 0 {
        return Err(ApiError::invalid_argument(
            "timestamp_ms must be milliseconds since 1970-01-01 UTC, e.g. Date.now()",
        ));
    }
    let target = UNIX_EPOCH + Duration::from_millis(ms);
    let now = SystemTime::now();
    let skew = target
        .duration_since(now)
        .or_else(|_| now.duration_since(target))
        .unwrap_or(Duration::ZERO);
    if skew < CLOCK_TOLERANCE {
        return Ok(false);
    }
    let spec = TimeSpec::from(Duration::from_millis(ms));
    clock_settime(ClockId::CLOCK_REALTIME, spec).map_err(|errno| {
        ApiError::permission_denied(format!(
            "cannot set the system clock: {}; envd needs root (CAP_SYS_TIME)",
            errno.desc()
        ))
    })?;
    tracing::info!(skew_ms = skew.as_millis() as u64, "system clock set");
    Ok(true)
}
