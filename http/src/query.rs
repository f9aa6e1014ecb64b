//! Query strings: percent-decoded key/value pairs, read as text, paths,
//! flags or numbers, with errors that name the parameter.

use std::path::PathBuf;

use crate::error::ApiError;

/// A parsed query string: percent-decoded key/value pairs, in order.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, Vec<u8>)>,
}

impl Query {
    pub fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (key, value) = part.split_once('=').unwrap_or((part, ""));
                let key = String::from_utf8_lossy(&percent_decode(key, true)).into_owned();
                (key, percent_decode(value, true))
            })
            .collect();
        Self { pairs }
    }

    /// Every parameter name, in order, repeated names included.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(k, _)| k.as_str())
    }

    /// The raw bytes of the first value for `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value for `name` as UTF-8 text.
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.bytes(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| {
                    ApiError::invalid_argument(format!("query parameter '{name}' is not UTF-8"))
                })
            })
            .transpose()
    }

    /// The first value for `name` as a path (any bytes allowed).
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        self.bytes(name)
            .map(|v| PathBuf::from(std::ffi::OsStr::from_bytes(v)))
    }

    /// A boolean flag: `true`/`1`/`yes` or `false`/`0`/`no`; absent = `default`.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool, ApiError> {
        match self.text(name)? {
            None | Some("") => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ApiError::invalid_argument(format!(
                "query parameter '{name}' must be true or false, got '{other}'"
            ))),
        }
    }

    /// An unsigned number; absent = `default`.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, ApiError> {
        match self.text(name)? {
            None | Some("") => Ok(default),
            Some(text) => text.parse().map_err(|_| {
                ApiError::invalid_argument(format!(
                    "query parameter '{name}' must be a non-negative integer, got '{text}'"
                ))
            }),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`). Malformed
/// escapes are kept as they are.
pub fn percent_decode(input: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_escapes_plus_and_garbage() {
        assert_eq!(percent_decode("a%20b+c", true), b"a b c");
        assert_eq!(percent_decode("a+b", false), b"a+b");
        assert_eq!(percent_decode("%ff%FE", false), vec![0xff, 0xfe]);
        assert_eq!(percent_decode("100%", false), b"100%");
        assert_eq!(percent_decode("%zz%4", false), b"%zz%4");
    }

    #[test]
    fn query_reads_first_value_and_flags() {
        let q = Query::parse("path=%2Ftmp%2Fa+b&depth=3&recursive=true&path=/other");
        assert_eq!(q.path("path"), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(q.number("depth", 1).ok(), Some(3));
        assert_eq!(q.flag("recursive", false).ok(), Some(true));
        assert!(q.flag("depth", false).is_err());
        assert_eq!(q.number("missing", 7).ok(), Some(7));
    }
}
