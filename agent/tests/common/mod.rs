//! Harness for the agent's end-to-end tests: a real `wrenn-agent` process
//! with its own state folder, port and network slot range, driven over HTTP
//! with a real client. Dropping an [`Agent`] destroys its sandboxes through
//! the API (restarting the agent first if a test killed it), stops the
//! process by PID and removes its folder. An agent may also run in a
//! network namespace of a [`fleet::FleetNet`], on an address of its own
//! ([`Agent::start_in`]).

#![allow(dead_code)]

pub mod fleet;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Agents in the host's network namespace alive in this test process; the
/// last one out removes the host's shared nft table. A namespaced agent's
/// table is in its namespace, which goes with its `FleetNet`: it must not
/// count, or its drop would remove the table of agents it knows nothing of.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicU32 = AtomicU32::new(0);
/// Slots per test agent (room for ten sandboxes at once); ranges start at
/// 1000 to stay clear of a real node.
const SLOTS: u32 = 12;
/// Test agents one process may start before its slot ranges come round
/// again; 16 processes' ranges of this many agents fit below slot 16384.
const AGENTS_PER_PROCESS: u32 = 80;

/// The folder of base images (the parent of the `base` image), or None when
/// the test is skipped (see `wrenn_tests::guest::image_or_skip`).
pub fn images_dir_or_skip(test: &str) -> Option<PathBuf> {
    let image = wrenn_tests::guest::image_or_skip(test)?;
    image.rootfs.parent()?.parent().map(Path::to_path_buf)
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    pub url: String,
    pub dir: PathBuf,
    pub first_slot: u32,
    config: PathBuf,
    env: Vec<(String, String)>,
    /// The network namespace (under /run/netns) it runs in; None: the host's.
    netns: Option<String>,
    /// The API key sent on every request (`X-API-Key`), when it needs one.
    key: Option<String>,
    http: ureq::Agent,
}

/// A status and JSON body.
pub type Answer = (u16, Value);

impl Agent {
    /// Starts an agent on a free port with a fresh state folder.
    pub fn start(images_dir: &Path) -> Agent {
        Self::start_with_env(images_dir, &[])
    }

    /// Same, with extra environment variables (`WRENN_*` settings).
    pub fn start_with_env(images_dir: &Path, env: &[(&str, &str)]) -> Agent {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::launch(images_dir, None, listen, None, env, "")
    }

    /// Starts an agent inside network namespace `netns` (a
    /// [`fleet::FleetNet`]'s) with its API on `listen`. Off loopback the
    /// agent refuses to start without an API key: give `key`, which its
    /// config then accepts and every request here carries.
    ///
    /// Only the network namespace changes (`nsenter --net`, not `ip netns
    /// exec`, which also gives the process a mount namespace of its own with
    /// /sys remounted): the agent must share the host's mounts, where it
    /// makes its sandboxes' namespaces under /run/netns.
    pub fn start_in(
        images_dir: &Path,
        netns: &str,
        listen: SocketAddr,
        key: Option<&str>,
        env: &[(&str, &str)],
    ) -> Agent {
        Self::launch(images_dir, Some(netns), listen, key, env, "")
    }

    /// [`Agent::start_in`] with `extra` appended to the agent's config
    /// (whole TOML tables, such as `[sandbox]\nmax_running = 1\n`).
    pub fn start_in_with(
        images_dir: &Path,
        netns: &str,
        listen: SocketAddr,
        key: Option<&str>,
        env: &[(&str, &str)],
        extra: &str,
    ) -> Agent {
        Self::launch(images_dir, Some(netns), listen, key, env, extra)
    }

