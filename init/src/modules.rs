//! Kernel modules carried by the initramfs: locating the module directory,
//! parsing `modules.dep`, ordering modules so dependencies load before the
//! modules that need them, and loading them with `finit_module`.
//!
//! Every module named in `modules.dep` (as a key or as a dependency) is loaded.
//! The order is a depth-first post-order walk in file order, so it is
//! deterministic; a dependency cycle is an error. Only uncompressed `.ko` files
//! are supported.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use thiserror::Error;

use crate::log::{debug, error, info};

/// Where kernel modules live, in the initramfs as on a normal system.
pub const MODULES_BASE: &str = "/lib/modules";

/// Problems finding, reading or ordering the carried modules.
#[derive(Debug, Error)]
pub enum ModulesError {
    #[error("no module directory for kernel {kver}: {base}/{kver} does not exist and {base} holds {found} (expected exactly one directory)")]
    NoModuleDir {
        base: PathBuf,
        kver: String,
        found: String,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} line {line}: expected `module.ko: dependency.ko ...`, got {text:?}")]
    Malformed {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("module dependency cycle in modules.dep: {0}")]
    Cycle(String),
    #[error("module {name} is listed in modules.dep but its file {path} is missing; add it to the initramfs")]
    MissingFile { name: String, path: PathBuf },
    #[error("module {name}: compressed modules are not supported ({path}); carry the uncompressed .ko file")]
    Compressed { name: String, path: String },
    #[error("{path} in modules.dep is not a kernel module path (expected a name ending in .ko)")]
    NotAModule { path: String },
}

/// A module to load: its name (file name without `.ko`) and full path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// Path as written in modules.dep, relative to the module directory.
    pub relative: String,
    pub path: PathBuf,
}

/// The dependency graph from modules.dep, keeping the order of first mention.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DepGraph {
    nodes: Vec<String>,
    deps: HashMap<String, Vec<String>>,
}

impl DepGraph {
    fn add_node(&mut self, node: &str) {
        if !self.deps.contains_key(node) {
            self.deps.insert(node.to_string(), Vec::new());
            self.nodes.push(node.to_string());
        }
    }

    fn add_edge(&mut self, module: &str, dep: &str) {
        self.add_node(dep);
        if let Some(list) = self.deps.get_mut(module) {
            list.push(dep.to_string());
        }
    }
}

/// Parses the text of a modules.dep file. `path` is only used in messages.
pub fn parse_dep(text: &str, path: &Path) -> Result<DepGraph, ModulesError> {
    let mut graph = DepGraph::default();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = || ModulesError::Malformed {
            path: path.to_path_buf(),
            line: index + 1,
            text: raw.to_string(),
        };
        let (module, deps) = line.split_once(':').ok_or_else(malformed)?;
        let module = module.trim();
        if module.is_empty() || module.contains(char::is_whitespace) {
            return Err(malformed());
        }
        graph.add_node(module);
        for dep in deps.split_whitespace() {
            graph.add_edge(module, dep);
        }
    }
    Ok(graph)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    InProgress,
    Done,
}

/// Orders every module of the graph so each comes after all its dependencies.
pub fn load_order(graph: &DepGraph) -> Result<Vec<String>, ModulesError> {
    let mut marks = HashMap::new();
    let mut stack = Vec::new();
    let mut order = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        visit(graph, node, &mut marks, &mut stack, &mut order)?;
    }
    Ok(order)
}

fn visit<'a>(
    graph: &'a DepGraph,
    node: &'a str,
    marks: &mut HashMap<&'a str, Mark>,
    stack: &mut Vec<&'a str>,
    order: &mut Vec<String>,
) -> Result<(), ModulesError> {
    match marks.get(node) {
        Some(Mark::Done) => return Ok(()),
        Some(Mark::InProgress) => return Err(cycle_error(stack, node)),
        None => {}
    }
    marks.insert(node, Mark::InProgress);
    stack.push(node);
    for dep in graph.deps.get(node).into_iter().flatten() {
        visit(graph, dep, marks, stack, order)?;
    }
    stack.pop();
    marks.insert(node, Mark::Done);
    order.push(node.to_string());
    Ok(())
}

fn cycle_error(stack: &[&str], node: &str) -> ModulesError {
    let start = stack.iter().position(|n| *n == node).unwrap_or(0);
    let mut path: Vec<&str> = stack[start..].to_vec();
    path.push(node);
    ModulesError::Cycle(path.join(" -> "))
}

