//! The sandbox's identity files: host name, /etc/hostname, /etc/hosts and
//! /etc/resolv.conf. Rendering is pure (and unit tested); writing goes through
//! a temporary file and a rename, so readers never see a half-written file and
//! a symlinked /etc/resolv.conf is replaced rather than followed.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::cmdline::Config;
use crate::log::{info, warning};

/// Address that /etc/hosts maps the sandbox's host name to (Debian convention).
pub const HOSTNAME_ADDR: &str = "127.0.1.1";

const LOCALHOST_LINES: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// A failure to set up one identity file.
#[derive(Debug, Error)]
pub enum EtcError {
    #[error("sethostname({name}) failed: {source}")]
    SetHostname { name: String, source: nix::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Content of /etc/hostname.
pub fn render_hostname(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// Content of /etc/resolv.conf for the given name servers.
pub fn render_resolv_conf(dns: &[IpAddr]) -> String {
    let mut out = String::from("# Written by wrenn-init from wrenn.dns\n");
    for server in dns {
        out.push_str(&format!("nameserver {server}\n"));
    }
    out
}

/// Content of /etc/hosts: the existing file (if any) with its `127.0.1.1`
/// line replaced by one for `hostname`, and localhost entries added if absent.
pub fn render_hosts(existing: Option<&str>, hostname: &str) -> String {
    let mut kept = String::new();
    let mut has_localhost = false;
    for line in existing.unwrap_or("").lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first == HOSTNAME_ADDR {
            continue;
        }
        has_localhost |= first == "127.0.0.1";
        kept.push_str(line);
        kept.push('\n');
    }
    let mut out = String::new();
    if !has_localhost {
        out.push_str(LOCALHOST_LINES);
    }
    out.push_str(&kept);
    out.push_str(&format!("{HOSTNAME_ADDR}\t{hostname}\n"));
    out
}

/// Writes `contents` to `path` through `.<name>.wrenn-init.tmp` and a rename.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), EtcError> {
    let wrap = |source| EtcError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.wrenn-init.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(wrap)?;
    file.write_all(contents.as_bytes()).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        wrap(e)
    })
}

/// Sets the host name and writes the identity files under `etc`, logging
/// each failure; none of them stops the boot.
pub fn configure(config: &Config, etc: &Path) {
    let steps: [(&str, Result<(), EtcError>); 4] = [
        ("hostname", set_hostname(&config.hostname)),
        (
            "/etc/hostname",
            write_atomic(
                &etc.join("hostname"),
                &render_hostname(&config.hostname),
                0o644,
            ),
        ),
        (
            "/etc/hosts",
            write_hosts(&etc.join("hosts"), &config.hostname),
        ),
        (
            "/etc/resolv.conf",
            write_atomic(
                &etc.join("resolv.conf"),
                &render_resolv_conf(&config.dns),
                0o644,
            ),
        ),
    ];
    let mut problems = 0;
    for (what, result) in steps {
        if let Err(e) = result {
            problems += 1;
            warning!("cannot set up identity", what = what, error = e);
        }
    }
    info!(
        "identity configured",
        hostname = config.hostname,
        problems = problems
    );
}

fn set_hostname(name: &str) -> Result<(), EtcError> {
    nix::unistd::sethostname(name).map_err(|source| EtcError::SetHostname {
        name: name.to_string(),
        source,
    })
}

fn write_hosts(path: &Path, hostname: &str) -> Result<(), EtcError> {
    let existing = fs::read_to_string(path).ok();
    write_atomic(path, &render_hosts(existing.as_deref(), hostname), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn resolv_conf_lists_servers_in_order() {
        let dns = [
            IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
            "2606:4700::1111".parse().expect("v6"),
        ];
        assert_eq!(
            render_resolv_conf(&dns),
            "# Written by wrenn-init from wrenn.dns\nnameserver 8.8.8.8\nnameserver 2606:4700::1111\n"
        );
    }

    #[test]
    fn hosts_from_scratch_has_localhost_and_hostname() {
        assert_eq!(
            render_hosts(None, "wrenn"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\twrenn\n"
        );
    }

    #[test]
    fn hosts_replaces_old_hostname_line_and_keeps_the_rest() {
        let existing = "127.0.0.1 localhost\n127.0.1.1 debian\n10.0.0.5 db # note\n";
        assert_eq!(
            render_hosts(Some(existing), "box"),
            "127.0.0.1 localhost\n10.0.0.5 db # note\n127.0.1.1\tbox\n"
        );
    }

    #[test]
    fn hosts_rendering_is_idempotent() {
        let once = render_hosts(None, "wrenn");
        assert_eq!(render_hosts(Some(&once), "wrenn"), once);
    }

    #[test]
    fn hostname_file_ends_with_newline() {
        assert_eq!(render_hostname("wrenn"), "wrenn\n");
    }

    #[test]
    fn atomic_write_replaces_a_symlink_instead_of_following_it() {
        let dir = std::env::temp_dir().join(format!("wrenn-init-etc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let target = dir.join("stub-resolv.conf");
        fs::write(&target, "nameserver 127.0.0.53\n").expect("write");
        std::os::unix::fs::symlink(&target, dir.join("resolv.conf")).expect("symlink");

        write_atomic(&dir.join("resolv.conf"), "nameserver 1.1.1.1\n", 0o644).expect("write");

        let meta = fs::symlink_metadata(dir.join("resolv.conf")).expect("stat");
        assert!(meta.is_file());
        assert_eq!(
            fs::read_to_string(dir.join("resolv.conf")).expect("read"),
            "nameserver 1.1.1.1\n"
        );
        assert_eq!(
            fs::read_to_string(&target).expect("read"),
            "nameserver 127.0.0.53\n"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
