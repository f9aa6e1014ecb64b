//! What the node did and does, in the SDK's shapes: a capsule's resource
//! samples (`/v1/capsules/{id}/metrics`), the node's running capsules over
//! time (`/v1/capsules/stats`), vCPU and memory minutes per day
//! (`/v1/capsules/usage`) and the live event feed (`/v1/events/stream`,
//! server-sent events).
//!
//! Stats, usage and the feed are read from the node's event log in LMDB:
//! each `create` event carries the capsule's size, `pause`, `resume`,
//! `destroy` and `create_failed` say when it stopped or started using it.

use std::collections::HashMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use lmdb_schema::{EventRecord, SandboxStatus};
use serde_json::{json, Value};
use wrenn_http::{ApiError, Exchange, NdjsonStream, Reply};

use super::sandboxes::parse_id;
use super::Api;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;
/// Points in a stats series.
const SERIES_POINTS: u64 = 60;
/// How often the event feed looks for new events.
const FEED_POLL: Duration = Duration::from_millis(250);
/// A quiet feed sends a comment line this often.
const FEED_KEEPALIVE: Duration = Duration::from_secs(15);

/// A `range` query parameter among `allowed` (name, milliseconds).
fn range(
    ex: &Exchange,
    allowed: &[(&'static str, u64)],
    default: &'static str,
) -> Result<(&'static str, u64), ApiError> {
    let wanted = ex.query().text("range")?.unwrap_or(default);
    allowed
        .iter()
        .find(|(name, _)| *name == wanted)
        .copied()
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            ApiError::invalid_argument(format!(
                "range is {wanted:?}: use one of {}",
                names.join(", ")
            ))
        })
}

/// `GET /v1/capsules/{id}/metrics[?range=10m]`.
pub fn metrics(api: &Api, ex: &Exchange, id: &str) -> Result<Reply, ApiError> {
    const RANGES: &[(&str, u64)] = &[
        ("5m", 5 * MINUTE_MS),
        ("10m", 10 * MINUTE_MS),
        ("1h", 60 * MINUTE_MS),
        ("2h", 120 * MINUTE_MS),
        ("6h", 360 * MINUTE_MS),
        ("12h", 720 * MINUTE_MS),
        ("24h", DAY_MS),
    ];
    let (name, span) = range(ex, RANGES, "10m")?;
    let id = parse_id(id)?;
    let record = api.manager.get(&id)?;
    let since = now_ms().saturating_sub(span) / 1000;
    let mut points = api.manager.metrics().since(&id, since);
    if points.is_empty() && record.status == SandboxStatus::Running {
        // Newer than the sampler's last round: measure it now.
        points.push(api.manager.sample(&id)?);
    }
    Ok(Reply::Json(
        200,
        json!({"sandbox_id": id.as_str(), "range": name, "points": points}),
    ))
}

/// When each capsule ran, as read from the event log.
struct Spans {
    /// (start ms, end ms or None while running, vcpus, memory MiB).
    spans: Vec<(u64, Option<u64>, u32, u32)>,
}

impl Spans {
    fn from_events(events: &[(u64, EventRecord)]) -> Spans {
        let mut sizes: HashMap<String, (u32, u32)> = HashMap::new();
        let mut open: HashMap<String, usize> = HashMap::new();
        let mut spans = Vec::new();
        for (_, event) in events {
            let Some(id) = event.sandbox.as_ref().map(|s| s.as_str().to_owned()) else {
                continue;
            };
            match event.kind.as_str() {
                "create" => {
                    let size = parse_size(&event.detail);
                    sizes.insert(id.clone(), size);
                    open.insert(id, spans.len());
                    spans.push((event.at_ms, None, size.0, size.1));
                }
                "resume" => {
                    let size = sizes.get(&id).copied().unwrap_or((1, 512));
                    open.insert(id, spans.len());
                    spans.push((event.at_ms, None, size.0, size.1));
                }
                "pause" | "destroy" | "create_failed" | "timeout_destroy" => {
                    if let Some(i) = open.remove(&id) {
                        spans[i].1 = Some(event.at_ms);
                    }
                }
                _ => {}
            }
        }
        Spans { spans }
    }

    /// Capsules, vCPUs and MiB running at `at`.
    fn at(&self, at: u64) -> (u64, u64, u64) {
        self.spans
            .iter()
            .filter(|(start, end, _, _)| *start <= at && end.is_none_or(|e| e > at))
            .fold((0, 0, 0), |(n, v, m), (_, _, vcpus, mem)| {
                (n + 1, v + u64::from(*vcpus), m + u64::from(*mem))
            })
    }

