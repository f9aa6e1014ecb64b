//! The schema: every database, the schema version and the migrations.
//!
//! The `databases!` declaration below is the list of databases. A plain
//! key → record database (such as a future `layers` or `keys`) is one line
//! there plus its record type in `records/`; the line gives it a handle,
//! its creation at open time and the `txn.<name>()` accessors. `meta` and
//! `events` are fixed members with their own views.
//!
//! The schema version covers what records cannot say about themselves:
//! which databases exist and how keys are laid out. Opening a file runs the
//! migrations from its version up to [`SCHEMA_VERSION`] in one write
//! transaction that also stores the new version.
//!
//! Not for record layouts: a record's own version byte covers those (see
//! `codec`).

use std::path::Path;

use heed::{CommitOrAbort, WithoutTls};

use crate::codec::Record;
use crate::error::{Error, Result};
use crate::meta::{self, MetaKey};
use crate::records::{EventRecord, LayerRecord, SandboxRecord, SlotRecord, TemplateRecord};
use crate::store::Store;
use crate::txn::{Db, ReadTxn, Table, TableMut, WriteTxn};

/// The schema version this program writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = 2;

/// One migration step: turns a file of version N into version N + 1 inside
/// the open-time write transaction. It must not have effects outside that
/// transaction: the transaction may be aborted and the step run again.
pub(crate) type Migration = fn(&mut WriteTxn<'_>) -> Result<()>;

/// `MIGRATIONS[i]` turns version `i + 1` into version `i + 2`.
const MIGRATIONS: &[Migration] = &[v1_to_v2];

/// Version 2 added the `layers` database, which is created empty at open.
fn v1_to_v2(_: &mut WriteTxn<'_>) -> Result<()> {
    Ok(())
}

// A new schema version without its migration step does not build.
const _: () = assert!(MIGRATIONS.len() + 1 == SCHEMA_VERSION as usize);

/// A schema version with the steps that lead to it. Tests use their own.
pub(crate) struct Schema {
    pub(crate) version: u32,
    pub(crate) migrations: &'static [Migration],
}

/// The schema of this program.
pub(crate) const CURRENT: Schema = Schema {
    version: SCHEMA_VERSION,
    migrations: MIGRATIONS,
};

/// Declares the plain key → record databases; see the module comment.
macro_rules! databases {
    ($($(#[$doc:meta])* $name:ident: $record:ty,)*) => {
        /// A handle for every database.
        pub(crate) struct Databases<'e> {
            pub(crate) meta: Db<'e>,
            pub(crate) events: Db<'e>,
            $(pub(crate) $name: Db<'e>,)*
        }

        impl<'e> Databases<'e> {
            /// The names of every database.
            #[cfg(test)]
            pub(crate) const NAMES: &'static [&'static str] = &[
                "meta",
                <EventRecord as Record>::DATABASE,
                $(<$record as Record>::DATABASE,)*
            ];

            /// Creates (or opens) every database in `wtxn`.
            fn create<T>(
                opener: &heed::DatabaseOpener<'e, T>,
                wtxn: &mut heed::RwTxn<'e>,
            ) -> heed::Result<Self> {
                Ok(Databases {
                    meta: opener.create_database(wtxn, Some("meta"))?,
                    events: opener
                        .create_database(wtxn, Some(<EventRecord as Record>::DATABASE))?,
                    $($name: opener
                        .create_database(wtxn, Some(<$record as Record>::DATABASE))?,)*
                })
            }

            /// Pairs of accessor name and database name, which must be equal.
            #[cfg(test)]
            pub(crate) fn accessors() -> Vec<(&'static str, &'static str)> {
                vec![$((stringify!($name), <$record as Record>::DATABASE),)*]
            }
        }

        impl heed::OnCommit for Databases<'_> {
            type Committed = Databases<'static>;

            fn on_commit(self, token: &heed::CommitToken) -> Databases<'static> {
                Databases {
                    meta: self.meta.on_commit(token),
                    events: self.events.on_commit(token),
                    $($name: self.$name.on_commit(token),)*
                }
            }
        }

        impl<'s> ReadTxn<'s> {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> Table<'_, $record> {
                    Table::new(&self.txn, self.dbs.$name)
                }
            )*
        }

        impl<'s> WriteTxn<'s> {
            $(
                $(#[$doc])*
                pub fn $name(&mut self) -> TableMut<'_, 's, $record> {
                    let db = self.dbs.$name;
                    TableMut::new(self, db)
                }
            )*
        }
    };
}

