//! Kernel command line parsing into the boot configuration.
//!
//! The command line is split like the kernel does it: on whitespace, except
//! inside double quotes, with the quotes removed (`wrenn.envd_args="a b"` is one
//! parameter). Keys treat `-` and `_` alike, and the last occurrence of a key
//! wins. Unknown keys are ignored (most belong to the kernel). A value that
//! does not parse produces a [`Warning`] and the key falls back to its default,
//! so a typo never stops the boot.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

pub const DEFAULT_ROOT: &str = "/dev/vda";
pub const DEFAULT_ROOTFSTYPE: &str = "ext4";
pub const DEFAULT_IP: Ipv4Cidr = Ipv4Cidr {
    addr: Ipv4Addr::new(169, 254, 0, 21),
    prefix: 30,
};
pub const DEFAULT_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
pub const DEFAULT_DNS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
    IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
];
pub const DEFAULT_HOSTNAME: &str = "wrenn";
pub const DEFAULT_ENVD: &str = "/usr/local/bin/envd";

/// An IPv4 address with its prefix length, as in `169.254.0.21/30`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let (addr, prefix) = s.split_once('/').ok_or(ValueError::MissingPrefix)?;
        let addr = addr.parse().map_err(ValueError::BadIpv4)?;
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| ValueError::BadPrefix(prefix.to_string()))?;
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What PID 1 should be: a sandbox guest, or the appliance host (not built yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Guest,
    Host,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Guest => "guest",
            Mode::Host => "host",
        })
    }
}

/// Everything wrenn-init takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `root=`: device path of the root file system.
    pub root: String,
    /// `rootfstype=`: file system type of the root device.
    pub rootfstype: String,
    /// `rootflags=`: file-system-specific mount options, passed through verbatim.
    pub rootflags: Option<String>,
    /// `ro` / `rw`: mount the root file system read-only.
    pub read_only: bool,
    /// `wrenn.ip=`: address and prefix of eth0.
    pub ip: Ipv4Cidr,
    /// `wrenn.gw=`: default gateway.
    pub gateway: Ipv4Addr,
    /// `wrenn.dns=`: name servers for /etc/resolv.conf.
    pub dns: Vec<IpAddr>,
    /// `wrenn.hostname=`.
    pub hostname: String,
    /// `wrenn.envd=`: path of envd inside the root file system.
    pub envd: PathBuf,
    /// `wrenn.envd_args=`: extra arguments for envd.
    pub envd_args: Vec<String>,
    /// `wrenn.mode=`.
    pub mode: Mode,
    /// `wrenn.debug`: verbose logging.
    pub debug: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.to_string(),
            rootfstype: DEFAULT_ROOTFSTYPE.to_string(),
            rootflags: None,
            read_only: false,
            ip: DEFAULT_IP,
            gateway: DEFAULT_GW,
            dns: DEFAULT_DNS.to_vec(),
            hostname: DEFAULT_HOSTNAME.to_string(),
            envd: PathBuf::from(DEFAULT_ENVD),
            envd_args: Vec::new(),
            mode: Mode::Guest,
            debug: false,
        }
    }
}

/// Renders the configuration as `key=value` lines using the command line keys.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "root={}", self.root)?;
        writeln!(f, "rootfstype={}", self.rootfstype)?;
        writeln!(f, "rootflags={}", self.rootflags.as_deref().unwrap_or(""))?;
        writeln!(f, "ro={}", self.read_only)?;
        writeln!(f, "wrenn.ip={}", self.ip)?;
        writeln!(f, "wrenn.gw={}", self.gateway)?;
        writeln!(f, "wrenn.dns={}", join(&self.dns))?;
        writeln!(f, "wrenn.hostname={}", self.hostname)?;
        writeln!(f, "wrenn.envd={}", self.envd.display())?;
        writeln!(f, "wrenn.envd_args={}", self.envd_args.join(","))?;
        writeln!(f, "wrenn.mode={}", self.mode)?;
        writeln!(f, "wrenn.debug={}", self.debug)
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a command line value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("a value is required (write key=value)")]
    Missing,
    #[error("missing /prefix (expected an IPv4 address with prefix length, e.g. 169.254.0.21/30)")]
    MissingPrefix,
    #[error("not an IPv4 address: {0}")]
    BadIpv4(AddrParseError),
    #[error("prefix length {0:?} is not a number from 0 to 32")]
    BadPrefix(String),
    #[error("{0:?} is not an IPv4 or IPv6 address (expected a comma list like 8.8.8.8,1.1.1.1)")]
    BadDns(String),
    #[error("must be 1-64 characters of letters, digits, '-' and '.', with labels not starting or ending in '-'")]
    BadHostname,
    #[error("must be an absolute path")]
    NotAbsolute,
    #[error("only device paths such as /dev/vda are supported, not {0}")]
    UnsupportedRootSpec(String),
    #[error("unknown mode (expected guest or host)")]
    BadMode,
    #[error("expected a boolean (1/0, true/false, yes/no, on/off)")]
    BadBool,
}

