//! The userfaultfd page server: serves a restored VM's memory, page by page
//! as the guest touches it, from a memory snapshot in the layer store.
//!
//! The VMM maps guest memory anonymously, registers it with a userfaultfd
//! and hands that descriptor and the layout of its memory to the agent over
//! a Unix socket ([`handover`], `docs/uffd.md`). A [`PageServer`] thread
//! then places every missing page: zero blocks with `UFFDIO_ZEROPAGE`
//! (no I/O), layer blocks read through [`LayerStore::read_blocks`] and
//! placed with `UFFDIO_COPY`. Pages the guest frees (`UFFD_EVENT_REMOVE`)
//! are zero from then on.
//!
//! - `handover.rs`: the protocol, both sides.
//! - `layout.rs`: regions checked against the snapshot; addresses to
//!   device blocks.
//! - `server.rs`: the thread: prefetch, events, faults and their windows.
//! - `place.rs`: the copy and zeropage ioctls over ranges of pages.
//! - `prefetch.rs`: recorded first-touch lists and their files.
//! - `stats.rs`: counters and fault latencies.
//!
//! [`accept`] serves one handover; [`accept_with_prefetch`] also loads the
//! snapshot's prefetch list and saves what the restore learnt.
//!
//! Not here: creating the userfaultfd or mapping memory (the VMM's job).

mod error;
pub mod handover;
mod layout;
mod place;
mod prefetch;
mod server;
mod stats;

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{info, warn};

use crate::store::{Header, HeaderId, LayerStore};

pub use error::{Error, Result};
pub use handover::{Received, Region};
pub use prefetch::{load_prefetch, prefetch_path, save_prefetch, MAX_PREFETCH, PREFETCH_VERSION};
pub use server::Exit;
pub use stats::{Latency, Stats};

use layout::Layout;
use server::{Server, Shared};

/// How long after the handover faults are recorded by default.
pub const RECORD_FOR: Duration = Duration::from_secs(1);
/// Pages placed per fault by default (64 KiB, the kernel's own fault-around
/// for file mappings).
pub const FAULT_AROUND: u64 = 16;

/// How to start a [`PageServer`].
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// Device blocks to place right after the handover, before waiting for
    /// faults (a list [`PageServer::record`] returned earlier).
    pub prefetch: &'a [u64],
    /// How long after the start faults are recorded.
    pub record_for: Duration,
    /// Pages placed per fault: the aligned window of this many device
    /// blocks around the faulting page, cut to its region (a power of two
    /// from 1 to 256; other values are rounded up or cut to that range).
    /// The prefetch places the window around each listed block too. 1
    /// places only the faulting page.
    pub fault_around: u64,
    /// The sandbox, for logs.
    pub sandbox: &'a str,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            prefetch: &[],
            record_for: RECORD_FOR,
            fault_around: FAULT_AROUND,
            sandbox: "",
        }
    }
}

