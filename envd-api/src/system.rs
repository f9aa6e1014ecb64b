//! Sandbox-level bodies: `GET /health` and `POST /init` (token, default
//! environment and user, clock).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The answer of `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"`.
    pub status: String,
    /// envd's version.
    pub version: String,
}

/// The body of `POST /init`. Every field is optional; a missing one leaves
/// that setting unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// Required on every later call but `/health`; must not be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Default environment of every new process (replaces the previous).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// User for processes and file operations that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    /// Milliseconds since the Unix epoch; envd sets its clock when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<u64>,
}

/// The answer of `POST /init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitResponse {
    /// Always `"ok"`.
    pub status: String,
    /// Whether envd stepped the system clock to `timestamp_ms`.
    pub clock_set: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn init_request_round_trips_and_leaves_out_unset_fields() {
        let request = InitRequest {
            access_token: Some("s3cret".into()),
            env_vars: Some(BTreeMap::from([("LANG".into(), "C.UTF-8".into())])),
            default_user: None,
            timestamp_ms: Some(1_717_171_717_171),
        };
        let wire = json!({
            "access_token": "s3cret",
            "env_vars": {"LANG": "C.UTF-8"},
            "timestamp_ms": 1_717_171_717_171_u64,
        });
        assert_eq!(serde_json::to_value(&request).expect("encode"), wire);
        let back: InitRequest = serde_json::from_value(wire).expect("parse");
        assert_eq!(back, request);
        let empty: InitRequest = serde_json::from_str("{}").expect("parse empty");
        assert_eq!(empty, InitRequest::default());
    }

    #[test]
    fn health_and_init_answers_have_todays_shape() {
        let health = Health {
            status: "ok".into(),
            version: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&health).expect("encode"),
            r#"{"status":"ok","version":"0.1.0"}"#
        );
        let init = InitResponse {
            status: "ok".into(),
            clock_set: true,
        };
        let text = serde_json::to_string(&init).expect("encode");
        assert_eq!(text, r#"{"status":"ok","clock_set":true}"#);
        assert_eq!(serde_json::from_str::<InitResponse>(&text).ok(), Some(init));
    }
}
