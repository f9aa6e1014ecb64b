//! Warm templates: a base template whose `manifest.json` declares a `warm`
//! object, for example
//!
//! ```json
//! "warm": {"prepare": ["/opt/wrenn/jupyter/bin/python", "/opt/wrenn/warm-kernel.py"],
//!          "timeout_s": 1200, "vcpus": 2, "memory_mb": 1024}
//! ```
//!
//! is warmed by the node in the background ([`start`]): it boots one helper
//! sandbox of the template (`vcpus` and `memory_mb` optional, else the
//! create defaults), runs `prepare` in it through envd as `exec` does
//! (`WRENN_WARM_TIMEOUT_S` set to `timeout_s`), and when that exits 0 pauses
//! the helper, snapshots it as `<template>.warm` and destroys it. The
//! snapshot record's `sha256` holds the manifest's `rootfs.ext4` SHA-256: the
//! identity of the image it was made from.
//!
//! From then on [`Manager::create`] of the template restores the warm
//! snapshot instead of booting cold, as long as that identity matches the
//! manifest and the request leaves `vcpus` and `memory_mb` out (or asks for
//! the snapshot's). The record of such a sandbox names the snapshot
//! (`code-runner-beta.warm`) as its template: pause, resume, snapshots of it
//! and the in-use checks all go by that name ([`warm_base_of`] gives the base
//! name back). Until the snapshot is ready, when the image changed, or when
//! `[templates] warm = false`, creates boot cold.
//!
//! A changed image: the outdated warm snapshot is deleted (once no sandbox
//! uses it) and a new one made. A failed warm-up is logged with its reason,
//! shown by [`Manager::warm_state`] and retried after 1, 2, 4, ... minutes
//! (at most an hour apart); it never stops the node. Names ending in
//! `.warm` are reserved: users cannot take snapshots under them, nor delete
//! them while warm-up is on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmdb_schema::{SandboxRecord, TemplateName, TemplateRecord, TimeoutAction};
use serde::Deserialize;
use serde_json::json;

use super::error::SandboxError;
use super::manager::Manager;
use super::snapshots::SnapshotRequest;
use super::spec::CreateRequest;

/// What a warm snapshot's name ends in.
pub const WARM_SUFFIX: &str = ".warm";
/// The metadata key that marks a helper sandbox, with the base template's
/// name as its value. Reserved: user creates that set it are refused.
pub const WARM_METADATA_KEY: &str = "wrenn.warm";
/// How often the warm-up thread looks at the templates' manifests.
pub const POLL: Duration = Duration::from_secs(10);
/// The first wait after a failed warm-up; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(60);
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Whether `name` is a warm snapshot's (reserved) name.
pub fn is_warm_name(name: &str) -> bool {
    name.ends_with(WARM_SUFFIX)
}

/// The name of the warm snapshot of base template `base`; `None` when
/// `base` is too long to take the suffix.
pub fn warm_name(base: &TemplateName) -> Option<TemplateName> {
    TemplateName::parse(&format!("{base}{WARM_SUFFIX}")).ok()
}

/// The base template a warm snapshot's name stands for
/// (`code-runner-beta.warm` → `code-runner-beta`).
pub fn warm_base_of(name: &str) -> Option<&str> {
    name.strip_suffix(WARM_SUFFIX).filter(|b| !b.is_empty())
}

/// Whether `record` is a helper sandbox the node boots to make a warm
/// snapshot (it lives only for the warm-up).
pub fn is_warm_helper(record: &SandboxRecord) -> bool {
    record.metadata.contains_key(WARM_METADATA_KEY)
}

/// Where the warm-up of one base template stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmState {
    /// Not warmed: no `warm` in its manifest, warm-up off, not looked at
    /// yet, or not a base template.
    None,
    /// A helper sandbox is booting or running `prepare`, or being
    /// snapshotted.
    Preparing,
    /// Creates restore from `snapshot`.
    Ready { snapshot: TemplateName },
    /// The last warm-up failed (it is retried later); creates boot cold.
    Failed { reason: String },
}

/// The manifest's `warm` object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WarmSpec {
    /// The program and its arguments, run in the helper sandbox.
    pub prepare: Vec<String>,
    /// How long `prepare` may run.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// The helper's (and so every warm sandbox's) vCPUs and memory.
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
}

fn default_timeout_s() -> u64 {
    1200
}

/// What a template's manifest asks for: the warm-up, and the identity of
/// the image (its `rootfs.ext4` SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPlan {
    pub spec: WarmSpec,
    pub identity: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    files: BTreeMap<String, ManifestFile>,
    #[serde(default)]
    warm: Option<WarmSpec>,
}

#[derive(Deserialize)]
struct ManifestFile {
    sha256: String,
}

