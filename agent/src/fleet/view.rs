//! The fleet as gossip shows it: what each node publishes about itself
//! (its capacity and load, its sandboxes, its templates), read back for
//! placement, quotas and finding the node that holds a sandbox.
//!
//! Keys a node publishes, refreshed every second:
//! - `runtime`: `qemu/tcg`, `native/kvm`, ...
//! - `cap`: `{"vcpus", "memory_mb" (for sandboxes: total less the host's
//!   reserve), "max_running" (0: no limit)}`
//! - `load`: `{"running", "paused", "creating", "vcpus", "memory_mb"}` of
//!   the sandboxes that hold room
//! - `sbx:<id>`: `status|vcpus|memory_mb|owner` (owner `-`: none)
//! - `tpl:<name>`: `base|bytes|sha256` (the files' total size and the root
//!   file system's SHA-256, from the image's manifest.json), or
//!   `snapshot|bytes|vcpus|memory_mb|owner|base|digest` (the base image its
//!   disk rests on, and the digest of its bundle, `sandbox::bundle`)
//! - `drain`: `draining` or `drained` when the node takes no sandboxes
//!   (`api/drain.rs`), else empty

use std::collections::BTreeMap;
use std::sync::Arc;

use lmdb_schema::{SandboxRecord, SandboxStatus, TemplateRecord};
use serde::Deserialize;

use super::gossip::{Member, Publish};
use super::manifest::Quota;
use crate::sandbox::Manager;

/// One sandbox as its node publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxEntry {
    pub id: String,
    pub status: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub owner: Option<String>,
}

impl SandboxEntry {
    /// Whether it holds room on its node (anything but paused or error).
    fn runs(&self) -> bool {
        !matches!(self.status.as_str(), "paused" | "error" | "destroyed")
    }
}

/// The `sbx:<id>` value of a sandbox.
pub fn sandbox_value(record: &SandboxRecord) -> String {
    format!(
        "{}|{}|{}|{}",
        record.status.as_str(),
        record.vcpus,
        record.memory_mb,
        record.owner.as_deref().unwrap_or("-")
    )
}

fn parse_sandbox(id: &str, value: &str) -> Option<SandboxEntry> {
    let mut parts = value.split('|');
    let status = parts.next()?.to_owned();
    let vcpus = parts.next()?.parse().ok()?;
    let memory_mb = parts.next()?.parse().ok()?;
    let owner = match parts.next() {
        None | Some("-") => None,
        Some(owner) => Some(owner.to_owned()),
    };
    Some(SandboxEntry {
        id: id.to_owned(),
        status,
        vcpus,
        memory_mb,
        owner,
    })
}

/// A node's published capacity.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub max_running: u32,
}

/// A node's published load: the sandboxes that hold room on it.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Load {
    pub running: u32,
    pub paused: u32,
    pub creating: u32,
    pub vcpus: u64,
    pub memory_mb: u64,
}

