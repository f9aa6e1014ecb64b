//! The page server's thread: prefetch, then wait for userfaultfd events and
//! resolve each fault from the snapshot.
//!
//! One thread per VM. It polls three descriptors: the userfaultfd, the
//! handover socket (closed by the VMM when it exits) and an eventfd that
//! asks it to stop. Faults read together are resolved together: zero
//! blocks and freed pages with `UFFDIO_ZEROPAGE`, no I/O; layer blocks read
//! in one `LayerStore::read_blocks` batch and placed with `UFFDIO_COPY`.
//! Events other than faults (remove, unmap, remap, fork) are handled in
//! the order they were read, between the faults around them.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libc::c_void;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{debug, error, info, warn};
use userfaultfd::{Event, EventBuffer, Uffd};

use crate::store::{Block, Header, LayerStore};

use super::error::{errno, Error, Result};
use super::layout::{Layout, PAGE};
use super::prefetch::Recorder;
use super::stats::Counters;

/// Events read at once.
const EVENTS: usize = 64;
/// Pages the prefetch places between two looks at pending faults.
const PREFETCH_BATCH: usize = 256;
/// How soon placements the kernel refused with `EAGAIN` are tried again.
const RETRY_AFTER: Duration = Duration::from_millis(1);

/// Why a page server ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// [`PageServer::stop`](super::PageServer::stop) asked it to.
    Stopped,
    /// The VMM closed the handover socket: it exited or gave the VM up.
    Disconnected,
    /// The VM's address space is gone (`ESRCH` from the kernel).
    VmGone,
    /// The userfaultfd reported end of file or hang-up.
    UffdClosed,
    /// The VMM unmapped all guest memory: nothing can fault any more.
    Unmapped,
}

/// State shared between the server thread and its handle.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) recorder: Mutex<Recorder>,
}

impl Shared {
    pub(crate) fn new(record_until: Instant) -> Shared {
        Shared {
            counters: Counters::default(),
            recorder: Mutex::new(Recorder::new(record_until)),
        }
    }

    pub(crate) fn record(&self) -> Vec<u64> {
        self.recorder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocks()
            .to_vec()
    }
}

/// What the kernel did with one page placement.
enum Placed {
    /// The page is in place.
    Mapped,
    /// It was already there (`EEXIST`); waiters were woken.
    Present,
    /// Try again after reading events (`EAGAIN`).
    Again,
    /// The range is no longer registered (`ENOENT`): nobody waits on it.
    Unregistered,
    /// The VM's address space is gone (`ESRCH`).
    Gone,
}

/// What one poll found.
#[derive(Default)]
struct Ready {
    uffd: bool,
    uffd_closed: bool,
    socket: bool,
    stop: bool,
}

/// Pages the guest freed, by device block: served as zero from then on.
struct Freed {
    words: Vec<u64>,
    blocks: u64,
}

