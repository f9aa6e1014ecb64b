//! The external programs the node runs, where each is looked up, and which
//! Debian package brings it.
//!
//! The agent resolves every program it needs once, at start
//! ([`require`]), and refuses to start naming the missing ones, rather than
//! failing at the first sandbox create with a 500. The runtimes then run the
//! paths found here, so the check and the use cannot disagree.
//!
//! The message for a missing program is the one `scripts/install-deps.sh`
//! prints for it.
//!
//! Not here: `wrenn-vmm`, which is ours and found beside the agent
//! ([`crate::runtime::native::find_binary`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// A program the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The command's file name.
    pub name: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// Folders tried after `PATH` (sbin folders are often not on a
    /// non-root `PATH`).
    pub fallback_dirs: &'static [&'static str],
    /// How to install it without breaking something else.
    pub install: &'static str,
}

/// The QEMU pair must be installed together at one version: installing
/// qemu-system-x86 alone next to a backported qemu-utils makes apt remove
/// qemu-img (docs/decisions.md, "QEMU packages").
const QEMU_INSTALL: &str = "install qemu-system-x86 and qemu-utils together at the same \
                            version (`make deps` in a Wrenn checkout does)";

pub const QEMU_SYSTEM: Tool = Tool {
    name: "qemu-system-x86_64",
    package: "qemu-system-x86",
    fallback_dirs: &[],
    install: QEMU_INSTALL,
};

pub const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
    fallback_dirs: &[],
    install: QEMU_INSTALL,
};

pub const NFT: Tool = Tool {
    name: "nft",
    package: "nftables",
    fallback_dirs: &["/usr/sbin", "/sbin"],
    install: "install it with `apt-get install nftables` (or `make deps` in a Wrenn checkout)",
};

/// A program that was not found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", self.what(), self.tool.install)]
pub struct Missing {
    pub tool: Tool,
}

impl Missing {
    /// What is missing and which package provides it: the words
    /// `scripts/install-deps.sh` uses.
    pub fn what(&self) -> String {
        let Tool { name, package, .. } = self.tool;
        let place = match self.tool.fallback_dirs {
            [] => "PATH".to_owned(),
            dirs => format!("PATH (nor in {})", dirs.join(" or ")),
        };
        format!("`{name}` is not on {place}: the Debian package {package} provides it")
    }
}

/// Every program that could not be found, for one error at start: what is
/// missing, then each remedy once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingTools(pub Vec<Missing>);

impl std::fmt::Display for MissingTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what: Vec<String> = self.0.iter().map(Missing::what).collect();
        let mut remedies: Vec<&str> = Vec::new();
        for missing in &self.0 {
            if !remedies.contains(&missing.tool.install) {
                remedies.push(missing.tool.install);
            }
        }
        write!(
            f,
            "cannot start: {}. To fix it: {}",
            what.join("; "),
            remedies.join("; ")
        )
    }
}

impl std::error::Error for MissingTools {}

impl Tool {
    /// Finds the program on this process's `PATH`, then in the fallback
    /// folders.
    pub fn find(&self) -> Result<PathBuf, Missing> {
        self.find_in(std::env::var_os("PATH").as_deref())
    }

    /// Finds the program on `path` (a `PATH` value), then in the fallback
    /// folders.
    pub fn find_in(&self, path: Option<&OsStr>) -> Result<PathBuf, Missing> {
        let on_path = path.into_iter().flat_map(std::env::split_paths);
        let fallbacks = self.fallback_dirs.iter().map(PathBuf::from);
        on_path
            .chain(fallbacks)
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable(candidate))
            .ok_or(Missing { tool: *self })
    }
}

/// Finds each of `tools`, in order, or says which are missing.
pub fn require<const N: usize>(tools: [Tool; N]) -> Result<[PathBuf; N], MissingTools> {
    let found = tools.map(|tool| tool.find());
    let missing: Vec<Missing> = found.iter().filter_map(|r| r.clone().err()).collect();
    if !missing.is_empty() {
        return Err(MissingTools(missing));
    }
    // Every entry is Ok here.
    Ok(found.map(Result::unwrap_or_default))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn a_program_is_found_in_the_first_path_folder_that_has_it() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        executable(b.path(), "qemu-img");
        let in_a = executable(a.path(), "qemu-img");
        let path = std::env::join_paths([a.path(), b.path()]).expect("join");
        assert_eq!(QEMU_IMG.find_in(Some(&path)), Ok(in_a));
    }

    #[test]
    fn a_file_that_is_not_executable_does_not_count() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("qemu-img"), "").expect("write");
        let err = QEMU_IMG
            .find_in(Some(dir.path().as_os_str()))
            .expect_err("not executable");
        assert_eq!(err.tool, QEMU_IMG);
    }

    #[test]
    fn the_message_names_the_program_and_its_package() {
        let dir = tempfile::tempdir().expect("dir");
        let err = QEMU_IMG
            .find_in(Some(dir.path().as_os_str()))
            .expect_err("missing");
        let message = err.to_string();
        assert!(
            message.starts_with(
                "`qemu-img` is not on PATH: the Debian package qemu-utils provides it"
            ),
            "{message}"
        );
        assert!(
            message.contains("together at the same version"),
            "{message}"
        );
    }

    #[test]
    fn fallback_folders_are_tried_after_path_and_named_when_missing() {
        let tool = Tool {
            fallback_dirs: &["/nonexistent/sbin"],
            ..NFT
        };
        let err = tool.find_in(None).expect_err("missing");
        assert!(
            err.to_string().starts_with(
                "`nft` is not on PATH (nor in /nonexistent/sbin): the Debian package nftables"
            ),
            "{err}"
        );
    }

    #[test]
    fn require_names_every_missing_program_at_once() {
        let tools = [
            Tool {
                name: "wrenn-no-such-a",
                ..QEMU_IMG
            },
            Tool {
                name: "wrenn-no-such-b",
                ..QEMU_SYSTEM
            },
        ];
        let err = require(tools).expect_err("missing").to_string();
        assert!(err.contains("`wrenn-no-such-a`"), "{err}");
        assert!(err.contains("`wrenn-no-such-b`"), "{err}");
        // The two share a remedy: it is said once.
        assert_eq!(err.matches(QEMU_INSTALL).count(), 1, "{err}");
    }
}
