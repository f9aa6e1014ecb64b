//! The page server's thread: prefetch, then wait for userfaultfd events and
//! resolve each fault from the snapshot.
//!
//! One thread per VM. It polls three descriptors: the userfaultfd, the
//! handover socket (closed by the VMM when it exits) and an eventfd that
//! asks it to stop. Up to 64 messages are read at once, and the faults
//! among them are resolved together: each by placing the window of pages
//! around it (`Options::fault_around`), every window once. Zero blocks and
//! freed pages go in with one `UFFDIO_ZEROPAGE` per run, no I/O; layer
//! blocks are read in one `LayerStore::read_blocks` batch and placed with
//! one `UFFDIO_COPY` per run. Removes take effect before any placement of
//! the batch that read them; unmaps, remaps and forks are handled in the
//! order they were read, between the faults around them.

use std::borrow::Cow;
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
use super::layout::{Layout, Span, PAGE};
use super::place::{self, Outcome};
use super::prefetch::Recorder;
use super::stats::Counters;

/// Events read at once.
const EVENTS: usize = 64;
/// The largest window in pages (1 MiB): also the most pages read from
/// layers at once, and about what the prefetch places between two looks
/// at pending faults.
pub(crate) const MAX_WINDOW: u64 = 256;
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

/// What one poll found.
#[derive(Default)]
struct Ready {
    uffd: bool,
    uffd_closed: bool,
    socket: bool,
    stop: bool,
}

/// A set of device blocks, one bit each.
struct Blocks {
    words: Vec<u64>,
    blocks: u64,
}

