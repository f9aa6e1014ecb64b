//! The record codec: the one place values are turned into bytes and back.
//!
//! Every stored value is one version byte followed by the postcard encoding
//! of that version's struct. Encoding always writes the current version.
//! Decoding dispatches on the version byte: the current version decodes
//! directly, an older one goes through the record's upgrade function, a
//! newer one is [`Error::UnknownRecordVersion`], and an empty or
//! undecodable value is [`Error::EmptyRecord`] / [`Error::CorruptRecord`],
//! each naming the database and key.
//!
//! Not for keys (see `keys`): they have fixed layouts without a version.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::keys::Key;

/// The value type of one database, with the version of its layout.
///
/// Implemented only by this crate's record types. To change a record's
/// layout, see `docs/state.md` ("Changing a record").
pub trait Record: sealed::Upgrade + Serialize + DeserializeOwned {
    /// The name of the LMDB database holding these records.
    const DATABASE: &'static str;
    /// The version byte written in front of every record encoded now.
    const CURRENT_VERSION: u8;
    /// The key type of the database.
    type Key: Key;
}

pub(crate) mod sealed {
    use std::borrow::Cow;

    /// Decoding of older record versions, and the key a record carries.
    /// Crate-private.
    pub trait Upgrade: Sized {
        /// The bytes of the key this record names itself by (its `id` or
        /// `name` field), if it has one; a write under any other key is
        /// refused.
        fn own_key(&self) -> Option<Cow<'_, [u8]>> {
            None
        }

        /// Decodes the postcard `body` of record version `version`, which is
        /// older than the current one, and converts it to the current struct
        /// (use [`decode_body`](crate::codec::decode_body)).
        ///
        /// `None` means `version` never existed for this record. The default
        /// is for records that have only ever had one version.
        fn upgrade(version: u8, body: &[u8]) -> Option<Result<Self, String>> {
            let _ = (version, body);
            None
        }
    }
}

/// Encodes `record` as its current version byte followed by its postcard bytes.
pub(crate) fn encode<R: Record>(record: &R) -> Result<Vec<u8>> {
    postcard::to_extend(record, vec![R::CURRENT_VERSION]).map_err(|e| Error::Encode {
        database: R::DATABASE,
        reason: e.to_string(),
    })
}

/// Decodes a stored value of database `R::DATABASE`; `key` is only used in errors.
pub(crate) fn decode<R: Record>(key: &dyn fmt::Display, bytes: &[u8]) -> Result<R> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(Error::EmptyRecord {
            database: R::DATABASE,
            key: key.to_string(),
        });
    };
    let decoded = if version == R::CURRENT_VERSION {
        decode_body::<R>(body)
    } else if version > R::CURRENT_VERSION {
        return Err(Error::UnknownRecordVersion {
            database: R::DATABASE,
            key: key.to_string(),
            version,
            known: R::CURRENT_VERSION,
        });
    } else {
        R::upgrade(version, body)
            .unwrap_or_else(|| Err(format!("no version {version} of this record ever existed")))
    };
    decoded.map_err(|reason| Error::CorruptRecord {
        database: R::DATABASE,
        key: key.to_string(),
        version,
        reason,
    })
}

/// Decodes one version's postcard body, which must be used up exactly.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> std::result::Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| e.to_string())?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(format!("{} bytes left over after the record", rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::keys::SlotId;

    /// A record at version 2 whose version 1 lacked `b`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Two {
        a: u32,
        b: String,
    }

    #[derive(Deserialize)]
    struct TwoV1 {
        a: u32,
    }

    impl sealed::Upgrade for Two {
        fn upgrade(version: u8, body: &[u8]) -> Option<std::result::Result<Self, String>> {
            match version {
                1 => Some(decode_body::<TwoV1>(body).map(|v1| Two {
                    a: v1.a,
                    b: "default".into(),
                })),
                _ => None,
            }
        }
    }

    impl Record for Two {
        const DATABASE: &'static str = "two";
        const CURRENT_VERSION: u8 = 2;
        type Key = SlotId;
    }

    fn key() -> SlotId {
        SlotId(9)
    }

    #[test]
    fn encode_writes_the_current_version_first() {
        let bytes = encode(&Two {
            a: 5,
            b: "x".into(),
        })
        .unwrap();
        assert_eq!(bytes, [2, 5, 1, b'x']);
        assert_eq!(
            decode::<Two>(&key(), &bytes).unwrap(),
            Two {
                a: 5,
                b: "x".into()
            }
        );
    }

    #[test]
    fn older_versions_are_upgraded() {
        let v1 = [1, 7];
        assert_eq!(
            decode::<Two>(&key(), &v1).unwrap(),
            Two {
                a: 7,
                b: "default".into()
            }
        );
    }

    #[test]
    fn newer_versions_are_refused_with_upgrade_advice() {
        let err = decode::<Two>(&key(), &[3, 1, 2, 3]).unwrap_err();
        assert!(matches!(
            err,
            Error::UnknownRecordVersion {
                database: "two",
                version: 3,
                known: 2,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "record 9 in database `two` has record version 3 but this wrenn-agent knows \
             up to 2: upgrade wrenn-agent"
        );
    }

    #[test]
    fn empty_values_are_errors() {
        let err = decode::<Two>(&key(), &[]).unwrap_err();
        assert!(matches!(
            err,
            Error::EmptyRecord {
                database: "two",
                ..
            }
        ));
        assert!(err
            .to_string()
            .contains("record 9 in database `two` is empty"));
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let cases: [&[u8]; 5] = [
            &[2],                   // no body
            &[2, 5, 9, b'x'],       // string length past the end
            &[2, 5, 1, 0xff],       // not UTF-8
            &[2, 5, 1, b'x', 0, 0], // trailing bytes
            &[0, 1],                // version 0 never existed
        ];
        for bytes in cases {
            let err = decode::<Two>(&key(), bytes).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptRecord {
                        database: "two",
                        ..
                    }
                ),
                "{bytes:?}: {err}"
            );
            assert!(
                err.to_string().contains("record 9 in database `two`"),
                "{err}"
            );
        }
        let err = decode::<Two>(&key(), &[2, 5, 1, b'x', 0, 0]).unwrap_err();
        assert!(err.to_string().contains("2 bytes left over"), "{err}");
    }
}
