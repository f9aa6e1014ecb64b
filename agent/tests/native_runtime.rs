//! The native runtime (wrenn-vmm) through the real agent API.
//!
//! - Forced with `WRENN_RUNTIME=native` on any host with `/dev/kvm`: a
//!   create starts wrenn-vmm in the sandbox's network namespace (not as the
//!   agent's child), the guest kernel prints its banner on the console, the
//!   node reports the runtime and why, and destroying (or the create's own
//!   roll-back, where the guest cannot finish booting, as under PVM) ends the
//!   process and removes every file, namespace and link.
//! - The full life of a sandbox (create, Python, pause, resume, Python)
//!   needs hardware KVM; elsewhere it says loudly that it is skipped.
//!
//! Needs root, the guest image (`make image`) and `/dev/kvm`. wrenn-vmm is
//! built here (`cargo build -p wrenn-vmm`, a no-op when it is fresh) into
//! the folder of the wrenn-agent under test, where the agent looks first.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{images_dir_or_skip, Agent};
use serde_json::{json, Value};
use wrenn_agent::runtime::probe::HostFacts;

/// How long the guest kernel may take to print its banner: ~20 s from the
/// ELF vmlinux under PVM, well under a second on hardware KVM.
const BANNER_TIMEOUT: Duration = Duration::from_secs(240);

/// Builds wrenn-vmm beside the wrenn-agent under test; the path.
fn build_vmm() -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_wrenn-agent"));
    let profile_dir = agent.parent().expect("target folder");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "-p", "wrenn-vmm", "--bin", "wrenn-vmm"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build -p wrenn-vmm");
    assert!(status.success(), "cargo build -p wrenn-vmm failed");
    let vmm = profile_dir.join("wrenn-vmm");
    assert!(vmm.is_file(), "{} was not built", vmm.display());
    vmm
}

/// What is needed here, or None (said loudly) when the test cannot run.
fn ready_or_skip(test: &str) -> Option<PathBuf> {
    let images = images_dir_or_skip(test)?;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED {test}: no /dev/kvm on this host (wrenn-vmm needs KVM)");
        return None;
    }
    build_vmm();
    Some(images)
}

/// PIDs of wrenn-vmm processes whose command line names `dir`.
fn vmm_pids_under(dir: &Path) -> Vec<u32> {
    common::pids_under("wrenn-vmm", dir)
}

/// Kills, by PID, any wrenn-vmm of `dir` a failed test leaves (the agent's
/// own clean-up only knows QEMU).
struct KillVmms(PathBuf);

