//! The store on real LMDB files in temporary directories: records, keys,
//! events, slots, meta, transactions, map growth, concurrency, reopening.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use lmdb_schema::{
    DiskFormat, Error, EventRecord, EventSeq, RuntimeKind, SandboxId, SandboxRecord, SandboxStatus,
    SlotId, SlotRecord, Store, StoreOptions, TemplateKind, TemplateName, TemplateRecord,
    TimeoutAction, VmmProcess, FILE_NAME, SCHEMA_VERSION,
};

fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::new()).unwrap()
}

fn id(text: &str) -> SandboxId {
    SandboxId::parse(text).unwrap()
}

fn sandbox(id_text: &str) -> SandboxRecord {
    SandboxRecord {
        id: id(id_text),
        status: SandboxStatus::Creating,
        template: TemplateName::parse("base").unwrap(),
        vcpus: 1,
        memory_mb: 256,
        metadata: BTreeMap::from([("team".to_owned(), "infra".to_owned())]),
        env: BTreeMap::new(),
        internet: false,
        created_at_ms: 1,
        expires_at_ms: None,
        timeout_action: TimeoutAction::Kill,
        slot: None,
        runtime: RuntimeKind::Qemu,
        vmm: Some(VmmProcess {
            pid: 7,
            start_time_ticks: 99,
            control_socket: "/run/x.sock".to_owned(),
        }),
        envd_token: None,
        error: Some("none yet".to_owned()),
        updated_at_ms: 2,
        memory_header: None,
        vm_state_version: None,
        idle_timeout_s: None,
        last_active_ms: 1,
        owner: None,
    }
}

fn template(name: &str) -> TemplateRecord {
    TemplateRecord {
        name: TemplateName::parse(name).unwrap(),
        kind: TemplateKind::Base,
        vcpus: None,
        memory_mb: Some(512),
        kernel: "k".to_owned(),
        initramfs: "i".to_owned(),
        rootfs: "r".to_owned(),
        disk_format: DiskFormat::Raw,
        runtime: None,
        size_bytes: 10,
        sha256: None,
        parent_sandbox: None,
        created_at_ms: 3,
        memory_header: None,
        vm_state: None,
        disk_base: None,
        envd_token: None,
        vm_state_version: None,
        owner: None,
    }
}

fn event(n: u64) -> EventRecord {
    EventRecord {
        at_ms: n,
        sandbox: None,
        kind: "test".to_owned(),
        detail: format!("event {n}"),
    }
}

#[test]
fn new_file_has_the_current_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.path(), dir.path().join(FILE_NAME));
    assert!(store.path().is_file(), "a single file, not a directory");
    let version = store.read(|r| r.meta().schema_version()).unwrap();
    assert_eq!(version, Some(SCHEMA_VERSION));
}

#[test]
fn creates_missing_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/wrenn");
    let store = open(&nested);
    assert!(store.path().starts_with(&nested));
}