impl Member {
    /// The sandboxes it published.
    pub fn sandboxes(&self) -> impl Iterator<Item = SandboxEntry> + '_ {
        self.published
            .iter()
            .filter_map(|(key, value)| parse_sandbox(key.strip_prefix("sbx:")?, value))
    }

    /// Its published entry for sandbox `id`.
    pub fn sandbox(&self, id: &str) -> Option<SandboxEntry> {
        parse_sandbox(id, self.published.get(&format!("sbx:{id}"))?)
    }

    /// Whether it has template `name` (a base image or a snapshot).
    pub fn has_template(&self, name: &str) -> bool {
        self.published.contains_key(&format!("tpl:{name}"))
    }

    /// `(vcpus, memory_mb)` of snapshot template `name`, if it has it.
    pub fn snapshot_shape(&self, name: &str) -> Option<(u32, u32)> {
        let value = self.published.get(&format!("tpl:{name}"))?;
        let mut parts = value.strip_prefix("snapshot|")?.split('|').skip(1);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    /// Fields of its `tpl:<name>` entry after `snapshot|`, when it has
    /// snapshot `name`.
    fn snapshot_fields(&self, name: &str) -> Option<Vec<&str>> {
        let value = self.published.get(&format!("tpl:{name}"))?;
        Some(value.strip_prefix("snapshot|")?.split('|').collect())
    }

    /// The digest it gossips for snapshot `name` (`Some(None)`: it has the
    /// snapshot and says none), `None` when it does not have it.
    pub fn snapshot_digest(&self, name: &str) -> Option<Option<String>> {
        let fields = self.snapshot_fields(name)?;
        Some(
            fields
                .get(5)
                .filter(|d| !d.is_empty())
                .map(|d| (*d).to_owned()),
        )
    }

    /// The owner of its snapshot `name` (`Some(None)`: a node key's).
    pub fn snapshot_owner(&self, name: &str) -> Option<Option<String>> {
        let fields = self.snapshot_fields(name)?;
        Some(
            fields
                .get(3)
                .filter(|o| **o != "-")
                .map(|o| (*o).to_owned()),
        )
    }

    /// The base image its snapshot `name` rests on, when it says.
    pub fn snapshot_base(&self, name: &str) -> Option<String> {
        let fields = self.snapshot_fields(name)?;
        fields
            .get(4)
            .filter(|b| !b.is_empty())
            .map(|b| (*b).to_owned())
    }

    /// The root file system SHA-256 of its base image `name`, when it has
    /// that image and its manifest says.
    pub fn base_sha256(&self, name: &str) -> Option<&str> {
        let value = self.published.get(&format!("tpl:{name}"))?;
        value
            .strip_prefix("base|")?
            .split('|')
            .nth(1)
            .filter(|s| !s.is_empty())
    }

    /// Its runtime's kind (`qemu`, `native`), from `runtime`.
    pub fn runtime_kind(&self) -> Option<&str> {
        let runtime = self.published.get("runtime")?;
        runtime.split('/').next()
    }

    pub fn capacity(&self) -> Capacity {
        self.json("cap")
    }

    pub fn load(&self) -> Load {
        self.json("load")
    }

    fn json<T: Default + for<'de> Deserialize<'de>>(&self, key: &str) -> T {
        self.published
            .get(key)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default()
    }

    pub fn is_live(&self) -> bool {
        self.state == "live"
    }

    /// Its drain state (`draining`, `drained`) when it takes no sandboxes.
    pub fn drain_state(&self) -> Option<&str> {
        self.published
            .get("drain")
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Why it cannot take one more sandbox of `memory_mb`, if it cannot.
    pub fn lacks_room(&self, memory_mb: u32) -> Option<String> {
        let (cap, load) = (self.capacity(), self.load());
        if cap.max_running > 0 && load.running >= cap.max_running {
            return Some(format!("runs {} sandboxes, its limit", load.running));
        }
        let free = cap.memory_mb.saturating_sub(load.memory_mb);
        (free < u64::from(memory_mb)).then(|| format!("has {free} MiB free"))
    }

    /// How much room it has left, for "least loaded first": free memory.
    pub fn free_memory_mb(&self) -> u64 {
        self.capacity()
            .memory_mb
            .saturating_sub(self.load().memory_mb)
    }
}

/// What one owner holds across the fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sandboxes that run (or start, or pause).
    pub sandboxes: u32,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub paused: u32,
    /// Bytes of the owner's snapshots.
    pub snapshot_bytes: u64,
}

impl Usage {
    fn add(&mut self, entry: &SandboxEntry) {
        if entry.runs() {
            self.sandboxes += 1;
            self.vcpus += u64::from(entry.vcpus);
            self.memory_mb += u64::from(entry.memory_mb);
        } else if entry.status == "paused" {
            self.paused += 1;
        }
    }

    /// What `owner` holds by the published state of `members`, leaving out
    /// node `skip` (whose own numbers the caller knows better), plus
    /// `local`, the records of that node.
    pub fn of_owner(
        members: &[Member],
        owner: &str,
        skip: &str,
        local: &[SandboxRecord],
        local_snapshots: &[TemplateRecord],
    ) -> Usage {
        let mut usage = Usage::default();
        for member in members.iter().filter(|m| m.name != skip) {
            for entry in member.sandboxes() {
                if entry.owner.as_deref() == Some(owner) {
                    usage.add(&entry);
                }
            }
            usage.snapshot_bytes += member
                .published
                .values()
                .filter_map(|v| {
                    let mut parts = v.strip_prefix("snapshot|")?.split('|');
                    let bytes: u64 = parts.next()?.parse().ok()?;
                    (parts.nth(2) == Some(owner)).then_some(bytes)
                })
                .sum::<u64>();
        }
        usage.snapshot_bytes += local_snapshots
            .iter()
            .filter(|t| t.owner.as_deref() == Some(owner))
            .map(|t| t.size_bytes)
            .sum::<u64>();
        for record in local
            .iter()
            .filter(|r| r.owner.as_deref() == Some(owner) && !r.status.is_terminal())
        {
            if let Some(entry) = parse_sandbox(record.id.as_str(), &sandbox_value(record)) {
                usage.add(&entry);
            }
        }
        usage
    }
}