impl Drop for KillVmms {
    fn drop(&mut self) {
        for pid in vmm_pids_under(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The argument after `flag` in `pid`'s command line.
fn argument_of(pid: u32, flag: &str) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(PathBuf::from)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The network namespace of `pid`, as the inode its `ns/net` link names.
fn netns_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The `wrenn-<slot>` namespace of `agent` that `pid` runs in.
fn sandbox_netns_of(agent: &Agent, pid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = netns_of(pid)?;
    agent.slots().find_map(|slot| {
        let name = format!("wrenn-{slot}");
        let meta = std::fs::metadata(format!("/run/netns/{name}")).ok()?;
        (inode == format!("net:[{}]", meta.ino())).then_some(name)
    })
}

/// Waits for `what` to be Some, at most `timeout`.
fn wait_for<T>(timeout: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = what() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn forced_native_runtime_boots_wrenn_vmm_in_the_sandbox_netns_and_leaves_nothing_behind() {
    let test = "native runtime, forced";
    let Some(images) = ready_or_skip(test) else {
        return;
    };
    let facts = HostFacts::read();
    let agent = Agent::start_with_env(&images, &[("WRENN_RUNTIME", "native")]);
    let _kill = KillVmms(agent.dir.clone());

    let (status, node) = agent.get("/v1/node");
    assert_eq!(status, 200, "{node}");
    let runtime = &node["runtime"];
    assert_eq!(runtime["name"], "native", "{node}");
    let reason = runtime["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("forced"), "reason: {reason}");
    if facts.hardware_kvm() {
        assert!(runtime["warning"].is_null(), "{node}");
    } else {
        let warning = runtime["warning"].as_str().unwrap_or_default();
        assert!(warning.contains("runtime auto"), "warning: {warning}");
        assert!(
            agent.log().contains(warning),
            "the warning is not in the agent's log:\n{}",
            agent.log()
        );
    }

    // The create blocks until envd answers or the boot is given up.
    let (done_tx, done) = mpsc::channel::<(u16, Value)>();
    let url = agent.url.clone();
    std::thread::spawn(move || {
        let http = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(400))
            .build();
        let answer = match http
            .post(&format!("{url}/v1/sandboxes"))
            .send_json(json!({"memory_mb": 512}))
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                let status = r.status();
                (status, r.into_json().unwrap_or(Value::Null))
            }
            Err(e) => (0, Value::String(e.to_string())),
        };
        let _ = done_tx.send(answer);
    });

    // Whatever the create answers first ends the waits below early.
    let mut answered: Option<(u16, Value)> = None;
    let create_answered = |answered: &mut Option<(u16, Value)>| {
        if answered.is_none() {
            *answered = done.try_recv().ok();
        }
        answered.is_some()
    };
    let pid = wait_for(Duration::from_secs(60), || {
        let pid = vmm_pids_under(&agent.dir).first().copied();
        (pid.is_some() || create_answered(&mut answered)).then_some(pid)
    })
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "no wrenn-vmm process started; create: {answered:?}; log:\n{}",
            agent.log()
        )
    });
    assert_ne!(
        parent_pid(pid),
        Some(std::process::id()),
        "wrenn-vmm must not be a child"
    );
    let netns = sandbox_netns_of(&agent, pid);
    assert!(
        netns.is_some(),
        "wrenn-vmm (pid {pid}) does not run in a sandbox namespace of this agent"
    );
    let console = argument_of(pid, "--serial-log").expect("--serial-log");
    let folder = console.parent().expect("sandbox folder").to_path_buf();
    assert!(folder.starts_with(agent.dir.join("state/sandboxes")));
    assert!(folder.join("rootfs.raw").is_file(), "no raw disk");
    let banner = |console: &Path| {
        std::fs::read_to_string(console)
            .unwrap_or_default()
            .contains("Linux version")
    };
    // Once the create has answered, the console may be gone with its folder.
    let seen = wait_for(BANNER_TIMEOUT, || {
        if banner(&console) {
            Some(true)
        } else if create_answered(&mut answered) {
            Some(false)
        } else {
            None
        }
    });
    assert_eq!(
        seen,
        Some(true),
        "no kernel banner within {}s; create: {answered:?}; console:\n{}\nlog:\n{}",
        BANNER_TIMEOUT.as_secs(),
        std::fs::read_to_string(&console).unwrap_or_default(),
        agent.log()
    );

    let (status, answer) = match answered {
        Some(answer) => answer,
        None => done
            .recv_timeout(Duration::from_secs(400))
            .expect("the create answered"),
    };
    if status == 201 {
        let id = answer["id"].as_str().expect("id");
        let (status, _) = agent.delete(&format!("/v1/sandboxes/{id}"));
        assert_eq!(status, 204);
    } else {
        // The guest could not finish booting here (PVM): the create says so
        // with the console's last lines, and rolled back.
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        eprintln!("create under {}: {status} {message}", facts.describe());
        assert!(!facts.hardware_kvm(), "create failed: {answer}");
        assert!(
            message.contains("guest agent") && message.contains("native"),
            "unclear create error: {answer}"
        );
    }

    assert!(
        vmm_pids_under(&agent.dir).is_empty(),
        "wrenn-vmm still runs"
    );
    assert!(!folder.exists(), "{} is left", folder.display());
    assert!(
        agent.leftovers().is_empty(),
        "left behind: {:?}",
        agent.leftovers()
    );
    let (_, list) = agent.get("/v1/sandboxes");
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );
}

#[test]
fn native_sandbox_runs_python_and_survives_pause_and_resume() {
    let test = "native sandbox life";
    let facts = HostFacts::read();
    if !facts.hardware_kvm() {
        eprintln!("SKIPPED {test} (needs hardware KVM: {})", facts.describe());
        return;
    }
    let Some(images) = ready_or_skip(test) else {
        return;
    };
    let agent = Agent::start_with_env(&images, &[("WRENN_RUNTIME", "native")]);
    let _kill = KillVmms(agent.dir.clone());
    let (_, node) = agent.get("/v1/node");
    assert_eq!(node["runtime"]["name"], "native", "{node}");
    let id = agent.create(json!({"memory_mb": 512}));
    let base = format!("/v1/sandboxes/{id}");

    let (code, out) = agent.python(&id, "print(6 * 7)");
    assert_eq!((code, out.trim()), (0, "42"));
    let (code, _) = agent.python(
        &id,
        "open('/root/kept', 'w').write('native'); import os; os.sync()",
    );
    assert_eq!(code, 0);

    let (status, paused) = agent.post(&format!("{base}/pause"), json!({}));
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["status"], "paused");
    assert!(
        vmm_pids_under(&agent.dir).is_empty(),
        "a paused sandbox has no VM"
    );

    let (status, resumed) = agent.post(&format!("{base}/resume"), json!({}));
    assert_eq!(status, 200, "{resumed}\nlog:\n{}", agent.log());
    let (code, out) = agent.python(&id, "print(open('/root/kept').read())");
    assert_eq!((code, out.trim()), (0, "native"));

    let (status, _) = agent.delete(&base);
    assert_eq!(status, 204);
    assert!(vmm_pids_under(&agent.dir).is_empty());
    assert!(
        agent.leftovers().is_empty(),
        "left behind: {:?}",
        agent.leftovers()
    );
}
