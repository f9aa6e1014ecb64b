//! A host without one of the programs the node runs: `scripts/install-deps.sh
//! --check` and `wrenn-agent` both refuse, naming the program and its Debian
//! package in the same words.
//!
//! Each test builds a `PATH` folder of links to every program it needs except
//! `qemu-img`, so it runs on the real host without uninstalling anything.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What both say when `qemu-img` is missing.
const QEMU_IMG_MISSING: &str =
    "`qemu-img` is not on PATH: the Debian package qemu-utils provides it";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate sits in the workspace")
        .to_path_buf()
}

/// The real location of `name` on this process's PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A folder with a link to each of `names` that exists on this host.
fn path_with(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in names {
        if let Some(real) = which(name) {
            symlink(real, dir.path().join(name)).expect("symlink");
        }
    }
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_install_check_fails_naming_qemu_img_when_path_lacks_it() {
    let script = repo_root().join("scripts/install-deps.sh");
    let list = Command::new("bash")
        .arg(&script)
        .arg("--list")
        .output()
        .expect("run install-deps.sh --list");
    assert!(list.status.success(), "--list failed: {}", stderr(&list));
    let commands: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(commands.iter().any(|c| c == "qemu-img"), "{commands:?}");
    let mut keep: Vec<&str> = commands.iter().map(String::as_str).collect();
    keep.retain(|&c| c != "qemu-img");
    keep.push("cargo");
    let path = path_with(&keep);

    let out = Command::new("/bin/bash")
        .arg(&script)
        .arg("--check")
        .env("PATH", path.path())
        .output()
        .expect("run install-deps.sh --check");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the check passed without qemu-img: {err}"
    );
    assert!(
        err.contains(&format!("install-deps: {QEMU_IMG_MISSING}")),
        "{err}"
    );
    // Only what is really missing is named.
    let named: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("is not on PATH"))
        .collect();
    assert_eq!(named.len(), 1, "{err}");
}

#[test]
fn the_install_check_passes_on_this_host() {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/install-deps.sh"))
        .arg("--check")
        .output()
        .expect("run install-deps.sh --check");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn the_agent_refuses_to_start_without_qemu_img_and_says_the_same() {
    let path = path_with(&["qemu-system-x86_64", "nft"]);
    let state = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_wrenn-agent"))
        .args(["--runtime", "qemu", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .env("PATH", path.path())
        .env_remove("WRENN_CONFIG")
        .output()
        .expect("run wrenn-agent");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the agent started without qemu-img: {err}"
    );
    assert!(err.contains(QEMU_IMG_MISSING), "{err}");
    assert!(
        err.contains("qemu-system-x86 and qemu-utils together"),
        "{err}"
    );
    // It stopped before touching its state.
    let left: Vec<_> = std::fs::read_dir(state.path())
        .expect("read state dir")
        .collect();
    assert!(left.is_empty(), "the agent wrote {left:?} before refusing");
}
