//! Access-token checks: after `/init` set a token, every request except
//! `/health` must carry it in `X-Access-Token` or `Authorization: Bearer`.

use wrenn_http::{ApiError, Exchange};

/// Fails with 401 unless the request carries `expected` (or none is set).
pub fn check(expected: Option<&str>, exchange: &Exchange) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match presented_token(exchange) {
        Some(token) if tokens_match(token, expected) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(
            "the access token is wrong; send the token given to /init",
        )),
        None => Err(ApiError::unauthorized(
            "this sandbox requires an access token; send it in the X-Access-Token header",
        )),
    }
}

/// The token from `X-Access-Token`, else from `Authorization: Bearer`.
fn presented_token(exchange: &Exchange) -> Option<&str> {
    if let Some(token) = exchange.header("X-Access-Token") {
        return Some(token.trim());
    }
    let auth = exchange.header("Authorization")?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares in time that depends only on the lengths, not on the contents.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::tokens_match;

    #[test]
    fn token_comparison_is_exact() {
        assert!(tokens_match("secret", "secret"));
        assert!(!tokens_match("secreT", "secret"));
        assert!(!tokens_match("secret1", "secret"));
        assert!(!tokens_match("", "secret"));
    }
}
