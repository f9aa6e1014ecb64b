//! The `meta` database: schema version, node id, small settings.
//!
//! Keys are fixed ASCII strings (`schema_version`, `node_id`,
//! `events.last_seq`) plus `setting/<name>` for settings. Each kind of entry
//! has its own tiny record type, encoded by the shared codec like every
//! other value. The schema version's layout (version byte 1, postcard
//! `u32`) is frozen forever: every past and future program must be able to
//! read it to decide whether it may open the file.
//!
//! Not for anything large or per-sandbox: settings are capped at
//! [`MAX_SETTING_LEN`] bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use heed::PutFlags;
use serde::{Deserialize, Serialize};

use crate::codec::{sealed::Upgrade, Record};
use crate::error::{clip, Error, Result};
use crate::keys::{sealed::KeyBytes, Key};
use crate::txn::{self, Db, ReadTxn, WriteTxn};

/// The longest setting value, in bytes.
pub const MAX_SETTING_LEN: usize = 4096;
/// The longest setting name, in bytes.
pub const MAX_SETTING_NAME_LEN: usize = 64;
/// The longest node id, in bytes.
pub const MAX_NODE_ID_LEN: usize = 256;

const SETTING_PREFIX: &str = "setting/";

/// A key of the `meta` database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetaKey {
    SchemaVersion,
    NodeId,
    LastEventSeq,
    Setting(String),
}

impl fmt::Display for MetaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaKey::SchemaVersion => f.write_str("schema_version"),
            MetaKey::NodeId => f.write_str("node_id"),
            MetaKey::LastEventSeq => f.write_str("events.last_seq"),
            MetaKey::Setting(name) => write!(f, "{SETTING_PREFIX}{name}"),
        }
    }
}

impl KeyBytes for MetaKey {
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.to_string().into_bytes())
    }

    fn from_bytes(bytes: &[u8]) -> std::result::Result<MetaKey, String> {
        match bytes {
            b"schema_version" => Ok(MetaKey::SchemaVersion),
            b"node_id" => Ok(MetaKey::NodeId),
            b"events.last_seq" => Ok(MetaKey::LastEventSeq),
            _ => {
                let name = bytes
                    .strip_prefix(SETTING_PREFIX.as_bytes())
                    .ok_or_else(|| "not a key this program knows".to_owned())?;
                let name = std::str::from_utf8(name).map_err(|_| "not UTF-8".to_owned())?;
                check_setting_name(name).map_err(|e| e.to_string())?;
                Ok(MetaKey::Setting(name.to_owned()))
            }
        }
    }
}

impl Key for MetaKey {}

/// Declares the record type of one kind of `meta` entry.
macro_rules! meta_records {
    ($($(#[$doc:meta])* $name:ident($inner:ty);)*) => {$(
        $(#[$doc])*
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) struct $name(pub(crate) $inner);

        impl Upgrade for $name {}

        impl Record for $name {
            const DATABASE: &'static str = "meta";
            const CURRENT_VERSION: u8 = 1;
            type Key = MetaKey;
        }
    )*};
}

meta_records! {
    /// `schema_version`: the layout version of the whole file. Frozen.
    SchemaVersion(u32);
    /// `node_id`: this node's id.
    NodeId(String);
    /// `events.last_seq`: the last event sequence number handed out, kept
    /// even when that event has been trimmed.
    LastEventSeq(u64);
    /// `setting/<name>`: a small free-form setting.
    Setting(String);
}

fn invalid(name: &str, reason: String) -> Error {
    Error::InvalidMeta {
        name: clip(name),
        reason,
    }
}

fn check_setting_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_SETTING_NAME_LEN || !ok_chars {
        return Err(invalid(
            name,
            format!(
                "a setting name is 1 to {MAX_SETTING_NAME_LEN} characters of a-z, 0-9, '.', \
                 '_' and '-'"
            ),
        ));
    }
    Ok(())
}

