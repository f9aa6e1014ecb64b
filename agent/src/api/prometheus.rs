//! `GET /metrics`: the node's figures in the Prometheus text format
//! (version 0.0.4): sandboxes by state, the lifecycle's operations with
//! latency histograms, the layer store, gossip, forwarded requests and
//! failed authentications. Names start with `wrenn_`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use wrenn_http::{ApiError, Exchange, Reply};

use super::Api;
use crate::sandbox::timings::{Op, BUCKETS};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every state a sandbox can be in, so that each series exists from the
/// start (a rate over a series that appears late is wrong).
const STATES: [&str; 8] = [
    "creating",
    "running",
    "pausing",
    "paused",
    "resuming",
    "destroying",
    "destroyed",
    "error",
];

pub(super) fn metrics(api: &Api, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let text = render(api)?;
    let request = ex.take_request()?;
    let response = wrenn_http::tiny_http::Response::from_data(text.into_bytes());
    let _ = request.respond(wrenn_http::with_header(
        response,
        "Content-Type",
        CONTENT_TYPE,
    ));
    Ok(Reply::Streamed)
}

/// One metric family: its `# HELP` and `# TYPE` lines, then its samples.
struct Family<'o> {
    out: &'o mut String,
    name: &'static str,
}

impl<'o> Family<'o> {
    fn new(out: &'o mut String, name: &'static str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out, name }
    }

    /// A sample of this family: `suffix` (`_bucket`, ...) and labels.
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render(api: &Api) -> Result<String, ApiError> {
    let mut out = String::new();
    let manager = &api.manager;
    let mut by_state: BTreeMap<&str, u64> = STATES.iter().map(|s| (*s, 0)).collect();
    for record in manager.list()? {
        *by_state.entry(record.status.as_str()).or_default() += 1;
    }
    let mut f = Family::new(
        &mut out,
        "wrenn_sandboxes",
        "gauge",
        "Sandboxes on this node by state.",
    );
    for (state, n) in &by_state {
        f.sample("", &[("state", state)], n);
    }

    let timings = manager.timings();
    let mut f = Family::new(
        &mut out,
        "wrenn_operations_total",
        "counter",
        "Lifecycle operations finished, by operation and outcome.",
    );
    for op in Op::ALL {
        let (ok, failed) = timings.of(op).outcomes();
        f.sample("", &[("op", op.as_str()), ("outcome", "ok")], ok);
        f.sample("", &[("op", op.as_str()), ("outcome", "error")], failed);
    }
    let mut f = Family::new(
        &mut out,
        "wrenn_operation_seconds",
        "histogram",
        "How long lifecycle operations took, in seconds.",
    );
    for op in Op::ALL {
        let h = timings.of(op);
        let counts = h.cumulative();
        for (bound, n) in BUCKETS.iter().zip(&counts) {
            f.sample(
                "_bucket",
                &[("op", op.as_str()), ("le", &bound.to_string())],
                n,
            );
        }
        let total = counts.last().copied().unwrap_or(0);
        f.sample("_bucket", &[("op", op.as_str()), ("le", "+Inf")], total);
        f.sample("_sum", &[("op", op.as_str())], h.sum_seconds());
        f.sample("_count", &[("op", op.as_str())], total);
    }

    let layers = manager.snapshots().layer_usage()?;
    Family::new(
        &mut out,
        "wrenn_layer_store_bytes",
        "gauge",
        "Bytes of the layers in use.",
    )
    .sample("", &[], layers.bytes);
    Family::new(
        &mut out,
        "wrenn_layer_store_layers",
        "gauge",
        "Layers in use.",
    )
    .sample("", &[], layers.layers);

    let counters = &api.counters;
    Family::new(
        &mut out,
        "wrenn_forwarded_requests_total",
        "counter",
        "Requests sent on to the node of the fleet that holds their sandbox.",
    )
    .sample("", &[], counters.forwarded.load(Ordering::Relaxed));
    Family::new(
        &mut out,
        "wrenn_auth_failures_total",
        "counter",
        "Requests refused for a missing or wrong API key or caller signature.",
    )
    .sample("", &[], counters.auth_failures.load(Ordering::Relaxed));
    let transfers = &api.fetcher.counters;
    for (name, help, value) in [
        (
            "wrenn_snapshot_fetches_total",
            "Snapshot templates fetched from another node of the fleet and imported.",
            &transfers.fetches,
        ),
        (
            "wrenn_snapshot_fetch_failures_total",
            "Fetches of a snapshot template from another node that failed (retried at the next create).",
            &transfers.failures,
        ),
        (
            "wrenn_snapshot_fetched_bytes_total",
            "Bytes of snapshot files received from other nodes.",
            &transfers.fetched_bytes,
        ),
        (
            "wrenn_snapshot_fetch_resumed_total",
            "Snapshot files whose transfer went on from where an earlier one stopped.",
            &transfers.resumed,
        ),
        (
            "wrenn_snapshot_served_bytes_total",
            "Bytes of snapshot files sent to other nodes.",
            &transfers.served_bytes,
        ),
    ] {
        Family::new(&mut out, name, "counter", help).sample("", &[], value.load(Ordering::Relaxed));
    }

    if let Some(fleet) = &api.fleet {
        let mut states: BTreeMap<&str, u64> = ["live", "dead", "refused", "unknown"]
            .iter()
            .map(|s| (*s, 0))
            .collect();
        for member in fleet.members() {
            *states.entry(member.state).or_default() += 1;
        }
        let mut f = Family::new(
            &mut out,
            "wrenn_gossip_members",
            "gauge",
            "Members of the fleet as this node sees them, by state.",
        );
        for (state, n) in &states {
            f.sample("", &[("state", state)], n);
        }
        let c = fleet.counters();
        let mut f = Family::new(
            &mut out,
            "wrenn_gossip_messages_total",
            "counter",
            "Gossip datagrams sent, received, and rejected (bad signature or sender).",
        );
        for (dir, n) in [
            ("sent", &c.sent),
            ("received", &c.received),
            ("rejected", &c.rejected),
        ] {
            f.sample("", &[("direction", dir)], n.load(Ordering::Relaxed));
        }
        Family::new(
            &mut out,
            "wrenn_fleet_manifest_version",
            "gauge",
            "Version of the fleet manifest in force.",
        )
        .sample("", &[], fleet.manifest().version);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_in_the_text_format() {
        let mut out = String::new();
        let mut f = Family::new(&mut out, "wrenn_x", "gauge", "An example.");
        f.sample("", &[("state", "a\"b")], 3);
        f.sample("_bucket", &[("op", "create"), ("le", "0.5")], 1);
        f.sample("", &[], 2.5);
        assert_eq!(
            out,
            "# HELP wrenn_x An example.\n# TYPE wrenn_x gauge\n\
             wrenn_x{state=\"a\\\"b\"} 3\nwrenn_x_bucket{op=\"create\",le=\"0.5\"} 1\nwrenn_x 2.5\n"
        );
    }
}
