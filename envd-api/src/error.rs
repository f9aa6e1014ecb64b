//! The body of every envd error answer: `{"error":{"code","message"}}`.
//! envd writes it through `wrenn-http`'s `ApiError`; clients read it here.

use serde::{Deserialize, Serialize};

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What failed: a stable code (`not_found`, `conflict`, ... as listed in
/// `docs/envd-api.md`) and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_body_round_trips_in_the_nested_shape() {
        let wire = json!({"error": {"code": "not_found", "message": "no such process 7"}});
        let body: ErrorBody = serde_json::from_value(wire.clone()).expect("parse");
        assert_eq!(body.error.code, "not_found");
        assert_eq!(serde_json::to_value(&body).expect("encode"), wire);
    }
}