/// The warm-up `manifest` (a `manifest.json`) declares: `Ok(None)` when it
/// declares none or the file is missing.
pub fn read_plan(manifest: &Path) -> Result<Option<WarmPlan>, String> {
    let text = match std::fs::read_to_string(manifest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", manifest.display())),
    };
    let parsed: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a valid manifest: {e}", manifest.display()))?;
    let Some(spec) = parsed.warm else {
        return Ok(None);
    };
    if spec.prepare.first().is_none_or(|cmd| cmd.trim().is_empty()) {
        return Err(format!(
            "{}: warm.prepare is empty: name the program to run",
            manifest.display()
        ));
    }
    if spec.timeout_s == 0 || spec.timeout_s > 24 * 3600 {
        return Err(format!(
            "{}: warm.timeout_s is {}: it must be between 1 and 86400",
            manifest.display(),
            spec.timeout_s
        ));
    }
    let identity = parsed
        .files
        .get("rootfs.ext4")
        .map(|f| f.sha256.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!(
                "{}: no files.rootfs.ext4.sha256 to tell this image from the next",
                manifest.display()
            )
        })?;
    Ok(Some(WarmPlan { spec, identity }))
}

/// The warm states the warm-up thread reports ([`Manager::warm_state`]).
#[derive(Debug, Default)]
pub struct WarmTable {
    states: Mutex<HashMap<TemplateName, WarmState>>,
}

impl WarmTable {
    fn get(&self, name: &TemplateName) -> Option<WarmState> {
        self.states.lock().ok()?.get(name).cloned()
    }

    fn set(&self, name: &TemplateName, state: WarmState) {
        if let Ok(mut states) = self.states.lock() {
            states.insert(name.clone(), state);
        }
    }
}