/// A quota that one more sandbox would break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub resource: &'static str,
    pub limit: u64,
    pub used: u64,
    pub asked: u64,
}

/// What a caller asks for that a quota may refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// One more running sandbox of this size.
    Run { vcpus: u32, memory_mb: u32 },
    /// One more paused sandbox.
    Pause,
    /// One more snapshot (its size is known only once taken: refused when
    /// the owner's snapshots already fill the quota).
    Snapshot,
}

/// Whether `ask` fits in `quota` beside `usage`.
pub fn check_quota(quota: &Quota, usage: &Usage, ask: Ask) -> Result<(), OverQuota> {
    let checks = match ask {
        Ask::Run { vcpus, memory_mb } => vec![
            (
                "sandboxes",
                quota.sandboxes.map(u64::from),
                u64::from(usage.sandboxes),
                1,
            ),
            (
                "vcpus",
                quota.vcpus.map(u64::from),
                usage.vcpus,
                u64::from(vcpus),
            ),
            (
                "memory_mb",
                quota.memory_mb,
                usage.memory_mb,
                u64::from(memory_mb),
            ),
        ],
        Ask::Pause => vec![(
            "paused",
            quota.paused.map(u64::from),
            u64::from(usage.paused),
            1,
        )],
        Ask::Snapshot => vec![(
            "snapshot_bytes",
            quota.snapshot_bytes,
            usage.snapshot_bytes,
            1,
        )],
    };
    for (resource, limit, used, asked) in checks {
        if let Some(limit) = limit {
            if used + asked > limit {
                return Err(OverQuota {
                    resource,
                    limit,
                    used,
                    asked,
                });
            }
        }
    }
    Ok(())
}

