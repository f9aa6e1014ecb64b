//! Membership and node state by gossip: chitchat (scuttlebutt anti-entropy
//! with a phi-accrual failure detector) over UDP, on a thread with its own
//! tokio runtime. Every datagram is signed: `0x57 | key index | chitchat
//! envelope | HMAC-SHA256(secret, cluster name ‖ envelope)[..16]`, signed
//! with the manifest's first secret and checked against all of them, and
//! only datagrams from a gossip address the manifest lists are read. What
//! fails is dropped and counted.
//!
//! Each node publishes its own keys (`mf` manifest version, `api`,
//! `runtime`, `cap`, `load`, `sbx:<id>` per sandbox, `tpl:<name>` per
//! template); a peer gossiping an older manifest than ours does not count
//! as live.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage,
    Deserializable, FailureDetectorConfig, NodeState, Serializable,
};
use hmac::{KeyInit, Mac};
use serde::Serialize;

use super::manifest::Manifest;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// First byte of every datagram.
const MAGIC: u8 = 0x57;
/// Bytes of the HMAC kept.
const MAC_BYTES: usize = 16;
/// Largest datagram read.
const MAX_DATAGRAM: usize = 65_507;
/// How often this node's own keys are published again.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Prefixes of keys that name one item each (`sbx:<id>`, `tpl:<name>`):
/// the node deletes those it no longer publishes.
const ITEM_PREFIXES: [&str; 2] = ["sbx:", "tpl:"];

/// What this node says about itself, refreshed every second.
pub type Publish = Box<dyn Fn() -> Vec<(String, String)> + Send>;

/// The manifest in force: replaced by [`Gossip::reload`] (SIGHUP).
type Shared = Arc<RwLock<Arc<Manifest>>>;

fn current(shared: &Shared) -> Arc<Manifest> {
    match shared.read() {
        Ok(m) => Arc::clone(&m),
        Err(poisoned) => Arc::clone(&poisoned.into_inner()),
    }
}

/// Counters of the gossip layer.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Datagrams dropped: bad signature, unknown sender, malformed.
    pub rejected: AtomicU64,
}

/// This node's part in the fleet's gossip.
pub struct Gossip {
    manifest: Shared,
    node: String,
    chitchat: Arc<tokio::sync::Mutex<Chitchat>>,
    counters: Arc<Counters>,
    /// Set when a peer runs a newer manifest: this node stopped gossiping.
    refused: Arc<std::sync::Mutex<Option<String>>>,
    stopped: Arc<AtomicBool>,
}

/// One member as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub name: String,
    pub api: String,
    pub gossip: String,
    pub labels: BTreeMap<String, String>,
    /// `live`, `dead`, `refused` (on an older manifest than this node's),
    /// or `unknown` (never heard from).
    pub state: &'static str,
    /// Its keys (`mf`, `runtime`, `cap`, `load`, ...).
    pub published: BTreeMap<String, String>,
}

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("this node is called {0:?}, but the fleet manifest lists no such node: add it as a [[node]] (or start the node with --node-name set to its name there)")]
    NotListed(String),
    #[error("cannot start gossip on {addr}: {message}")]
    Start { addr: SocketAddr, message: String },
}

