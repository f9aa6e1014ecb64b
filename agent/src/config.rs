//! The agent's configuration: an embedded default, then a TOML file, then
//! environment variables, then command-line flags, each overriding the last.
//!
//! The embedded default (`default.toml` beside this file) runs a single node
//! on this machine with no file at all: state in `/var/lib/wrenn`, the API on
//! `127.0.0.1:8080`. A loopback API needs no key; listening anywhere else
//! without an API key is refused at start, with the way to add one.
//!
//! Not here: the fleet manifest (nodes, cluster secret, quotas) comes later
//! in its own file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The configuration a node runs with when given nothing else.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// A complete, validated configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub api: ApiConfig,
    pub runtime: RuntimeConfig,
    pub sandbox: SandboxConfig,
    pub network: NetworkConfig,
    pub capsules: CapsulesConfig,
    pub proxy: ProxyConfig,
    pub templates: TemplatesConfig,
    pub fleet: FleetConfig,
}

/// This node's part in a fleet (the fleet itself is `fleet.toml`,
/// docs/fleet.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Most MiB/s one snapshot transfer to another node is sent at; 0: no
    /// limit.
    pub transfer_mib_per_s: u64,
}

/// Base templates (docs/image.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Warm the base templates whose manifest declares `warm`: boot one,
    /// run its `prepare` command, snapshot it as `<name>.warm`, and create
    /// that template's sandboxes from the snapshot (`sandbox::warm`).
    pub warm: bool,
}

/// The SDK's capsule API (`/v1/capsules`, docs/sdk.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapsulesConfig {
    /// The template of a capsule created without one.
    pub default_template: String,
    /// Other names for templates, such as the hosted service's
    /// `minimal-ubuntu`: a capsule asked for by alias gets the template.
    pub template_aliases: std::collections::BTreeMap<String, String>,
}

/// The port proxy: `http://{port}-{sandbox id}.{domain}` reaches that port
/// of the sandbox.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The domain under which sandboxes' ports are served, without a port.
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Empty means the host name.
    pub name: String,
    pub state_dir: PathBuf,
    /// Base images, one folder per template; empty means `<state_dir>/images`.
    pub images_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// SHA-256 (hex) of each accepted API key; see [`hash_api_key`].
    pub key_hashes: Vec<String>,
    /// Requests served at once; more wait in a queue.
    pub workers: usize,
    /// Largest JSON request body, in bytes.
    pub max_json_body: usize,
    /// Longest request header line (request line included), in bytes;
    /// longer ones are answered 431.
    pub max_header_line: usize,
    /// Largest request head (request line and headers), in bytes; larger
    /// ones are answered 431.
    pub max_head: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `auto`, `qemu` or `native`.
    pub kind: String,
    /// `auto`, `kvm` or `tcg` (QEMU only).
    pub accel: String,
    /// The `wrenn-vmm` binary of the native runtime; empty: the one next to
    /// `wrenn-agent`, else the one on `PATH`.
    pub vmm_binary: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub default_timeout_s: u64,
    pub max_timeout_s: u64,
    pub max_vcpus: u32,
    /// Memory the host keeps for itself, in MiB, when checking a request.
    pub host_reserved_memory_mb: u64,
    /// Most sandboxes running (or starting) at once; 0: no limit but
    /// memory. A node at its limit refuses creates and resumes (503), and
    /// the fleet places them elsewhere.
    #[serde(default)]
    pub max_running: u32,
    /// Pause every running sandbox when the agent is asked to stop
    /// (SIGTERM, SIGINT), and resume them when it starts again.
    pub pause_on_shutdown: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// How many sandboxes can have a network at once.
    pub slots: u32,
    /// The first slot this node uses; `first_slot + slots` is at most 16384.
    /// Two agents on one host (tests do that) need ranges that don't overlap.
    pub first_slot: u32,
}

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{name}={value:?}: {message}")]
    Env {
        name: String,
        value: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Settings given as flags or environment variables, each optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub images_dir: Option<PathBuf>,
    pub node_name: Option<String>,
    pub runtime: Option<String>,
    pub accel: Option<String>,
    pub vmm_binary: Option<PathBuf>,
    /// A plain API key; stored only as its hash.
    pub api_key: Option<String>,
    /// `templates.warm` (`WRENN_WARM`: 1/0, true/false).
    pub warm: Option<String>,
}