impl Freed {
    fn new(blocks: u64) -> Freed {
        Freed {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    fn contains(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Marks `blocks` and returns how many were not marked before.
    fn insert(&mut self, blocks: std::ops::Range<u64>) -> u64 {
        let mut added = 0;
        for block in blocks.start..blocks.end.min(self.blocks) {
            if let Some(word) = self.words.get_mut((block / 64) as usize) {
                let bit = 1 << (block % 64);
                added += u64::from(*word & bit == 0);
                *word |= bit;
            }
        }
        added
    }
}

/// The server thread's state.
pub(crate) struct Server {
    pub(crate) uffd: Uffd,
    pub(crate) socket: UnixStream,
    pub(crate) stop: Arc<EventFd>,
    pub(crate) header: Header,
    pub(crate) store: Arc<LayerStore>,
    pub(crate) layout: Layout,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sandbox: String,
    freed: Freed,
    /// Fault addresses to place again (the kernel said `EAGAIN`).
    deferred: Vec<u64>,
    /// When the oldest deferred fault was read.
    deferred_since: Instant,
    events: EventBuffer,
    buf: Vec<u8>,
}

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        uffd: Uffd,
        socket: UnixStream,
        stop: Arc<EventFd>,
        header: Header,
        store: Arc<LayerStore>,
        layout: Layout,
        shared: Arc<Shared>,
        sandbox: String,
    ) -> Server {
        let freed = Freed::new(header.block_count());
        Server {
            uffd,
            socket,
            stop,
            header,
            store,
            layout,
            shared,
            sandbox,
            freed,
            deferred: Vec::new(),
            deferred_since: Instant::now(),
            events: EventBuffer::new(EVENTS),
            buf: vec![0; PREFETCH_BATCH.max(EVENTS) * PAGE as usize],
        }
    }

    /// Prefetches `prefetch`, then serves until the VMM goes away, the
    /// userfaultfd closes or a stop is asked for.
    pub(crate) fn run(mut self, prefetch: &[u64]) -> Result<Exit> {
        let result = self.serve(prefetch);
        match &result {
            Ok(exit) => info!(sandbox = %self.sandbox, ?exit, "page server ended"),
            Err(e) => error!(sandbox = %self.sandbox, error = %e, "page server failed"),
        }
        result
    }

    fn serve(&mut self, prefetch: &[u64]) -> Result<Exit> {
        if let Some(exit) = self.prefetch(prefetch)? {
            return Ok(exit);
        }
        loop {
            let timeout = if self.deferred.is_empty() {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(RETRY_AFTER).unwrap_or(PollTimeout::ZERO)
            };
            let ready = self.wait(timeout)?;
            if ready.stop {
                return Ok(Exit::Stopped);
            }
            if ready.uffd || !self.deferred.is_empty() {
                if let Some(exit) = self.serve_pending()? {
                    return Ok(exit);
                }
            }
            if ready.uffd_closed {
                return Ok(Exit::UffdClosed);
            }
            if ready.socket {
                if let Some(exit) = self.check_socket() {
                    return Ok(exit);
                }
            }
        }
    }

    /// Polls the userfaultfd, the socket and the stop eventfd.
    fn wait(&self, timeout: PollTimeout) -> Result<Ready> {
        let mut fds = [
            PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(Ready::default()),
            Err(e) => return Err(Error::setup("poll its descriptors")(errno(e))),
        }
        let revents = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let closed = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
        Ok(Ready {
            uffd: revents(0).contains(PollFlags::POLLIN),
            uffd_closed: revents(0).intersects(closed),
            socket: !revents(1).is_empty(),
            stop: !revents(2).is_empty(),
        })
    }

    /// Whether a stop was asked for, without waiting.
    fn stop_requested(&self) -> Result<bool> {
        let mut fds = [PollFd::new(self.stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(Error::setup("poll its stop eventfd")(errno(e))),
        }
    }

    /// The socket is readable: the VMM closed it, or sent bytes the
    /// protocol does not have (ignored).
    fn check_socket(&self) -> Option<Exit> {
        let mut buf = [0u8; 256];
        match nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&self.socket),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Some(Exit::Disconnected),
            Ok(n) => {
                warn!(sandbox = %self.sandbox, bytes = n,
                    "the VMM sent bytes after the handover; ignored");
                None
            }
            Err(Errno::EAGAIN | Errno::EINTR) => None,
            Err(e) => {
                warn!(sandbox = %self.sandbox, error = %e, "handover socket failed");
                Some(Exit::Disconnected)
            }
        }
    }

    // -----------------------------------------------------------------------
    // Prefetch

    /// Places the pages of `blocks` before they fault, in batches, serving
    /// faults that arrive meanwhile between batches. Best effort: a page
    /// the kernel refuses now faults later like any other.
    fn prefetch(&mut self, blocks: &[u64]) -> Result<Option<Exit>> {
        let started = Instant::now();
        let mut listed = HashSet::new();
        for batch in blocks.chunks(PREFETCH_BATCH) {
            if self.stop_requested()? {
                return Ok(Some(Exit::Stopped));
            }
            if let Some(exit) = self.serve_pending()? {
                return Ok(Some(exit));
            }
            let pages: Vec<u64> = batch
                .iter()
                .filter(|&&block| listed.insert(block))
                .filter_map(|&block| self.layout.host_addr(block))
                .collect();
            let placed = self.place_pages(&pages, None)?;
            let Some(placed) = placed else {
                return Ok(Some(Exit::VmGone));
            };
            Counters::add(&self.shared.counters.prefetched_pages, placed);
        }
        self.shared.counters.finish_prefetch();
        if !blocks.is_empty() {
            let stats = self.shared.counters.snapshot();
            info!(sandbox = %self.sandbox, listed = blocks.len(),
                placed = stats.prefetched_pages, ms = started.elapsed().as_millis() as u64,
                "prefetch done");
        }
        Ok(None)
    }

