//! Parsing signal names and numbers from API requests.

use std::str::FromStr;

use nix::sys::signal::Signal;
use serde_json::Value;
use wrenn_http::ApiError;

/// Accepts "SIGTERM", "TERM", "term", "15" or the JSON number 15.
pub fn parse(value: &Value) -> Result<Signal, ApiError> {
    let parsed = match value {
        Value::Number(n) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .and_then(from_number),
        Value::String(s) => from_text(s.trim()),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ApiError::invalid_argument(format!(
            "unknown signal {value}; use a name like \"SIGTERM\" or \"KILL\", or a number like 15"
        ))
    })
}

fn from_number(n: i32) -> Option<Signal> {
    Signal::try_from(n).ok()
}

fn from_text(text: &str) -> Option<Signal> {
    if let Ok(n) = text.parse::<i32>() {
        return from_number(n);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_names_with_and_without_prefix_and_numbers() {
        assert_eq!(parse(&json!("SIGTERM")).ok(), Some(Signal::SIGTERM));
        assert_eq!(parse(&json!("kill")).ok(), Some(Signal::SIGKILL));
        assert_eq!(parse(&json!("INT")).ok(), Some(Signal::SIGINT));
        assert_eq!(parse(&json!(9)).ok(), Some(Signal::SIGKILL));
        assert_eq!(parse(&json!("15")).ok(), Some(Signal::SIGTERM));
    }

    #[test]
    fn rejects_unknown_signals() {
        for bad in [
            json!("SIGNOPE"),
            json!(0),
            json!(999),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(parse(&bad).map_err(|e| e.status()).err(), Some(400));
        }
    }
}