fn check_len(name: &str, value: &str, min: usize, max: usize) -> Result<()> {
    if value.len() < min || value.len() > max {
        return Err(invalid(
            name,
            format!(
                "the value is {} bytes long; it must be {min} to {max} bytes",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Reads the schema version; used at open time, before a [`Store`](crate::Store) exists.
pub(crate) fn schema_version(txn: &heed::RoTxn, db: Db<'_>) -> Result<Option<u32>> {
    Ok(txn::get::<SchemaVersion>(txn, db, &MetaKey::SchemaVersion)?.map(|v| v.0))
}

/// Writes the schema version; only the open and migration code does this.
pub(crate) fn set_schema_version(w: &mut WriteTxn<'_>, version: u32) -> Result<()> {
    let db = w.dbs.meta;
    txn::put(
        w,
        db,
        &MetaKey::SchemaVersion,
        &SchemaVersion(version),
        PutFlags::empty(),
    )
}

/// Read access to `meta`.
pub struct Meta<'t> {
    txn: &'t heed::RoTxn<'t>,
    db: Db<'static>,
}

impl<'t> Meta<'t> {
    pub(crate) fn new(txn: &'t heed::RoTxn<'t>, db: Db<'static>) -> Self {
        Meta { txn, db }
    }

    /// The schema version of the file (always set once the store is open).
    pub fn schema_version(&self) -> Result<Option<u32>> {
        schema_version(self.txn, self.db)
    }

    /// This node's id, once set.
    pub fn node_id(&self) -> Result<Option<String>> {
        Ok(txn::get::<NodeId>(self.txn, self.db, &MetaKey::NodeId)?.map(|v| v.0))
    }

    /// The setting `name`, if set.
    pub fn setting(&self, name: &str) -> Result<Option<String>> {
        check_setting_name(name)?;
        let key = MetaKey::Setting(name.to_owned());
        Ok(txn::get::<Setting>(self.txn, self.db, &key)?.map(|v| v.0))
    }

    /// All settings, by name.
    pub fn settings(&self) -> Result<BTreeMap<String, String>> {
        // '0' is the byte after '/': the range is exactly the `setting/` keys.
        let entries = txn::range::<Setting>(
            self.txn,
            self.db,
            Bound::Included(b"setting/".as_slice()),
            Bound::Excluded(b"setting0".as_slice()),
        )?;
        let mut settings = BTreeMap::new();
        for entry in entries {
            if let (MetaKey::Setting(name), Setting(value)) = entry? {
                settings.insert(name, value);
            }
        }
        Ok(settings)
    }

    /// The last event sequence number handed out, if any.
    pub(crate) fn last_event_seq(&self) -> Result<Option<u64>> {
        Ok(txn::get::<LastEventSeq>(self.txn, self.db, &MetaKey::LastEventSeq)?.map(|v| v.0))
    }
}

/// Read and write access to `meta`. The read methods are those of [`Meta`].
pub struct MetaMut<'t, 's> {
    txn: &'t mut WriteTxn<'s>,
}

impl MetaMut<'_, '_> {
    fn view(&self) -> Meta<'_> {
        Meta::new(&self.txn.txn, self.txn.dbs.meta)
    }

    fn put<R: Record<Key = MetaKey>>(&mut self, key: &MetaKey, value: &R) -> Result<()> {
        let db = self.txn.dbs.meta;
        txn::put(self.txn, db, key, value, PutFlags::empty())
    }

    /// The schema version of the file.
    pub fn schema_version(&self) -> Result<Option<u32>> {
        self.view().schema_version()
    }

    /// This node's id, once set.
    pub fn node_id(&self) -> Result<Option<String>> {
        self.view().node_id()
    }

    /// The setting `name`, if set.
    pub fn setting(&self, name: &str) -> Result<Option<String>> {
        self.view().setting(name)
    }

    /// All settings, by name.
    pub fn settings(&self) -> Result<BTreeMap<String, String>> {
        self.view().settings()
    }

    /// Sets this node's id (1 to [`MAX_NODE_ID_LEN`] bytes).
    pub fn set_node_id(&mut self, node_id: &str) -> Result<()> {
        check_len("node_id", node_id, 1, MAX_NODE_ID_LEN)?;
        self.put(&MetaKey::NodeId, &NodeId(node_id.to_owned()))
    }

    /// Sets the setting `name` (1 to [`MAX_SETTING_NAME_LEN`] characters of
    /// `a-z 0-9 . _ -`) to `value` (at most [`MAX_SETTING_LEN`] bytes).
    pub fn set_setting(&mut self, name: &str, value: &str) -> Result<()> {
        check_setting_name(name)?;
        check_len(name, value, 0, MAX_SETTING_LEN)?;
        self.put(
            &MetaKey::Setting(name.to_owned()),
            &Setting(value.to_owned()),
        )
    }

    /// Removes the setting `name`; `true` when it was set.
    pub fn remove_setting(&mut self, name: &str) -> Result<bool> {
        check_setting_name(name)?;
        let db = self.txn.dbs.meta;
        txn::delete::<Setting>(self.txn, db, &MetaKey::Setting(name.to_owned()))
    }

    /// Records the last event sequence number handed out.
    pub(crate) fn set_last_event_seq(&mut self, seq: u64) -> Result<()> {
        self.put(&MetaKey::LastEventSeq, &LastEventSeq(seq))
    }
}

impl<'s> ReadTxn<'s> {
    /// The `meta` database: schema version, node id, settings.
    pub fn meta(&self) -> Meta<'_> {
        Meta::new(&self.txn, self.dbs.meta)
    }
}

impl<'s> WriteTxn<'s> {
    /// The `meta` database: schema version, node id, settings.
    pub fn meta(&mut self) -> MetaMut<'_, 's> {
        MetaMut { txn: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn schema_version_layout_is_frozen() {
        assert_eq!(encode(&SchemaVersion(1)).unwrap(), [1, 1]);
        assert_eq!(encode(&SchemaVersion(300)).unwrap(), [1, 0xac, 0x02]);
        assert_eq!(
            decode::<SchemaVersion>(&MetaKey::SchemaVersion, &[1, 7]).unwrap(),
            SchemaVersion(7)
        );
    }

    #[test]
    fn meta_keys_round_trip() {
        for key in [
            MetaKey::SchemaVersion,
            MetaKey::NodeId,
            MetaKey::LastEventSeq,
            MetaKey::Setting("log.level".into()),
        ] {
            assert_eq!(MetaKey::from_bytes(&key.to_bytes()).unwrap(), key);
        }
        assert_eq!(&*MetaKey::Setting("x".into()).to_bytes(), b"setting/x");
        assert!(MetaKey::from_bytes(b"what").is_err());
        assert!(MetaKey::from_bytes(b"setting/A").is_err());
    }

    #[test]
    fn setting_names_are_checked() {
        for good in ["a", "log.level", "max_slots", "x-1"] {
            check_setting_name(good).unwrap();
        }
        for bad in ["", "A", "a/b", "a b", &"a".repeat(65)] {
            let msg = check_setting_name(bad).unwrap_err().to_string();
            assert!(
                msg.contains("a setting name is 1 to 64 characters"),
                "{msg}"
            );
        }
    }
}
