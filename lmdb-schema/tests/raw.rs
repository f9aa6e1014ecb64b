//! Files changed behind the store's back (through heed directly): records
//! from a newer program, damaged values and keys, a newer schema version.
//! Each must be a clear error, never a panic or a silent open.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};
use lmdb_schema::{Error, SandboxId, SlotId, Store, StoreOptions, FILE_NAME, SCHEMA_VERSION};

/// Writes `value` under `key` in database `db` of the store in `dir`
/// without going through the store. No store may be open on `dir`.
fn poke(dir: &Path, db: &str, key: &[u8], value: &[u8]) {
    let mut options = EnvOpenOptions::new();
    options.max_dbs(32).map_size(64 << 20);
    // SAFETY: NO_SUB_DIR only names the file layout the store uses.
    unsafe {
        options.flags(EnvFlags::NO_SUB_DIR);
    }
    // SAFETY: the test owns the temporary file and nothing else maps it.
    let env = unsafe { options.open(dir.join(FILE_NAME)) }.unwrap();
    let wtxn = env.write_txn().unwrap();
    let db: Database<Bytes, Bytes> = env
        .create_databases_and_commit(wtxn, |opener, wtxn| {
            opener
                .create_database(wtxn, Some(db))
                .map(CommitOrAbort::<_, ()>::Commit)
        })
        .unwrap()
        .unwrap_commit();
    let mut wtxn = env.write_txn().unwrap();
    db.put(&mut wtxn, key, value).unwrap();
    wtxn.commit().unwrap();
}

fn new_store(dir: &Path) {
    drop(Store::open(dir, StoreOptions::new()).unwrap());
}

fn id(text: &str) -> SandboxId {
    SandboxId::parse(text).unwrap()
}

#[test]
fn a_record_from_a_newer_program_says_to_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    poke(dir.path(), "sandboxes", b"sb-future", &[6, 0xde, 0xad]);

    let store = Store::open(dir.path(), StoreOptions::new()).unwrap();
    let err = store
        .read(|r| r.sandboxes().get(&id("sb-future")))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnknownRecordVersion {
                database: "sandboxes",
                version: 6,
                known: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "record sb-future in database `sandboxes` has record version 6 but this wrenn-agent \
         knows up to 5: upgrade wrenn-agent"
    );
    // Iteration reports it as an error item instead of stopping or panicking.
    let items = store
        .read(|r| {
            Ok(r.sandboxes()
                .iter()?
                .map(|item| item.is_ok())
                .collect::<Vec<_>>())
        })
        .unwrap();
    assert_eq!(items, [false]);
    // Presence checks do not decode.
    assert!(store
        .read(|r| r.sandboxes().contains(&id("sb-future")))
        .unwrap());
}

#[test]
fn damaged_values_are_decode_errors_naming_database_and_key() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    poke(dir.path(), "sandboxes", b"sb-empty", &[]);
    poke(dir.path(), "sandboxes", b"sb-junk", &[1, 0xff, 0xff, 0xff]);
    poke(dir.path(), "templates", b"base", &[1]);
    poke(dir.path(), "events", &1u64.to_be_bytes(), &[0]);

    let store = Store::open(dir.path(), StoreOptions::new()).unwrap();
    store
        .read(|r| {
            let err = r.sandboxes().get(&id("sb-empty")).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::EmptyRecord {
                        database: "sandboxes",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err
                .to_string()
                .starts_with("record sb-empty in database `sandboxes` is empty"));

            let err = r.sandboxes().get(&id("sb-junk")).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptRecord {
                        database: "sandboxes",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string()
                    .contains("record sb-junk in database `sandboxes`"),
                "{err}"
            );
            assert!(err.to_string().contains("restore a backup"), "{err}");

            let name = lmdb_schema::TemplateName::parse("base").unwrap();
            let err = r.templates().get(&name).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptRecord {
                        database: "templates",
                        ..
                    }
                ),
                "{err}"
            );

            let err = r.events().iter()?.next().unwrap().unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptRecord {
                        database: "events",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains("record 1 in database `events`"),
                "{err}"
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn damaged_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    poke(
        dir.path(),
        "slots",
        &[0, 0, 1],
        &[1, 4, b's', b'b', b'-', b'a', 0],
    );
    poke(dir.path(), "sandboxes", b"not-an-id", &[1]);

    let store = Store::open(dir.path(), StoreOptions::new()).unwrap();
    store
        .read(|r| {
            let err = r.slots().first_free(0..1000).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptKey {
                        database: "slots",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("3 bytes instead of 4"), "{err}");

            let err = r.slots().iter()?.next().unwrap().unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptKey {
                        database: "slots",
                        ..
                    }
                ),
                "{err}"
            );

            let err = r.sandboxes().iter()?.next().unwrap().unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptKey {
                        database: "sandboxes",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("\"not-an-id\""), "{err}");
            Ok(())
        })
        .unwrap();
    // Reading a good key of the same database still works.
    assert_eq!(store.read(|r| r.slots().get(&SlotId(5))).unwrap(), None);
}

#[test]
fn a_newer_schema_version_is_refused_and_the_file_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    poke(dir.path(), "meta", b"schema_version", &[1, 7]);
    let file = dir.path().join(FILE_NAME);
    let before = std::fs::read(&file).unwrap();

    let err = Store::open(dir.path(), StoreOptions::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SchemaTooNew {
                found: 7,
                known: SCHEMA_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{} has schema version 7 but this wrenn-agent knows up to {SCHEMA_VERSION}: \
             upgrade wrenn-agent or restore a backup",
            file.display()
        )
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the file was not written"
    );
}

#[test]
fn a_damaged_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    poke(dir.path(), "meta", b"schema_version", &[1]);
    let err = Store::open(dir.path(), StoreOptions::new()).unwrap_err();
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
    assert!(err.to_string().contains("schema_version"), "{err}");
}

#[test]
fn a_file_that_is_not_lmdb_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 64 * 1024]).unwrap();
    let err = Store::open(dir.path(), StoreOptions::new()).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("state.lmdb"), "{err}");
}