/// Starts the warm-up thread when `[templates] warm` is on.
pub fn start(manager: Arc<Manager>) {
    if !manager.config.templates.warm {
        tracing::info!("warm templates are off ([templates] warm = false)");
        return;
    }
    std::thread::Builder::new()
        .name("warm".into())
        .spawn(move || {
            let mut backoff = Backoff::default();
            loop {
                manager.warm_pass(&mut backoff);
                std::thread::sleep(POLL);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the warm-up thread"));
}

/// Failed warm-ups and when each may be tried again.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: HashMap<TemplateName, (u32, Instant)>,
}

impl Backoff {
    fn may_try(&self, name: &TemplateName) -> bool {
        self.failures
            .get(name)
            .is_none_or(|(_, next)| Instant::now() >= *next)
    }

    fn failed(&mut self, name: &TemplateName) -> Duration {
        let failures = self.failures.get(name).map_or(0, |(n, _)| *n) + 1;
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << (failures - 1).min(10))
            .min(MAX_BACKOFF);
        self.failures
            .insert(name.clone(), (failures, Instant::now() + wait));
        wait
    }

    fn succeeded(&mut self, name: &TemplateName) {
        self.failures.remove(name);
    }
}

impl Manager {
    /// Where the warm-up of template `name` stands. `Ready` exactly when
    /// [`Manager::create`] of `name` restores the warm snapshot.
    pub fn warm_state(&self, name: &TemplateName) -> WarmState {
        if let Some(snapshot) = self.ready_warm_snapshot(name) {
            return WarmState::Ready {
                snapshot: snapshot.name,
            };
        }
        if !self.config.templates.warm {
            return WarmState::None;
        }
        match self.warm.get(name) {
            // Ready no more: the image changed since, or the snapshot went.
            Some(WarmState::Ready { .. }) | None => WarmState::None,
            Some(state) => state,
        }
    }

    /// The warm snapshot of base template `base` when creates may use it:
    /// warm-up on, and the snapshot made from the image the manifest names
    /// now.
    pub(super) fn ready_warm_snapshot(&self, base: &TemplateName) -> Option<TemplateRecord> {
        if !self.config.templates.warm || is_warm_name(base.as_str()) {
            return None;
        }
        if !self.templates.exists(base) {
            return None;
        }
        let plan = read_plan(&self.templates.manifest_path(base)).ok()??;
        let snapshot = self.snapshot_record(&warm_name(base)?).ok()??;
        (snapshot.sha256.as_deref() == Some(plan.identity.as_str())).then_some(snapshot)
    }

    /// `request` turned to the warm snapshot of its template, when there
    /// is a ready one that fits it.
    pub(super) fn warm_request(&self, request: &CreateRequest) -> Option<CreateRequest> {
        let base = TemplateName::parse(&request.template).ok()?;
        let snapshot = self.ready_warm_snapshot(&base)?;
        let fits = |asked: Option<u32>, fixed: Option<u32>| asked.is_none() || asked == fixed;
        if !fits(request.vcpus, snapshot.vcpus) || !fits(request.memory_mb, snapshot.memory_mb) {
            tracing::debug!(template = %base, "vcpus or memory differ from the warm snapshot's; booting cold");
            return None;
        }
        Some(CreateRequest {
            template: snapshot.name.to_string(),
            ..request.clone()
        })
    }

    /// One look at every base template: warms those that need it (one at a
    /// time, in this thread), and records where each stands.
    pub fn warm_pass(&self, backoff: &mut Backoff) {
        for base in self.templates.list() {
            if is_warm_name(base.as_str()) {
                continue;
            }
            let plan = match read_plan(&self.templates.manifest_path(&base)) {
                Ok(Some(plan)) => plan,
                Ok(None) => {
                    self.warm.set(&base, WarmState::None);
                    continue;
                }
                Err(reason) => {
                    if self.warm.get(&base)
                        != Some(WarmState::Failed {
                            reason: reason.clone(),
                        })
                    {
                        tracing::error!(template = %base, reason = %reason, "cannot warm the template");
                    }
                    self.warm.set(&base, WarmState::Failed { reason });
                    continue;
                }
            };
            if let Some(snapshot) = self.ready_warm_snapshot(&base) {
                backoff.succeeded(&base);
                self.warm.set(
                    &base,
                    WarmState::Ready {
                        snapshot: snapshot.name,
                    },
                );
                continue;
            }
            if !backoff.may_try(&base) {
                continue;
            }
            self.warm.set(&base, WarmState::Preparing);
            let started = Instant::now();
            match self.warm_up(&base, &plan) {
                Ok(snapshot) => {
                    backoff.succeeded(&base);
                    tracing::info!(template = %base, snapshot = %snapshot,
                        seconds = started.elapsed().as_secs(), "warm snapshot ready");
                    self.warm.set(&base, WarmState::Ready { snapshot });
                }
                Err(reason) => {
                    let wait = backoff.failed(&base);
                    tracing::error!(template = %base, reason = %reason,
                        seconds = started.elapsed().as_secs(),
                        retry_in_s = wait.as_secs(), "warm-up failed; creates boot cold");
                    self.warm.set(&base, WarmState::Failed { reason });
                }
            }
        }
    }

    /// Makes the warm snapshot of `base`: deletes an outdated one, boots a
    /// helper, runs `prepare`, snapshots and destroys the helper.
    fn warm_up(&self, base: &TemplateName, plan: &WarmPlan) -> Result<TemplateName, String> {
        let name = warm_name(base)
            .ok_or_else(|| format!("{base} is too long a name to add {WARM_SUFFIX} to"))?;
        if self
            .snapshot_record(&name)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            tracing::info!(template = %base, snapshot = %name,
                "the image changed: deleting the outdated warm snapshot");
            self.snapshots()
                .delete_reserved(&name)
                .map_err(|e| format!("cannot delete the outdated warm snapshot: {e}"))?;
        }
        self.destroy_warm_helpers(base);
        let max = self.config.sandbox.max_timeout_s;
        let request = CreateRequest {
            template: base.to_string(),
            vcpus: plan.spec.vcpus,
            memory_mb: plan.spec.memory_mb,
            // A helper left behind by a stuck warm-up goes by itself.
            timeout_s: Some((plan.spec.timeout_s + 1800).min(max)),
            idle_timeout_s: None,
            metadata: BTreeMap::from([(WARM_METADATA_KEY.to_owned(), base.to_string())]),
            env: BTreeMap::new(),
            internet: false,
            timeout_action: TimeoutAction::Kill,
            owner: None,
        };
        tracing::info!(template = %base, prepare = ?plan.spec.prepare, "warming the template: booting a helper sandbox");
        let helper = self
            .create_exact(request)
            .map_err(|e| format!("cannot boot a helper sandbox: {e}"))?;
        let made = self.prepare_and_snapshot(&helper, &name, plan);
        if let Err(e) = self.destroy(&helper.id) {
            tracing::error!(sandbox = %helper.id, error = %e, "cannot destroy the warm-up helper sandbox");
        }
        made.map(|()| name)
    }

    fn prepare_and_snapshot(
        &self,
        helper: &SandboxRecord,
        name: &TemplateName,
        plan: &WarmPlan,
    ) -> Result<(), String> {
        let started = Instant::now();
        let (cmd, args) = plan
            .spec
            .prepare
            .split_first()
            .ok_or("warm.prepare is empty")?;
        let process = json!({
            "cmd": cmd,
            "args": args,
            "env": {"WRENN_WARM_TIMEOUT_S": plan.spec.timeout_s.to_string()},
        });
        tracing::info!(sandbox = %helper.id, "helper up; running the prepare command");
        let run = self
            .exec(
                &helper.id,
                process,
                None,
                Duration::from_secs(plan.spec.timeout_s),
            )
            .map_err(|e| format!("cannot run the prepare command: {e}"))?;
        let seconds = started.elapsed().as_secs();
        if run.exit_code != Some(0) {
            let how = if run.timed_out {
                format!("timed out after {}s", plan.spec.timeout_s)
            } else if let Some(signal) = &run.signal {
                format!("was killed by {signal}")
            } else {
                format!("exited with {:?}", run.exit_code)
            };
            return Err(format!(
                "the prepare command {:?} {how} ({seconds}s); its last output: {}",
                plan.spec.prepare,
                tail(&run.stderr, &run.stdout)
            ));
        }
        tracing::info!(sandbox = %helper.id, seconds, output = %tail(&run.stderr, &run.stdout),
            "prepare command done; snapshotting");
        // Paused first, the helper is not resumed after the snapshot.
        self.pause(&helper.id)
            .map_err(|e| format!("cannot pause the helper sandbox: {e}"))?;
        self.snapshots()
            .create_reserved(SnapshotRequest {
                sandbox_id: helper.id.clone(),
                name: Some(name.to_string()),
                overwrite: true,
            })
            .map_err(|e| format!("cannot snapshot the helper sandbox: {e}"))?;
        self.store
            .write_with(|txn| {
                let Some(mut record) = txn.templates().get(name)? else {
                    return Err(SandboxError::SnapshotNotFound(name.to_string()));
                };
                record.sha256 = Some(plan.identity.clone());
                txn.templates().put(name, &record)?;
                Ok(())
            })
            .map_err(|e| format!("cannot record the image of the warm snapshot: {e}"))
    }

    /// Destroys helper sandboxes of `base` a previous warm-up left (a crash
    /// or restart in the middle).
    fn destroy_warm_helpers(&self, base: &TemplateName) {
        let Ok(all) = self.list() else {
            return;
        };
        for record in all {
            if record.metadata.get(WARM_METADATA_KEY).map(String::as_str) == Some(base.as_str()) {
                tracing::info!(sandbox = %record.id, template = %base, "destroying a leftover warm-up helper");
                if let Err(e) = self.destroy(&record.id) {
                    tracing::error!(sandbox = %record.id, error = %e, "cannot destroy a leftover warm-up helper");
                }
            }
        }
    }
}

