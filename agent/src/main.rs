//! `wrenn-agent`: the node daemon. Loads the configuration, picks the
//! runtime, opens the node's state, finishes what a previous run left half
//! done, then serves the API until it is killed. Sandbox VMs are not its
//! children: killing the agent leaves them running, and the next start
//! finds them again.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use wrenn_agent::api::Api;
use wrenn_agent::clock::SystemClock;
use wrenn_agent::config::{Config, Overrides};
use wrenn_agent::fleet::{Gossip, Manifest};
use wrenn_agent::network::HostNetwork;
use wrenn_agent::runtime::native::{self, NativeRuntime};
use wrenn_agent::runtime::probe::{choose, HostFacts, HostProbe, RuntimeKind};
use wrenn_agent::runtime::qemu::QemuRuntime;
use wrenn_agent::runtime::Runtime;
use wrenn_agent::sandbox::templates::Templates;
use wrenn_agent::sandbox::{HostCapacity, Manager, Parts};
use wrenn_agent::store::LayerStore;
use wrenn_agent::tools;
use wrenn_http::{Listen, Server, ServerAllocator, ServerConfig};

#[global_allocator]
static GLOBAL: ServerAllocator = ServerAllocator;

/// The Wrenn node agent: runs sandboxes as microVMs behind an HTTP API.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    /// TOML config file; without one the embedded default is used.
    #[arg(long, env = "WRENN_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the HTTP API (IP:PORT).
    #[arg(long)]
    listen: Option<String>,
    /// Folder for the node's state, sandboxes and images.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Folder of base images (one folder per template).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Name of this node.
    #[arg(long)]
    node_name: Option<String>,
    /// Runtime: auto, qemu or native.
    #[arg(long)]
    runtime: Option<String>,
    /// QEMU acceleration: auto, kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// The wrenn-vmm binary (native runtime); default: next to wrenn-agent,
    /// else on PATH.
    #[arg(long)]
    vmm_binary: Option<PathBuf>,
    /// An API key to accept (needed to listen beyond loopback).
    #[arg(long)]
    api_key: Option<String>,
    /// The fleet manifest (docs/fleet.md); without one the node runs alone.
    #[arg(long, env = "WRENN_FLEET")]
    fleet: Option<PathBuf>,
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            state_dir: self.state_dir.clone(),
            images_dir: self.images_dir.clone(),
            node_name: self.node_name.clone(),
            runtime: self.runtime.clone(),
            accel: self.accel.clone(),
            vmm_binary: self.vmm_binary.clone(),
            api_key: self.api_key.clone(),
            warm: None,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Flags::parse()) {
        Ok(never) => match never {},
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("wrenn-agent: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> Result<std::convert::Infallible, String> {
    // Blocked here, before any thread exists, so that every thread inherits
    // the mask and only the shutdown thread receives these signals.
    let shutdown_signals = {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set
    };
    shutdown_signals
        .thread_block()
        .map_err(|e| format!("cannot block shutdown signals: {e}"))?;
    let reload_signal = SigSet::from(Signal::SIGHUP);
    reload_signal
        .thread_block()
        .map_err(|e| format!("cannot block SIGHUP: {e}"))?;
    let env = std::env::vars().collect();
    let overrides = Overrides::from_env(&env).then(flags.overrides());
    let config = Config::load(flags.config.as_deref(), &overrides).map_err(|e| e.to_string())?;
    let (probe, runtime) = choose_runtime(&config)?;
    let store = lmdb_schema::Store::open(&config.node.state_dir, lmdb_schema::StoreOptions::new())
        .map_err(|e| format!("cannot open the node's state: {e}"))?;
    let store = Arc::new(store);
    let layers = LayerStore::open(&config.node.state_dir, Arc::clone(&store))
        .map_err(|e| format!("cannot open the snapshot layers: {e}"))?;
    tracing::info!(io = %layers.backend(), "layer store opened");
    let manager = Arc::new(Manager::new(Parts {
        store,
        layers: Arc::new(layers),
        runtime,
        network: Arc::new(HostNetwork),
        clock: Arc::new(SystemClock),
        config: config.clone(),
        templates: Templates::new(config.images_dir()),
        capacity: HostCapacity::probe(),
    }));
    manager
        .node()
        .reconcile()
        .map_err(|e| format!("cannot reconcile the node's state: {e}"))?;
    // Unused snapshot files only cost disk: the node starts anyway.
    if let Err(e) = manager.snapshots().clean_files() {
        tracing::error!(error = %e, "cannot clean up snapshot files");
    }
    // Transfers cut short are kept to be resumed, for a day.
    wrenn_agent::api::transfer::clean_incoming(&manager.incoming_dir());
    if config.sandbox.pause_on_shutdown {
        manager.node().resume_marked();
    }
    start_reaper(Arc::clone(&manager));
    start_sampler(Arc::clone(&manager));
    wrenn_agent::sandbox::warm::start(Arc::clone(&manager));
    start_shutdown_watch(
        Arc::clone(&manager),
        shutdown_signals,
        config.sandbox.pause_on_shutdown,
    );
    let fleet = match &flags.fleet {
        Some(path) => {
            let manifest = Manifest::load(path).map_err(|e| e.to_string())?;
            let runtime = format!("{}/{}", probe.runtime.as_str(), probe.accel.as_str());
            let gossip = Gossip::start(
                manifest,
                &config.node_name(),
                wrenn_agent::fleet::view::publisher(&manager, runtime),
            )
            .map_err(|e| e.to_string())?;
            start_reload_watch(Arc::clone(&gossip), path.clone(), reload_signal);
            Some(gossip)
        }
        None => None,
    };
    let api = Api {
        manager,
        node_name: config.node_name(),
        probe,
        fleet,
        key_hashes: config.api.key_hashes.clone(),
        counters: Default::default(),
        default_timeout_s: config.sandbox.default_timeout_s,
        capsules: config.capsules.clone(),
        proxy_domain: config.proxy.domain.clone(),
        fetcher: wrenn_agent::api::transfer::Fetcher::new(config.fleet.transfer_mib_per_s),
    };
    let server_config = ServerConfig {
        workers: config.api.workers,
        max_json_body: config.api.max_json_body,
        max_header_line: config.api.max_header_line,
        max_head: config.api.max_head,
        bind_hint: Some("choose another address with --listen or WRENN_LISTEN"),
        ..ServerConfig::new(
            "wrenn-agent",
            env!("CARGO_PKG_VERSION"),
            Listen::Tcp(config.api.listen.to_string()),
        )
    };
    let server = Server::bind(server_config, api).map_err(|e| e.to_string())?;
    tracing::info!(listen = %config.api.listen, "wrenn-agent ready");
    server.run()
}

/// Picks the runtime from the configuration and the host, and says which
/// and why; a loud warning when the choice works but not well.
fn choose_runtime(config: &Config) -> Result<(HostProbe, Arc<dyn Runtime>), String> {
    let facts = HostFacts::read();
    let vmm = native::find_binary(&config.runtime.vmm_binary);
    let probe = choose(
        &facts,
        &config.runtime.kind,
        &config.runtime.accel,
        vmm.as_ref().map(drop).map_err(String::as_str),
    )?;
    let runtime: Arc<dyn Runtime> = match (probe.runtime, vmm) {
        (RuntimeKind::Native, Ok(binary)) => {
            tools::require([tools::NFT]).map_err(|e| e.to_string())?;
            tracing::info!(binary = %binary.display(), "wrenn-vmm found");
            Arc::new(NativeRuntime::new(binary))
        }
        (RuntimeKind::Native, Err(why)) => return Err(why),
        (RuntimeKind::Qemu, _) => {
            let [qemu, qemu_img, _nft] =
                tools::require([tools::QEMU_SYSTEM, tools::QEMU_IMG, tools::NFT])
                    .map_err(|e| e.to_string())?;
            tracing::info!(qemu = %qemu.display(), qemu_img = %qemu_img.display(), "QEMU found");
            Arc::new(QemuRuntime::new(probe.accel, qemu, qemu_img))
        }
    };
    tracing::info!(runtime = probe.runtime.as_str(), accel = probe.accel.as_str(),
        reason = %probe.reason, "runtime chosen");
    if let Some(warning) = &probe.warning {
        tracing::warn!(runtime = probe.runtime.as_str(), "{warning}");
        eprintln!("wrenn-agent: WARNING: {warning}");
    }
    Ok((probe, runtime))
}

/// Waits for SIGTERM or SIGINT, pauses every running sandbox if configured
/// (VMs otherwise keep running without the agent), and exits.
fn start_shutdown_watch(manager: Arc<Manager>, signals: SigSet, pause: bool) {
    let spawned = std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let signal = signals.wait();
            tracing::info!(signal = ?signal, pause, "stopping");
            if pause {
                manager.node().pause_all_for_shutdown();
            }
            tracing::info!("wrenn-agent stopped");
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot watch for shutdown signals");
    }
}

/// Re-reads the fleet manifest on SIGHUP and puts it in force; a manifest
/// that does not parse, or that [`Gossip::reload`] refuses, leaves the one
/// in force and says why in the log.
fn start_reload_watch(gossip: Arc<Gossip>, path: PathBuf, signal: SigSet) {
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || loop {
            if signal.wait().is_err() {
                return;
            }
            let outcome = Manifest::load(&path)
                .map_err(|e| e.to_string())
                .and_then(|m| gossip.reload(m));
            if let Err(why) = outcome {
                tracing::error!(path = %path.display(), "fleet manifest not reloaded: {why}");
            }
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot watch for SIGHUP"));
}

/// Measures the running sandboxes for `/v1/capsules/{id}/metrics`.
fn start_sampler(manager: Arc<Manager>) {
    std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || loop {
            std::thread::sleep(wrenn_agent::sandbox::metrics::INTERVAL);
            manager.sample_running();
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the metrics sampler"));
}

/// Destroys sandboxes whose timeout passed, once a second.
fn start_reaper(manager: Arc<Manager>) {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            manager.node().reap_expired();
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the timeout reaper"));
}