/// Whether `labels` has every key/value of `wanted`.
pub fn labels_match(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What this node gossips about itself.
pub fn publisher(manager: &Arc<Manager>, runtime: String) -> Publish {
    let manager = Arc::clone(manager);
    Box::new(move || publish(&manager, &runtime))
}

fn publish(manager: &Manager, runtime: &str) -> Vec<(String, String)> {
    let capacity = manager.node().capacity();
    let node = manager.node();
    let limits = node.limits();
    let all = manager.list().unwrap_or_default();
    let holding: Vec<_> = all
        .iter()
        .filter(|r| {
            matches!(
                r.status,
                SandboxStatus::Creating
                    | SandboxStatus::Running
                    | SandboxStatus::Pausing
                    | SandboxStatus::Resuming
            )
        })
        .collect();
    let count = |status: SandboxStatus| all.iter().filter(|r| r.status == status).count();
    let load = serde_json::json!({
        "running": holding.len(),
        "paused": count(SandboxStatus::Paused),
        "creating": count(SandboxStatus::Creating),
        "vcpus": holding.iter().map(|r| u64::from(r.vcpus)).sum::<u64>(),
        "memory_mb": holding.iter().map(|r| u64::from(r.memory_mb)).sum::<u64>(),
    });
    let cap = serde_json::json!({
        "vcpus": capacity.vcpus,
        "memory_mb": capacity.memory_mb.saturating_sub(limits.host_reserved_memory_mb),
        "max_running": limits.max_running,
    });
    let mut keys = vec![
        ("runtime".to_owned(), runtime.to_owned()),
        ("cap".to_owned(), cap.to_string()),
        ("load".to_owned(), load.to_string()),
        // Always there ("" when it takes sandboxes), so that an undrain
        // overwrites it.
        ("drain".to_owned(), node.drain_state().unwrap_or_default()),
    ];
    keys.extend(
        all.iter()
            .filter(|r| !r.status.is_terminal() && !crate::sandbox::warm::is_warm_helper(r))
            .map(|r| (format!("sbx:{}", r.id), sandbox_value(r))),
    );
    let templates = node.templates();
    keys.extend(templates.list().into_iter().map(|name| {
        let value = base_value(&templates.manifest_path(&name));
        (format!("tpl:{name}"), value)
    }));
    if let Ok(snapshots) = manager.snapshots().list() {
        keys.extend(
            snapshots
                .iter()
                .map(|s| (format!("tpl:{}", s.record.name), snapshot_value(&s.record))),
        );
    }
    keys
}

/// The `tpl:` value of snapshot `r`:
/// `snapshot|bytes|vcpus|memory_mb|owner|base|digest`.
pub fn snapshot_value(r: &lmdb_schema::TemplateRecord) -> String {
    format!(
        "snapshot|{}|{}|{}|{}|{}|{}",
        r.size_bytes,
        r.vcpus.unwrap_or(1),
        r.memory_mb.unwrap_or(512),
        r.owner.as_deref().unwrap_or("-"),
        crate::sandbox::bundle::base_of(r).unwrap_or_default(),
        r.sha256.as_deref().unwrap_or_default(),
    )
}

/// The `tpl:` value of a base image: `base|bytes|sha256` from its
/// manifest.json (`files`: sizes and checksums, written by `make image`);
/// `base||` when the manifest says nothing.
fn base_value(manifest: &std::path::Path) -> String {
    let manifest: serde_json::Value = std::fs::read(manifest)
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default();
    let files = manifest["files"].as_object();
    let bytes: u64 = files
        .map(|f| f.values().filter_map(|v| v["size"].as_u64()).sum())
        .unwrap_or(0);
    let rootfs = files
        .and_then(|f| f.iter().find(|(name, _)| name.starts_with("rootfs")))
        .and_then(|(_, v)| v["sha256"].as_str())
        .unwrap_or_default();
    format!("base|{bytes}|{rootfs}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, published: &[(&str, &str)]) -> Member {
        Member {
            name: name.into(),
            api: String::new(),
            gossip: String::new(),
            labels: BTreeMap::new(),
            state: "live",
            published: published
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn usage_counts_an_owners_sandboxes_on_every_node() {
        let members = [
            member(
                "n1",
                &[
                    ("sbx:sb-a", "running|1|512|team-a"),
                    ("sbx:sb-b", "paused|2|1024|team-a"),
                    ("tpl:snap", "snapshot|4096|1|512|team-a"),
                    ("tpl:other", "snapshot|9999|1|512|team-b"),
                ],
            ),
            member(
                "n2",
                &[
                    ("sbx:sb-c", "running|2|256|team-a"),
                    ("sbx:sb-d", "running|1|512|-"),
                ],
            ),
        ];
        let usage = Usage::of_owner(&members, "team-a", "n9", &[], &[]);
        assert_eq!(
            usage,
            Usage {
                sandboxes: 2,
                vcpus: 3,
                memory_mb: 768,
                paused: 1,
                snapshot_bytes: 4096,
            }
        );
        // The node's own figures replace what it gossiped.
        let usage = Usage::of_owner(&members, "team-a", "n1", &[], &[]);
        assert_eq!(usage.sandboxes, 1);
    }

    #[test]
    fn quotas_refuse_the_one_too_many() {
        let quota = Quota {
            sandboxes: Some(2),
            memory_mb: Some(2048),
            ..Quota::default()
        };
        let mut usage = Usage {
            sandboxes: 1,
            memory_mb: 512,
            ..Usage::default()
        };
        let run = |memory_mb| Ask::Run {
            vcpus: 1,
            memory_mb,
        };
        assert!(check_quota(&quota, &usage, run(512)).is_ok());
        usage.sandboxes = 2;
        let over = check_quota(&quota, &usage, run(512)).unwrap_err();
        assert_eq!((over.resource, over.limit, over.used), ("sandboxes", 2, 2));
        usage.sandboxes = 0;
        let over = check_quota(&quota, &usage, run(2000)).unwrap_err();
        assert_eq!(over.resource, "memory_mb");
        let quota = Quota {
            paused: Some(1),
            snapshot_bytes: Some(100),
            ..Quota::default()
        };
        usage.paused = 1;
        assert_eq!(
            check_quota(&quota, &usage, Ask::Pause)
                .unwrap_err()
                .resource,
            "paused"
        );
        usage.snapshot_bytes = 99;
        assert!(check_quota(&quota, &usage, Ask::Snapshot).is_ok());
        usage.snapshot_bytes = 100;
        assert!(check_quota(&quota, &usage, Ask::Snapshot).is_err());
    }

    #[test]
    fn room_and_templates_from_what_a_node_publishes() {
        let full = member(
            "n1",
            &[
                ("cap", r#"{"vcpus":2,"memory_mb":1000,"max_running":1}"#),
                ("load", r#"{"running":1,"memory_mb":512}"#),
                ("tpl:base", "base|100|ab"),
                ("tpl:snap", "snapshot|4096|2|768|-"),
            ],
        );
        assert!(full.lacks_room(128).unwrap().contains("limit"));
        assert!(full.has_template("base") && !full.has_template("other"));
        assert_eq!(full.snapshot_shape("snap"), Some((2, 768)));
        let roomy = member("n2", &[("cap", r#"{"vcpus":2,"memory_mb":1000}"#)]);
        assert_eq!(roomy.lacks_room(1000), None);
        assert!(roomy.lacks_room(1001).is_some());
    }
}