impl Gossip {
    /// Joins the fleet as node `node` of `manifest`.
    pub fn start(
        manifest: Manifest,
        node: &str,
        publish: Publish,
    ) -> Result<Arc<Gossip>, GossipError> {
        let me = manifest
            .node(node)
            .ok_or_else(|| GossipError::NotListed(node.to_owned()))?
            .clone();
        let counters = Arc::new(Counters::default());
        let version = manifest.version;
        let shared: Shared = Arc::new(RwLock::new(Arc::new(manifest)));
        let manifest = current(&shared);
        let transport = SignedUdp {
            manifest: Arc::clone(&shared),
            counters: Arc::clone(&counters),
        };
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let interval = Duration::from_millis(manifest.gossip.interval_ms);
        let dead_after = Duration::from_millis(manifest.gossip.dead_after_ms);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(me.name.clone(), generation, me.gossip),
            cluster_id: manifest.cluster.clone(),
            gossip_interval: interval,
            listen_addr: me.gossip,
            seed_nodes: manifest
                .nodes
                .iter()
                .filter(|n| n.name != me.name)
                .map(|n| n.gossip.to_string())
                .collect(),
            failure_detector_config: FailureDetectorConfig {
                // A node silent for `dead_after` is dead whatever its history.
                max_interval: dead_after / 2,
                initial_interval: interval * 2,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(600),
            catchup_callback: None,
            // A peer on an older manifest is not one of us.
            extra_liveness_predicate: Some({
                let shared = Arc::clone(&shared);
                Box::new(move |state: &NodeState| {
                    state
                        .get("mf")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v >= current(&shared).version)
                })
            }),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| GossipError::Start {
                addr: me.gossip,
                message: e.to_string(),
            })?;
        let mut initial = publish();
        initial.push(("mf".into(), version.to_string()));
        initial.push(("api".into(), me.api.clone()));
        let handle: ChitchatHandle = runtime
            .block_on(spawn_chitchat(config, initial, &transport))
            .map_err(|e| GossipError::Start {
                addr: me.gossip,
                message: format!("{e:#}"),
            })?;
        let gossip = Arc::new(Gossip {
            manifest: shared,
            node: me.name.clone(),
            chitchat: handle.chitchat(),
            counters,
            refused: Arc::default(),
            stopped: Arc::default(),
        });
        let worker = Arc::clone(&gossip);
        let spawned = std::thread::Builder::new()
            .name("gossip".into())
            .spawn(move || runtime.block_on(worker.run(handle, publish)));
        if let Err(e) = spawned {
            return Err(GossipError::Start {
                addr: me.gossip,
                message: format!("cannot start its thread: {e}"),
            });
        }
        tracing::info!(node = %me.name, gossip = %me.gossip, cluster = %manifest.cluster, version, "joined the fleet's gossip");
        Ok(gossip)
    }

    /// Publishes this node's keys every second; stops when a peer runs a
    /// newer manifest.
    async fn run(self: Arc<Self>, handle: ChitchatHandle, publish: Publish) {
        loop {
            tokio::time::sleep(PUBLISH_EVERY).await;
            let manifest = self.manifest();
            let ours = manifest.version;
            let newer = {
                let mut chitchat = self.chitchat.lock().await;
                let state = chitchat.self_node_state();
                let mut wanted = publish();
                wanted.push(("mf".into(), ours.to_string()));
                if let Some(me) = manifest.node(&self.node) {
                    wanted.push(("api".into(), me.api.clone()));
                }
                // Per-item keys (a sandbox, a template) that are gone.
                let stale: Vec<String> = state
                    .key_values()
                    .map(|(k, _)| k)
                    .filter(|k| ITEM_PREFIXES.iter().any(|p| k.starts_with(p)))
                    .filter(|k| !wanted.iter().any(|(w, _)| w == k))
                    .map(str::to_owned)
                    .collect();
                for key in stale {
                    state.delete(&key);
                }
                for (key, value) in wanted {
                    state.set(key, value);
                }
                chitchat
                    .node_states()
                    .values()
                    .filter_map(|s| s.get("mf").and_then(|v| v.parse::<u64>().ok()))
                    .max()
                    .filter(|v| *v > ours)
            };
            if let Some(fleet) = newer {
                let why = format!(
                    "the fleet runs manifest version {fleet}, this node has version {ours}: \
                     give it the current fleet.toml; it takes no part until then"
                );
                tracing::error!(node = %self.node, "{why}");
                if let Ok(mut refused) = self.refused.lock() {
                    *refused = Some(why);
                }
                self.stopped.store(true, Ordering::Release);
                let _ = handle.shutdown().await;
                return;
            }
        }
    }

    /// Every node of the manifest as this node sees it, itself first.
    pub fn members(&self) -> Vec<Member> {
        let manifest = self.manifest();
        let chitchat = self.chitchat.blocking_lock();
        let stopped = self.stopped.load(Ordering::Acquire);
        let live: HashSet<&str> = chitchat.live_nodes().map(|id| &*id.node_id).collect();
        let dead: HashSet<&str> = chitchat.dead_nodes().map(|id| &*id.node_id).collect();
        let mut states: BTreeMap<&str, &NodeState> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            // The newest generation of a node wins.
            states.insert(&id.node_id, state);
        }
        let mut members: Vec<Member> = manifest
            .nodes
            .iter()
            .map(|entry| {
                let name = entry.name.as_str();
                let older = states
                    .get(name)
                    .and_then(|s| s.get("mf"))
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v < manifest.version);
                let state = match () {
                    _ if name == self.node => match stopped {
                        true => "refused",
                        false => "live",
                    },
                    _ if stopped => "unknown",
                    // Gossiping, but on an older manifest: not one of us.
                    _ if older && !dead.contains(name) => "refused",
                    _ if live.contains(name) => "live",
                    _ if dead.contains(name) => "dead",
                    _ => "unknown",
                };
                let published = states
                    .get(name)
                    .map(|s| {
                        s.key_values()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Member {
                    name: name.to_owned(),
                    api: entry.api.clone(),
                    gossip: entry.gossip.to_string(),
                    labels: entry.labels.clone(),
                    state,
                    published,
                }
            })
            .collect();
        members.sort_by_key(|m| m.name != self.node);
        members
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The manifest in force.
    pub fn manifest(&self) -> Arc<Manifest> {
        current(&self.manifest)
    }

    /// Puts `new` in force (the file re-read on SIGHUP): its keys, quotas,
    /// labels, secrets and API addresses apply at once. Refused, keeping
    /// the old one, when it is older, names another cluster, or moves or
    /// drops this node (those need a restart).
    pub fn reload(&self, new: Manifest) -> Result<(), String> {
        let old = self.manifest();
        if new.cluster != old.cluster {
            return Err(format!(
                "the new manifest is for cluster {:?}, this node runs in {:?}: a node changes \
                 fleets only with a restart",
                new.cluster, old.cluster
            ));
        }
        if new.version < old.version {
            return Err(format!(
                "the new manifest has version {}, older than the {} in force: give it a \
                 higher version",
                new.version, old.version
            ));
        }
        let (Some(was), Some(now)) = (old.node(&self.node), new.node(&self.node)) else {
            return Err(format!(
                "the new manifest does not list this node ({}): add it back, or stop the node",
                self.node
            ));
        };
        if was.gossip != now.gossip {
            return Err(format!(
                "the new manifest moves this node's gossip address from {} to {}: restart \
                 the node to change it",
                was.gossip, now.gossip
            ));
        }
        tracing::info!(
            from = old.version,
            to = new.version,
            nodes = new.nodes.len(),
            keys = new.keys.len(),
            "fleet manifest reloaded"
        );
        match self.manifest.write() {
            Ok(mut m) => *m = Arc::new(new),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
        }
        Ok(())
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Why this node takes no part, when a peer runs a newer manifest.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

/// chitchat's UDP, signed.
struct SignedUdp {
    manifest: Shared,
    counters: Arc<Counters>,
}

#[async_trait]
impl Transport for SignedUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind {listen_addr}/udp for gossip: {e}"))?;
        Ok(Box::new(SignedSocket {
            socket,
            manifest: Arc::clone(&self.manifest),
            counters: Arc::clone(&self.counters),
            buf: vec![0; MAX_DATAGRAM],
        }))
    }
}

