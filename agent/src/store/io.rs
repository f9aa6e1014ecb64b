//! Batched positional reads and writes: io_uring, or pread/pwrite.
//!
//! A batch is a list of operations, each a file, an offset in it and a
//! range of one caller buffer. With io_uring every operation of a batch is
//! in flight at once (up to the ring size) and short transfers are
//! resubmitted for the rest; the fallback runs them one after the other
//! with `pread`/`pwrite`. Both fill the same bytes.
//!
//! Whether io_uring works is probed once per process (it can be turned off
//! by `kernel.io_uring_disabled` or refused by a seccomp filter); when it
//! does not, one warning says so and every store uses the fallback.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock, PoisonError};

use io_uring::{opcode, types, IoUring, Probe};

/// Entries per ring: operations in flight at once.
const RING_ENTRIES: u32 = 64;
/// Rings kept for reuse between batches.
const POOL_SIZE: usize = 4;
/// The most bytes one submission moves (the kernel's limit is below 2 GiB).
const MAX_SUBMIT: usize = 1 << 30;

/// How layer I/O is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// io_uring: batches in flight together.
    IoUring,
    /// `pread`/`pwrite`, one call per operation.
    Pread,
}

impl Backend {
    /// The name reported by the agent (`GET /v1/node`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Pread => "pread",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One operation of a batch: `range` of the batch buffer from or to
/// `offset` of `file`.
#[derive(Clone, Debug)]
pub struct Op<'f> {
    /// The file read or written.
    pub file: &'f File,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes of the batch buffer.
    pub range: Range<usize>,
}

/// A failed batch: which operation failed and why. The other operations
/// may or may not have been done.
#[derive(Debug)]
pub struct OpError {
    /// Index of the failed operation in the batch.
    pub op: usize,
    /// What the system said.
    pub source: io::Error,
}

/// Which way a batch moves bytes, with the buffer's address.
#[derive(Clone, Copy)]
enum Dir {
    Read(*mut u8),
    Write(*const u8),
}

/// Runs batches with one backend. Shared between threads.
pub struct Io {
    backend: Backend,
    rings: Mutex<Vec<IoUring>>,
}

impl fmt::Debug for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Io")
            .field("backend", &self.backend)
            .finish()
    }
}

impl Io {
    /// io_uring when it works here, the fallback otherwise (with one
    /// warning per process).
    pub fn probe() -> Io {
        let backend = match probed() {
            Ok(()) => Backend::IoUring,
            Err(_) => Backend::Pread,
        };
        Io::with_backend(backend)
    }

    /// The pread/pwrite fallback, whatever the kernel offers.
    pub fn fallback() -> Io {
        Io::with_backend(Backend::Pread)
    }