    fn launch(
        images_dir: &Path,
        netns: Option<&str>,
        listen: SocketAddr,
        key: Option<&str>,
        env: &[(&str, &str)],
        extra: &str,
    ) -> Agent {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wrenn-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let first_slot = 1000
            + (std::process::id() % 16) * AGENTS_PER_PROCESS * SLOTS
            + (n % AGENTS_PER_PROCESS) * SLOTS;
        let config = dir.join("agent.toml");
        let key_hashes = match key {
            Some(key) => format!(
                "key_hashes = [{:?}]\n",
                wrenn_agent::config::hash_api_key(key)
            ),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "[node]\nstate_dir = {state:?}\nimages_dir = {images:?}\n\
                 [api]\nlisten = \"{listen}\"\n{key_hashes}\
                 [network]\nslots = {SLOTS}\nfirst_slot = {first_slot}\n\
                 [templates]\nwarm = false\n{extra}",
                state = dir.join("state"),
                images = images_dir,
            ),
        )
        .expect("write config");
        if netns.is_none() {
            LIVE.fetch_add(1, Ordering::SeqCst);
        }
        let mut agent = Agent {
            child: None,
            url: format!("http://{listen}"),
            dir,
            first_slot,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(str::to_owned),
            key: key.map(str::to_owned),
            http: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout_read(Duration::from_secs(300))
                .build(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("{log}");
        }
    }

    /// Starts the agent; Err with its log when it does not come up.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log file");
        let binary = env!("CARGO_BIN_EXE_wrenn-agent");
        let mut command = match &self.netns {
            // nsenter execs the agent without forking: the child's PID is
            // the agent's, so kill9 and terminate reach it (checked below).
            Some(netns) => {
                let mut nsenter = Command::new("nsenter");
                nsenter
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg("--")
                    .arg(binary);
                nsenter
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .env("WRENN_LOG", "info")
            // No background warm-up (a helper VM) unless a test asks for it.
            .env("WRENN_WARM", "0")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start wrenn-agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.get("/v1/health").0 == 200 {
                return self.check_pid_is_agent();
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "wrenn-agent exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "wrenn-agent did not answer within 60 s; log:\n{}",
            self.log()
        ))
    }

