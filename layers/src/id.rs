//! The names of layer and header files: the SHA-256 of their content,
//! written as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What [`LayerId::parse`] says of text that is not a layer id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid layer id {input:?}: {reason}")]
pub struct InvalidId {
    /// The rejected input (cut to 80 characters).
    pub input: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

/// The id of a layer file: the SHA-256 of its content.
///
/// Written as 64 lowercase hex digits (its file name under
/// `<state dir>/layers/`); serialized as the 32 digest bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LayerId(pub [u8; 32]);

impl LayerId {
    /// Length of the hex form.
    pub const HEX_LEN: usize = 64;

    /// The id of a layer whose content is `bytes`.
    pub fn of(bytes: &[u8]) -> LayerId {
        LayerId(Sha256::digest(bytes).into())
    }

    /// Parses the hex form: exactly 64 lowercase hex digits.
    pub fn parse(input: &str) -> Result<LayerId, InvalidId> {
        const HINT: &str = "a layer id is the SHA-256 of the layer file, 64 lowercase hex digits";
        let invalid = |what: String| InvalidId {
            input: input.chars().take(80).collect(),
            reason: format!("{what}; {HINT}"),
        };
        if input.len() != Self::HEX_LEN {
            let chars = input.chars().count();
            return Err(invalid(format!("it is {chars} characters long")));
        }
        parse_hex32(input)
            .map(LayerId)
            .ok_or_else(|| invalid("it contains characters other than 0-9 and a-f".into()))
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerId({self})")
    }
}

impl FromStr for LayerId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<LayerId, InvalidId> {
        LayerId::parse(s)
    }
}

/// The id of an encoded header: the SHA-256 of its bytes, which is also the
/// name of its file under `<state dir>/headers/`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HeaderId(pub [u8; 32]);

impl HeaderId {
    /// The id of the encoded header `bytes`.
    pub fn of(bytes: &[u8]) -> HeaderId {
        HeaderId(Sha256::digest(bytes).into())
    }

    /// Parses 64 lowercase hex digits; `None` for anything else.
    pub fn parse(text: &str) -> Option<HeaderId> {
        parse_hex32(text).map(HeaderId)
    }
}

impl fmt::Display for HeaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for HeaderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeaderId({self})")
    }
}

impl FromStr for HeaderId {
    type Err = String;
    fn from_str(s: &str) -> Result<HeaderId, String> {
        HeaderId::parse(s)
            .ok_or_else(|| format!("{s:?} is not a header id: 64 lowercase hex digits (a SHA-256)"))
    }
}

/// 64 lowercase hex digits as 32 bytes; `None` for anything else (the
/// names of layer and header files).
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let lower = text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let mut bytes = [0u8; 32];
    (lower && hex::decode_to_slice(text, &mut bytes).is_ok()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_round_trip_through_hex() {
        let hex = "00ff10ab".repeat(8);
        let id = LayerId::parse(&hex).unwrap();
        assert_eq!(id.to_string(), hex);
        assert_eq!(id.0[..4], [0x00, 0xff, 0x10, 0xab]);
        assert_eq!(format!("{id:?}"), format!("LayerId({hex})"));
        assert_eq!(LayerId::of(b"abc"), LayerId(Sha256::digest(b"abc").into()));
    }

    #[test]
    fn bad_layer_ids_say_what_is_wrong() {
        let upper = "AB".repeat(32);
        let cases = [
            ("", "0 characters long"),
            ("abc", "3 characters long"),
            (upper.as_str(), "other than 0-9 and a-f"),
            (&format!("{}g", "0".repeat(63)), "other than 0-9 and a-f"),
        ];
        for (input, why) in cases {
            let msg = LayerId::parse(input).unwrap_err().to_string();
            assert!(msg.contains(why), "{input:?}: {msg}");
            assert!(msg.contains("64 lowercase hex digits"), "{msg}");
        }
        // Multi-byte characters are refused, not split.
        assert!(LayerId::parse(&"é".repeat(32)).is_err());
    }

    #[test]
    fn header_ids_print_and_parse_as_hex() {
        let id = HeaderId([0xa5; 32]);
        assert_eq!(id.to_string(), "a5".repeat(32));
        assert_eq!(HeaderId::parse(&id.to_string()), Some(id));
        assert_eq!(HeaderId::parse(&"A5".repeat(32)), None);
        assert_eq!(HeaderId::parse("a5"), None);
    }
}