impl Overrides {
    /// The `WRENN_*` variables from `vars`.
    pub fn from_env(vars: &BTreeMap<String, String>) -> Overrides {
        let get = |name: &str| vars.get(name).filter(|v| !v.is_empty()).cloned();
        Overrides {
            listen: get("WRENN_LISTEN"),
            state_dir: get("WRENN_STATE_DIR").map(PathBuf::from),
            images_dir: get("WRENN_IMAGES_DIR").map(PathBuf::from),
            node_name: get("WRENN_NODE_NAME"),
            runtime: get("WRENN_RUNTIME"),
            accel: get("WRENN_ACCEL"),
            vmm_binary: get("WRENN_VMM_BINARY").map(PathBuf::from),
            api_key: get("WRENN_API_KEY"),
            warm: get("WRENN_WARM"),
        }
    }

    /// `self`, with every setting that `later` has replaced by it.
    pub fn then(self, later: Overrides) -> Overrides {
        Overrides {
            listen: later.listen.or(self.listen),
            state_dir: later.state_dir.or(self.state_dir),
            images_dir: later.images_dir.or(self.images_dir),
            node_name: later.node_name.or(self.node_name),
            runtime: later.runtime.or(self.runtime),
            accel: later.accel.or(self.accel),
            vmm_binary: later.vmm_binary.or(self.vmm_binary),
            api_key: later.api_key.or(self.api_key),
            warm: later.warm.or(self.warm),
        }
    }
}

/// The hex SHA-256 of an API key, as `api.key_hashes` holds it.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Config {
    /// The embedded default, then `file` if given, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut table = parse_table(DEFAULT_TOML, "embedded default")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            merge(&mut table, parse_table(&text, &path.display().to_string())?);
        }
        let origin = file.map_or("embedded default".to_owned(), |p| p.display().to_string());
        let mut config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin,
                    message: e.message().to_owned(),
                })?;
        config.apply(overrides)?;
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(listen) = &o.listen {
            self.api.listen = listen.parse().map_err(|_| ConfigError::Env {
                name: "listen".into(),
                value: listen.clone(),
                message: "expected IP:PORT, for example 127.0.0.1:8080".into(),
            })?;
        }
        if let Some(dir) = &o.state_dir {
            self.node.state_dir = dir.clone();
        }
        if let Some(dir) = &o.images_dir {
            self.node.images_dir = dir.clone();
        }
        if let Some(name) = &o.node_name {
            self.node.name = name.clone();
        }
        if let Some(runtime) = &o.runtime {
            self.runtime.kind = runtime.clone();
        }
        if let Some(accel) = &o.accel {
            self.runtime.accel = accel.clone();
        }
        if let Some(binary) = &o.vmm_binary {
            self.runtime.vmm_binary = binary.clone();
        }
        if let Some(key) = &o.api_key {
            self.api.key_hashes.push(hash_api_key(key));
        }
        if let Some(warm) = &o.warm {
            self.templates.warm = match warm.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "WRENN_WARM".into(),
                        value: warm.clone(),
                        message: "expected 1 or 0 (true or false)".into(),
                    })
                }
            };
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !self.api.listen.ip().is_loopback() && self.api.key_hashes.is_empty() {
            return invalid(format!(
                "refusing to listen on {} without an API key: anyone who reaches this address \
                 could run code on this machine. Add one with --api-key KEY (or WRENN_API_KEY), \
                 or put its SHA-256 into api.key_hashes in the config file \
                 (`printf %s KEY | sha256sum`), or listen on 127.0.0.1",
                self.api.listen
            ));
        }
        if let Some(bad) = self
            .api
            .key_hashes
            .iter()
            .find(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return invalid(format!(
                "api.key_hashes holds {bad:?}, which is not a hex SHA-256 (64 hex digits)"
            ));
        }
        let domain = &self.proxy.domain;
        if domain.is_empty()
            || domain.starts_with(['.', '-'])
            || domain.ends_with('.')
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return invalid(format!(
                "proxy.domain {domain:?} is not a lower-case DNS name: give one such as \
                 \"localhost\" or \"wrenn.internal\", without a scheme or a port"
            ));
        }
        if self.capsules.default_template.is_empty() {
            return invalid(
                "capsules.default_template is empty: name the template a capsule created \
                 without one gets, such as \"base\""
                    .into(),
            );
        }
        if !["auto", "qemu", "native"].contains(&self.runtime.kind.as_str()) {
            return invalid(format!(
                "runtime {:?} is unknown: use auto, qemu or native",
                self.runtime.kind
            ));
        }
        if !["auto", "kvm", "tcg"].contains(&self.runtime.accel.as_str()) {
            return invalid(format!(
                "accel {:?} is unknown: use auto, kvm or tcg",
                self.runtime.accel
            ));
        }
        let net = &self.network;
        if net.slots == 0 || u64::from(net.first_slot) + u64::from(net.slots) > 16384 {
            return invalid(format!(
                "network.slots is {} from network.first_slot {}: the slots must lie in 0..16384",
                net.slots, net.first_slot
            ));
        }
        let api = &self.api;
        if api.max_header_line < 1024 || api.max_head < api.max_header_line {
            return invalid(format!(
                "api.max_header_line is {} and api.max_head {}: a line needs at least 1024 \
                 bytes and the head at least one line",
                api.max_header_line, api.max_head
            ));
        }
        if self.sandbox.default_timeout_s > self.sandbox.max_timeout_s {
            return invalid("sandbox.default_timeout_s is above sandbox.max_timeout_s".into());
        }
        Ok(())
    }

    /// Where base images are: configured, or `<state_dir>/images`.
    pub fn images_dir(&self) -> PathBuf {
        if self.node.images_dir.as_os_str().is_empty() {
            self.node.state_dir.join("images")
        } else {
            self.node.images_dir.clone()
        }
    }

    /// The node's name: configured, or the host name.
    pub fn node_name(&self) -> String {
        if !self.node.name.is_empty() {
            return self.node.name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "wrenn".to_owned())
    }
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