/// A running page server: a thread serving one VM's memory. Dropping it
/// stops the thread and waits for it.
pub struct PageServer {
    stop: Arc<EventFd>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<Exit>>>,
    saver: Option<Saver>,
    sandbox: String,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("sandbox", &self.sandbox)
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// Takes a handover on `socket` and serves it: receives the userfaultfd and
/// the regions, checks them against `header`, starts the server and answers
/// the VMM. Whatever is wrong is answered to the VMM too, and returned.
pub fn accept(
    socket: UnixStream,
    header: Header,
    store: Arc<LayerStore>,
    options: &Options<'_>,
) -> Result<PageServer> {
    let reply = socket.try_clone().map_err(Error::socket("duplicate"))?;
    let started = handover::receive(&socket)
        .and_then(|received| PageServer::start(received, socket, header, store, options));
    match started {
        Ok(server) => {
            handover::answer(&reply, Ok(()))?;
            Ok(server)
        }
        Err(e) => {
            if let Err(answer) = handover::answer(&reply, Err(&e)) {
                warn!(sandbox = %options.sandbox, error = %answer,
                    "cannot tell the VMM why its handover was refused");
            }
            Err(e)
        }
    }
}

/// Serves a restore of the snapshot `header` with the prefetch list that
/// earlier restores of it saved, and saves what this one learns: loads
/// `<state_dir>/prefetch/<header id>` ([`load_prefetch`]), accepts the
/// handover on `socket` ([`accept`]) with that list as
/// [`Options::prefetch`] (`options.prefetch` is not used), and once
/// [`Options::record_for`] has passed, or sooner when the server ends,
/// saves the list followed by the blocks this restore faulted on that it
/// lacked, if there are any ([`save_prefetch`]). A damaged list is deleted
/// and the restore goes on without one; a list that cannot be read or
/// written is logged, never an error of the restore.
pub fn accept_with_prefetch(
    socket: UnixStream,
    header: Header,
    store: Arc<LayerStore>,
    state_dir: &Path,
    options: &Options<'_>,
) -> Result<PageServer> {
    let id = header.id().map_err(crate::store::Error::from)?;
    let list = match load_prefetch(state_dir, &id) {
        Ok(list) => list.unwrap_or_default(),
        Err(e) => {
            warn!(sandbox = %options.sandbox, error = %e, "restoring without a prefetch list");
            if matches!(e, Error::PrefetchCorrupt { .. }) {
                let _ = std::fs::remove_file(prefetch_path(state_dir, &id));
            }
            Vec::new()
        }
    };
    let with_list = Options {
        prefetch: &list,
        ..*options
    };
    let mut server = accept(socket, header, store, &with_list)?;
    let saver = Saver::start(
        Arc::clone(&server.shared),
        state_dir.to_owned(),
        id,
        list,
        Instant::now() + options.record_for,
        server.sandbox.clone(),
    )?;
    server.saver = Some(saver);
    Ok(server)
}

/// A thread that saves a server's record as the next prefetch list when
/// the record window closes or the server ends.
struct Saver {
    /// Dropped to save at once.
    now: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Saver {
    fn start(
        shared: Arc<Shared>,
        state_dir: PathBuf,
        id: HeaderId,
        list: Vec<u64>,
        at: Instant,
        sandbox: String,
    ) -> Result<Saver> {
        let (now, wait) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wrenn-prefetch".to_owned())
            .spawn(move || {
                // Returns at `at`, or when the sender is dropped.
                let _ = wait.recv_timeout(at.saturating_duration_since(Instant::now()));
                save_learnt(&state_dir, &id, list, &shared.record(), &sandbox);
            })
            .map_err(Error::setup("start its prefetch saver"))?;
        Ok(Saver { now, thread })
    }

    /// Saves now (unless done already) and waits for it.
    fn finish(self, sandbox: &str) {
        drop(self.now);
        if self.thread.join().is_err() {
            warn!(sandbox = %sandbox, "the prefetch saver panicked");
        }
    }
}

/// Saves `list` followed by the blocks of `recorded` it lacks, when there
/// are any.
fn save_learnt(
    state_dir: &Path,
    id: &HeaderId,
    mut list: Vec<u64>,
    recorded: &[u64],
    sandbox: &str,
) {
    let mut known: HashSet<u64> = list.iter().copied().collect();
    let before = list.len();
    list.extend(
        recorded
            .iter()
            .copied()
            .filter(|&block| known.insert(block)),
    );
    list.truncate(MAX_PREFETCH);
    if list.len() == before {
        return;
    }
    match save_prefetch(state_dir, id, &list) {
        Ok(path) => info!(sandbox = %sandbox, pages = list.len(), new = list.len() - before,
            path = %path.display(), "prefetch list saved"),
        Err(e) => warn!(sandbox = %sandbox, error = %e, "cannot save the prefetch list"),
    }
}

impl PageServer {
    /// Starts serving a received handover: checks its regions against
    /// `header` (a memory snapshot), then runs the server on its own
    /// thread. `socket` is the handover's connection: the server ends when
    /// the VMM closes it.
    pub fn start(
        received: Received,
        socket: UnixStream,
        header: Header,
        store: Arc<LayerStore>,
        options: &Options<'_>,
    ) -> Result<PageServer> {
        let layout = Layout::new(&received.regions, &header)?;
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::setup("create its stop eventfd")(error::errno(e)))?;
        let stop = Arc::new(stop);
        let shared = Arc::new(Shared::new(Instant::now() + options.record_for));
        let prefetch = options.prefetch.to_vec();
        let sandbox = options.sandbox.to_owned();
        info!(sandbox = %sandbox, regions = received.regions.len(),
            blocks = header.block_count(), prefetch = prefetch.len(), "page server starting");
        let server = Server::new(
            received.uffd,
            socket,
            Arc::clone(&stop),
            header,
            store,
            layout,
            Arc::clone(&shared),
            sandbox.clone(),
            options.fault_around,
        );
        let thread = std::thread::Builder::new()
            .name("wrenn-uffd".to_owned())
            .spawn(move || server.run(&prefetch))
            .map_err(Error::setup("start its thread"))?;
        Ok(PageServer {
            stop,
            shared,
            thread: Some(thread),
            saver: None,
            sandbox,
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// The device blocks faulted within [`Options::record_for`] of the
    /// start, each once, in the order they first faulted: the prefetch list
    /// of the next restore. Pages the prefetch placed do not fault, so a
    /// server started with a list records only what the list missed.
    pub fn record(&self) -> Vec<u64> {
        self.shared.record()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the server to stop and waits for it.
    pub fn stop(mut self) -> Result<Exit> {
        self.signal_stop();
        self.join()
    }

    /// Waits for the server to end by itself (the VMM went away).
    pub fn wait(mut self) -> Result<Exit> {
        self.join()
    }

    fn signal_stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!(sandbox = %self.sandbox, error = %e, "cannot signal the page server to stop");
        }
    }

    fn join(&mut self) -> Result<Exit> {
        let result = match self.thread.take() {
            None => Ok(Exit::Stopped),
            Some(thread) => thread.join().unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(Error::Panicked(message))
            }),
        };
        if let Some(saver) = self.saver.take() {
            saver.finish(&self.sandbox);
        }
        result
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if self.thread.is_some() || self.saver.is_some() {
            self.signal_stop();
            if let Err(e) = self.join() {
                warn!(sandbox = %self.sandbox, error = %e, "page server ended with an error");
            }
        }
    }
}
