//! The crate's error type.
//!
//! One variant per way a store operation can fail. Each message names the
//! thing that failed (file, database, key) and, where there is one, what a
//! person can do about it. Nothing here decides policy: the caller chooses
//! whether an error is fatal.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The state directory does not exist and could not be created.
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        /// The directory that was to hold `state.lmdb`.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },

    /// LMDB refused to open or create the environment.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The `state.lmdb` file.
        path: PathBuf,
        /// What LMDB said.
        source: heed::Error,
    },

    /// The file was written by a newer program that knows a later schema.
    #[error(
        "{path} has schema version {found} but this wrenn-agent knows up to {known}: \
         upgrade wrenn-agent or restore a backup"
    )]
    SchemaTooNew {
        /// The `state.lmdb` file.
        path: PathBuf,
        /// The schema version stored in the file.
        found: u32,
        /// The newest schema version this program knows.
        known: u32,
    },

    /// A schema migration step failed; the file is unchanged.
    #[error(
        "cannot migrate {path} from schema version {from} to {to} (nothing was changed): {source}"
    )]
    Migration {
        /// The `state.lmdb` file.
        path: PathBuf,
        /// The version the failing step starts from.
        from: u32,
        /// The version the failing step was to produce.
        to: u32,
        /// Why the step failed.
        source: Box<Error>,
    },

    /// This program lacks the migration step from a schema version (a bug).
    #[error("this program has no migration step from schema version {from}")]
    MissingMigration {
        /// The version the missing step would start from.
        from: u32,
    },

    /// A record was written by a newer program with a newer record layout.
    #[error(
        "record {key} in database `{database}` has record version {version} but this \
         wrenn-agent knows up to {known}: upgrade wrenn-agent"
    )]
    UnknownRecordVersion {
        /// The database holding the record.
        database: &'static str,
        /// The record's key, as text.
        key: String,
        /// The version byte found.
        version: u8,
        /// The newest version this program knows for that database.
        known: u8,
    },

    /// A stored value has no bytes at all, so not even a version byte.
    #[error(
        "record {key} in database `{database}` is empty: the state file is damaged; \
         delete the record or restore a backup"
    )]
    EmptyRecord {
        /// The database holding the record.
        database: &'static str,
        /// The record's key, as text.
        key: String,
    },

    /// A stored value does not decode as the version its first byte names.
    #[error(
        "record {key} in database `{database}` (record version {version}) cannot be \
         decoded ({reason}): the state file is damaged; delete the record or restore a backup"
    )]
    CorruptRecord {
        /// The database holding the record.
        database: &'static str,
        /// The record's key, as text.
        key: String,
        /// The version byte found.
        version: u8,
        /// What the decoder said.
        reason: String,
    },

    /// A stored key does not have the layout its database uses.
    #[error(
        "a key in database `{database}` is malformed ({reason}): {key}; the state file is \
         damaged; restore a backup"
    )]
    CorruptKey {
        /// The database holding the key.
        database: &'static str,
        /// The key bytes, escaped for printing.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A record was to be written under a key other than the one it names.
    #[error(
        "record {record_key} cannot be written under key {key} in database `{database}`: \
         the key must be the record's own id or name"
    )]
    KeyMismatch {
        /// The database written to.
        database: &'static str,
        /// The key given.
        key: String,
        /// The key the record names itself by.
        record_key: String,
    },

    /// A record could not be serialized.
    #[error("cannot encode a record for database `{database}`: {reason}")]
    Encode {
        /// The database the record was meant for.
        database: &'static str,
        /// What the encoder said.
        reason: String,
    },

    /// A string is not a valid sandbox id.
    #[error("invalid sandbox id {input:?}: {reason}")]
    InvalidSandboxId {
        /// The rejected input (cut to 80 characters).
        input: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A string is not a valid template name.
    #[error("invalid template name {input:?}: {reason}")]
    InvalidTemplateName {
        /// The rejected input (cut to 80 characters).
        input: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A string is not a valid layer id.
    #[error("invalid layer id {input:?}: {reason}")]
    InvalidLayerId {
        /// The rejected input (cut to 80 characters).
        input: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A `meta` entry (node id or setting) was refused.
    #[error("invalid meta entry {name:?}: {reason}")]
    InvalidMeta {
        /// The setting name, or `node_id`.
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// The operating system's random source failed.
    #[error("cannot read random bytes for a new sandbox id: {0}")]
    Random(getrandom::Error),

    /// The environment is full and may not grow further.
    #[error(
        "{path} is full at {size} bytes and may not grow past {limit} bytes: raise \
         StoreOptions::max_map_size or trim old events"
    )]
    MapLimit {
        /// The `state.lmdb` file.
        path: PathBuf,
        /// The current map size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// Growing the memory map failed.
    #[error("cannot grow the map of {path} from {from} to {to} bytes: {source}")]
    Resize {
        /// The `state.lmdb` file.
        path: PathBuf,
        /// The map size before.
        from: usize,
        /// The map size asked for.
        to: usize,
        /// What LMDB said.
        source: heed::Error,
    },

    /// Every event sequence number has been used.
    #[error("the events database has used every sequence number up to {0}; restore a backup")]
    EventSeqExhausted(u64),

    /// A transaction was started while this thread already had one open.
    #[error(
        "a store transaction was started inside another one on the same thread; \
         do all the work in the outer transaction instead"
    )]
    NestedTransaction,

    /// A backup could not be written.
    #[error("cannot write a backup to {path}: {source}")]
    Backup {
        /// The backup file.
        path: PathBuf,
        /// Why it failed.
        source: heed::Error,
    },

    /// Any other LMDB failure.
    #[error("LMDB failed to {action}: {source}")]
    Lmdb {
        /// What was being done, such as "read from `sandboxes`".
        action: String,
        /// What LMDB said.
        source: heed::Error,
    },
}

impl Error {
    /// Wraps an LMDB error with what was being done.
    pub(crate) fn lmdb(action: impl Into<String>, source: heed::Error) -> Error {
        Error::Lmdb {
            action: action.into(),
            source,
        }
    }
}

/// Cuts user input to a length fit for an error message.
pub(crate) fn clip(input: &str) -> String {
    const MAX: usize = 80;
    match input.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &input[..end]),
        None => input.to_owned(),
    }
}

impl From<wrenn_layers::InvalidId> for Error {
    fn from(e: wrenn_layers::InvalidId) -> Error {
        Error::InvalidLayerId {
            input: e.input,
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Error>();
    }

    #[test]
    fn clip_keeps_short_input_and_cuts_long_input() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(300);
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), 83);
        assert!(clipped.ends_with("..."));
    }

    #[test]
    fn schema_too_new_message_says_what_to_do() {
        let e = Error::SchemaTooNew {
            path: PathBuf::from("/var/lib/wrenn/state.lmdb"),
            found: 7,
            known: 2,
        };
        assert_eq!(
            e.to_string(),
            "/var/lib/wrenn/state.lmdb has schema version 7 but this wrenn-agent knows up \
             to 2: upgrade wrenn-agent or restore a backup"
        );
    }
}