struct SignedSocket {
    socket: tokio::net::UdpSocket,
    manifest: Shared,
    counters: Arc<Counters>,
    buf: Vec<u8>,
}

/// The MAC of `payload` under `secret`.
fn mac(secret: &[u8], cluster: &str, payload: &[u8]) -> Option<[u8; MAC_BYTES]> {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret).ok()?;
    mac.update(cluster.as_bytes());
    mac.update(payload);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&full[..MAC_BYTES]);
    Some(out)
}

/// The envelope of a signed datagram, if its signature holds.
fn open_frame(secrets: &[Vec<u8>], cluster: &str, frame: &[u8]) -> Option<ChitchatMessage> {
    if frame.len() < 2 + MAC_BYTES || frame[0] != MAGIC {
        return None;
    }
    let (payload, tag) = frame[2..].split_at(frame.len() - 2 - MAC_BYTES);
    // Constant time per secret: a fold over every byte, no early exit.
    let signed = secrets.iter().any(|secret| {
        mac(secret, cluster, payload)
            .is_some_and(|m| m.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
    });
    if !signed {
        return None;
    }
    let mut rest = payload;
    ChitchatMessage::deserialize(&mut rest).ok()
}

fn seal_frame(secret: &[u8], cluster: &str, message: &ChitchatMessage) -> Vec<u8> {
    let mut frame = vec![MAGIC, 0];
    message.serialize(&mut frame);
    let tag = mac(secret, cluster, &frame[2..]).unwrap_or([0; MAC_BYTES]);
    frame.extend_from_slice(&tag);
    frame
}

#[async_trait]
impl Socket for SignedSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let manifest = current(&self.manifest);
        let secret = manifest
            .secrets
            .first()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let frame = seal_frame(secret, &manifest.cluster, &message);
        if let Err(e) = self.socket.send_to(&frame, to).await {
            // A peer that is down: gossip goes on with the others.
            tracing::debug!(to = %to, error = %e, "gossip send failed");
        }
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.buf).await {
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(anyhow::anyhow!("gossip socket failed: {e}")),
            };
            let manifest = current(&self.manifest);
            let message = match manifest.node_at(from_addr) {
                Some(_) => open_frame(&manifest.secrets, &manifest.cluster, &self.buf[..len]),
                None => None,
            };
            match message {
                Some(message) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    return Ok((from_addr, message));
                }
                None => {
                    let n = self.counters.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(from = %from_addr, rejected = n, "gossip datagram dropped: not signed with the cluster secret, or from an address the fleet manifest does not list");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> ChitchatMessage {
        ChitchatMessage::BadCluster
    }

    #[test]
    fn frames_open_only_with_a_secret_of_the_cluster() {
        let (a, b) = (vec![1u8; 32], vec![2u8; 32]);
        let frame = seal_frame(&a, "lab", &envelope());
        assert!(open_frame(std::slice::from_ref(&a), "lab", &frame).is_some());
        // Rotation: the old secret still verifies while it is listed.
        assert!(open_frame(&[b.clone(), a.clone()], "lab", &frame).is_some());
        assert!(open_frame(std::slice::from_ref(&b), "lab", &frame).is_none());
        assert!(open_frame(std::slice::from_ref(&a), "other", &frame).is_none());
        let mut tampered = frame.clone();
        tampered[3] ^= 1;
        assert!(open_frame(std::slice::from_ref(&a), "lab", &tampered).is_none());
        assert!(open_frame(std::slice::from_ref(&a), "lab", &frame[..4]).is_none());
    }
}