/// Merges `over` into `base`, table by table; other values are replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "wrenn-config-{}-{}",
            std::process::id(),
            &hash_api_key(text)[..16]
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("agent.toml");
        std::fs::write(&file, text).expect("write");
        let result = Config::load(Some(&file), overrides);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn the_embedded_default_is_a_loopback_single_node() {
        let config = Config::load(None, &Overrides::default()).expect("default");
        assert_eq!(config.api.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.node.state_dir, PathBuf::from("/var/lib/wrenn"));
        assert!(config.api.key_hashes.is_empty());
        assert_eq!(
            (config.api.max_header_line, config.api.max_head),
            (16384, 65536)
        );
    }

    #[test]
    fn a_file_overrides_only_what_it_names() {
        let config =
            load_str("[sandbox]\ndefault_timeout_s = 60\n", &Overrides::default()).expect("load");
        assert_eq!(config.sandbox.default_timeout_s, 60);
        assert_eq!(config.api.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn flags_override_env_which_overrides_the_file() {
        let env = BTreeMap::from([("WRENN_STATE_DIR".to_owned(), "/srv/env".to_owned())]);
        let flags = Overrides {
            listen: Some("127.0.0.1:9000".into()),
            ..Overrides::default()
        };
        let overrides = Overrides::from_env(&env).then(flags);
        let config = load_str("[node]\nstate_dir = \"/srv/file\"\n", &overrides).expect("load");
        assert_eq!(config.node.state_dir, PathBuf::from("/srv/env"));
        assert_eq!(config.api.listen.to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn a_public_listen_address_without_a_key_is_refused_with_the_fix() {
        let overrides = Overrides {
            listen: Some("0.0.0.0:8080".into()),
            ..Overrides::default()
        };
        let err = Config::load(None, &overrides).expect_err("must refuse");
        let message = err.to_string();
        assert!(message.contains("--api-key"), "{message}");
        let with_key = Overrides {
            api_key: Some("secret".into()),
            ..overrides
        };
        let config = Config::load(None, &with_key).expect("a key makes it fine");
        assert_eq!(config.api.key_hashes, vec![hash_api_key("secret")]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_them() {
        let err =
            load_str("[api]\nlisten_on = \"x\"\n", &Overrides::default()).expect_err("unknown");
        assert!(err.to_string().contains("listen_on"), "{err}");
        let err =
            load_str("[runtime]\nkind = \"docker\"\n", &Overrides::default()).expect_err("bad");
        assert!(err.to_string().contains("docker"), "{err}");
        let err = load_str("[network]\nslots = 0\n", &Overrides::default()).expect_err("bad");
        assert!(err.to_string().contains("slots"), "{err}");
        let err = load_str("not toml at all [", &Overrides::default()).expect_err("bad");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}
