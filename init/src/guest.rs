//! Guest mode, the sandbox VM's boot sequence.
//!
//! Stage 1 runs in the initramfs: load the carried kernel modules, wait for
//! the root disk, mount it and switch to it. Stage 2 runs on the real root in
//! the same process: mount the remaining kernel file systems, set the host
//! identity, configure the network, then hand over to the envd supervisor.
//! Stage 1 is skipped when PID 1 already runs on the real root (booted
//! without an initramfs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::cmdline::Config;
use crate::log::{error, info, warning};
use crate::modules::{self, ModulesError};
use crate::mounts::{self, MountError};
use crate::net::{self, NetConfig};
use crate::services::{self, Services};
use crate::supervise::{self, EnvdSpec};
use crate::switch_root::{self, SwitchRootError};

/// Where the real root file system is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";
/// How long to wait for the root device to appear.
pub const ROOT_WAIT: Duration = Duration::from_secs(10);

/// A failure that stops the boot.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("cannot determine the running kernel version: {0}")]
    Uname(nix::Error),
    #[error("loading kernel modules: {0}")]
    Modules(#[from] ModulesError),
    #[error("{0}")]
    Mount(#[from] MountError),
    #[error("switching to the root file system: {0}")]
    SwitchRoot(#[from] SwitchRootError),
}

/// Boots the guest; returns only if the boot cannot continue.
pub fn run(config: &Config) -> GuestError {
    match stage1_if_needed(config) {
        Ok(()) => stage2(config),
        Err(e) => e,
    }
}

fn stage1_if_needed(config: &Config) -> Result<(), GuestError> {
    if switch_root::is_initramfs(Path::new("/"))? {
        stage1(config)
    } else {
        info!("already on the real root file system; skipping stage 1");
        Ok(())
    }
}

/// Initramfs → real root.
fn stage1(config: &Config) -> Result<(), GuestError> {
    load_modules()?;
    let waited = mounts::wait_for_device(&config.root, ROOT_WAIT)?;
    mounts::mount_root(config, Path::new(NEW_ROOT))?;
    info!(
        "root mounted",
        device = config.root,
        fstype = config.rootfstype,
        waited_ms = waited.as_millis()
    );
    let cleanup = switch_root::switch_root(Path::new(NEW_ROOT))?;
    info!(
        "switched root",
        initramfs_files_removed = cleanup.removed,
        not_removed = cleanup.failed
    );
    Ok(())
}

fn load_modules() -> Result<(), GuestError> {
    let uname = nix::sys::utsname::uname().map_err(GuestError::Uname)?;
    let kver = uname.release().to_string_lossy().into_owned();
    let Some(dir) = modules::find_module_dir(Path::new(modules::MODULES_BASE), &kver)? else {
        warning!(
            "no kernel modules in the initramfs; relying on built-in drivers",
            kernel = kver
        );
        return Ok(());
    };
    let plan = modules::plan(&dir.join("modules.dep"))?;
    let summary = modules::load_all(&plan);
    info!(
        "modules loaded",
        loaded = summary.loaded,
        already_loaded = summary.already_loaded,
        failed = summary.failed,
        dir = dir.display()
    );
    Ok(())
}

/// Real root: kernel file systems, identity, network, then envd and the
/// image's services (/etc/wrenn/services) forever.
fn stage2(config: &Config) -> ! {
    mounts::mount_late();
    crate::etc::configure(config, Path::new("/etc"));
    configure_network(config);
    let services = Services::load(Path::new(services::SERVICES_DIR));
    supervise::run(
        EnvdSpec {
            path: PathBuf::from(&config.envd),
            args: config.envd_args.clone(),
        },
        services,
    )
}

fn configure_network(config: &Config) {
    let net_config = NetConfig {
        address: config.ip,
        gateway: config.gateway,
    };
    match net::configure(net_config) {
        Ok(()) => info!(
            "network up",
            interface = net::INTERFACE,
            ip = config.ip,
            gw = config.gateway
        ),
        Err(e) => error!(
            "NETWORK SETUP FAILED; continuing without network",
            error = e
        ),
    }
}
