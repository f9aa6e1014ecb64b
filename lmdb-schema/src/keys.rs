//! Key types: one per database, each with its byte layout.
//!
//! A key value is valid by construction: strings are checked when parsed
//! (and again when decoded from a record), numbers are stored big-endian so
//! that LMDB's byte order is numeric order. This module is the only place
//! that turns keys into bytes and back; nothing else sees key bytes.
//!
//! Not for records (see `records`) or for the `meta` keys (see `meta`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{clip, Error, Result};

/// A key of one of the store's databases.
///
/// Implemented only by this crate's key types; the byte layout is private.
pub trait Key: sealed::KeyBytes + Clone + fmt::Debug + fmt::Display {}

pub(crate) mod sealed {
    use std::borrow::Cow;

    /// The byte layout of a key. Crate-private: the one place keys are encoded.
    pub trait KeyBytes: Sized {
        /// The key as stored in LMDB.
        fn to_bytes(&self) -> Cow<'_, [u8]>;
        /// The key read back from LMDB; `Err` says what is wrong with the bytes.
        fn from_bytes(bytes: &[u8]) -> Result<Self, String>;
    }
}

use sealed::KeyBytes;

/// Prints key bytes that failed to decode: text when they are text, hex otherwise.
pub(crate) fn escape_key(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => format!("{:?}", clip(text)),
        Err(_) => {
            let hex: String = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
            let more = if bytes.len() > 64 { "..." } else { "" };
            format!("0x{hex}{more}")
        }
    }
}

// ---------------------------------------------------------------------------
// SandboxId

/// The id of a sandbox: `sb-` followed by 1 to 61 lowercase ASCII letters or
/// digits (at most 64 bytes in all).
///
/// Stored as its UTF-8 bytes, so sandboxes iterate in id order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// The prefix every sandbox id starts with.
    pub const PREFIX: &'static str = "sb-";
    /// The longest id, in bytes.
    pub const MAX_LEN: usize = 64;
    /// Characters after the prefix in a generated id (5 random bits each).
    const GENERATED_LEN: usize = 20;
    /// Alphabet of generated ids: digits and lowercase letters without i, l, o, u.
    const ALPHABET: &'static [u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

    /// Checks `input` and makes it an id.
    pub fn parse(input: &str) -> Result<SandboxId> {
        let invalid = |reason: &str| Error::InvalidSandboxId {
            input: clip(input),
            reason: format!(
                "{reason}; a sandbox id is \"sb-\" followed by 1 to 61 lowercase letters \
                 (a-z) or digits (0-9)"
            ),
        };
        let Some(rest) = input.strip_prefix(Self::PREFIX) else {
            return Err(invalid("it does not start with \"sb-\""));
        };
        if rest.is_empty() {
            return Err(invalid("nothing follows \"sb-\""));
        }
        if input.len() > Self::MAX_LEN {
            return Err(invalid(&format!("it is {} bytes long", input.len())));
        }
        if let Some(bad) = rest
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(invalid(&format!("it contains {bad:?}")));
        }
        Ok(SandboxId(input.to_owned()))
    }

    /// Makes a new random id (100 bits from the operating system's random source).
    pub fn generate() -> Result<SandboxId> {
        let mut random = [0u8; Self::GENERATED_LEN];
        getrandom::fill(&mut random).map_err(Error::Random)?;
        let mut id = String::with_capacity(Self::PREFIX.len() + Self::GENERATED_LEN);
        id.push_str(Self::PREFIX);
        // 256 is a multiple of 32, so taking the low 5 bits has no bias.
        id.extend(
            random
                .iter()
                .map(|b| char::from(Self::ALPHABET[usize::from(b & 31)])),
        );
        Ok(SandboxId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SandboxId {
    type Err = Error;
    fn from_str(s: &str) -> Result<SandboxId> {
        SandboxId::parse(s)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = Error;
    fn try_from(s: String) -> Result<SandboxId> {
        SandboxId::parse(&s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl AsRef<str> for SandboxId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl KeyBytes for SandboxId {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.as_bytes())
    }
    fn from_bytes(bytes: &[u8]) -> std::result::Result<SandboxId, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        SandboxId::parse(text).map_err(|e| e.to_string())
    }
}

impl Key for SandboxId {}

// ---------------------------------------------------------------------------
// TemplateName

/// The name of a template: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-` (so it is always a safe single path component).
///
/// Stored as its UTF-8 bytes, so templates iterate in byte order of names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

impl TemplateName {
    /// The longest name, in characters (all characters are one byte).
    pub const MAX_LEN: usize = 128;

    /// Checks `input` and makes it a name.
    pub fn parse(input: &str) -> Result<TemplateName> {
        let invalid = |reason: &str| Error::InvalidTemplateName {
            input: clip(input),
            reason: format!(
                "{reason}; a template name is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' \
                 and '-', not starting with '.' or '-'"
            ),
        };
        let Some(first) = input.chars().next() else {
            return Err(invalid("it is empty"));
        };
        if let Some(bad) = input
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(&format!("{bad:?} is not allowed")));
        }
        if first == '.' || first == '-' {
            return Err(invalid(&format!("it starts with {first:?}")));
        }
        if input.len() > Self::MAX_LEN {
            return Err(invalid(&format!("it is {} characters long", input.len())));
        }
        Ok(TemplateName(input.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TemplateName {
    type Err = Error;
    fn from_str(s: &str) -> Result<TemplateName> {
        TemplateName::parse(s)
    }
}

impl TryFrom<String> for TemplateName {
    type Error = Error;
    fn try_from(s: String) -> Result<TemplateName> {
        TemplateName::parse(&s)
    }
}

impl From<TemplateName> for String {
    fn from(name: TemplateName) -> String {
        name.0
    }
}

impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl KeyBytes for TemplateName {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.as_bytes())
    }
    fn from_bytes(bytes: &[u8]) -> std::result::Result<TemplateName, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        TemplateName::parse(text).map_err(|e| e.to_string())
    }
}

impl Key for TemplateName {}

// ---------------------------------------------------------------------------
// Numeric keys

/// Decodes a fixed-size big-endian key.
fn fixed<const N: usize>(bytes: &[u8]) -> std::result::Result<[u8; N], String> {
    <[u8; N]>::try_from(bytes).map_err(|_| format!("{} bytes instead of {N}", bytes.len()))
}

/// A network slot on this node. Stored as 4 big-endian bytes, so slots
/// iterate in numeric order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct SlotId(pub u32);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl KeyBytes for SlotId {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.to_be_bytes().to_vec())
    }
    fn from_bytes(bytes: &[u8]) -> std::result::Result<SlotId, String> {
        fixed::<4>(bytes).map(|b| SlotId(u32::from_be_bytes(b)))
    }
}

