//! How long the lifecycle's operations take, as counts and latency
//! histograms for `GET /metrics` (Prometheus text format).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds of the histogram buckets, in seconds (`+Inf` is implied):
/// a restore from a snapshot takes tens of milliseconds, a cold boot under
/// emulation tens of seconds.
pub const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The timed operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Pause,
    Resume,
    Destroy,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Create, Op::Pause, Op::Resume, Op::Destroy];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Destroy => "destroy",
        }
    }
}

/// One operation's figures.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket of [`BUCKETS`], then `+Inf`: observations at most that
    /// long (not cumulative; [`Histogram::cumulative`] adds them up).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Total of the observations, in microseconds.
    sum_us: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64, ok: bool) {
        let i = BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        match ok {
            true => self.ok.fetch_add(1, Ordering::Relaxed),
            false => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Observations at most `BUCKETS[i]` long, then the total.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// `(succeeded, failed)`.
    pub fn outcomes(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Every operation's histogram.
#[derive(Debug, Default)]
pub struct Timings {
    ops: [Histogram; 4],
}

impl Timings {
    pub fn of(&self, op: Op) -> &Histogram {
        &self.ops[op as usize]
    }

    /// Runs `f` as operation `op`, timing it.
    pub fn time<T, E>(&self, op: Op, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let started = Instant::now();
        let result = f();
        self.of(op)
            .observe(started.elapsed().as_secs_f64(), result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let timings = Timings::default();
        let h = timings.of(Op::Pause);
        h.observe(0.003, true);
        h.observe(0.3, true);
        h.observe(100.0, false);
        let c = h.cumulative();
        assert_eq!(c[0], 1, "0.003 s is within 0.01 s");
        assert_eq!(c[4], 1, "nothing else within 0.25 s");
        assert_eq!(c[5], 2, "0.3 s within 0.5 s");
        assert_eq!(*c.last().unwrap(), 3);
        assert_eq!(h.outcomes(), (2, 1));
        assert!((h.sum_seconds() - 100.303).abs() < 1e-3);
        assert_eq!(timings.of(Op::Create).outcomes(), (0, 0));
        let r: Result<(), ()> = timings.time(Op::Create, || Err(()));
        assert!(r.is_err());
        assert_eq!(timings.of(Op::Create).outcomes(), (0, 1));
    }
}