    // -----------------------------------------------------------------------
    // Events

    /// Reads and handles every pending event, then tries deferred faults
    /// again.
    fn serve_pending(&mut self) -> Result<Option<Exit>> {
        loop {
            let events = match self.read_events()? {
                Ok(events) => events,
                Err(exit) => return Ok(Some(exit)),
            };
            if events.is_empty() {
                break;
            }
            let read_at = Instant::now();
            let mut faults = Vec::new();
            for event in events {
                if let Event::Pagefault { addr, .. } = event {
                    faults.push(addr as u64 / PAGE * PAGE);
                    continue;
                }
                // Faults read before an event are resolved before it.
                if let Some(exit) = self.serve_faults(&std::mem::take(&mut faults), read_at)? {
                    return Ok(Some(exit));
                }
                self.handle_event(event);
                if self.layout.is_empty() {
                    return Ok(Some(Exit::Unmapped));
                }
            }
            if let Some(exit) = self.serve_faults(&faults, read_at)? {
                return Ok(Some(exit));
            }
        }
        // Deferred faults were counted and recorded when read.
        let deferred = std::mem::take(&mut self.deferred);
        if deferred.is_empty() {
            return Ok(None);
        }
        let since = self.deferred_since;
        match self.place_pages(&deferred, Some(since))? {
            Some(_) => Ok(None),
            None => Ok(Some(Exit::VmGone)),
        }
    }

    /// The events ready now (none when the read would block), or how the
    /// server ends when the userfaultfd is closed.
    fn read_events(&mut self) -> Result<std::result::Result<Vec<Event>, Exit>> {
        let iter = match self.uffd.read_events(&mut self.events) {
            Ok(iter) => iter,
            Err(userfaultfd::Error::ReadEof) => return Ok(Err(Exit::UffdClosed)),
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EINTR => {
                return Ok(Ok(Vec::new()))
            }
            Err(e) => return Err(uffd_error("read", 0, e)),
        };
        let mut events = Vec::with_capacity(EVENTS);
        for event in iter {
            match event {
                Ok(event) => events.push(event),
                Err(e) => warn!(sandbox = %self.sandbox, error = %e,
                    "unknown userfaultfd event ignored"),
            }
        }
        Ok(Ok(events))
    }