/// A rejected command line value; the key keeps its default.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("ignoring {key}={value:?}: {reason}; using default {default}")]
pub struct Warning {
    pub key: String,
    pub value: String,
    pub reason: ValueError,
    pub default: String,
}

/// The result of parsing: the configuration and anything that was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub config: Config,
    pub warnings: Vec<Warning>,
}

/// Parses a kernel command line. Never fails: bad values become warnings.
pub fn parse(cmdline: &str) -> Parsed {
    let mut config = Config::default();
    let mut warnings = Vec::new();
    for (key, value) in split_params(cmdline) {
        if let Err(reason) = apply(&mut config, &key, value.as_deref()) {
            let default = reset_to_default(&mut config, &key);
            warnings.push(Warning {
                key,
                value: value.unwrap_or_default(),
                reason,
                default,
            });
        }
    }
    Parsed { config, warnings }
}

/// Splits a command line into `(key, value)` pairs the way the kernel does.
/// Keys are normalised so that `-` reads as `_`.
pub fn split_params(cmdline: &str) -> Vec<(String, Option<String>)> {
    tokenize(cmdline)
        .into_iter()
        .map(|token| match token.split_once('=') {
            Some((key, value)) => (normalize_key(key), Some(value.to_string())),
            None => (normalize_key(&token), None),
        })
        .collect()
}

fn tokenize(cmdline: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    tokens.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        tokens.push(current);
    }
    tokens
}

fn normalize_key(key: &str) -> String {
    key.replace('-', "_")
}

/// Applies one parameter; unknown keys are ignored.
fn apply(config: &mut Config, key: &str, value: Option<&str>) -> Result<(), ValueError> {
    match key {
        "ro" => config.read_only = true,
        "rw" => config.read_only = false,
        "wrenn.debug" => config.debug = value.map_or(Ok(true), parse_bool)?,
        "root" => config.root = parse_root(required(value)?)?,
        "rootfstype" => config.rootfstype = required(value)?.to_string(),
        "rootflags" => config.rootflags = value.filter(|v| !v.is_empty()).map(str::to_string),
        "wrenn.ip" => config.ip = required(value)?.parse()?,
        "wrenn.gw" => config.gateway = required(value)?.parse().map_err(ValueError::BadIpv4)?,
        "wrenn.dns" => config.dns = parse_dns(required(value)?)?,
        "wrenn.hostname" => config.hostname = parse_hostname(required(value)?)?,
        "wrenn.envd" => config.envd = parse_absolute(required(value)?)?,
        "wrenn.envd_args" => config.envd_args = parse_list(value.unwrap_or("")),
        "wrenn.mode" => config.mode = parse_mode(required(value)?)?,
        _ => {}
    }
    Ok(())
}

/// Puts a key back to its default and returns the default as text.
fn reset_to_default(config: &mut Config, key: &str) -> String {
    let default = Config::default();
    match key {
        "wrenn.debug" => config.debug = default.debug,
        "root" => config.root = default.root,
        "rootfstype" => config.rootfstype = default.rootfstype,
        "wrenn.ip" => config.ip = default.ip,
        "wrenn.gw" => config.gateway = default.gateway,
        "wrenn.dns" => config.dns = default.dns,
        "wrenn.hostname" => config.hostname = default.hostname,
        "wrenn.envd" => config.envd = default.envd,
        "wrenn.mode" => config.mode = default.mode,
        _ => {}
    }
    default_text(&Config::default(), key)
}

