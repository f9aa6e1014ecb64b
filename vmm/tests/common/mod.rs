//! A client for a real `wrenn-vmm --api-sock` process, shared by the API
//! tests and the benchmark.

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
        let socket = dir.join(format!("{name}.sock"));
        let serial = dir.join(format!("{name}.serial"));
        let child = Command::new(env!("CARGO_BIN_EXE_wrenn-vmm"))
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
            std::thread::sleep(Duration::from_millis(5));
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
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
