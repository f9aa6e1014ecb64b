//! Directory watches (`/fs/watch`): inotify events turned into NDJSON
//! `create`/`write`/`remove`/`rename` events, optionally for a whole tree.
//!
//! A rename inside the watched tree arrives as a MOVED_FROM/MOVED_TO pair
//! with one cookie and becomes a single `rename` event with `from`. A move
//! out of the tree becomes `remove`, a move into it `create`. In recursive
//! mode new sub-directories are watched as they appear, and entries created
//! in them before their watch existed are reported as `create`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{Event, EventMask, Inotify, WatchDescriptor, WatchMask};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use wrenn_http::stream::{NdjsonStream, KEEPALIVE_INTERVAL};
use wrenn_http::ApiError;

use super::paths::display;

/// How long an unpaired MOVED_FROM waits for its MOVED_TO.
const MOVE_PAIRING_WINDOW: Duration = Duration::from_millis(20);
/// Most directories one recursive watch covers.
const MAX_WATCHES: usize = 65_536;

/// One NDJSON line of a watch stream.
#[derive(Debug, Serialize, PartialEq)]
pub struct FsEvent {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_dir: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
}

impl FsEvent {
    fn at(kind: &'static str, path: &Path, is_dir: bool) -> Self {
        Self {
            kind,
            path: Some(display(path)),
            is_dir: Some(is_dir),
            from: None,
        }
    }

    fn bare(kind: &'static str) -> Self {
        Self {
            kind,
            path: None,
            is_dir: None,
            from: None,
        }
    }
}

/// A MOVED_FROM waiting for its MOVED_TO.
struct PendingMove {
    cookie: u32,
    path: PathBuf,
    is_dir: bool,
}

/// Whether to keep streaming after a batch of events.
#[derive(PartialEq)]
enum Flow {
    Continue,
    RootGone,
}

/// An inotify instance watching one directory (or tree).
pub struct Watcher {
    inotify: Inotify,
    root: PathBuf,
    root_wd: WatchDescriptor,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    pending: Option<PendingMove>,
}

fn dir_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::EXCL_UNLINK
        | WatchMask::ONLYDIR
}

impl Watcher {
    /// Starts watching `root` (404 if missing, 400 if not a directory).
    pub fn open(root: &Path, recursive: bool) -> Result<Self, ApiError> {
        let meta = std::fs::metadata(root)
            .map_err(|e| ApiError::from_io(&e, format!("cannot watch {}", root.display())))?;
        if !meta.is_dir() {
            return Err(ApiError::invalid_argument(format!(
                "{} is not a directory; watch its parent directory instead",
                root.display()
            )));
        }
        let inotify = Inotify::init()
            .map_err(|e| ApiError::from_io(&e, "cannot create an inotify instance"))?;
        let root_wd = inotify
            .watches()
            .add(root, dir_mask())
            .map_err(|e| watch_error(&e, root))?;
        let mut watcher = Self {
            inotify,
            root: root.to_path_buf(),
            root_wd: root_wd.clone(),
            recursive,
            dirs: HashMap::from([(root_wd, root.to_path_buf())]),
            pending: None,
        };
        if recursive {
            watcher.watch_children(root, &mut Vec::new(), false);
        }
        Ok(watcher)
    }

