//! Shared by the VMM's tests and its benchmark: a client for a real
//! `wrenn-vmm --api-sock` process, a console that collects serial output,
//! and what the `counter` guest prints.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One `wrenn-vmm --api-sock` process, killed when dropped.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
}

impl Vmm {
    pub fn start(dir: &Path, name: &str) -> Vmm {
        Self::start_with(dir, name, &[])
    }

    /// [`Vmm::start`] under a wrapper command that execs the VMM (such as
    /// `ip netns exec NAME`), so the child's PID is still the VMM's.
    pub fn start_with(dir: &Path, name: &str, wrapper: &[&str]) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.serial"));
        let vmm = env!("CARGO_BIN_EXE_wrenn-vmm");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(vmm);
                command
            }
            None => Command::new(vmm),
        };
        let child = command
            .arg("--api-sock")
            .arg(&socket)
            .arg("--serial-log")
            .arg(&serial)
            .stderr(Stdio::null())
            .spawn()
            .expect("start wrenn-vmm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "no API socket");
            // Short: the benchmark times this wait.
            std::thread::sleep(Duration::from_micros(100));
        }
        Vmm {
            child,
            socket,
            serial,
        }
    }

    /// Sends one request; returns the status and the JSON body (null if none).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut stream = UnixStream::connect(&self.socket).expect("connect");
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer[9..12].parse().expect("status");
        let json = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim())
            .filter(|b| !b.is_empty())
            .map(|b| serde_json::from_str(b).expect("json body"))
            .unwrap_or(Value::Null);
        (status, json)
    }

    pub fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("PUT", path, Some(&body.to_string()))
    }

    pub fn state(&self) -> String {
        self.call("GET", "/", None).1["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits for the process to end by itself (the guest reset).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "wrenn-vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Boots the flat guest program at `path` (a `WRENN_GUEST_*` binary)
    /// through the API, failing the test unless both requests succeed.
    pub fn boot_program(&self, path: &str) {
        let (status, body) = self.put("/boot-source", serde_json::json!({"program_path": path}));
        assert_eq!(status, 204, "{body}");
        let start = serde_json::json!({"action_type": "InstanceStart"});
        let (status, body) = self.put("/actions", start);
        assert_eq!(status, 204, "{body}");
    }

    /// Waits until the serial log contains `text`; fails the test after
    /// 30 s.
    pub fn wait_serial(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.serial().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} on the serial log: {:?}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serial output collected in memory.
#[derive(Clone, Default)]
pub struct Console(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Whether this host has /dev/kvm; says loudly that `test` is skipped if not.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED {test}: no /dev/kvm on this host");
    false
}

/// How far the `counter` guest counts.
pub const COUNTER_TARGET: u64 = 1 << 18;

/// What the `counter` guest prints when nothing interrupts it.
pub fn counter_output() -> String {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ring = vec![0u64; 65536];
    for count in 1..=COUNTER_TARGET {
        ring[(count & 0xffff) as usize] = count ^ K;
    }
    let sum = ring.iter().fold(0u64, |a, w| a.wrapping_add(*w));
    format!("{COUNTER_TARGET:016x} {sum:016x}\n")
}

/// Runs `machine` (its virtio devices included) until the guest ends,
/// failing the test if it has not after `limit`.
pub fn run_for(
    mut machine: wrenn_vmm::Machine,
    limit: Duration,
) -> (wrenn_vmm::Machine, wrenn_vmm::Exit) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (stop, finished) = (Arc::clone(&stop), Arc::clone(&finished));
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while !finished.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Release);
        })
    };
    machine.virtio().start(false).unwrap();
    let exit = machine.run_until(&stop).unwrap();
    machine.virtio().stop().unwrap();
    finished.store(true, Ordering::Release);
    watchdog.join().unwrap();
    (machine, exit)
}