    /// Err unless the PID we spawned runs the agent itself (not a wrapper
    /// that would survive a kill by PID).
    fn check_pid_is_agent(&self) -> Result<(), String> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Ok(());
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| format!("cannot read /proc/{pid}/exe: {e}"))?;
        let binary = Path::new(env!("CARGO_BIN_EXE_wrenn-agent"));
        let same = |p: &Path| std::fs::canonicalize(p).ok();
        match same(&exe) == same(binary) {
            true => Ok(()),
            false => Err(format!(
                "PID {pid} runs {}, not {}: the agent was not exec'd in place, and a kill \
                 by PID would miss it",
                exe.display(),
                binary.display()
            )),
        }
    }

    /// The agent's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL, by PID.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the agent to stop with SIGTERM, by PID, and waits for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        child.wait().expect("wait for the agent")
    }

    /// Starts the agent again on the same state (after a kill or a stop).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent still runs");
        self.spawn();
    }

    /// Starts the agent again on the same state.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// A request to this agent, carrying its API key if it has one.
    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.http.request(method, &format!("{}{path}", self.url));
        match &self.key {
            Some(key) => request.set("X-API-Key", key),
            None => request,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        answer(self.request("GET", path).call())
    }

    pub fn delete(&self, path: &str) -> Answer {
        answer(self.request("DELETE", path).call())
    }

    pub fn post(&self, path: &str, body: Value) -> Answer {
        answer(self.request("POST", path).send_json(body))
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Answer {
        answer(
            self.request("POST", path)
                .set("Content-Type", "application/json")
                .send_bytes(body),
        )
    }

    pub fn put_bytes(&self, path: &str, body: &[u8]) -> Answer {
        answer(self.request("PUT", path).send_bytes(body))
    }

    /// GET returning the raw body.
    pub fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        let response = match self.request("GET", path).call() {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = response.status();
        let mut body = Vec::new();
        response
            .into_reader()
            .read_to_end(&mut body)
            .expect("read body");
        (status, body)
    }

    /// Creates a sandbox and returns its id; panics with the log on failure.
    pub fn create(&self, body: Value) -> String {
        let (status, sandbox) = self.post("/v1/sandboxes", body);
        assert_eq!(
            status,
            201,
            "create failed: {sandbox}\nlog:\n{}",
            self.log()
        );
        sandbox["id"].as_str().expect("id").to_owned()
    }

    /// Runs `python3 -c CODE` in the sandbox; returns (exit code, stdout).
    pub fn python(&self, id: &str, code: &str) -> (i64, String) {
        let (status, result) = self.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": "python3", "args": ["-c", code]}),
        );
        assert_eq!(status, 200, "exec failed: {result}");
        (
            result["exit_code"].as_i64().unwrap_or(-1),
            result["stdout"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// Slot numbers this agent may use.
    pub fn slots(&self) -> std::ops::Range<u32> {
        self.first_slot..self.first_slot + SLOTS
    }

    /// Every trace a sandbox of this agent could leave on the host.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for slot in self.slots() {
            if Path::new(&format!("/run/netns/wrenn-{slot}")).exists() {
                found.push(format!("netns wrenn-{slot}"));
            }
            if Path::new(&format!("/sys/class/net/wrenn-h{slot}")).exists() {
                found.push(format!("veth wrenn-h{slot}"));
            }
        }
        let sandboxes = self.dir.join("state/sandboxes");
        if let Ok(entries) = std::fs::read_dir(&sandboxes) {
            for entry in entries.flatten() {
                found.push(format!("folder {}", entry.path().display()));
            }
        }
        for pid in qemu_pids_under(&self.dir) {
            found.push(format!("QEMU process {pid}"));
        }
        found
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_none() && self.try_spawn().is_err() {
            // The agent cannot clean up after itself: remove what its
            // sandboxes could have left, by name (QEMU by PID below).
            // A namespaced agent's host ends live in its namespace.
            let link_ns: &[&str] = match &self.netns {
                Some(netns) => &["-n", netns],
                None => &[],
            };
            for slot in self.slots() {
                let _ = Command::new("ip")
                    .args(["netns", "delete", &format!("wrenn-{slot}")])
                    .stderr(Stdio::null())
                    .status();
                let _ = Command::new("ip")
                    .args(link_ns)
                    .args(["link", "delete", &format!("wrenn-h{slot}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let (_, list) = self.get("/v1/sandboxes");
        for sandbox in list["sandboxes"].as_array().cloned().unwrap_or_default() {
            if let Some(id) = sandbox["id"].as_str() {
                self.delete(&format!("/v1/sandboxes/{id}"));
            }
        }
        self.kill9();
        for pid in qemu_pids_under(&self.dir) {
            // Only QEMU processes whose command line names our own folder.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if self.netns.is_none() && LIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", "wrenn-host"])
                .stderr(Stdio::null())
                .status();
        }
        if std::env::var_os("WRENN_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// PIDs of QEMU processes whose command line mentions `dir`.
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    pids_under("qemu-system", dir)
}

/// PIDs of processes whose program's file name starts with `program` and
/// one of whose arguments mentions `dir`.
pub fn pids_under(program: &str, dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0);
            let first = String::from_utf8_lossy(args.next().unwrap_or_default()).into_owned();
            let name = first.rsplit('/').next().unwrap_or_default();
            name.starts_with(program) && args.any(|a| String::from_utf8_lossy(a).contains(&needle))
        })
        .collect()
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    match result {
        Ok(response) | Err(ureq::Error::Status(_, response)) => {
            let status = response.status();
            let text = response.into_string().unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends raw bytes on a new connection and returns what comes back.
pub fn raw_exchange(url: &str, request: &[u8]) -> String {
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                if response.windows(4).any(|w| w == b"\r\n\r\n") && response.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python, made (or checked) by the script.
pub fn sdk_python() -> String {
    let out = Command::new(repo().join("scripts/sdk-venv.sh"))
        .output()
        .expect("run scripts/sdk-venv.sh");
    assert!(
        out.status.success(),
        "scripts/sdk-venv.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("scripts/sdk-venv.sh printed no python")
        .trim()
        .to_owned()
}

/// The number after ` key=` in an agent's log line `line` (its colours
/// removed): `log_number(line, "bytes")` of `... bytes=42 ...` is 42.
pub fn log_number(line: &str, key: &str) -> u64 {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence: up to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {plain}"));
    plain[at + key.len() + 2..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {plain}"))
}