    /// Handles an event other than a fault.
    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Pagefault { .. } => {}
            Event::Remove { start, end } => {
                let (start, end) = (start as u64, end as u64);
                let mut added = 0;
                for blocks in self.layout.device_blocks(start, end) {
                    added += self.freed.insert(blocks);
                }
                Counters::add(&self.shared.counters.freed_pages, added);
                debug!(sandbox = %self.sandbox, start, end, pages = added,
                    "guest freed pages; they are zero from now on");
            }
            Event::Unmap { start, end } => {
                self.layout.unmap(start as u64, end as u64);
                info!(sandbox = %self.sandbox, start = start as u64, end = end as u64,
                    "VMM unmapped guest memory");
            }
            Event::Remap { from, to, len } => {
                self.layout.remap(from as u64, to as u64, len as u64);
                info!(sandbox = %self.sandbox, from = from as u64, to = to as u64, len,
                    "VMM moved guest memory");
            }
            Event::Fork { uffd } => {
                // Closing the child's userfaultfd unregisters its copy of
                // the memory: the child gets ordinary anonymous pages, and
                // a VMM has no reason to touch guest memory from a child.
                drop(uffd);
                warn!(sandbox = %self.sandbox,
                    "VMM forked with UFFD_FEATURE_EVENT_FORK; the child's memory is not served");
            }
        }
    }

    // -----------------------------------------------------------------------
    // Faults

    /// Resolves faults on the pages at `addrs` (page-aligned, read at
    /// `read_at`): records them, places each page once, counts them.
    fn serve_faults(&mut self, addrs: &[u64], read_at: Instant) -> Result<Option<Exit>> {
        if addrs.is_empty() {
            return Ok(None);
        }
        self.record(addrs)?;
        let mut pages = addrs.to_vec();
        pages.sort_unstable();
        pages.dedup();
        Counters::add(&self.shared.counters.faults, addrs.len() as u64);
        match self.place_pages(&pages, Some(read_at))? {
            Some(_) => Ok(None),
            None => Ok(Some(Exit::VmGone)),
        }
    }

    /// Records the device blocks of faulting pages while the window is
    /// open; a fault outside the regions is an error.
    fn record(&mut self, addrs: &[u64]) -> Result<()> {
        let mut recorder = self
            .shared
            .recorder
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let open = recorder.is_open(Instant::now());
        for &addr in addrs {
            let block = self
                .layout
                .device_block(addr)
                .ok_or(Error::FaultOutsideRegions { addr })?;
            if open {
                recorder.push(block);
            }
        }
        Ok(())
    }

    /// Places the pages at `pages` (distinct, page-aligned host addresses
    /// the layout maps): zero blocks and freed pages with ZEROPAGE, layer
    /// blocks read in batches and copied. `read_at` is set for faults: a
    /// latency is recorded per page, and a page the kernel refuses with
    /// `EAGAIN` is deferred; for the prefetch such a page is skipped (it
    /// faults later). Returns how many pages this call mapped, or `None`
    /// when the VM is gone.
    fn place_pages(&mut self, pages: &[u64], read_at: Option<Instant>) -> Result<Option<u64>> {
        let mut zero = Vec::new();
        let mut copy = Vec::new();
        let mut blocks = Vec::new();
        for &addr in pages {
            let Some(block) = self.layout.device_block(addr) else {
                continue;
            };
            match self.header.resolve(block) {
                Some(Block::Layer { .. }) if !self.freed.contains(block) => {
                    copy.push(addr);
                    blocks.push(block);
                }
                Some(_) => zero.push(addr),
                None => {}
            }
        }
        let mut placed = 0;
        for &addr in &zero {
            let Some(n) = self.place(addr, None, read_at)? else {
                return Ok(None);
            };
            placed += n;
        }
        let per_read = self.buf.len() / PAGE as usize;
        for first in (0..copy.len()).step_by(per_read) {
            let last = (first + per_read).min(copy.len());
            let bytes = (last - first) * PAGE as usize;
            self.store
                .read_blocks(&self.header, &blocks[first..last], &mut self.buf[..bytes])?;
            Counters::add(&self.shared.counters.layer_reads, 1);
            for (slot, &addr) in copy[first..last].iter().enumerate() {
                let Some(n) = self.place(addr, Some(slot), read_at)? else {
                    return Ok(None);
                };
                placed += n;
            }
        }
        Ok(Some(placed))
    }

    /// Places one page (zero, or slot `slot` of the buffer) and counts it.
    /// Returns 1 when this call mapped it, 0 when not, `None` when the VM
    /// is gone. For a fault (`read_at`), records its latency or defers it.
    fn place(
        &mut self,
        addr: u64,
        slot: Option<usize>,
        read_at: Option<Instant>,
    ) -> Result<Option<u64>> {
        let placed = match slot {
            None => self.zeropage(addr)?,
            Some(slot) => self.copy(addr, slot * PAGE as usize)?,
        };
        let counters = &self.shared.counters;
        // The latency first: once a page is counted, its latency is too.
        if let (Some(at), Placed::Mapped | Placed::Present | Placed::Unregistered) =
            (read_at, &placed)
        {
            counters.record_latency(at.elapsed());
        }
        let mapped = match placed {
            Placed::Mapped => {
                match slot {
                    None => Counters::add(&counters.zero_pages, 1),
                    Some(_) => {
                        Counters::add(&counters.copied_pages, 1);
                        Counters::add(&counters.bytes_copied, PAGE);
                    }
                }
                1
            }
            Placed::Present => {
                if read_at.is_some() {
                    Counters::add(&counters.already_mapped, 1);
                }
                0
            }
            Placed::Again => {
                Counters::add(&counters.retries, 1);
                if let Some(at) = read_at {
                    self.defer(addr, at);
                }
                return Ok(Some(0));
            }
            Placed::Unregistered => {
                debug!(sandbox = %self.sandbox, addr, "page no longer registered; dropped");
                0
            }
            Placed::Gone => return Ok(None),
        };
        Ok(Some(mapped))
    }

    /// Queues a fault read at `read_at` to be placed again.
    fn defer(&mut self, addr: u64, read_at: Instant) {
        if self.deferred.is_empty() || read_at < self.deferred_since {
            self.deferred_since = read_at;
        }
        self.deferred.push(addr);
    }

    /// `UFFDIO_ZEROPAGE` of one page.
    fn zeropage(&self, addr: u64) -> Result<Placed> {
        // SAFETY: the kernel checks that `addr` is a registered, missing
        // page of the VMM's address space and only then maps the zero page
        // there; no memory of this process is written.
        let result = unsafe { self.uffd.zeropage(addr as *mut c_void, PAGE as usize, true) };
        match result {
            Ok(_) => Ok(Placed::Mapped),
            Err(userfaultfd::Error::ZeropageFailed(e)) => {
                self.refused("zeropage", addr, Errno::from_raw(e as i32))
            }
            Err(e) => Err(uffd_error("zeropage", addr, e)),
        }
    }

    /// `UFFDIO_COPY` of one page from the buffer at byte `at`.
    fn copy(&self, addr: u64, at: usize) -> Result<Placed> {
        let src = self.buf[at..at + PAGE as usize].as_ptr();
        // SAFETY: `src` points to PAGE readable bytes of our buffer, which
        // outlives the call; the kernel writes only to `addr`, after
        // checking that it is a registered, missing page.
        let result = unsafe {
            self.uffd.copy(
                src.cast::<c_void>(),
                addr as *mut c_void,
                PAGE as usize,
                true,
            )
        };
        match result {
            Ok(n) if n == PAGE as usize => Ok(Placed::Mapped),
            // A one-page copy is all or nothing; anything else is EAGAIN.
            Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => Ok(Placed::Again),
            Err(userfaultfd::Error::CopyFailed(e)) => {
                self.refused("copy", addr, Errno::from_raw(e as i32))
            }
            Err(e) => Err(uffd_error("copy", addr, e)),
        }
    }

    /// What a refused placement means.
    fn refused(&self, action: &'static str, addr: u64, e: Errno) -> Result<Placed> {
        match e {
            Errno::EEXIST => {
                // Threads may still sleep on the page: wake them.
                self.wake(addr)?;
                Ok(Placed::Present)
            }
            Errno::EAGAIN => Ok(Placed::Again),
            Errno::ENOENT => Ok(Placed::Unregistered),
            Errno::ESRCH => Ok(Placed::Gone),
            e => Err(Error::Uffd {
                action,
                addr,
                source: errno(e),
            }),
        }
    }

    fn wake(&self, addr: u64) -> Result<()> {
        match self.uffd.wake(addr as *mut c_void, PAGE as usize) {
            Ok(()) => Ok(()),
            Err(userfaultfd::Error::SystemError(e))
                if matches!(e as i32, libc::ENOENT | libc::ESRCH) =>
            {
                Ok(())
            }
            Err(e) => Err(uffd_error("wake", addr, e)),
        }
    }
}

/// An [`Error::Uffd`] from the crate's error (whose errno is that of an
/// older nix, hence the raw numbers).
fn uffd_error(action: &'static str, addr: u64, e: userfaultfd::Error) -> Error {
    let source = match e {
        userfaultfd::Error::SystemError(e)
        | userfaultfd::Error::CopyFailed(e)
        | userfaultfd::Error::ZeropageFailed(e) => std::io::Error::from_raw_os_error(e as i32),
        other => std::io::Error::other(other.to_string()),
    };
    Error::Uffd {
        action,
        addr,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_pages_are_counted_once() {
        let mut freed = Freed::new(130);
        assert_eq!(freed.insert(60..70), 10);
        assert_eq!(freed.insert(65..75), 5);
        assert!(freed.contains(64) && freed.contains(74));
        assert!(!freed.contains(75) && !freed.contains(59));
        assert_eq!(freed.insert(129..200), 1);
        assert!(!freed.contains(1000));
    }
}