fn default_text(default: &Config, key: &str) -> String {
    let rendered = default.to_string();
    rendered
        .lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn required(value: Option<&str>) -> Result<&str, ValueError> {
    value.filter(|v| !v.is_empty()).ok_or(ValueError::Missing)
}

fn parse_bool(value: &str) -> Result<bool, ValueError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ValueError::BadBool),
    }
}

fn parse_root(value: &str) -> Result<String, ValueError> {
    if let Some((tag, _)) = value.split_once('=') {
        return Err(ValueError::UnsupportedRootSpec(format!("{tag}=")));
    }
    parse_absolute(value).map(|_| value.to_string())
}

fn parse_absolute(value: &str) -> Result<PathBuf, ValueError> {
    if value.starts_with('/') {
        Ok(PathBuf::from(value))
    } else {
        Err(ValueError::NotAbsolute)
    }
}

fn parse_dns(value: &str) -> Result<Vec<IpAddr>, ValueError> {
    parse_list(value)
        .into_iter()
        .map(|entry| entry.parse().map_err(|_| ValueError::BadDns(entry)))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|list| {
            if list.is_empty() {
                Err(ValueError::Missing)
            } else {
                Ok(list)
            }
        })
}

fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_mode(value: &str) -> Result<Mode, ValueError> {
    match value {
        "guest" => Ok(Mode::Guest),
        "host" => Ok(Mode::Host),
        _ => Err(ValueError::BadMode),
    }
}

