//! Per-process shared state: a bounded ring of past output, the exit status,
//! and a condition variable that wakes stream subscribers.
//!
//! Reader threads append chunks; each subscriber keeps its own cursor and
//! copies what it has not seen yet. A slow subscriber therefore never blocks
//! the child: if the ring drops output it had not read, it is told how many
//! bytes it missed and continues from the oldest chunk still kept.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Bytes of output kept per process for re-attaching clients (4 MiB).
pub const RING_CAPACITY: usize = 4 << 20;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
    Pty,
}

/// One read's worth of output.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    /// Bytes of output produced before this chunk.
    pub offset: u64,
    pub kind: StreamKind,
    pub data: Arc<[u8]>,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when envd could not learn the status (never for a normal exit).
    pub error: Option<String>,
    pub at: SystemTime,
}

/// State guarded by the mutex in `Output`.
#[derive(Debug)]
pub struct OutputState {
    chunks: VecDeque<Chunk>,
    buffered: usize,
    next_seq: u64,
    total_bytes: u64,
    open_streams: usize,
    /// Set once the child has been reaped; its pid may be reused after that.
    pub exit: Option<ExitInfo>,
    /// Set once the exit is known and output has been drained: streams end.
    complete: bool,
}

/// Where a subscriber is in the output.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    seq: u64,
    offset: u64,
}

/// What a subscriber gets from one `Output::next` call.
#[derive(Debug, Default)]
pub struct Batch {
    /// Bytes the subscriber missed because the ring dropped them.
    pub dropped: u64,
    pub chunks: Vec<Chunk>,
    /// Present once all output has been delivered and the process ended.
    pub end: Option<ExitInfo>,
}

/// Output ring, exit status and wake-ups for one process.
#[derive(Debug)]
pub struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
    capacity: usize,
}