#[test]
fn every_record_type_round_trips_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let seq = store
        .write(|w| {
            w.sandboxes().put(&id("sb-one"), &sandbox("sb-one"))?;
            w.templates()
                .put(&TemplateName::parse("base").unwrap(), &template("base"))?;
            w.slots().put(
                &SlotId(4),
                &SlotRecord {
                    sandbox: id("sb-one"),
                    allocated_at_ms: 5,
                },
            )?;
            w.meta().set_node_id("node-a")?;
            w.meta().set_setting("log.level", "debug")?;
            w.events().append(&event(1))
        })
        .unwrap();
    assert_eq!(seq, EventSeq(1));
    drop(store);

    let store = open(dir.path());
    store
        .read(|r| {
            assert_eq!(r.sandboxes().get(&id("sb-one"))?, Some(sandbox("sb-one")));
            assert_eq!(r.sandboxes().get(&id("sb-two"))?, None);
            assert_eq!(
                r.templates().get(&TemplateName::parse("base").unwrap())?,
                Some(template("base"))
            );
            assert_eq!(
                r.slots().get(&SlotId(4))?,
                Some(SlotRecord {
                    sandbox: id("sb-one"),
                    allocated_at_ms: 5
                })
            );
            assert_eq!(r.events().get(EventSeq(1))?, Some(event(1)));
            assert_eq!(r.meta().node_id()?.as_deref(), Some("node-a"));
            assert_eq!(
                r.meta().settings()?,
                BTreeMap::from([("log.level".to_owned(), "debug".to_owned())])
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn put_delete_iterate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(|w| {
            let mut table = w.sandboxes();
            for name in ["sb-c", "sb-a", "sb-b"] {
                table.put(&id(name), &sandbox(name))?;
            }
            assert_eq!(table.len()?, 3);
            assert!(table.contains(&id("sb-b"))?);
            assert!(table.delete(&id("sb-b"))?);
            assert!(!table.delete(&id("sb-b"))?);
            // Reads in a write transaction see its own writes.
            assert_eq!(table.get(&id("sb-b"))?, None);
            Ok(())
        })
        .unwrap();
    let ids = store
        .read(|r| {
            r.sandboxes()
                .iter()?
                .map(|entry| {
                    entry.map(|(key, record)| {
                        assert_eq!(key, record.id);
                        key.to_string()
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert_eq!(ids, ["sb-a", "sb-c"]);
}

#[test]
fn a_record_must_be_stored_under_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = store
        .write(|w| w.sandboxes().put(&id("sb-a"), &sandbox("sb-b")))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyMismatch {
                database: "sandboxes",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("\"sb-b\" cannot be written under key \"sb-a\""),
        "{err}"
    );
    let err = store
        .write(|w| {
            w.templates()
                .put(&TemplateName::parse("x").unwrap(), &template("y"))
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyMismatch {
                database: "templates",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_error_from_the_closure_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = store
        .write(|w| {
            w.sandboxes().put(&id("sb-a"), &sandbox("sb-a"))?;
            SandboxId::parse("bad")
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSandboxId { .. }));
    assert_eq!(store.read(|r| r.sandboxes().len()).unwrap(), 0);
}

#[derive(Debug)]
enum AgentError {
    NotRunning,
    Store(Error),
}

impl From<Error> for AgentError {
    fn from(e: Error) -> Self {
        AgentError::Store(e)
    }
}

#[test]
fn write_with_lets_the_caller_refuse_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(|w| w.sandboxes().put(&id("sb-a"), &sandbox("sb-a")))
        .unwrap();
    let result = store.write_with(|w| {
        let mut record = w
            .sandboxes()
            .get(&id("sb-a"))?
            .ok_or(AgentError::NotRunning)?;
        record.set_status(SandboxStatus::Pausing, 10);
        w.sandboxes().put(&id("sb-a"), &record)?;
        if record.status != SandboxStatus::Running {
            return Err(AgentError::NotRunning);
        }
        Ok(())
    });
    assert!(matches!(result, Err(AgentError::NotRunning)));
    let status = store
        .read(|r| Ok(r.sandboxes().get(&id("sb-a"))?.map(|s| s.status)))
        .unwrap();
    assert_eq!(
        status,
        Some(SandboxStatus::Creating),
        "the put was rolled back"
    );
    let store_err = store.write_with(|w| -> Result<(), AgentError> {
        w.meta().set_setting("BAD", "x")?;
        Ok(())
    });
    assert!(matches!(
        store_err,
        Err(AgentError::Store(Error::InvalidMeta { .. }))
    ));
}

#[test]
fn slots_iterate_numerically_and_first_free_finds_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(
        store.read(|r| r.slots().first_free(0..4)).unwrap(),
        Some(SlotId(0))
    );
    // Numbers whose little-endian bytes would sort differently.
    let taken = [256u32, 0, 1, 2, 65_536, 255, 4];
    store
        .write(|w| {
            for n in taken {
                w.slots().put(
                    &SlotId(n),
                    &SlotRecord {
                        sandbox: id("sb-a"),
                        allocated_at_ms: u64::from(n),
                    },
                )?;
            }
            Ok(())
        })
        .unwrap();
    store
        .read(|r| {
            let order: Vec<u32> = r
                .slots()
                .iter()?
                .map(|entry| entry.map(|(slot, _)| slot.0))
                .collect::<Result<_, _>>()?;
            assert_eq!(order, [0, 1, 2, 4, 255, 256, 65_536]);
            let slots = r.slots();
            assert_eq!(slots.first_free(0..1000)?, Some(SlotId(3)));
            assert_eq!(slots.first_free(0..3)?, None);
            assert_eq!(slots.first_free(4..6)?, Some(SlotId(5)));
            assert_eq!(slots.first_free(255..257)?, None);
            assert_eq!(slots.first_free(255..300)?, Some(SlotId(257)));
            assert_eq!(slots.first_free(7..7)?, None);
            assert_eq!(
                slots.first_free(u32::MAX - 1..u32::MAX)?,
                Some(SlotId(u32::MAX - 1))
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn slot_allocation_in_one_write_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                (0..8)
                    .map(|i| {
                        let owner = id(&format!("sb-t{t}i{i}"));
                        store
                            .write(|w| {
                                let slot = w.slots().first_free(0..64)?.expect("a free slot");
                                let record = SlotRecord {
                                    sandbox: owner.clone(),
                                    allocated_at_ms: 0,
                                };
                                w.slots().put(&slot, &record)?;
                                Ok(slot)
                            })
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .map(|slot| slot.0)
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..32).collect::<Vec<_>>(), "no slot handed out twice");
}

#[test]
fn events_append_read_after_and_trim() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.read(|r| r.events().last_seq()).unwrap(), None);
    // More than 255 so that ordering crosses a byte boundary.
    let seqs = store
        .write(|w| {
            (1..=300)
                .map(|n| w.events().append(&event(n)))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert_eq!(seqs.first(), Some(&EventSeq(1)));
    assert_eq!(seqs.last(), Some(&EventSeq(300)));

    store
        .read(|r| {
            let events = r.events();
            let all: Vec<u64> = events
                .iter()?
                .map(|e| {
                    e.map(|(seq, record)| {
                        assert_eq!(record.at_ms, seq.0);
                        seq.0
                    })
                })
                .collect::<Result<_, _>>()?;
            assert_eq!(all, (1..=300).collect::<Vec<_>>());
            let after: Vec<u64> = events
                .after(EventSeq(297))?
                .map(|e| e.map(|(seq, _)| seq.0))
                .collect::<Result<_, _>>()?;
            assert_eq!(after, [298, 299, 300]);
            assert_eq!(events.after(EventSeq(300))?.count(), 0);
            assert_eq!(events.after(EventSeq(0))?.count(), 300);
            assert_eq!(events.last_seq()?, Some(EventSeq(300)));
            Ok(())
        })
        .unwrap();

    // Keep the newest 10.
    let removed = store
        .write(|w| w.events().trim_before(EventSeq(291)))
        .unwrap();
    assert_eq!(removed, 290);
    store
        .read(|r| {
            assert_eq!(r.events().len()?, 10);
            let first = r.events().iter()?.next().transpose()?.map(|(seq, _)| seq);
            assert_eq!(first, Some(EventSeq(291)));
            Ok(())
        })
        .unwrap();

    // Trimming everything does not make numbers repeat, even after reopening.
    store
        .write(|w| w.events().trim_before(EventSeq(u64::MAX)))
        .unwrap();
    drop(store);
    let store = open(dir.path());
    let next = store
        .write(|w| {
            assert!(w.events().is_empty()?);
            w.events().append(&event(301))
        })
        .unwrap();
    assert_eq!(next, EventSeq(301));
}

#[test]
fn meta_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(|w| {
            let mut meta = w.meta();
            meta.set_setting("a", "1")?;
            meta.set_setting("b", "")?;
            assert!(meta.remove_setting("a")?);
            assert!(!meta.remove_setting("a")?);
            assert_eq!(meta.setting("b")?.as_deref(), Some(""));
            Ok(())
        })
        .unwrap();
    let too_long = "x".repeat(lmdb_schema::MAX_SETTING_LEN + 1);
    let err = store
        .write(|w| w.meta().set_setting("big", &too_long))
        .unwrap_err();
    assert!(err.to_string().contains("must be 0 to 4096 bytes"), "{err}");
    let err = store.write(|w| w.meta().set_node_id("")).unwrap_err();
    assert!(matches!(err, Error::InvalidMeta { .. }), "{err}");
    let err = store.read(|r| r.meta().setting("Not/Valid")).unwrap_err();
    assert!(
        err.to_string()
            .contains("a setting name is 1 to 64 characters"),
        "{err}"
    );
}

#[test]
fn the_map_grows_when_writes_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::new().map_size(1 << 20);
    let store = Store::open(dir.path(), options).unwrap();
    let start = store.map_size();
    assert_eq!(start, 1 << 20);

    // Each record is about 4 KiB: 2 MiB over 4 transactions, then, in a
    // single transaction, as many bytes as the whole map held at that point.
    let big = "x".repeat(4000);
    let record = |n: usize| {
        let mut r = sandbox(&format!("sb-n{n}"));
        r.env.insert("BIG".to_owned(), big.clone());
        r
    };
    for batch in 0..4 {
        store
            .write(|w| {
                for n in batch * 128..(batch + 1) * 128 {
                    w.sandboxes().put(&id(&format!("sb-n{n}")), &record(n))?;
                }
                Ok(())
            })
            .unwrap();
    }
    let before = store.map_size();
    assert!(before > start, "the batches grew the map");
    let total = 512 + before / 4096;
    let mut runs = 0;
    store
        .write(|w| {
            runs += 1;
            for n in 512..total {
                w.sandboxes().put(&id(&format!("sb-n{n}")), &record(n))?;
            }
            Ok(())
        })
        .unwrap();
    assert!(runs > 1, "the single big write needed a bigger map");
    let grown = store.map_size();
    assert!(grown >= 2 * before, "map is {grown} bytes");
    assert!(grown.is_power_of_two(), "doubled from 1 MiB: {grown}");
    drop(store);

    let file_len = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len();
    assert!(file_len > before as u64, "file is {file_len} bytes");

    let store = Store::open(dir.path(), options).unwrap();
    store
        .read(|r| {
            assert_eq!(r.sandboxes().len()?, total as u64);
            assert_eq!(
                r.sandboxes().get(&id(&format!("sb-n{}", total - 1)))?,
                Some(record(total - 1))
            );
            assert_eq!(r.sandboxes().get(&id("sb-n0"))?, Some(record(0)));
            Ok(())
        })
        .unwrap();
    // Reopened with room to spare: the map is at least twice the file.
    assert!(store.map_size() as u64 >= 2 * file_len);
}

#[test]
fn the_map_stops_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::new().map_size(1 << 20).max_map_size(2 << 20);
    let store = Store::open(dir.path(), options).unwrap();
    let big = "y".repeat(100_000);
    let err = store
        .write(|w| {
            for n in 0..40 {
                w.meta().set_setting(&format!("s{n}"), &big[..4000])?;
                let mut record = sandbox(&format!("sb-m{n}"));
                record.env.insert("BIG".to_owned(), big.clone());
                w.sandboxes().put(&record.id.clone(), &record)?;
            }
            Ok(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::MapLimit { .. }), "{err}");
    assert!(
        err.to_string().contains("raise StoreOptions::max_map_size"),
        "{err}"
    );
    assert_eq!(store.map_size(), 2 << 20);
    // The store still works for writes that fit.
    store
        .write(|w| w.sandboxes().put(&id("sb-small"), &sandbox("sb-small")))
        .unwrap();
    assert_eq!(store.read(|r| r.sandboxes().len()).unwrap(), 1);
}

#[test]
fn readers_run_while_a_writer_writes_and_grows_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::new().map_size(1 << 20);
    let store = Arc::new(Store::open(dir.path(), options).unwrap());
    store
        .write(|w| w.sandboxes().put(&id("sb-fixed"), &sandbox("sb-fixed")))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    // How many events the writer has committed: `write` has returned.
    let committed = Arc::new(AtomicU64::new(0));

    let readers: Vec<_> = (0..3)
        .map(|_| {
            let store = Arc::clone(&store);
            let done = Arc::clone(&done);
            let committed = Arc::clone(&committed);
            thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::SeqCst) || reads == 0 {
                    let before = committed.load(Ordering::SeqCst);
                    let (fixed, newest) = store
                        .read(|r| {
                            let fixed = r.sandboxes().get(&id("sb-fixed"))?;
                            let count = r.events().len()?;
                            let newest = r.events().last_seq()?.map_or(0, |s| s.0);
                            // A snapshot is consistent: every event up to the
                            // newest is there.
                            assert_eq!(count, newest);
                            Ok((fixed, newest))
                        })
                        .unwrap();
                    assert_eq!(fixed, Some(sandbox("sb-fixed")));
                    // A read sees every write that returned before it began.
                    // (It may also see one still committing, so two reads in
                    // a row are not promised to be in order: see Store::read.)
                    assert!(newest >= before, "read {newest} after {before} committed");
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let detail = "z".repeat(2000);
    for batch in 0..40u64 {
        store
            .write(|w| {
                for n in 0..100 {
                    let mut e = event(batch * 100 + n);
                    e.detail.clone_from(&detail);
                    w.events().append(&e)?;
                }
                Ok(())
            })
            .unwrap();
        committed.store((batch + 1) * 100, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert!(store.map_size() > 1 << 20, "the map grew during the test");
    assert_eq!(store.read(|r| r.events().len()).unwrap(), 4000);
}

#[test]
fn a_second_open_in_one_process_fails_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = Store::open(dir.path(), StoreOptions::new()).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("already open"), "{err}");
    drop(store);
    open(dir.path());
}

#[test]
fn backups_open_as_stores() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(|w| w.sandboxes().put(&id("sb-a"), &sandbox("sb-a")))
        .unwrap();
    let backup_dir = dir.path().join("backup");
    std::fs::create_dir(&backup_dir).unwrap();
    let backup = backup_dir.join(FILE_NAME);
    store.backup_to(&backup).unwrap();
    // An existing file is never overwritten.
    let err = store.backup_to(&backup).unwrap_err();
    assert!(matches!(err, Error::Backup { .. }), "{err}");

    let copy = open(&backup_dir);
    let record = copy.read(|r| r.sandboxes().get(&id("sb-a"))).unwrap();
    assert_eq!(record, Some(sandbox("sb-a")));
}