    fn with_backend(backend: Backend) -> Io {
        Io {
            backend,
            rings: Mutex::new(Vec::new()),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Fills the `range` of `buf` of every op from its file. Ranges must
    /// not overlap. Reading past the end of a file is an `UnexpectedEof`.
    pub fn read(&self, ops: &[Op<'_>], buf: &mut [u8]) -> Result<(), OpError> {
        check_ranges(ops, buf.len(), true)?;
        if let Some(mut ring) = self.ring() {
            let result = run_ring(&mut ring, ops, Dir::Read(buf.as_mut_ptr()));
            self.give_back(ring);
            return result;
        }
        for (i, op) in ops.iter().enumerate() {
            let failed = |source| OpError { op: i, source };
            op.file
                .read_exact_at(&mut buf[op.range.clone()], op.offset)
                .map_err(failed)?;
        }
        Ok(())
    }

    /// Writes the `range` of `buf` of every op to its file.
    pub fn write(&self, ops: &[Op<'_>], buf: &[u8]) -> Result<(), OpError> {
        check_ranges(ops, buf.len(), false)?;
        if let Some(mut ring) = self.ring() {
            let result = run_ring(&mut ring, ops, Dir::Write(buf.as_ptr()));
            self.give_back(ring);
            return result;
        }
        for (i, op) in ops.iter().enumerate() {
            let failed = |source| OpError { op: i, source };
            op.file
                .write_all_at(&buf[op.range.clone()], op.offset)
                .map_err(failed)?;
        }
        Ok(())
    }

    /// A ring for one batch, or `None` to use the fallback (also when a new
    /// ring cannot be made right now, such as at the locked-memory limit).
    fn ring(&self) -> Option<IoUring> {
        if self.backend != Backend::IoUring {
            return None;
        }
        let pooled = self
            .rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        pooled.or_else(|| match IoUring::new(RING_ENTRIES) {
            Ok(ring) => Some(ring),
            Err(e) => {
                tracing::debug!(error = %e, "no io_uring for this batch; using pread/pwrite");
                None
            }
        })
    }

    fn give_back(&self, ring: IoUring) {
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        if rings.len() < POOL_SIZE {
            rings.push(ring);
        }
    }
}

/// Refuses ranges outside the buffer and, for reads, overlapping ranges
/// (the kernel would write them at the same time).
fn check_ranges(ops: &[Op<'_>], len: usize, disjoint: bool) -> Result<(), OpError> {
    let invalid = |op, what: &str| OpError {
        op,
        source: io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()),
    };
    if let Some(i) = ops
        .iter()
        .position(|op| op.range.start > op.range.end || op.range.end > len)
    {
        return Err(invalid(i, "operation range outside the buffer"));
    }
    if !disjoint {
        return Ok(());
    }
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_unstable_by_key(|&i| ops[i].range.start);
    for pair in order.windows(2) {
        if ops[pair[0]].range.end > ops[pair[1]].range.start {
            return Err(invalid(pair[1], "operation ranges overlap"));
        }
    }
    Ok(())
}

/// The outcome of the process-wide io_uring probe.
fn probed() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let result = probe_ring();
        if let Err(reason) = &result {
            tracing::warn!(
                "io_uring is not usable ({reason}); layer I/O falls back to pread/pwrite"
            );
        }
        result
    })
}

/// Makes a ring, checks that the kernel has the opcodes used and that a
/// request completes (a seccomp filter may allow setup but not enter).
fn probe_ring() -> Result<(), String> {
    let mut ring = IoUring::new(8).map_err(|e| {
        format!("io_uring_setup failed: {e}; kernel.io_uring_disabled or a seccomp filter may forbid it")
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot list io_uring opcodes: {e}"))?;
    for (code, name) in [(opcode::Read::CODE, "READ"), (opcode::Write::CODE, "WRITE")] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel lacks IORING_OP_{name} (Linux 5.6 or later has it)"
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|e| format!("cannot queue a NOP: {e}"))?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let result = ring.completion().next().map(|cqe| cqe.result());
    match result {
        Some(res) if res >= 0 => Ok(()),
        Some(res) => Err(format!(
            "a NOP failed: {}",
            io::Error::from_raw_os_error(-res)
        )),
        None => Err("a NOP did not complete".to_owned()),
    }
}

/// One batch going through a ring.
struct RingBatch<'b, 'f> {
    ops: &'b [Op<'f>],
    dir: Dir,
    /// Bytes done per operation.
    done: Vec<usize>,
    /// Operations (or their rests) still to submit.
    queue: VecDeque<usize>,
    in_flight: usize,
    failed: Option<OpError>,
}

/// Runs a batch through `ring`: keeps up to the ring size in flight,
/// resubmits the rest of short transfers, stops queueing after the first
/// error and returns only when nothing is in flight any more.
fn run_ring(ring: &mut IoUring, ops: &[Op<'_>], dir: Dir) -> Result<(), OpError> {
    let mut batch = RingBatch {
        ops,
        dir,
        done: vec![0; ops.len()],
        queue: (0..ops.len())
            .filter(|&i| !ops[i].range.is_empty())
            .collect(),
        in_flight: 0,
        failed: None,
    };
    loop {
        if batch.failed.is_none() {
            batch.fill(ring);
        }
        if batch.in_flight == 0 {
            break;
        }
        wait(ring, batch.in_flight);
        for cqe in ring.completion() {
            batch.complete(cqe.user_data() as usize, cqe.result());
        }
    }
    batch.failed.map_or(Ok(()), Err)
}

impl RingBatch<'_, '_> {
    /// Queues operations until the ring holds [`RING_ENTRIES`] requests or
    /// nothing is left to submit.
    fn fill(&mut self, ring: &mut IoUring) {
        let mut sq = ring.submission();
        while self.in_flight < RING_ENTRIES as usize && !sq.is_full() {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            let entry = entry(&self.ops[i], self.done[i], self.dir).user_data(i as u64);
            // SAFETY: the entry points into the batch buffer at
            // `ops[i].range`, which the caller keeps borrowed (mutably for
            // reads) until `run_ring` returns, and `run_ring` returns only
            // once every queued entry has completed. The file is borrowed for
            // as long. Ranges were checked to lie inside the buffer and, for
            // reads, not to overlap.
            if unsafe { sq.push(&entry) }.is_err() {
                self.queue.push_front(i);
                break;
            }
            self.in_flight += 1;
        }
    }

    /// Accounts one completion of operation `i`: done, partly done (queued
    /// again for the rest), or failed.
    fn complete(&mut self, i: usize, result: i32) {
        self.in_flight -= 1;
        let error = match result {
            n if n > 0 => {
                self.done[i] += n as usize;
                if self.done[i] < self.ops[i].range.len() {
                    self.queue.push_back(i);
                }
                return;
            }
            n if n == -libc::EINTR || n == -libc::EAGAIN => {
                self.queue.push_back(i);
                return;
            }
            0 => match self.dir {
                Dir::Read(_) => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ends before the data",
                ),
                Dir::Write(_) => {
                    io::Error::new(io::ErrorKind::WriteZero, "the kernel wrote nothing")
                }
            },
            n => io::Error::from_raw_os_error(-n),
        };
        self.failed.get_or_insert(OpError {
            op: i,
            source: error,
        });
    }
}

/// The submission entry for the rest of `op` after `done` bytes.
fn entry(op: &Op<'_>, done: usize, dir: Dir) -> io_uring::squeue::Entry {
    let fd = types::Fd(op.file.as_raw_fd());
    let at = op.range.start + done;
    let len = (op.range.len() - done).min(MAX_SUBMIT) as u32;
    let offset = op.offset + done as u64;
    match dir {
        // SAFETY: pointer arithmetic only: `at` is inside the buffer,
        // checked against its length by `check_ranges`.
        Dir::Read(base) => opcode::Read::new(fd, unsafe { base.add(at) }, len)
            .offset(offset)
            .build(),
        // SAFETY: as above.
        Dir::Write(base) => opcode::Write::new(fd, unsafe { base.add(at) }, len)
            .offset(offset)
            .build(),
    }
}

/// Submits what is queued and waits for at least one completion. Retries
/// interruptions. Any other failure while requests are in flight aborts the
/// process: the kernel may still write into buffers we would give back.
fn wait(ring: &mut IoUring, in_flight: usize) {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return,
            Err(e) if retryable(&e) => {
                if !ring.completion().is_empty() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, in_flight, "io_uring_enter failed with requests in flight");
                std::process::abort();
            }
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile_lite::Dir, File) {
        let dir = tempfile_lite::Dir::new();
        let path = dir.path().join("f");
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        (dir, file)
    }

    /// A temporary folder removed on drop (tests only).
    mod tempfile_lite {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Dir {
                static N: AtomicUsize = AtomicUsize::new(0);
                let n = N.fetch_add(1, Ordering::SeqCst);
                let path =
                    std::env::temp_dir().join(format!("wrenn-io-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn both() -> [Io; 2] {
        [Io::probe(), Io::fallback()]
    }

    #[test]
    fn reads_and_writes_scattered_ranges_on_both_backends() {
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        for io in both() {
            let (_dir, file) = file_with(&data);
            let ops: Vec<Op> = (0..200)
                .map(|k| Op {
                    file: &file,
                    offset: (k * 4999) as u64,
                    range: k * 100..k * 100 + 100,
                })
                .collect();
            let mut buf = vec![0u8; 20_000];
            io.read(&ops, &mut buf).unwrap();
            for (k, chunk) in buf.chunks(100).enumerate() {
                assert_eq!(chunk, &data[k * 4999..k * 4999 + 100], "{}", io.backend());
            }
            let writes = [Op {
                file: &file,
                offset: 3,
                range: 0..5,
            }];
            io.write(&writes, b"hello").unwrap();
            let mut back = [0u8; 5];
            io.read(
                &[Op {
                    file: &file,
                    offset: 3,
                    range: 0..5,
                }],
                &mut back,
            )
            .unwrap();
            assert_eq!(&back, b"hello");
        }
    }

    #[test]
    fn reading_past_the_end_and_bad_ranges_are_errors() {
        for io in both() {
            let (_dir, file) = file_with(&[1; 100]);
            let mut buf = [0u8; 64];
            let err = io
                .read(
                    &[Op {
                        file: &file,
                        offset: 80,
                        range: 0..64,
                    }],
                    &mut buf,
                )
                .unwrap_err();
            assert_eq!(
                err.source.kind(),
                io::ErrorKind::UnexpectedEof,
                "{}",
                io.backend()
            );
            let overlap = [
                Op {
                    file: &file,
                    offset: 0,
                    range: 0..10,
                },
                Op {
                    file: &file,
                    offset: 0,
                    range: 5..15,
                },
            ];
            assert_eq!(io.read(&overlap, &mut buf).unwrap_err().op, 1);
            let outside = [Op {
                file: &file,
                offset: 0,
                range: 60..70,
            }];
            assert!(io.read(&outside, &mut buf).is_err());
        }
    }

    #[test]
    fn the_backend_is_named() {
        assert_eq!(Io::fallback().backend().as_str(), "pread");
        assert_eq!(Backend::IoUring.to_string(), "io_uring");
    }
}