    /// vCPU-minutes and MiB-minutes between `from` and `to`.
    fn minutes(&self, from: u64, to: u64, now: u64) -> (f64, f64) {
        self.spans
            .iter()
            .fold((0.0, 0.0), |(cpu, ram), (start, end, vcpus, mem)| {
                let lo = (*start).max(from);
                let hi = end.unwrap_or(now).min(to);
                if hi <= lo {
                    return (cpu, ram);
                }
                let minutes = (hi - lo) as f64 / MINUTE_MS as f64;
                (
                    cpu + minutes * f64::from(*vcpus),
                    ram + minutes * f64::from(*mem),
                )
            })
    }
}

/// `vcpus=N memory_mb=M` from a create event (1 and 512 when older events
/// do not say).
fn parse_size(detail: &str) -> (u32, u32) {
    let mut size = (1, 512);
    for word in detail.split_whitespace() {
        match word.split_once('=') {
            Some(("vcpus", v)) => size.0 = v.parse().unwrap_or(size.0),
            Some(("memory_mb", v)) => size.1 = v.parse().unwrap_or(size.1),
            _ => {}
        }
    }
    size
}

fn now_ms() -> u64 {
    wrenn_http::timefmt::unix_millis(std::time::SystemTime::now())
}

fn timestamp(ms: u64) -> String {
    wrenn_http::timefmt::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// `GET /v1/capsules/stats[?range=1h]`.
pub fn stats(api: &Api, ex: &Exchange) -> Result<Reply, ApiError> {
    const RANGES: &[(&str, u64)] = &[
        ("5m", 5 * MINUTE_MS),
        ("1h", 60 * MINUTE_MS),
        ("6h", 360 * MINUTE_MS),
        ("24h", DAY_MS),
        ("30d", 30 * DAY_MS),
    ];
    let (name, span) = range(ex, RANGES, "1h")?;
    let now = now_ms();
    let spans = Spans::from_events(&api.manager.events_after(0)?);
    let live: Vec<_> = api
        .manager
        .list()?
        .into_iter()
        .filter(|r| r.status == SandboxStatus::Running)
        .collect();
    let step = (span / SERIES_POINTS).max(1);
    let mut labels = Vec::new();
    let (mut running, mut vcpus, mut memory) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=SERIES_POINTS {
        let at = now.saturating_sub(span) + i * step;
        let (n, v, m) = spans.at(at.min(now));
        labels.push(timestamp(at.min(now)));
        running.push(n);
        vcpus.push(v);
        memory.push(m);
    }
    let current = (
        live.len() as u64,
        live.iter().map(|r| u64::from(r.vcpus)).sum::<u64>(),
        live.iter().map(|r| u64::from(r.memory_mb)).sum::<u64>(),
    );
    let peak = |series: &[u64], now: u64| series.iter().copied().max().unwrap_or(0).max(now);
    Ok(Reply::Json(
        200,
        json!({
            "range": name,
            "current": {
                "running_count": current.0,
                "vcpus_reserved": current.1,
                "memory_mb_reserved": current.2,
            },
            "peaks": {
                "running_count": peak(&running, current.0),
                "vcpus": peak(&vcpus, current.1),
                "memory_mb": peak(&memory, current.2),
            },
            "series": {"labels": labels, "running": running, "vcpus": vcpus, "memory_mb": memory},
        }),
    ))
}

/// Days since the Unix epoch of `YYYY-MM-DD`.
fn parse_date(name: &str, text: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid_argument(format!(
            "{name} is {text:?}: give a date as YYYY-MM-DD, such as 2026-01-31"
        ))
    };
    let time = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).map_err(|_| bad())?;
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_millis() as u64;
    Ok(ms / DAY_MS)
}

fn date(day: u64) -> String {
    timestamp(day * DAY_MS)[..10].to_owned()
}

/// `GET /v1/capsules/usage[?from=YYYY-MM-DD&to=YYYY-MM-DD]`: one point per
/// day, both ends included; by default the last 30 days.
pub fn usage(api: &Api, ex: &Exchange) -> Result<Reply, ApiError> {
    let now = now_ms();
    let today = now / DAY_MS;
    let to = match ex.query().text("to")? {
        Some(text) => parse_date("to", text)?,
        None => today,
    };
    let from = match ex.query().text("from")? {
        Some(text) => parse_date("from", text)?,
        None => to.saturating_sub(29),
    };
    if from > to || to - from > 366 {
        return Err(ApiError::invalid_argument(
            "from must be on or before to, and at most 366 days before it",
        ));
    }
    let spans = Spans::from_events(&api.manager.events_after(0)?);
    let points: Vec<Value> = (from..=to)
        .map(|day| {
            let (cpu, ram) = spans.minutes(day * DAY_MS, (day + 1) * DAY_MS, now);
            json!({"date": date(day), "cpu_minutes": cpu, "ram_mb_minutes": ram})
        })
        .collect();
    Ok(Reply::Json(
        200,
        json!({"from": date(from), "to": date(to), "points": points}),
    ))
}