impl Key for SlotId {}

/// The sequence number of an audit event. Assigned by
/// [`EventsMut::append`](crate::EventsMut::append), starting at 1; stored as
/// 8 big-endian bytes, so events iterate in the order they were appended.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct EventSeq(pub u64);

impl fmt::Display for EventSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl KeyBytes for EventSeq {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.to_be_bytes().to_vec())
    }
    fn from_bytes(bytes: &[u8]) -> std::result::Result<EventSeq, String> {
        fixed::<8>(bytes).map(|b| EventSeq(u64::from_be_bytes(b)))
    }
}

impl Key for EventSeq {}

// ---------------------------------------------------------------------------
// LayerId

/// Layer ids are defined by the layer format (`wrenn-layers`), which the
/// VMM reads without LMDB; stored as their 32 digest bytes, so layers
/// iterate in digest order.
pub use wrenn_layers::LayerId;

impl KeyBytes for LayerId {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0)
    }
    fn from_bytes(bytes: &[u8]) -> std::result::Result<LayerId, String> {
        fixed::<32>(bytes).map(LayerId)
    }
}

impl Key for LayerId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_sandbox_ids_parse() {
        for good in [
            "sb-a",
            "sb-0",
            "sb-abc123",
            &format!("sb-{}", "z".repeat(61)),
        ] {
            let id = SandboxId::parse(good).unwrap();
            assert_eq!(id.as_str(), good);
            assert_eq!(id.to_string(), good);
        }
    }

    #[test]
    fn bad_sandbox_ids_say_what_is_wrong_and_what_is_allowed() {
        let cases = [
            ("", "does not start with \"sb-\""),
            ("sb-", "nothing follows \"sb-\""),
            ("SB-abc", "does not start with \"sb-\""),
            ("sb-ABC", "contains 'A'"),
            ("sb-a_b", "contains '_'"),
            ("sb-a/b", "contains '/'"),
            ("sb-é", "contains 'é'"),
            (&format!("sb-{}", "a".repeat(62)), "65 bytes long"),
        ];
        for (input, why) in cases {
            let err = SandboxId::parse(input).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidSandboxId { .. }), "{input}");
            assert!(msg.contains(why), "{input:?}: {msg}");
            assert!(
                msg.contains("\"sb-\" followed by 1 to 61 lowercase letters (a-z) or digits"),
                "{msg}"
            );
        }
    }

    #[test]
    fn generated_sandbox_ids_are_valid_and_differ() {
        let a = SandboxId::generate().unwrap();
        let b = SandboxId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 23);
        assert_eq!(SandboxId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn good_template_names_parse() {
        let long = "a".repeat(128);
        for good in [
            "a",
            "Z",
            "0",
            "_x",
            "base",
            "python-3.12_slim",
            long.as_str(),
        ] {
            assert_eq!(TemplateName::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn bad_template_names_say_what_is_wrong_and_what_is_allowed() {
        let long = "a".repeat(300);
        let cases = [
            ("", "it is empty"),
            ("a/b", "'/' is not allowed"),
            ("../etc", "'/' is not allowed"),
            (".hidden", "starts with '.'"),
            ("-rf", "starts with '-'"),
            ("a b", "' ' is not allowed"),
            ("naïve", "'ï' is not allowed"),
            (long.as_str(), "300 characters long"),
        ];
        for (input, why) in cases {
            let err = TemplateName::parse(input).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidTemplateName { .. }));
            assert!(msg.contains(why), "{input:?}: {msg}");
            assert!(
                msg.contains("1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"),
                "{msg}"
            );
        }
        // The echoed input is cut short.
        let msg = TemplateName::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn serde_checks_strings() {
        let bytes = postcard::to_allocvec("SB-nope").unwrap();
        assert!(postcard::from_bytes::<SandboxId>(&bytes).is_err());
        let bytes = postcard::to_allocvec("a/b").unwrap();
        assert!(postcard::from_bytes::<TemplateName>(&bytes).is_err());
        let bytes = postcard::to_allocvec("sb-ok").unwrap();
        assert_eq!(
            postcard::from_bytes::<SandboxId>(&bytes).unwrap().as_str(),
            "sb-ok"
        );
    }

    #[test]
    fn key_bytes_round_trip() {
        let id = SandboxId::parse("sb-abc").unwrap();
        assert_eq!(SandboxId::from_bytes(&id.to_bytes()).unwrap(), id);
        let name = TemplateName::parse("base").unwrap();
        assert_eq!(TemplateName::from_bytes(&name.to_bytes()).unwrap(), name);
        assert_eq!(&*SlotId(258).to_bytes(), &[0, 0, 1, 2]);
        assert_eq!(SlotId::from_bytes(&[0, 0, 1, 2]).unwrap(), SlotId(258));
        assert_eq!(&*EventSeq(1).to_bytes(), &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            EventSeq::from_bytes(&[0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
            EventSeq(256)
        );
    }

    #[test]
    fn malformed_key_bytes_are_errors() {
        assert!(SlotId::from_bytes(&[1, 2, 3])
            .unwrap_err()
            .contains("3 bytes instead of 4"));
        assert!(EventSeq::from_bytes(&[]).is_err());
        assert!(SandboxId::from_bytes(&[0xff])
            .unwrap_err()
            .contains("not UTF-8"));
        assert!(TemplateName::from_bytes(b".x").is_err());
    }

    #[test]
    fn big_endian_order_is_numeric_order() {
        let mut keys: Vec<Vec<u8>> = [256u32, 1, 65536, 2, 255]
            .iter()
            .map(|n| SlotId(*n).to_bytes().into_owned())
            .collect();
        keys.sort();
        let back: Vec<u32> = keys
            .iter()
            .map(|k| SlotId::from_bytes(k).unwrap().0)
            .collect();
        assert_eq!(back, [1, 2, 255, 256, 65536]);
    }

    #[test]
    fn layer_ids_round_trip_through_bytes() {
        let id = LayerId::parse(&"00ff10ab".repeat(8)).unwrap();
        assert_eq!(&*id.to_bytes(), id.as_bytes());
        assert_eq!(LayerId::from_bytes(&id.to_bytes()).unwrap(), id);
        assert!(LayerId::from_bytes(&[0; 31])
            .unwrap_err()
            .contains("31 bytes instead of 32"));
    }

    #[test]
    fn bad_layer_ids_become_invalid_layer_id_errors() {
        let err = Error::from(LayerId::parse("abc").unwrap_err());
        assert!(matches!(err, Error::InvalidLayerId { .. }), "{err}");
        assert!(err.to_string().contains("64 lowercase hex digits"), "{err}");
    }

    #[test]
    fn escape_key_prints_text_or_hex() {
        assert_eq!(escape_key(b"abc"), "\"abc\"");
        assert_eq!(escape_key(&[0xff, 0x00]), "0xff00");
    }
}
