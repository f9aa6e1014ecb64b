//! `GET /metrics`: CPU, memory, disk, load and uptime of the sandbox, read
//! from /proc and statvfs. CPU usage is the share of non-idle time between
//! two /proc/stat samples: the previous request's, or one taken 100 ms ago.

use std::fs;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use wrenn_http::ApiError;

use wrenn_http::timefmt::unix_millis;

/// A previous sample younger than this is too close to measure against.
const MIN_SAMPLE_GAP: Duration = Duration::from_millis(100);

/// Cumulative CPU time counters (in USER_HZ ticks) from /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// Remembers the last CPU sample between requests.
#[derive(Default)]
pub struct CpuSampler {
    last: Mutex<Option<(Instant, CpuTimes)>>,
}

impl CpuSampler {
    /// CPU usage in percent (0-100) since the last sample.
    fn usage_percent(&self) -> Result<f64, String> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = match *last {
            Some((at, times)) if at.elapsed() >= MIN_SAMPLE_GAP => times,
            _ => {
                let first = read_cpu_times()?;
                thread::sleep(MIN_SAMPLE_GAP);
                first
            }
        };
        let now = read_cpu_times()?;
        *last = Some((Instant::now(), now));
        Ok(usage_between(previous, now))
    }
}

fn usage_between(before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    (busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0)
}

fn read_cpu_times() -> Result<CpuTimes, String> {
    let stat = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    parse_cpu_line(&stat).ok_or_else(|| "/proc/stat has no parsable cpu line".to_owned())
}

/// Parses the aggregate `cpu` line: idle = idle + iowait.
fn parse_cpu_line(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// The JSON document `/metrics` answers.
#[derive(Debug, Serialize)]
pub struct Metrics {
    pub cpu_count: usize,
    pub cpu_used_pct: f64,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub mem_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_available_bytes: u64,
    pub load_avg: [f64; 3],
    pub uptime_secs: f64,
    pub timestamp_ms: u64,
}

/// Collects all metrics.
pub fn collect(cpu: &CpuSampler) -> Result<Metrics, ApiError> {
    let fail = |what: String| ApiError::internal(format!("cannot read metrics: {what}"));
    let cpu_used_pct = cpu.usage_percent().map_err(fail)?;
    let mem = read_meminfo().map_err(fail)?;
    let disk = disk_usage().map_err(fail)?;
    Ok(Metrics {
        cpu_count: thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_used_pct: (cpu_used_pct * 10.0).round() / 10.0,
        mem_total_bytes: mem.total,
        mem_used_bytes: mem.total.saturating_sub(mem.available),
        mem_available_bytes: mem.available,
        disk_total_bytes: disk.total,
        disk_used_bytes: disk.used,
        disk_available_bytes: disk.available,
        load_avg: read_loadavg().map_err(fail)?,
        uptime_secs: read_uptime().map_err(fail)?,
        timestamp_ms: unix_millis(SystemTime::now()),
    })
}

struct Memory {
    total: u64,
    available: u64,
}

fn read_meminfo() -> Result<Memory, String> {
    let text = fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(total), Some(available)) => Ok(Memory { total, available }),
        _ => Err("/proc/meminfo lacks MemTotal or MemAvailable".to_owned()),
    }
}

struct Disk {
    total: u64,
    used: u64,
    available: u64,
}

fn disk_usage() -> Result<Disk, String> {
    let vfs = nix::sys::statvfs::statvfs("/").map_err(|e| format!("statvfs /: {e}"))?;
    let unit = vfs.fragment_size();
    let total = vfs.blocks().saturating_mul(unit);
    let free = vfs.blocks_free().saturating_mul(unit);
    Ok(Disk {
        total,
        used: total.saturating_sub(free),
        available: vfs.blocks_available().saturating_mul(unit),
    })
}

fn read_loadavg() -> Result<[f64; 3], String> {
    let text = fs::read_to_string("/proc/loadavg").map_err(|e| format!("/proc/loadavg: {e}"))?;
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<f64>().unwrap_or(0.0));
    Ok([
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    ])
}

fn read_uptime() -> Result<f64, String> {
    let text = fs::read_to_string("/proc/uptime").map_err(|e| format!("/proc/uptime: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "/proc/uptime is not parsable".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_parsing_and_usage() {
        let before = parse_cpu_line("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n");
        let after = parse_cpu_line("cpu  200 0 200 800 100 0 0 0 0 0\n");
        let (before, after) = (before.expect("parse"), after.expect("parse"));
        assert_eq!(before.total, 1000);
        assert_eq!(before.busy, 200);
        assert!((usage_between(before, after) - 66.666).abs() < 0.01);
    }

    #[test]
    fn collect_reads_the_real_system() {
        let m = collect(&CpuSampler::default()).expect("metrics");
        assert!(m.cpu_count >= 1);
        assert!(m.mem_total_bytes >= m.mem_available_bytes);
        assert!(m.disk_total_bytes >= m.disk_used_bytes);
        assert!((0.0..=100.0).contains(&m.cpu_used_pct));
    }
}
