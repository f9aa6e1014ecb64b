//! What a page server has done, readable while it runs: counters and a
//! histogram of fault latencies.
//!
//! The server thread adds to [`Counters`] with relaxed atomics; anyone
//! takes a [`Stats`] copy at any time. The histogram is log-linear (eight
//! buckets per power of two of nanoseconds), so a percentile read from it
//! is at most 12.5 % above the true value and never below it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Exact buckets below this many nanoseconds.
const LINEAR: u64 = 8;
/// Sub-buckets per power of two above [`LINEAR`].
const SUB_BITS: u32 = 3;
/// Buckets for every `u64` of nanoseconds.
const BUCKETS: usize = (LINEAR as usize) + (64 - SUB_BITS as usize) * (1 << SUB_BITS);

/// A copy of a page server's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Page faults resolved (each fault message read, duplicates included).
    pub faults: u64,
    /// Pages placed with `UFFDIO_ZEROPAGE` (zero blocks, freed pages), by
    /// faults and the prefetch.
    pub zero_pages: u64,
    /// Pages placed with `UFFDIO_COPY` from layers, by faults and the
    /// prefetch.
    pub copied_pages: u64,
    /// Bytes placed with `UFFDIO_COPY`.
    pub bytes_copied: u64,
    /// Batches read from layers (`LayerStore::read_blocks` calls).
    pub layer_reads: u64,
    /// Pages placed by the prefetch before they faulted.
    pub prefetched_pages: u64,
    /// Whether the prefetch has finished (true at once without a list).
    pub prefetch_done: bool,
    /// Faults on pages already present (`EEXIST`): the VMM, or a prefetch
    /// racing with the fault, placed them first.
    pub already_mapped: u64,
    /// Placements the kernel asked to retry (`EAGAIN`, the address space
    /// was changing).
    pub retries: u64,
    /// Pages the guest gave back (`UFFD_EVENT_REMOVE`), served as zero
    /// since.
    pub freed_pages: u64,
    /// Fault latencies: from reading the fault to the page being placed.
    pub latency: Latency,
}

/// A histogram of fault latencies.
#[derive(Clone, PartialEq, Eq)]
pub struct Latency {
    buckets: Vec<u64>,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency")
            .field("count", &self.count())
            .field("p50", &self.percentile(0.5))
            .field("p99", &self.percentile(0.99))
            .finish()
    }
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            buckets: vec![0; BUCKETS],
        }
    }
}

impl Latency {
    /// Number of latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The latency that `q` (0.0..=1.0) of the faults stayed under, such as
    /// `percentile(0.99)` for p99; `None` before the first fault.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // The rank of the sample asked for, 1-based, at least the first.
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos(bucket_top(index)));
            }
        }
        None
    }
}

/// The counters a server thread updates.
pub(crate) struct Counters {
    pub(crate) faults: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) copied_pages: AtomicU64,
    pub(crate) bytes_copied: AtomicU64,
    pub(crate) layer_reads: AtomicU64,
    pub(crate) prefetched_pages: AtomicU64,
    pub(crate) prefetch_done: AtomicBool,
    pub(crate) already_mapped: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) freed_pages: AtomicU64,
    latency: Vec<AtomicU64>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            faults: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            copied_pages: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            layer_reads: AtomicU64::new(0),
            prefetched_pages: AtomicU64::new(0),
            prefetch_done: AtomicBool::new(false),
            already_mapped: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            freed_pages: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    /// Adds `n` to a counter.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one fault latency.
    pub(crate) fn record_latency(&self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        Counters::add(&self.latency[bucket(nanos)], 1);
    }

    /// Marks the prefetch finished; what it counted is visible to whoever
    /// sees the mark.
    pub(crate) fn finish_prefetch(&self) {
        self.prefetch_done.store(true, Ordering::Release);
    }

    /// A copy of every counter.
    pub(crate) fn snapshot(&self) -> Stats {
        let prefetch_done = self.prefetch_done.load(Ordering::Acquire);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            faults: get(&self.faults),
            zero_pages: get(&self.zero_pages),
            copied_pages: get(&self.copied_pages),
            bytes_copied: get(&self.bytes_copied),
            layer_reads: get(&self.layer_reads),
            prefetched_pages: get(&self.prefetched_pages),
            prefetch_done,
            already_mapped: get(&self.already_mapped),
            retries: get(&self.retries),
            freed_pages: get(&self.freed_pages),
            latency: Latency {
                buckets: self.latency.iter().map(get).collect(),
            },
        }
    }
}

/// The bucket of `nanos`: exact below [`LINEAR`], then eight per power of
/// two.
fn bucket(nanos: u64) -> usize {
    if nanos < LINEAR {
        return nanos as usize;
    }
    let power = 63 - nanos.leading_zeros();
    let sub = (nanos >> (power - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (LINEAR + u64::from(power - SUB_BITS) * (1 << SUB_BITS) + sub) as usize
}

/// The largest value of bucket `index`.
fn bucket_top(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR {
        return index;
    }
    let power = (index - LINEAR) / (1 << SUB_BITS) + u64::from(SUB_BITS);
    let sub = (index - LINEAR) % (1 << SUB_BITS);
    let low = ((1 << SUB_BITS) + sub) << (power - u64::from(SUB_BITS));
    let width = 1u64 << (power - u64::from(SUB_BITS));
    low.saturating_add(width - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_that_holds_it() {
        for nanos in (0..5000).chain([u64::MAX, u64::MAX / 3, 1 << 40, (1 << 40) - 1]) {
            let index = bucket(nanos);
            assert!(index < BUCKETS);
            assert!(bucket_top(index) >= nanos, "{nanos} in bucket {index}");
            if index > 0 {
                assert!(bucket_top(index - 1) < nanos, "{nanos} in bucket {index}");
            }
        }
    }

    #[test]
    fn percentiles_are_close_above_the_truth() {
        let counters = Counters::default();
        for micros in 1..=100 {
            counters.record_latency(Duration::from_micros(micros));
        }
        let latency = counters.snapshot().latency;
        assert_eq!(latency.count(), 100);
        let p50 = latency.percentile(0.5).unwrap();
        let p99 = latency.percentile(0.99).unwrap();
        assert!(p50 >= Duration::from_micros(50), "{p50:?}");
        assert!(p50 <= Duration::from_micros(57), "{p50:?}");
        assert!(p99 >= Duration::from_micros(99), "{p99:?}");
        assert!(p99 <= Duration::from_micros(112), "{p99:?}");
        assert_eq!(Latency::default().percentile(0.5), None);
    }
}