databases! {
    /// The `sandboxes` database: [`SandboxId`](crate::SandboxId) → [`SandboxRecord`].
    sandboxes: SandboxRecord,
    /// The `templates` database: [`TemplateName`](crate::TemplateName) → [`TemplateRecord`].
    templates: TemplateRecord,
    /// The `slots` database: [`SlotId`](crate::SlotId) → [`SlotRecord`], one
    /// entry per allocated network slot.
    slots: SlotRecord,
    /// The `layers` database: [`LayerId`](crate::LayerId) → [`LayerRecord`],
    /// one entry per layer file of the snapshot store.
    layers: LayerRecord,
}

/// The schema version in the file, refusing one newer than `schema`'s.
fn stored_version(
    txn: &heed::RoTxn,
    meta_db: Db<'_>,
    path: &Path,
    schema: &Schema,
) -> Result<Option<u32>> {
    match meta::schema_version(txn, meta_db)? {
        Some(0) => Err(Error::CorruptRecord {
            database: "meta",
            key: MetaKey::SchemaVersion.to_string(),
            version: 1,
            reason: "schema version 0 does not exist".to_owned(),
        }),
        Some(found) if found > schema.version => Err(Error::SchemaTooNew {
            path: path.to_owned(),
            found,
            known: schema.version,
        }),
        found => Ok(found),
    }
}

/// Creates every database and checks the stored schema version. Nothing is
/// committed when the file is too new for `schema`.
pub(crate) fn create_databases(
    env: &heed::Env<WithoutTls>,
    path: &Path,
    schema: &Schema,
) -> Result<Databases<'static>> {
    let wtxn = env
        .write_txn()
        .map_err(|e| Error::lmdb("begin a write transaction", e))?;
    let outcome = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            let dbs = Databases::create(opener, wtxn)?;
            Ok::<_, heed::Error>(match stored_version(wtxn, dbs.meta, path, schema) {
                Ok(_) => CommitOrAbort::Commit(dbs),
                Err(e) => CommitOrAbort::Abort(e),
            })
        })
        .map_err(|e| Error::lmdb("create the databases", e))?;
    match outcome {
        CommitOrAbort::Commit(dbs) => Ok(dbs),
        CommitOrAbort::Abort(e) => Err(e),
    }
}

