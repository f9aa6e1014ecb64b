//! `fleet.toml`: the one file every node of a fleet is given
//! (`docs/fleet.md`). It names the cluster and its secret, lists the nodes
//! (a node not listed is refused) and the API keys with their quotas. Its
//! `version` only grows: a node given an older manifest than the fleet
//! runs says so and takes no part.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// Shortest cluster secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// A fleet manifest that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub cluster: String,
    pub version: u64,
    /// The first signs; all verify (rotation: add a new one second, move it
    /// first, then drop the old one, one manifest version each).
    pub secrets: Vec<Vec<u8>>,
    pub nodes: Vec<NodeEntry>,
    pub keys: Vec<KeyEntry>,
    /// How gossip runs.
    pub gossip: GossipSettings,
}

/// One node of the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub name: String,
    /// Where its HTTP API answers, such as `http://10.0.0.11:8080`.
    pub api: String,
    /// Its gossip address (UDP).
    pub gossip: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

/// One API key, by the SHA-256 of the key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEntry {
    /// Shown in logs and events, never the key.
    pub id: String,
    /// Lowercase hex SHA-256 of the key.
    pub hash: String,
    pub owner: String,
    pub quota: Quota,
}

/// What one key may hold across the fleet at once; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub sandboxes: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub paused: Option<u32>,
    pub snapshot_bytes: Option<u64>,
}

/// Gossip timing.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSettings {
    /// Between two gossip rounds.
    pub interval_ms: u64,
    /// A node silent this long is declared dead (at most; the failure
    /// detector usually says so sooner).
    pub dead_after_ms: u64,
}

impl Default for GossipSettings {
    fn default() -> Self {
        GossipSettings {
            interval_ms: 500,
            dead_after_ms: 10_000,
        }
    }
}

/// Why a manifest was refused. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read the fleet manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the fleet manifest {path} is not valid TOML or has an unknown key: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("the fleet manifest {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    cluster: ClusterForm,
    #[serde(default, rename = "node")]
    nodes: Vec<NodeForm>,
    #[serde(default, rename = "key")]
    keys: Vec<KeyForm>,
    #[serde(default)]
    gossip: GossipSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterForm {
    name: String,
    version: u64,
    /// Inline secrets: `b64:...` or `hex:...`.
    #[serde(default)]
    secrets: Vec<String>,
    /// Or files holding one secret each (same forms), relative to the
    /// manifest.
    #[serde(default)]
    secret_files: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeForm {
    name: String,
    api: String,
    gossip: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyForm {
    id: String,
    /// `sha256:HEX` or bare hex.
    hash: String,
    owner: String,
    #[serde(default)]
    quota: Quota,
}

impl Manifest {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Checks manifest `text`; `path` names it in messages and is where
    /// secret files are found from.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let form: FileForm = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: path.to_owned(),
            message,
        };
        let cluster = form.cluster;
        if !is_name(&cluster.name) {
            return Err(invalid(format!(
                "cluster.name {:?} must be 1 to 63 of a-z, 0-9 and '-'",
                cluster.name
            )));
        }
        let mut secrets = Vec::new();
        for (i, text) in cluster.secrets.iter().enumerate() {
            secrets.push(
                decode_secret(text)
                    .map_err(|why| invalid(format!("cluster.secrets[{i}]: {why}")))?,
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for file in &cluster.secret_files {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                invalid(format!(
                    "cannot read the secret file {}: {e}",
                    file.display()
                ))
            })?;
            secrets.push(
                decode_secret(text.trim())
                    .map_err(|why| invalid(format!("secret file {}: {why}", file.display())))?,
            );
        }
        if secrets.is_empty() {
            return Err(invalid(
                "the cluster has no secret: add cluster.secrets = [\"b64:...\"] (32 random \
                 bytes: `head -c 32 /dev/urandom | base64`) or cluster.secret_files"
                    .into(),
            ));
        }
        if form.nodes.is_empty() {
            return Err(invalid(
                "no [[node]]: list every node of the fleet, this one included".into(),
            ));
        }
        let mut nodes: Vec<NodeEntry> = Vec::new();
        for node in form.nodes {
            if !is_name(&node.name) {
                return Err(invalid(format!(
                    "node name {:?} must be 1 to 63 of a-z, 0-9 and '-'",
                    node.name
                )));
            }
            if nodes.iter().any(|n| n.name == node.name) {
                return Err(invalid(format!("node {} is listed twice", node.name)));
            }
            let gossip: SocketAddr = node.gossip.parse().map_err(|_| {
                invalid(format!(
                    "node {}: gossip = {:?} is not an IP:port such as \"10.0.0.11:7946\"",
                    node.name, node.gossip
                ))
            })?;
            if nodes.iter().any(|n| n.gossip == gossip) {
                return Err(invalid(format!(
                    "node {}: gossip address {gossip} is another node's too",
                    node.name
                )));
            }
            if !(node.api.starts_with("http://") || node.api.starts_with("https://")) {
                return Err(invalid(format!(
                    "node {}: api = {:?} must be a URL such as \"http://10.0.0.11:8080\"",
                    node.name, node.api
                )));
            }
            nodes.push(NodeEntry {
                name: node.name,
                api: node.api.trim_end_matches('/').to_owned(),
                gossip,
                labels: node.labels,
            });
        }
        let mut keys: Vec<KeyEntry> = Vec::new();
        for key in form.keys {
            let hash = key.hash.strip_prefix("sha256:").unwrap_or(&key.hash);
            let hash = hash.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "key {}: hash must be the SHA-256 of the key in hex \
                     (`printf %s KEY | sha256sum`)",
                    key.id
                )));
            }
            for (field, value) in [("id", &key.id), ("owner", &key.owner)] {
                if !is_name(value) {
                    return Err(invalid(format!(
                        "key {:?}: {field} {value:?} must be 1 to 63 of a-z, 0-9 and '-'",
                        key.id
                    )));
                }
            }
            if keys.iter().any(|k| k.id == key.id || k.hash == hash) {
                return Err(invalid(format!("key {} is listed twice", key.id)));
            }
            keys.push(KeyEntry {
                id: key.id,
                hash,
                owner: key.owner,
                quota: key.quota,
            });
        }
        if form.gossip.interval_ms == 0 || form.gossip.dead_after_ms < 4 * form.gossip.interval_ms {
            return Err(invalid(
                "gossip.interval_ms must be above 0 and gossip.dead_after_ms at least four \
                 intervals"
                    .into(),
            ));
        }
        Ok(Manifest {
            cluster: cluster.name,
            version: cluster.version,
            secrets,
            nodes,
            keys,
            gossip: form.gossip,
        })
    }

    /// The entry of node `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node whose gossip address is `addr`.
    pub fn node_at(&self, addr: SocketAddr) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.gossip == addr)
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// `b64:...` or `hex:...`, at least [`MIN_SECRET_BYTES`].
fn decode_secret(text: &str) -> Result<Vec<u8>, String> {
    let bytes = if let Some(b64) = text.strip_prefix("b64:") {
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("not base64 ({e})"))?
    } else if let Some(hex) = text.strip_prefix("hex:") {
        hex::decode(hex.trim()).map_err(|e| format!("not hex ({e})"))?
    } else {
        return Err("write it as \"b64:...\" or \"hex:...\"".into());
    };
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{} bytes is too short: use at least {MIN_SECRET_BYTES} random bytes (32 is good)",
            bytes.len()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "lab"