impl Output {
    /// `open_streams` is the number of reader threads that will report EOF.
    pub fn new(open_streams: usize, capacity: usize) -> Self {
        Self {
            state: Mutex::new(OutputState {
                chunks: VecDeque::new(),
                buffered: 0,
                next_seq: 0,
                total_bytes: 0,
                open_streams,
                exit: None,
                complete: false,
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a chunk, dropping the oldest ones beyond the capacity.
    pub fn append(&self, kind: StreamKind, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        if st.complete {
            return;
        }
        let chunk = Chunk {
            seq: st.next_seq,
            offset: st.total_bytes,
            kind,
            data: Arc::from(data),
        };
        st.next_seq += 1;
        st.total_bytes += data.len() as u64;
        st.buffered += data.len();
        st.chunks.push_back(chunk);
        while st.buffered > self.capacity && st.chunks.len() > 1 {
            if let Some(old) = st.chunks.pop_front() {
                st.buffered -= old.data.len();
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// A reader thread reached EOF on its stream.
    pub fn stream_closed(&self) {
        let mut st = self.lock();
        st.open_streams = st.open_streams.saturating_sub(1);
        drop(st);
        self.changed.notify_all();
    }

    /// Records the exit status; the caller reaps the child under this lock.
    pub fn record_exit(&self, mut st: MutexGuard<'_, OutputState>, exit: ExitInfo) {
        st.exit = Some(exit);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until every output stream reached EOF, or until `grace` passed
    /// (a background grandchild may keep a pipe open forever).
    pub fn wait_for_streams(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut st = self.lock();
        while st.open_streams > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.changed.wait_timeout(st, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Ends all streams after the last chunk; later output is discarded.
    pub fn mark_complete(&self) {
        let mut st = self.lock();
        st.complete = true;
        drop(st);
        self.changed.notify_all();
    }

    pub fn is_complete(&self) -> bool {
        self.lock().complete
    }

    /// Bytes currently held in the ring.
    pub fn retained_bytes(&self) -> usize {
        self.lock().buffered
    }

    /// Waits up to `wait` for output after `cursor` or the end, then returns
    /// at most about `max_bytes` of chunks. An empty batch means a timeout.
    pub fn next(&self, cursor: &mut Cursor, wait: Duration, max_bytes: usize) -> Batch {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        while cursor.seq >= st.next_seq && !st.complete {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Batch::default();
            }
            st = match self.changed.wait_timeout(st, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        take_batch(&st, cursor, max_bytes)
    }
}

/// Copies the chunks after `cursor` (and the end, once everything is read).
fn take_batch(st: &OutputState, cursor: &mut Cursor, max_bytes: usize) -> Batch {
    let mut batch = Batch::default();
    let (front_seq, front_offset) = st
        .chunks
        .front()
        .map_or((st.next_seq, st.total_bytes), |c| (c.seq, c.offset));
    if cursor.seq < front_seq {
        batch.dropped = front_offset.saturating_sub(cursor.offset);
        *cursor = Cursor {
            seq: front_seq,
            offset: front_offset,
        };
    }
    let start = usize::try_from(cursor.seq - front_seq).unwrap_or(usize::MAX);
    let mut size = 0;
    for chunk in st.chunks.iter().skip(start) {
        if size > 0 && size + chunk.data.len() > max_bytes {
            break;
        }
        size += chunk.data.len();
        cursor.seq = chunk.seq + 1;
        cursor.offset = chunk.offset + chunk.data.len() as u64;
        batch.chunks.push(chunk.clone());
    }
    if st.complete && cursor.seq >= st.next_seq {
        batch.end = Some(st.exit.clone().unwrap_or_else(|| ExitInfo {
            code: None,
            signal: None,
            error: Some("the exit status is unknown".to_owned()),
            at: SystemTime::now(),
        }));
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(output: &Output) {
        let st = output.lock();
        output.record_exit(
            st,
            ExitInfo {
                code: Some(0),
                signal: None,
                error: None,
                at: SystemTime::now(),
            },
        );
        output.mark_complete();
    }

    #[test]
    fn subscriber_sees_all_chunks_then_end() {
        let output = Output::new(1, 1024);
        output.append(StreamKind::Stdout, b"hello ");
        output.append(StreamKind::Stderr, b"world");
        finish(&output);
        let mut cursor = Cursor::default();
        let batch = output.next(&mut cursor, Duration::from_millis(10), 1 << 20);
        assert_eq!(batch.dropped, 0);
        assert_eq!(batch.chunks.len(), 2);
        assert_eq!(&*batch.chunks[1].data, b"world");
        assert_eq!(batch.end.and_then(|e| e.code), Some(0));
    }

    #[test]
    fn ring_drops_oldest_and_reports_missed_bytes() {
        let output = Output::new(1, 10);
        for _ in 0..5 {
            output.append(StreamKind::Stdout, b"abcd");
        }
        let mut cursor = Cursor::default();
        let batch = output.next(&mut cursor, Duration::from_millis(10), 1 << 20);
        assert_eq!(batch.dropped, 12);
        assert_eq!(batch.chunks.len(), 2);
        assert!(batch.end.is_none());
    }

    #[test]
    fn idle_subscriber_times_out_with_empty_batch() {
        let output = Output::new(1, 10);
        let mut cursor = Cursor::default();
        let batch = output.next(&mut cursor, Duration::from_millis(20), 1 << 20);
        assert!(batch.chunks.is_empty() && batch.end.is_none());
    }

    #[test]
    fn batches_respect_the_size_limit() {
        let output = Output::new(1, 1 << 20);
        for _ in 0..4 {
            output.append(StreamKind::Pty, &[b'x'; 100]);
        }
        let mut cursor = Cursor::default();
        let first = output.next(&mut cursor, Duration::from_millis(10), 250);
        assert_eq!(first.chunks.len(), 2);
        let second = output.next(&mut cursor, Duration::from_millis(10), 250);
        assert_eq!(second.chunks.len(), 2);
    }
}
