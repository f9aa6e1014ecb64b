//! Runs the built wrenn-init binary (as an ordinary process, not PID 1) and
//! checks its test subcommands: `modules-order` on a real modules.dep in a
//! temporary directory, `parse-cmdline`, `render-etc`, and the usage errors.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wrenn_init(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wrenn-init"))
        .args(args)
        .output()
        .expect("run wrenn-init")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A module tree laid out like the initramfs's /lib/modules/<kver>.
struct ModuleTree {
    dir: PathBuf,
}

impl ModuleTree {
    fn new(tag: &str, dep: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wrenn-init-it-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        fs::write(dir.join("modules.dep"), dep).expect("write modules.dep");
        ModuleTree { dir }
    }

    fn add(&self, relative: &str) {
        let path = self.dir.join(relative);
        fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).expect("mkdir");
        fs::write(path, b"\x7fELF").expect("write module");
    }

    fn dep_file(&self) -> String {
        self.dir.join("modules.dep").to_string_lossy().into_owned()
    }
}

impl Drop for ModuleTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const VIRTIO_DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
";

#[test]
fn modules_order_prints_dependencies_first() {
    let tree = ModuleTree::new("order", VIRTIO_DEP);
    for line in VIRTIO_DEP.lines() {
        tree.add(line.split(':').next().expect("key"));
    }

    let output = wrenn_init(&["modules-order", &tree.dep_file()]);

    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let order: Vec<String> = stdout(&output).lines().map(str::to_string).collect();
    assert_eq!(
        order,
        vec![
            "kernel/net/core/failover.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
        ]
    );
}

#[test]
fn modules_order_names_a_missing_module_file() {
    let tree = ModuleTree::new("missing", "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n");
    tree.add("kernel/a.ko");

    let output = wrenn_init(&["modules-order", &tree.dep_file()]);

    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("module b is listed in modules.dep but its file"),
        "stderr: {}",
        stderr(&output)
    );
}

#[test]
fn modules_order_reports_cycles_and_compressed_modules() {
    let tree = ModuleTree::new("cycle", "a.ko: b.ko\nb.ko: a.ko\n");
    let output = wrenn_init(&["modules-order", &tree.dep_file()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cycle"), "{}", stderr(&output));

    let tree = ModuleTree::new("xz", "kernel/virtio.ko.xz:\n");
    tree.add("kernel/virtio.ko.xz");
    let output = wrenn_init(&["modules-order", &tree.dep_file()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("compressed modules are not supported"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn parse_cmdline_prints_key_value_lines() {
    let output = wrenn_init(&[
        "parse-cmdline",
        "console=ttyS0 ro wrenn.ip=10.1.2.3/24 wrenn.envd_args=\"--port,49983\" wrenn.debug",
    ]);

    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "root=/dev/vda\nrootfstype=ext4\nrootflags=\nro=true\nwrenn.ip=10.1.2.3/24\n\
         wrenn.gw=169.254.0.22\nwrenn.dns=8.8.8.8,1.1.1.1\nwrenn.hostname=wrenn\n\
         wrenn.envd=/usr/local/bin/envd\nwrenn.envd_args=--port,49983\nwrenn.mode=guest\n\
         wrenn.debug=true\n"
    );
    assert_eq!(stderr(&output), "");
}

#[test]
fn parse_cmdline_warns_and_falls_back_on_bad_values() {
    let output = wrenn_init(&["parse-cmdline", "wrenn.ip=300.1.2.3/99"]);

    assert!(output.status.success());
    assert!(stdout(&output).contains("wrenn.ip=169.254.0.21/30\n"));
    assert!(
        stderr(&output).contains("warning: ignoring wrenn.ip=\"300.1.2.3/99\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn render_etc_shows_the_files_boot_would_write() {
    let output = wrenn_init(&["render-etc", "wrenn.hostname=box wrenn.dns=9.9.9.9"]);

    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.contains("==> /etc/hostname <==\nbox\n"), "{text}");
    assert!(text.contains("127.0.1.1\tbox\n"), "{text}");
    assert!(text.contains("nameserver 9.9.9.9\n"), "{text}");
}

#[test]
fn anything_else_is_a_usage_error() {
    for args in [&[][..], &["boot"][..], &["modules-order"][..]] {
        let output = wrenn_init(args);
        assert_eq!(output.status.code(), Some(2), "args {args:?}");
        assert!(stderr(&output).contains("modules-order <modules.dep>"));
    }
    let output = wrenn_init(&["help"]);
    assert!(output.status.success());
    assert!(stdout(&output).contains("parse-cmdline"));
}