/// Module name for a modules.dep path, rejecting compressed or odd files.
pub fn module_name(relative: &str) -> Result<String, ModulesError> {
    let file = relative.rsplit('/').next().unwrap_or(relative);
    if let Some(name) = file.strip_suffix(".ko") {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
    }
    if let Some((name, _)) = file.split_once(".ko.") {
        return Err(ModulesError::Compressed {
            name: name.to_string(),
            path: relative.to_string(),
        });
    }
    Err(ModulesError::NotAModule {
        path: relative.to_string(),
    })
}

/// Reads `dep_file`, orders its modules and checks that every file exists
/// (paths are relative to the directory holding `dep_file`).
pub fn plan(dep_file: &Path) -> Result<Vec<Module>, ModulesError> {
    let text = fs::read_to_string(dep_file).map_err(|source| ModulesError::Read {
        path: dep_file.to_path_buf(),
        source,
    })?;
    let dir = dep_file.parent().unwrap_or(Path::new("."));
    let order = load_order(&parse_dep(&text, dep_file)?)?;
    order
        .into_iter()
        .map(|relative| resolve(dir, relative))
        .collect()
}

fn resolve(dir: &Path, relative: String) -> Result<Module, ModulesError> {
    let name = module_name(&relative)?;
    let path = dir.join(&relative);
    if !path.is_file() {
        return Err(ModulesError::MissingFile { name, path });
    }
    Ok(Module {
        name,
        relative,
        path,
    })
}

/// Finds `<base>/<kver>`, or the only directory under `base` if that does not
/// exist. Returns `Ok(None)` when `base` is missing or empty (no modules carried).
pub fn find_module_dir(base: &Path, kver: &str) -> Result<Option<PathBuf>, ModulesError> {
    let wanted = base.join(kver);
    if wanted.is_dir() {
        return Ok(Some(wanted));
    }
    let mut dirs: Vec<PathBuf> = match fs::read_dir(base) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModulesError::Read {
                path: base.to_path_buf(),
                source,
            })
        }
    };
    match dirs.len() {
        0 => Ok(None),
        1 => Ok(dirs.pop()),
        _ => Err(ModulesError::NoModuleDir {
            base: base.to_path_buf(),
            kver: kver.to_string(),
            found: describe_dirs(&dirs),
        }),
    }
}

fn describe_dirs(dirs: &[PathBuf]) -> String {
    let names: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    format!("{} directories ({})", names.len(), names.join(", "))
}

/// How a batch of module loads went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadSummary {
    pub loaded: usize,
    pub already_loaded: usize,
    pub failed: usize,
}

/// Loads the modules in order, logging each. A failure is logged and the rest
/// are still tried (a later wait for the root disk or eth0 reports the impact).
pub fn load_all(modules: &[Module]) -> LoadSummary {
    let mut summary = LoadSummary::default();
    for module in modules {
        let started = Instant::now();
        let result = load_one(&module.path);
        let ms = started.elapsed().as_millis();
        match result {
            Ok(()) => {
                summary.loaded += 1;
                info!("module loaded", name = module.name, ms = ms);
            }
            Err(LoadError::Kernel(Errno::EEXIST)) => {
                summary.already_loaded += 1;
                debug!("module already loaded", name = module.name);
            }
            Err(e) => {
                summary.failed += 1;
                error!(
                    "module load failed",
                    name = module.name,
                    path = module.path.display(),
                    error = e
                );
            }
        }
    }
    summary
}

#[derive(Debug, Error)]
enum LoadError {
    #[error("cannot open the module file: {0}")]
    Open(io::Error),
    #[error("finit_module: {0} (see the kernel log for details)")]
    Kernel(Errno),
}