/// The last lines of a run's output, for logs and reasons.
fn tail(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let joined: Vec<&str> = lines.into_iter().rev().collect();
    joined.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_names() {
        assert!(is_warm_name("code-runner-beta.warm"));
        assert!(!is_warm_name("code-runner-beta"));
        let base = TemplateName::parse("code-runner-beta").expect("name");
        let warm = warm_name(&base).expect("warm name");
        assert_eq!(warm.as_str(), "code-runner-beta.warm");
        assert_eq!(warm_base_of(warm.as_str()), Some("code-runner-beta"));
        assert_eq!(warm_base_of(".warm"), None);
        let long = TemplateName::parse(&"a".repeat(TemplateName::MAX_LEN)).expect("name");
        assert!(warm_name(&long).is_none());
    }

    #[test]
    fn a_manifest_plan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("manifest.json");
        assert_eq!(read_plan(&path), Ok(None));
        std::fs::write(
            &path,
            r#"{"name": "x", "files": {"rootfs.ext4": {"size": 1, "sha256": "ab"}}}"#,
        )
        .expect("write");
        assert_eq!(read_plan(&path), Ok(None));
        std::fs::write(
            &path,
            r#"{"files": {"rootfs.ext4": {"size": 1, "sha256": "ab"}},
                "warm": {"prepare": ["/bin/true"], "vcpus": 2}}"#,
        )
        .expect("write");
        let plan = read_plan(&path).expect("valid").expect("a plan");
        assert_eq!(plan.identity, "ab");
        assert_eq!(plan.spec.timeout_s, 1200);
        assert_eq!(plan.spec.vcpus, Some(2));
        std::fs::write(
            &path,
            r#"{"files": {}, "warm": {"prepare": ["/bin/true"]}}"#,
        )
        .expect("write");
        assert!(read_plan(&path).is_err());
        std::fs::write(
            &path,
            r#"{"files": {"rootfs.ext4": {"sha256": "ab"}}, "warm": {"prepare": []}}"#,
        )
        .expect("write");
        assert!(read_plan(&path).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let mut b = Backoff::default();
        let name = TemplateName::parse("t").expect("name");
        assert!(b.may_try(&name));
        assert_eq!(b.failed(&name), FIRST_BACKOFF);
        assert!(!b.may_try(&name));
        assert_eq!(b.failed(&name), FIRST_BACKOFF * 2);
        for _ in 0..20 {
            b.failed(&name);
        }
        assert_eq!(b.failed(&name), MAX_BACKOFF);
        b.succeeded(&name);
        assert!(b.may_try(&name));
    }
}