/// Accepts RFC 1123 style host names (labels of letters, digits and `-`).
fn parse_hostname(value: &str) -> Result<String, ValueError> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if value.len() <= 64 && value.split('.').all(label_ok) {
        Ok(value.to_string())
    } else {
        Err(ValueError::BadHostname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_command_line_gives_defaults() {
        let parsed = parse("");
        assert_eq!(parsed.config, Config::default());
        assert!(parsed.warnings.is_empty());
        let c = parsed.config;
        assert_eq!(c.root, "/dev/vda");
        assert_eq!(c.rootfstype, "ext4");
        assert_eq!(c.rootflags, None);
        assert!(!c.read_only);
        assert_eq!(c.ip.to_string(), "169.254.0.21/30");
        assert_eq!(c.gateway.to_string(), "169.254.0.22");
        assert_eq!(join(&c.dns), "8.8.8.8,1.1.1.1");
        assert_eq!(c.hostname, "wrenn");
        assert_eq!(c.envd, PathBuf::from("/usr/local/bin/envd"));
        assert!(c.envd_args.is_empty());
        assert_eq!(c.mode, Mode::Guest);
        assert!(!c.debug);
    }

    #[test]
    fn every_key_is_parsed() {
        let parsed = parse(
            "console=ttyS0 root=/dev/vdb rootfstype=xfs rootflags=noatime,discard ro \
             wrenn.ip=10.0.0.2/24 wrenn.gw=10.0.0.1 wrenn.dns=9.9.9.9,2606:4700::1111 \
             wrenn.hostname=box-1.example wrenn.envd=/opt/envd wrenn.envd_args=--port,49983 \
             wrenn.mode=host wrenn.debug quiet",
        );
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let c = parsed.config;
        assert_eq!(c.root, "/dev/vdb");
        assert_eq!(c.rootfstype, "xfs");
        assert_eq!(c.rootflags.as_deref(), Some("noatime,discard"));
        assert!(c.read_only);
        assert_eq!(
            c.ip,
            Ipv4Cidr {
                addr: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24
            }
        );
        assert_eq!(c.gateway, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(join(&c.dns), "9.9.9.9,2606:4700::1111");
        assert_eq!(c.hostname, "box-1.example");
        assert_eq!(c.envd, PathBuf::from("/opt/envd"));
        assert_eq!(c.envd_args, vec!["--port", "49983"]);
        assert_eq!(c.mode, Mode::Host);
        assert!(c.debug);
    }

    #[test]
    fn last_occurrence_wins_and_rw_undoes_ro() {
        let c = parse("ro rw wrenn.hostname=a wrenn.hostname=b").config;
        assert!(!c.read_only);
        assert_eq!(c.hostname, "b");
    }

    #[test]
    fn debug_accepts_explicit_booleans() {
        assert!(parse("wrenn.debug=1").config.debug);
        assert!(!parse("wrenn.debug wrenn.debug=off").config.debug);
        let parsed = parse("wrenn.debug=maybe");
        assert!(!parsed.config.debug);
        assert_eq!(parsed.warnings[0].reason, ValueError::BadBool);
    }

    #[test]
    fn quoted_values_keep_spaces_and_lose_quotes() {
        let c = parse(r#"wrenn.envd_args="--name,a b" "wrenn.hostname=q1" root="/dev/vdc""#).config;
        assert_eq!(c.envd_args, vec!["--name", "a b"]);
        assert_eq!(c.hostname, "q1");
        assert_eq!(c.root, "/dev/vdc");
    }

    #[test]
    fn dashes_in_keys_read_as_underscores() {
        let c = parse("wrenn.envd-args=-v").config;
        assert_eq!(c.envd_args, vec!["-v"]);
    }

    #[test]
    fn malformed_ip_falls_back_with_warning() {
        let parsed = parse("wrenn.ip=300.1.2.3/99");
        assert_eq!(parsed.config.ip, DEFAULT_IP);
        let w = &parsed.warnings[0];
        assert_eq!(w.key, "wrenn.ip");
        assert_eq!(w.value, "300.1.2.3/99");
        assert!(matches!(w.reason, ValueError::BadIpv4(_)));
        assert_eq!(
            w.to_string(),
            "ignoring wrenn.ip=\"300.1.2.3/99\": not an IPv4 address: invalid IPv4 address syntax; \
             using default 169.254.0.21/30"
        );
    }

    #[test]
    fn bad_prefix_and_missing_prefix_are_reported() {
        let w = &parse("wrenn.ip=10.0.0.1/33").warnings[0];
        assert_eq!(w.reason, ValueError::BadPrefix("33".into()));
        let w = &parse("wrenn.ip=10.0.0.1").warnings[0];
        assert_eq!(w.reason, ValueError::MissingPrefix);
    }

    #[test]
    fn invalid_value_after_valid_one_resets_to_default() {
        let parsed = parse("wrenn.gw=10.0.0.1 wrenn.gw=nope");
        assert_eq!(parsed.config.gateway, DEFAULT_GW);
        assert_eq!(parsed.warnings[0].default, "169.254.0.22");
    }

    #[test]
    fn other_malformed_values_fall_back() {
        let parsed = parse(
            "root=UUID=1234 wrenn.dns=8.8.8.8,nope wrenn.hostname=-bad- \
             wrenn.envd=envd wrenn.mode=appliance rootfstype= wrenn.dns=",
        );
        assert_eq!(parsed.config, Config::default());
        let reasons: Vec<_> = parsed.warnings.iter().map(|w| w.reason.clone()).collect();
        assert_eq!(
            reasons,
            vec![
                ValueError::UnsupportedRootSpec("UUID=".into()),
                ValueError::BadDns("nope".into()),
                ValueError::BadHostname,
                ValueError::NotAbsolute,
                ValueError::BadMode,
                ValueError::Missing,
                ValueError::Missing,
            ]
        );
    }

    #[test]
    fn hostname_length_is_limited() {
        assert!(parse_hostname(&"a".repeat(64)).is_ok());
        assert_eq!(
            parse_hostname(&"a".repeat(65)),
            Err(ValueError::BadHostname)
        );
        assert_eq!(parse_hostname("a..b"), Err(ValueError::BadHostname));
        assert_eq!(parse_hostname("a_b"), Err(ValueError::BadHostname));
    }

    #[test]
    fn empty_envd_args_and_rootflags_mean_none() {
        let c = parse("wrenn.envd_args= rootflags=").config;
        assert!(c.envd_args.is_empty());
        assert_eq!(c.rootflags, None);
    }

    #[test]
    fn display_lists_every_key() {
        let text = Config::default().to_string();
        assert_eq!(
            text,
            "root=/dev/vda\nrootfstype=ext4\nrootflags=\nro=false\nwrenn.ip=169.254.0.21/30\n\
             wrenn.gw=169.254.0.22\nwrenn.dns=8.8.8.8,1.1.1.1\nwrenn.hostname=wrenn\n\
             wrenn.envd=/usr/local/bin/envd\nwrenn.envd_args=\nwrenn.mode=guest\nwrenn.debug=false\n"
        );
    }
}