fn load_one(path: &Path) -> Result<(), LoadError> {
    let file = File::open(path).map_err(LoadError::Open)?;
    finit_module(&file, c"", ModuleInitFlags::empty()).map_err(LoadError::Kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(text: &str) -> Result<Vec<String>, ModulesError> {
        load_order(&parse_dep(text, Path::new("modules.dep"))?)
    }

    fn position(list: &[String], item: &str) -> usize {
        list.iter()
            .position(|m| m == item)
            .unwrap_or_else(|| panic!("{item} missing from {list:?}"))
    }

    const VIRTIO: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
";

    #[test]
    fn real_layout_orders_dependencies_first() {
        let list = order(VIRTIO).expect("valid graph");
        assert_eq!(list.len(), 7);
        for (before, after) in [
            ("virtio_ring.ko", "virtio_mmio.ko"),
            ("virtio.ko", "virtio_mmio.ko"),
            ("virtio_ring.ko", "virtio_blk.ko"),
            ("failover.ko", "net_failover.ko"),
            ("net_failover.ko", "virtio_net.ko"),
        ] {
            let find = |suffix: &str| {
                let full = list
                    .iter()
                    .find(|m| m.ends_with(&format!("/{suffix}")))
                    .expect("module present");
                position(&list, full)
            };
            assert!(
                find(before) < find(after),
                "{before} before {after}: {list:?}"
            );
        }
    }

    #[test]
    fn order_is_deterministic_post_order() {
        let list = order("c.ko: b.ko a.ko\nb.ko: a.ko\na.ko:\n").expect("valid");
        assert_eq!(list, vec!["a.ko", "b.ko", "c.ko"]);
    }

    #[test]
    fn diamond_loads_shared_dependency_once() {
        let list = order("top.ko: left.ko right.ko\nleft.ko: base.ko\nright.ko: base.ko\n")
            .expect("valid");
        assert_eq!(list, vec!["base.ko", "left.ko", "right.ko", "top.ko"]);
    }

    #[test]
    fn dependency_that_is_not_a_key_is_still_loaded() {
        let list = order("a.ko: lonely.ko\n").expect("valid");
        assert_eq!(list, vec!["lonely.ko", "a.ko"]);
    }

    #[test]
    fn cycle_is_an_error_naming_the_path() {
        let err = order("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n").expect_err("cycle");
        assert_eq!(
            err.to_string(),
            "module dependency cycle in modules.dep: a.ko -> b.ko -> c.ko -> a.ko"
        );
        assert!(matches!(order("a.ko: a.ko\n"), Err(ModulesError::Cycle(_))));
    }

    #[test]
    fn comments_and_blank_lines_are_skipped_malformed_lines_are_not() {
        assert_eq!(order("# x\n\na.ko:\n").expect("valid"), vec!["a.ko"]);
        let err = order("a.ko:\nthis is wrong\n").expect_err("malformed");
        assert!(
            matches!(err, ModulesError::Malformed { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn module_names_and_compression() {
        assert_eq!(
            module_name("kernel/x/virtio_net.ko").ok(),
            Some("virtio_net".into())
        );
        let err = module_name("kernel/x/virtio_net.ko.xz").expect_err("compressed");
        assert!(matches!(err, ModulesError::Compressed { ref name, .. } if name == "virtio_net"));
        assert!(err.to_string().contains("not supported"));
        assert!(matches!(
            module_name("kernel/x/readme.txt"),
            Err(ModulesError::NotAModule { .. })
        ));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wrenn-init-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn plan_checks_every_file_exists() {
        let dir = temp_dir("plan");
        fs::create_dir_all(dir.join("kernel")).expect("mkdir");
        fs::write(
            dir.join("modules.dep"),
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n",
        )
        .expect("write");
        fs::write(dir.join("kernel/a.ko"), b"").expect("write");
        let err = plan(&dir.join("modules.dep")).expect_err("b.ko is missing");
        assert!(
            matches!(err, ModulesError::MissingFile { ref name, .. } if name == "b"),
            "{err}"
        );
        assert!(err.to_string().contains("module b is listed"), "{err}");

        fs::write(dir.join("kernel/b.ko"), b"").expect("write");
        let modules = plan(&dir.join("modules.dep")).expect("complete");
        let names: Vec<_> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["b", "a"]);
        assert_eq!(modules[0].path, dir.join("kernel/b.ko"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn module_dir_prefers_running_kernel_then_single_dir() {
        let base = temp_dir("moddir");
        assert_eq!(
            find_module_dir(&base.join("none"), "6.1.0").ok(),
            Some(None)
        );
        assert_eq!(find_module_dir(&base, "6.1.0").ok(), Some(None));
        fs::create_dir_all(base.join("6.1.0-other")).expect("mkdir");
        assert_eq!(
            find_module_dir(&base, "6.1.0").ok(),
            Some(Some(base.join("6.1.0-other")))
        );
        fs::create_dir_all(base.join("6.1.0")).expect("mkdir");
        assert_eq!(
            find_module_dir(&base, "6.1.0").ok(),
            Some(Some(base.join("6.1.0")))
        );
        fs::create_dir_all(base.join("5.10")).expect("mkdir");
        assert!(matches!(
            find_module_dir(&base, "6.2"),
            Err(ModulesError::NoModuleDir { .. })
        ));
        let _ = fs::remove_dir_all(&base);
    }
}