impl Blocks {
    fn new(blocks: u64) -> Blocks {
        Blocks {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    fn contains(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Adds `blocks` and returns how many were not in the set before.
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

    fn remove(&mut self, blocks: std::ops::Range<u64>) {
        for block in blocks.start..blocks.end.min(self.blocks) {
            if let Some(word) = self.words.get_mut((block / 64) as usize) {
                *word &= !(1 << (block % 64));
            }
        }
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
    /// Pages placed around a fault, a power of two.
    window: u64,
    /// Pages the guest freed (`UFFD_EVENT_REMOVE`), by device block:
    /// served as zero from then on.
    freed: Blocks,
    /// Pages this server placed or found in place, by device block, until
    /// the guest frees them: left out of other faults' windows. (The VMM
    /// may drop a page without telling; it then faults and is placed
    /// again, since a faulting page is never left out.)
    placed: Blocks,
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
        window: u64,
    ) -> Server {
        let freed = Blocks::new(header.block_count());
        let placed = Blocks::new(header.block_count());
        Server {
            uffd,
            socket,
            stop,
            header,
            store,
            layout,
            shared,
            sandbox,
            window: window.clamp(1, MAX_WINDOW).next_power_of_two(),
            freed,
            placed,
            deferred: Vec::new(),
            deferred_since: Instant::now(),
            events: EventBuffer::new(EVENTS),
            buf: vec![0; (MAX_WINDOW * PAGE) as usize],
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

    /// Places the windows of `blocks` before they fault, a few windows at a
    /// time, serving faults that arrive meanwhile between batches. Best
    /// effort: a page the kernel refuses now faults later like any other.
    fn prefetch(&mut self, blocks: &[u64]) -> Result<Option<Exit>> {
        let started = Instant::now();
        let mut windows = HashSet::new();
        let per_batch = (MAX_WINDOW / self.window).max(1) as usize;
        for batch in blocks.chunks(per_batch) {
            if self.stop_requested()? {
                return Ok(Some(Exit::Stopped));
            }
            if let Some(exit) = self.serve_pending()? {
                return Ok(Some(exit));
            }
            let addrs = batch
                .iter()
                .filter_map(|&block| self.layout.host_addr(block))
                .collect::<Vec<_>>();
            let spans: Vec<Span> = self
                .spans(&addrs)
                .into_iter()
                .filter(|span| windows.insert(span.block))
                .collect();
            let Some(placed) = self.place_spans(&spans, &[], None)? else {
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
            // Reading a remove event lets its madvise go on and zap the
            // range at once, so no page of this batch may be placed before
            // the freed blocks are marked: a placement after the zap would
            // bring the old data back. A fault read before the remove then
            // gets zeros, which is one order the racing read and free could
            // have had.
            self.mark_removed(&events);
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
        let mut deferred = std::mem::take(&mut self.deferred);
        if deferred.is_empty() {
            return Ok(None);
        }
        deferred.sort_unstable();
        let spans = self.spans(&deferred);
        let since = self.deferred_since;
        match self.place_spans(&spans, &deferred, Some(since))? {
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

    /// Marks the device blocks of every remove event of `events` as freed,
    /// each through the map as it stands at that event (after the unmaps
    /// and remaps read before it).
    fn mark_removed(&mut self, events: &[Event]) {
        let mut layout = Cow::Borrowed(&self.layout);
        for event in events {
            match *event {
                Event::Remove { start, end } => {
                    let (start, end) = (start as u64, end as u64);
                    let mut added = 0;
                    for blocks in layout.device_blocks(start, end) {
                        added += self.freed.insert(blocks.clone());
                        self.placed.remove(blocks);
                    }
                    Counters::add(&self.shared.counters.freed_pages, added);
                    debug!(sandbox = %self.sandbox, start, end, pages = added,
                        "guest freed pages; they are zero from now on");
                }
                Event::Unmap { start, end } => layout.to_mut().unmap(start as u64, end as u64),
                Event::Remap { from, to, len } => {
                    layout.to_mut().remap(from as u64, to as u64, len as u64);
                }
                Event::Pagefault { .. } | Event::Fork { .. } => {}
            }
        }
    }

    /// Handles an event other than a fault or a remove (marked already).
    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Pagefault { .. } | Event::Remove { .. } => {}
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
    /// `read_at`): records them, places the window around each once,
    /// counts them.
    fn serve_faults(&mut self, addrs: &[u64], read_at: Instant) -> Result<Option<Exit>> {
        if addrs.is_empty() {
            return Ok(None);
        }
        self.record(addrs)?;
        Counters::add(&self.shared.counters.faults, addrs.len() as u64);
        let mut faults = addrs.to_vec();
        faults.sort_unstable();
        let spans = self.spans(&faults);
        match self.place_spans(&spans, &faults, Some(read_at))? {
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

    /// The windows around the pages at `addrs`, sorted by host address,
    /// each once, those that follow on in both spaces joined. Addresses the
    /// map does not hold are left out.
    fn spans(&self, addrs: &[u64]) -> Vec<Span> {
        let mut windows: Vec<Span> = addrs
            .iter()
            .filter_map(|&addr| self.layout.window(addr, self.window))
            .collect();
        windows.sort_unstable_by_key(|span| span.host);
        // Windows of one piece are equal or disjoint, pieces are disjoint.
        windows.dedup();
        let mut spans: Vec<Span> = Vec::with_capacity(windows.len());
        for window in windows {
            match spans.last_mut() {
                Some(last) if last.followed_by(&window) => last.pages += window.pages,
                _ => spans.push(window),
            }
        }
        spans
    }

    /// Places the pages of `spans`: zero blocks and freed pages with one
    /// ZEROPAGE per run, layer blocks read in one batch per [`MAX_WINDOW`]
    /// pages and copied with one COPY per run. `faults` are the faulting
    /// pages inside the spans (sorted, repeats kept), read at `read_at`: a
    /// latency is recorded for each once its page is placed, and those the
    /// kernel refuses with `EAGAIN` are deferred. Returns how many pages
    /// this call mapped, or `None` when the VM is gone.
    fn place_spans(
        &mut self,
        spans: &[Span],
        faults: &[u64],
        read_at: Option<Instant>,
    ) -> Result<Option<u64>> {
        let (zero, layer) = self.runs(spans, faults);
        let mut placed = 0;
        for run in &zero {
            let Some(n) = self.place_run(run, None, faults, read_at)? else {
                return Ok(None);
            };
            placed += n;
        }
        let mut group: Vec<Span> = Vec::new();
        let mut group_pages = 0;
        for run in layer {
            let mut rest = run;
            while rest.pages > 0 {
                let take = rest.pages.min(MAX_WINDOW - group_pages);
                group.push(Span {
                    pages: take,
                    ..rest
                });
                group_pages += take;
                rest = Span {
                    host: rest.host + take * PAGE,
                    block: rest.block + take,
                    pages: rest.pages - take,
                };
                if group_pages == MAX_WINDOW {
                    let Some(n) = self.copy_group(&group, faults, read_at)? else {
                        return Ok(None);
                    };
                    placed += n;
                    group.clear();
                    group_pages = 0;
                }
            }
        }
        let Some(n) = self.copy_group(&group, faults, read_at)? else {
            return Ok(None);
        };
        Ok(Some(placed + n))
    }

    /// The pages of `spans` as runs to zero and runs to copy from layers,
    /// leaving out pages known to be in place unless they fault.
    fn runs(&self, spans: &[Span], faults: &[u64]) -> (Vec<Span>, Vec<Span>) {
        let (mut zero, mut layer): (Vec<Span>, Vec<Span>) = (Vec::new(), Vec::new());
        for span in spans {
            for i in 0..span.pages {
                let block = span.block + i;
                let page = Span {
                    host: span.host + i * PAGE,
                    block,
                    pages: 1,
                };
                if self.placed.contains(block) && faults.binary_search(&page.host).is_err() {
                    continue;
                }
                let runs = match self.header.resolve(block) {
                    Some(Block::Layer { .. }) if !self.freed.contains(block) => &mut layer,
                    Some(_) => &mut zero,
                    None => continue,
                };
                match runs.last_mut() {
                    Some(last) if last.followed_by(&page) => last.pages += 1,
                    _ => runs.push(page),
                }
            }
        }
        (zero, layer)
    }

    /// Reads the layer blocks of `runs` (at most [`MAX_WINDOW`] pages) in
    /// one `read_blocks` and copies each run.
    fn copy_group(
        &mut self,
        runs: &[Span],
        faults: &[u64],
        read_at: Option<Instant>,
    ) -> Result<Option<u64>> {
        if runs.is_empty() {
            return Ok(Some(0));
        }
        let blocks: Vec<u64> = runs
            .iter()
            .flat_map(|run| run.block..run.block + run.pages)
            .collect();
        let bytes = blocks.len() * PAGE as usize;
        // The buffer is taken out for the copies, which need `self` too.
        let mut buf = std::mem::take(&mut self.buf);
        let read = self
            .store
            .read_blocks(&self.header, &blocks, &mut buf[..bytes]);
        let result = read.map_err(Error::from).and_then(|()| {
            Counters::add(&self.shared.counters.layer_reads, 1);
            let mut placed = 0;
            let mut at = 0;
            for run in runs {
                let len = (run.pages * PAGE) as usize;
                let src = &buf[at..at + len];
                at += len;
                let Some(n) = self.place_run(run, Some(src), faults, read_at)? else {
                    return Ok(None);
                };
                placed += n;
            }
            Ok(Some(placed))
        });
        self.buf = buf;
        result
    }

    /// Places one run: zero pages, or the bytes of `src` (as long as the
    /// run). The kernel may stop partway; the run goes on after the pages
    /// it placed and past pages already there. Returns how many pages this
    /// call mapped, `None` when the VM is gone.
    fn place_run(
        &mut self,
        run: &Span,
        src: Option<&[u8]>,
        faults: &[u64],
        read_at: Option<Instant>,
    ) -> Result<Option<u64>> {
        let counters = Arc::clone(&self.shared);
        let counters = &counters.counters;
        let fd = self.uffd.as_fd();
        let mut placed = 0;
        let mut at = 0;
        // Pages per ioctl: the whole rest of the run, or one at a time once
        // the kernel said the range is not one registered mapping.
        let mut single = false;
        while at < run.pages {
            let dst = run.host + at * PAGE;
            let pages = if single { 1 } else { run.pages - at };
            let outcome = match src {
                None => place::zeropage(fd, dst, pages * PAGE),
                Some(src) => {
                    let from = (at * PAGE) as usize;
                    place::copy(fd, dst, &src[from..from + (pages * PAGE) as usize])
                }
            };
            let action = if src.is_some() { "copy" } else { "zeropage" };
            let outcome = outcome.map_err(|e| Error::Uffd {
                action,
                addr: dst,
                source: errno(e),
            })?;
            match outcome {
                Outcome::Placed(bytes) if bytes >= PAGE => {
                    let n = (bytes / PAGE).min(pages);
                    if src.is_some() {
                        Counters::add(&counters.copied_pages, n);
                        Counters::add(&counters.bytes_copied, n * PAGE);
                    } else {
                        Counters::add(&counters.zero_pages, n);
                    }
                    Self::done(counters, faults, dst, dst + n * PAGE, read_at);
                    let block = run.block + at;
                    self.placed.insert(block..block + n);
                    placed += n;
                    at += n;
                }
                Outcome::Exists => {
                    let block = run.block + at;
                    self.placed.insert(block..block + 1);
                    let waiting = Self::done(counters, faults, dst, dst + PAGE, read_at);
                    if waiting > 0 {
                        // Threads may still sleep on the page: wake them.
                        Counters::add(&counters.already_mapped, waiting);
                        self.wake(dst)?;
                    }
                    at += 1;
                }
                Outcome::Placed(_) | Outcome::Again => {
                    Counters::add(&counters.retries, 1);
                    if let Some(read_at) = read_at {
                        let end = run.end();
                        let from = faults.partition_point(|&f| f < dst);
                        let to = faults.partition_point(|&f| f < end);
                        for &fault in &faults[from..to] {
                            self.defer(fault, read_at);
                        }
                    }
                    return Ok(Some(placed));
                }
                Outcome::Unregistered if !single && pages > 1 => single = true,
                Outcome::Unregistered => {
                    debug!(sandbox = %self.sandbox, addr = dst, "page no longer registered; dropped");
                    Self::done(counters, faults, dst, dst + PAGE, read_at);
                    at += 1;
                }
                Outcome::Gone => return Ok(None),
            }
        }
        Ok(Some(placed))
    }

    /// Records the latency of the faults on pages `from..to`, now resolved;
    /// returns how many there were.
    fn done(
        counters: &Counters,
        faults: &[u64],
        from: u64,
        to: u64,
        read_at: Option<Instant>,
    ) -> u64 {
        let Some(read_at) = read_at else {
            return 0;
        };
        let first = faults.partition_point(|&f| f < from);
        let last = faults.partition_point(|&f| f < to);
        if last > first {
            let latency = read_at.elapsed();
            for _ in first..last {
                counters.record_latency(latency);
            }
        }
        (last - first) as u64
    }

    /// Queues a fault read at `read_at` to be placed again.
    fn defer(&mut self, addr: u64, read_at: Instant) {
        if self.deferred.is_empty() || read_at < self.deferred_since {
            self.deferred_since = read_at;
        }
        self.deferred.push(addr);
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
    fn block_sets_count_new_blocks_and_forget_removed_ones() {
        let mut freed = Blocks::new(130);
        assert_eq!(freed.insert(60..70), 10);
        assert_eq!(freed.insert(65..75), 5);
        assert!(freed.contains(64) && freed.contains(74));
        assert!(!freed.contains(75) && !freed.contains(59));
        assert_eq!(freed.insert(129..200), 1);
        assert!(!freed.contains(1000));
        freed.remove(60..66);
        assert!(!freed.contains(65) && freed.contains(66));
        assert_eq!(freed.insert(60..70), 6);
    }
}