version = 3
secrets = ["hex:000102030405060708090a0b0c0d0e0f", "b64:AAECAwQFBgcICQoLDA0ODw=="]

[gossip]
interval_ms = 200
dead_after_ms = 3000

[[node]]
name = "n1"
api = "http://10.77.0.1:8080/"
gossip = "10.77.0.1:7946"
labels = { zone = "a" }

[[node]]
name = "n2"
api = "http://10.77.0.2:8080"
gossip = "10.77.0.2:7946"

[[key]]
id = "team-a"
hash = "sha256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
owner = "team-a"
quota = { sandboxes = 2, vcpus = 4 }
"#;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("/etc/wrenn/fleet.toml"))
    }

    #[test]
    fn a_good_manifest_reads_whole() {
        let m = parse(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.cluster.as_str(), m.version), ("lab", 3));
        assert_eq!(m.secrets.len(), 2);
        assert_eq!(m.secrets[0], m.secrets[1]);
        assert_eq!(m.nodes[0].api, "http://10.77.0.1:8080");
        assert_eq!(m.nodes[0].labels["zone"], "a");
        assert_eq!(
            m.node_at("10.77.0.2:7946".parse().unwrap_or_else(|_| unreachable!()))
                .map(|n| n.name.as_str()),
            Some("n2")
        );
        assert_eq!(m.keys[0].hash.len(), 64);
        assert!(m.keys[0].hash.chars().all(|c| !c.is_ascii_uppercase()));
        assert_eq!(m.keys[0].quota.sandboxes, Some(2));
        assert_eq!(m.keys[0].quota.memory_mb, None);
        assert_eq!(m.gossip.interval_ms, 200);
    }

    #[test]
    fn each_mistake_is_named() {
        let cases = [
            (
                GOOD.replace("name = \"lab\"", "name = \"Lab!\""),
                "cluster.name",
            ),
            (
                GOOD.replace("secrets = [", "secrets = [\"b64:AAEC\", "),
                "too short",
            ),
            (GOOD.replace("hex:0001", "plain0001"), "b64:"),
            (
                GOOD.replace("gossip = \"10.77.0.2:7946\"", "gossip = \"10.77.0.1:7946\""),
                "another node",
            ),
            (
                GOOD.replace("name = \"n2\"", "name = \"n1\""),
                "listed twice",
            ),
            (
                GOOD.replace("http://10.77.0.2:8080", "10.77.0.2:8080"),
                "must be a URL",
            ),
            (GOOD.replace("sha256:9F86", "sha256:ZZ86"), "SHA-256"),
            (
                GOOD.replace("dead_after_ms = 3000", "dead_after_ms = 300"),
                "four",
            ),
            (
                GOOD.replace("version = 3", "version = 3\ncolour = 1"),
                "unknown",
            ),
        ];
        for (text, wanted) in cases {
            let err = parse(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(wanted), "{wanted:?} not in {err:?}");
        }
        let no_nodes = GOOD.split("[[node]]").next().unwrap_or_default().to_owned();
        assert!(parse(&no_nodes)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("[[node]]"));
    }
}