    /// Streams events until the client goes away or the root disappears.
    pub fn run(mut self, stream: &mut NdjsonStream) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let wait = if self.pending.is_some() {
                MOVE_PAIRING_WINDOW
            } else {
                KEEPALIVE_INTERVAL
            };
            let mut out = Vec::new();
            let flow = if self.wait_readable(wait)? {
                self.read_batch(&mut buf, &mut out)?
            } else if self.pending.is_some() {
                self.flush_pending(&mut out);
                Flow::Continue
            } else {
                out.push(FsEvent::bare("keepalive"));
                Flow::Continue
            };
            for event in &out {
                stream.queue(event)?;
            }
            stream.flush()?;
            if flow == Flow::RootGone {
                return Ok(());
            }
        }
    }

    fn wait_readable(&self, wait: Duration) -> io::Result<bool> {
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(errno) => Err(io::Error::from_raw_os_error(errno as i32)),
        }
    }

    fn read_batch(&mut self, buf: &mut [u8], out: &mut Vec<FsEvent>) -> io::Result<Flow> {
        let events: Vec<_> = match self.inotify.read_events(buf) {
            Ok(events) => events.map(|e| e.to_owned()).collect(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Continue),
            Err(e) => return Err(e),
        };
        for event in events {
            let event = Event {
                wd: event.wd,
                mask: event.mask,
                cookie: event.cookie,
                name: event.name.as_deref(),
            };
            if self.handle(&event, out) == Flow::RootGone {
                return Ok(Flow::RootGone);
            }
        }
        Ok(Flow::Continue)
    }

    fn handle(&mut self, event: &Event<&OsStr>, out: &mut Vec<FsEvent>) -> Flow {
        let mask = event.mask;
        let pairs_with_pending = mask.contains(EventMask::MOVED_TO)
            && self
                .pending
                .as_ref()
                .is_some_and(|p| p.cookie == event.cookie);
        if !pairs_with_pending {
            self.flush_pending(out);
        }
        if mask.contains(EventMask::Q_OVERFLOW) {
            out.push(FsEvent::bare("overflow"));
            return Flow::Continue;
        }
        if event.wd == self.root_wd && mask.intersects(EventMask::DELETE_SELF | EventMask::IGNORED)
        {
            out.push(FsEvent::at("remove", &self.root.clone(), true));
            return Flow::RootGone;
        }
        if event.wd == self.root_wd && mask.contains(EventMask::MOVE_SELF) {
            return Flow::RootGone;
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&event.wd);
            return Flow::Continue;
        }
        let (Some(dir), Some(name)) = (self.dirs.get(&event.wd), event.name) else {
            return Flow::Continue;
        };
        let path = dir.join(name);
        let is_dir = mask.contains(EventMask::ISDIR);
        self.handle_entry(mask, event.cookie, path, is_dir, out);
        Flow::Continue
    }

    fn handle_entry(
        &mut self,
        mask: EventMask,
        cookie: u32,
        path: PathBuf,
        is_dir: bool,
        out: &mut Vec<FsEvent>,
    ) {
        if mask.contains(EventMask::CREATE) {
            out.push(FsEvent::at("create", &path, is_dir));
            if is_dir && self.recursive {
                self.watch_tree(&path, out);
            }
        } else if mask.contains(EventMask::MODIFY) {
            let event = FsEvent::at("write", &path, is_dir);
            if out.last() != Some(&event) {
                out.push(event);
            }
        } else if mask.contains(EventMask::DELETE) {
            out.push(FsEvent::at("remove", &path, is_dir));
        } else if mask.contains(EventMask::MOVED_FROM) {
            self.pending = Some(PendingMove {
                cookie,
                path,
                is_dir,
            });
        } else if mask.contains(EventMask::MOVED_TO) {
            self.moved_to(path, is_dir, out);
        }
    }

    fn moved_to(&mut self, path: PathBuf, is_dir: bool, out: &mut Vec<FsEvent>) {
        match self.pending.take() {
            Some(from) => {
                if is_dir && self.recursive {
                    self.rebase(&from.path, &path);
                }
                out.push(FsEvent {
                    from: Some(display(&from.path)),
                    ..FsEvent::at("rename", &path, is_dir)
                });
            }
            None => {
                out.push(FsEvent::at("create", &path, is_dir));
                if is_dir && self.recursive {
                    self.watch_tree(&path, out);
                }
            }
        }
    }

    /// An unpaired MOVED_FROM: the entry left the watched tree.
    fn flush_pending(&mut self, out: &mut Vec<FsEvent>) {
        if let Some(gone) = self.pending.take() {
            if gone.is_dir && self.recursive {
                self.unwatch_under(&gone.path);
            }
            out.push(FsEvent::at("remove", &gone.path, gone.is_dir));
        }
    }

    /// Watches a new directory and everything below it, reporting entries
    /// that were created before the watch existed.
    fn watch_tree(&mut self, dir: &Path, out: &mut Vec<FsEvent>) {
        if self.add_watch(dir) {
            self.watch_children(dir, out, true);
        }
    }

    fn watch_children(&mut self, dir: &Path, out: &mut Vec<FsEvent>, report: bool) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if report {
                out.push(FsEvent::at("create", &path, is_dir));
            }
            if is_dir && self.add_watch(&path) {
                self.watch_children(&path, out, report);
            }
        }
    }

    fn add_watch(&mut self, dir: &Path) -> bool {
        if self.dirs.len() >= MAX_WATCHES {
            tracing::warn!(root = %self.root.display(), "watch limit reached; deeper directories are not watched");
            return false;
        }
        match self
            .inotify
            .watches()
            .add(dir, dir_mask() | WatchMask::DONT_FOLLOW)
        {
            Ok(wd) => {
                self.dirs.insert(wd, dir.to_path_buf());
                true
            }
            Err(err) => {
                tracing::debug!(dir = %dir.display(), error = %err, "cannot watch a sub-directory");
                false
            }
        }
    }

    /// A watched directory was renamed inside the tree: fix stored paths.
    fn rebase(&mut self, from: &Path, to: &Path) {
        for path in self.dirs.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = to.join(rest);
            }
        }
    }

    fn unwatch_under(&mut self, gone: &Path) {
        let stale: Vec<_> = self
            .dirs
            .iter()
            .filter(|(_, path)| path.starts_with(gone))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in stale {
            self.dirs.remove(&wd);
            let _ = self.inotify.watches().remove(wd);
        }
    }
}

fn watch_error(err: &io::Error, path: &Path) -> ApiError {
    if err.raw_os_error() == Some(libc::ENOSPC) {
        return ApiError::unavailable(
            "the inotify watch limit is reached; raise fs.inotify.max_user_watches or stop other watches",
        );
    }
    ApiError::from_io(err, format!("cannot watch {}", path.display()))
}