/// Brings the file to `schema.version`: stores it in a new file, runs the
/// missing steps on an older one. One write transaction.
pub(crate) fn migrate(store: &Store, schema: &Schema) -> Result<()> {
    store.write(|w| {
        let Some(found) = stored_version(&w.txn, w.dbs.meta, store.path(), schema)? else {
            return meta::set_schema_version(w, schema.version);
        };
        if found == schema.version {
            return Ok(());
        }
        for from in found..schema.version {
            let to = from + 1;
            let failed = |source: Error| Error::Migration {
                path: store.path().to_owned(),
                from,
                to,
                source: Box::new(source),
            };
            let step = usize::try_from(from - 1)
                .ok()
                .and_then(|i| schema.migrations.get(i))
                .ok_or_else(|| failed(Error::MissingMigration { from }))?;
            step(w).map_err(failed)?;
        }
        meta::set_schema_version(w, schema.version)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::StoreOptions;

    #[test]
    fn accessor_names_are_database_names() {
        for (accessor, database) in Databases::accessors() {
            assert_eq!(accessor, database);
        }
        let mut names = Databases::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            Databases::NAMES.len(),
            "duplicate database name"
        );
    }

    #[test]
    fn docs_describe_every_database() {
        let docs = include_str!("../../docs/state.md");
        for name in Databases::NAMES {
            assert!(
                docs.contains(&format!("### `{name}`")),
                "docs/state.md lacks `{name}`"
            );
        }
        assert!(docs.contains(&format!("Schema version: {SCHEMA_VERSION}.")));
    }

    fn open(dir: &Path, schema: &Schema) -> Result<Store> {
        Store::open_with_schema(dir, StoreOptions::new(), schema)
    }

    /// The schema of a program that knew only version 1.
    const V1: Schema = Schema {
        version: 1,
        migrations: &[],
    };

    static STEP_1: AtomicUsize = AtomicUsize::new(0);
    static STEP_2: AtomicUsize = AtomicUsize::new(0);

    fn step_1(w: &mut WriteTxn<'_>) -> Result<()> {
        STEP_1.fetch_add(1, Ordering::SeqCst);
        w.meta().set_setting("migrated-1", "yes")
    }

    fn step_2(w: &mut WriteTxn<'_>) -> Result<()> {
        STEP_2.fetch_add(1, Ordering::SeqCst);
        w.meta().set_setting("migrated-2", "yes")
    }

    const V3: Schema = Schema {
        version: 3,
        migrations: &[step_1, step_2],
    };

    #[test]
    fn migrations_run_once_from_an_older_version() {
        let dir = tempfile::tempdir().unwrap();
        // A file made by a program that knew schema version 1.
        let store = open(dir.path(), &V1).unwrap();
        store.write(|w| w.meta().set_setting("kept", "1")).unwrap();
        drop(store);

        let store = open(dir.path(), &V3).unwrap();
        assert_eq!(STEP_1.load(Ordering::SeqCst), 1);
        assert_eq!(STEP_2.load(Ordering::SeqCst), 1);
        store
            .read(|r| {
                let meta = r.meta();
                assert_eq!(meta.schema_version()?, Some(3));
                assert_eq!(meta.setting("migrated-1")?.as_deref(), Some("yes"));
                assert_eq!(meta.setting("migrated-2")?.as_deref(), Some("yes"));
                assert_eq!(meta.setting("kept")?.as_deref(), Some("1"));
                Ok(())
            })
            .unwrap();
        drop(store);

        // Reopening runs nothing.
        let store = open(dir.path(), &V3).unwrap();
        assert_eq!(STEP_1.load(Ordering::SeqCst), 1);
        assert_eq!(STEP_2.load(Ordering::SeqCst), 1);
        drop(store);

        // And the version 1 program now refuses the file.
        let err = open(dir.path(), &V1).err().unwrap();
        assert!(
            matches!(
                err,
                Error::SchemaTooNew {
                    found: 3,
                    known: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().ends_with(
                "state.lmdb has schema version 3 but this wrenn-agent knows up to 1: \
                 upgrade wrenn-agent or restore a backup"
            ),
            "{err}"
        );
    }

    static PARTIAL: AtomicUsize = AtomicUsize::new(0);

    fn partial_ok(w: &mut WriteTxn<'_>) -> Result<()> {
        PARTIAL.fetch_add(1, Ordering::SeqCst);
        w.meta().set_setting("half-done", "yes")
    }

    fn partial_fail(_: &mut WriteTxn<'_>) -> Result<()> {
        Err(Error::InvalidMeta {
            name: "test".into(),
            reason: "this step always fails".into(),
        })
    }

    #[test]
    fn a_failed_migration_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), &V1).unwrap());

        let failing = Schema {
            version: 3,
            migrations: &[partial_ok, partial_fail],
        };
        let err = open(dir.path(), &failing).err().unwrap();
        assert!(
            matches!(err, Error::Migration { from: 2, to: 3, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("from schema version 2 to 3"),
            "{err}"
        );
        assert!(err.to_string().contains("this step always fails"), "{err}");
        assert_eq!(PARTIAL.load(Ordering::SeqCst), 1);

        let store = open(dir.path(), &V1).unwrap();
        store
            .read(|r| {
                assert_eq!(r.meta().schema_version()?, Some(1));
                assert_eq!(r.meta().setting("half-done")?, None);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_new_file_gets_the_current_version_without_migrating() {
        let dir = tempfile::tempdir().unwrap();
        static NEVER: AtomicUsize = AtomicUsize::new(0);
        fn never(_: &mut WriteTxn<'_>) -> Result<()> {
            NEVER.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        let schema = Schema {
            version: 2,
            migrations: &[never],
        };
        let store = open(dir.path(), &schema).unwrap();
        assert_eq!(NEVER.load(Ordering::SeqCst), 0);
        let version = store.read(|r| r.meta().schema_version()).unwrap();
        assert_eq!(version, Some(2));
    }

    #[test]
    fn a_version_1_file_gets_the_layers_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), &V1).unwrap();
        store.write(|w| w.meta().set_setting("kept", "1")).unwrap();
        drop(store);

        let store = open(dir.path(), &CURRENT).unwrap();
        let record = crate::records::samples::layer();
        store
            .write(|w| w.layers().put(&record.id(), &record))
            .unwrap();
        // A layer record is stored under its own SHA-256 only.
        let err = store
            .write(|w| w.layers().put(&crate::LayerId([0; 32]), &record))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::KeyMismatch {
                    database: "layers",
                    ..
                }
            ),
            "{err}"
        );
        store
            .read(|r| {
                assert_eq!(r.meta().schema_version()?, Some(2));
                assert_eq!(r.meta().setting("kept")?.as_deref(), Some("1"));
                assert_eq!(r.layers().get(&record.id())?, Some(record.clone()));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn schema_version_zero_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), &CURRENT).unwrap();
        store.write(|w| meta::set_schema_version(w, 0)).unwrap();
        drop(store);
        let err = open(dir.path(), &CURRENT).err().unwrap();
        assert!(
            matches!(
                err,
                Error::CorruptRecord {
                    database: "meta",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("schema version 0 does not exist"));
    }
}