/// The SDK's name for an event of the log, `None` for those it does not
/// know (its event enum is strict: one unknown name ends its iterator).
fn event_name(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "create" => ("capsule.create", "success"),
        "create_failed" => ("capsule.create", "error"),
        "pause" => ("capsule.pause", "success"),
        "resume" => ("capsule.resume", "success"),
        "destroy" | "timeout_destroy" => ("capsule.destroy", "success"),
        "snapshot_create" => ("template.snapshot.create", "success"),
        "snapshot_delete" => ("template.snapshot.delete", "success"),
        _ => return None,
    })
}

fn sse_event(event: &EventRecord) -> Option<Value> {
    let (name, outcome) = event_name(&event.kind)?;
    let resource = match name {
        "template.snapshot.create" | "template.snapshot.delete" => {
            json!({"id": event.detail, "type": "template"})
        }
        _ => json!({"id": event.sandbox.as_ref().map(|s| s.as_str()), "type": "capsule"}),
    };
    let mut body = json!({
        "event": name,
        "outcome": outcome,
        "resource": resource,
        "actor": {"type": "system", "id": "node", "name": "wrenn-agent"},
        "timestamp": timestamp(event.at_ms),
    });
    if outcome == "error" && !event.detail.is_empty() {
        body["error"] = Value::String(event.detail.clone());
    }
    Some(body)
}

/// `GET /v1/events/stream`: `connected` first, then each new event of the
/// node's log as it is written, and a comment line when quiet. It ends
/// when the client goes away.
pub fn stream(api: &Api, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let mut seen = api
        .manager
        .events_after(0)?
        .last()
        .map_or(0, |(seq, _)| *seq);
    let request = ex.take_request()?;
    let Ok(mut out) = NdjsonStream::open_as(request, "text/event-stream") else {
        return Ok(Reply::Streamed);
    };
    let connected = json!({"event": "connected", "timestamp": timestamp(now_ms())});
    if out.send_raw(frame(&connected).as_bytes()).is_err() {
        return Ok(Reply::Streamed);
    }
    let mut quiet_since = Instant::now();
    loop {
        std::thread::sleep(FEED_POLL);
        let events = match api.manager.events_after(seen) {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "event feed cannot read the log; ending it");
                return Ok(Reply::Streamed);
            }
        };
        let mut text = String::new();
        for (seq, event) in &events {
            seen = *seq;
            if let Some(body) = sse_event(event) {
                text.push_str(&frame(&body));
            }
        }
        if text.is_empty() && quiet_since.elapsed() >= FEED_KEEPALIVE {
            text.push_str(": keepalive\n\n");
        }
        if !text.is_empty() {
            if out.send_raw(text.as_bytes()).is_err() {
                return Ok(Reply::Streamed);
            }
            quiet_since = Instant::now();
        }
    }
}

fn frame(body: &Value) -> String {
    format!("data: {body}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb_schema::SandboxId;

    fn event(at_ms: u64, id: &str, kind: &str, detail: &str) -> (u64, EventRecord) {
        (
            at_ms,
            EventRecord {
                at_ms,
                sandbox: SandboxId::parse(id).ok(),
                kind: kind.into(),
                detail: detail.into(),
            },
        )
    }

    #[test]
    fn spans_follow_create_pause_resume_destroy() {
        let events = vec![
            event(0, "sb-a", "create", "vcpus=2 memory_mb=1024"),
            event(10 * MINUTE_MS, "sb-a", "pause", ""),
            event(20 * MINUTE_MS, "sb-a", "resume", ""),
            event(30 * MINUTE_MS, "sb-a", "destroy", ""),
            event(5 * MINUTE_MS, "sb-b", "create", ""),
        ];
        let spans = Spans::from_events(&events);
        assert_eq!(spans.at(MINUTE_MS), (1, 2, 1024));
        assert_eq!(spans.at(6 * MINUTE_MS), (2, 3, 1536));
        assert_eq!(spans.at(15 * MINUTE_MS), (1, 1, 512));
        let (cpu, ram) = spans.minutes(0, 30 * MINUTE_MS, 40 * MINUTE_MS);
        // sb-a: 20 minutes at 2 vCPUs; sb-b: 25 minutes at 1.
        assert_eq!(cpu, 65.0);
        assert_eq!(ram, 20.0 * 1024.0 + 25.0 * 512.0);
    }

    #[test]
    fn dates_are_days_since_the_epoch() {
        assert_eq!(parse_date("from", "1970-01-02").ok(), Some(1));
        assert_eq!(date(20_454), "2026-01-01");
        assert!(parse_date("from", "yesterday").is_err());
    }

    #[test]
    fn unknown_kinds_are_not_sent_to_the_sdk() {
        assert!(event_name("slot_reclaimed").is_none());
        assert_eq!(event_name("pause"), Some(("capsule.pause", "success")));
    }
}
