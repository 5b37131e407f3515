//! The Prometheus recorder and the gauges no stage owns.
//!
//! The `metrics` facade has one recorder per process, so [`install`] installs it once and
//! hands every later caller the same handle (tests start several gateways in one process).
//! Counters are bumped by the stages where their events happen; the gauges derived from the
//! log's statistics are set here, once a second by [`refresh`] and on each scrape: the log
//! itself does not know whether it is the main log or the dead-letter log.
//!
//! Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`); label values are
//! fixed strings (protocol, QoS, reason, kind), never device ids or topics.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::buffer::LogStats;

/// Histogram buckets for every `_seconds` histogram (fsync and produce latency): from half a
/// millisecond (a fast SSD fsync) to 30 s (Kafka's delivery timeout).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often [`refresh`] runs.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the process-wide recorder on first use; `None` when another recorder was
/// installed first (then `/metrics` answers 503 and says why).
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot install the metrics recorder; /metrics will be empty.");
                    None
                }
            }
        })
        .as_ref()
}

/// Sets the derived gauges from `health` every [`REFRESH_INTERVAL`] until `shutdown`, and
/// runs the recorder's upkeep.
pub async fn refresh(
    health: Health,
    handle: Option<&'static PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let started = health
        .started
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("edgegate_start_time_seconds").set(started);
    metrics::gauge!("edgegate_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Counters that may stay at zero for months are shown from the start, so a dashboard's
    // rate() has a series before the first drop or dead letter.
    for name in [
        "edgegate_log_dropped_records_total",
        "edgegate_log_corrupt_records_total",
        "edgegate_kafka_delivered_total",
        "edgegate_kafka_dead_letter_total",
        "edgegate_mqtt_connections_total",
        "edgegate_auth_failures_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("edgegate_mqtt_connections").increment(0.0);
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = health.log.stats();
        health.sample(&stats);
        set_gauges(&health, &stats);
        if let Some(handle) = handle {
            handle.run_upkeep();
        }
    }
}

/// HELP text for every metric: each stage describes its own, beside where it counts them;
/// these are the gauges set here.
/// Sets the gauges derived from `stats` and `health`. Called by [`refresh`] and again by each
/// `/metrics` scrape, so a scrape never shows a backlog that has already drained.
pub fn set_gauges(health: &Health, stats: &LogStats) {
    metrics::gauge!("edgegate_log_records").set(stats.records as f64);
    metrics::gauge!("edgegate_log_bytes").set(stats.bytes as f64);
    metrics::gauge!("edgegate_log_segments").set(stats.segments as f64);
    metrics::gauge!("edgegate_log_oldest_record_age_seconds")
        .set(stats.oldest_age.map_or(0.0, |d| d.as_secs_f64()));
    // +Inf while the backlog is not shrinking: "at this rate, never".
    metrics::gauge!("edgegate_backlog_drain_seconds").set(
        health
            .drain_estimate(stats.records)
            .unwrap_or(f64::INFINITY),
    );
    let dead_letter = health.dead_letter.stats();
    metrics::gauge!("edgegate_dead_letter_records").set(dead_letter.records as f64);
    metrics::gauge!("edgegate_dead_letter_bytes").set(dead_letter.bytes as f64);
    let up = SystemTime::now()
        .duration_since(health.started)
        .unwrap_or(Duration::ZERO);
    metrics::gauge!("edgegate_uptime_seconds").set(up.as_secs_f64());
    if let Some(b) = health.broker_stats() {
        metrics::gauge!("edgegate_mqtt_sessions", "state" => "online")
            .set(b.sessions_online as f64);
        metrics::gauge!("edgegate_mqtt_sessions", "state" => "offline")
            .set(b.sessions_offline as f64);
        metrics::gauge!("edgegate_mqtt_subscriptions").set(b.subscriptions as f64);
        metrics::gauge!("edgegate_retained_messages").set(b.retained as f64);
        metrics::gauge!("edgegate_local_queued_messages").set(b.queued_messages as f64);
        metrics::gauge!("edgegate_local_queued_bytes").set(b.queued_bytes as f64);
        metrics::gauge!("edgegate_local_read_back_bytes").set(b.read_back_bytes as f64);
        metrics::gauge!("edgegate_downlink_commands_held").set(b.commands_held as f64);
        let oldest = b.oldest_command_ms.map_or(0.0, |sent| {
            (crate::ingest::now_ms().saturating_sub(sent)).max(0) as f64 / 1000.0
        });
        metrics::gauge!("edgegate_downlink_oldest_command_age_seconds").set(oldest);
        if let Some(lag) = b.downlink_lag {
            metrics::gauge!("edgegate_downlink_consumer_lag").set(lag as f64);
        }
    }
}

fn describe() {
    use metrics::describe_gauge;
    crate::ingest::describe();
    crate::format::registry::describe();
    crate::ingest::mqtt::describe();
    crate::ingest::coap::describe();
    crate::auth::describe();
    crate::buffer::describe();
    crate::forward::metric::describe();
    crate::broker::describe();
    describe_gauge!(
        "edgegate_log_records",
        "Records in the log not yet acknowledged by Kafka."
    );
    describe_gauge!("edgegate_log_bytes", "Bytes the log uses on disk.");
    describe_gauge!("edgegate_log_segments", "Segment files of the log.");
    describe_gauge!(
        "edgegate_log_oldest_record_age_seconds",
        "Age of the oldest record not yet acknowledged by Kafka (0 when none)."
    );
    describe_gauge!(
        "edgegate_backlog_drain_seconds",
        "Estimated time to send the backlog at the current rates (+Inf while it grows)."
    );
    describe_gauge!(
        "edgegate_dead_letter_records",
        "Records in the dead-letter log."
    );
    describe_gauge!(
        "edgegate_dead_letter_bytes",
        "Bytes the dead-letter log uses on disk."
    );
    describe_gauge!(
        "edgegate_start_time_seconds",
        "Start time of the gateway, seconds since the Unix epoch."
    );
    describe_gauge!(
        "edgegate_uptime_seconds",
        "Seconds since the gateway started."
    );
    describe_gauge!(
        "edgegate_build_info",
        "Always 1; the version label says which build runs."
    );
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((path.display().to_string(), text));
            }
        }
    }

    /// The metric names given as first argument to the macros `prefix` names
    /// (`counter!(`, `describe_counter!(`...): string literals, or constants of the same file.
    fn names(file: &str, prefixes: &[&str]) -> Vec<String> {
        let constants: BTreeMap<&str, &str> = file
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("pub const ")
                    .or(l.trim().strip_prefix("const "))
            })
            .filter_map(|l| l.split_once(": &str = \""))
            .filter_map(|(name, rest)| Some((name, rest.split_once('"')?.0)))
            .collect();
        let mut out = Vec::new();
        for prefix in prefixes {
            for (i, _) in file.match_indices(prefix) {
                let before = &file[..i];
                if !(before.ends_with("metrics::")
                    || before.ends_with(' ')
                    || before.ends_with('\n'))
                {
                    continue;
                }
                let arg = file[i + prefix.len()..].trim_start();
                let arg = arg.split([',', ')']).next().unwrap_or_default().trim();
                if let Some(literal) = arg.strip_prefix('"') {
                    out.push(literal.trim_end_matches('"').to_owned());
                } else if let Some(value) = constants.get(arg) {
                    out.push((*value).to_owned());
                }
            }
        }
        out
    }

    /// Every metric the gateway exports has HELP text, described once, and nothing is
    /// described that is not exported.
    #[test]
    fn every_metric_is_described_once() {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let (mut used, mut described) = (BTreeSet::new(), Vec::new());
        for (path, text) in &files {
            if path.contains("/bin/") {
                continue;
            }
            used.extend(names(text, &["counter!(", "gauge!(", "histogram!("]));
            described.extend(names(
                text,
                &[
                    "describe_counter!(",
                    "describe_gauge!(",
                    "describe_histogram!(",
                ],
            ));
        }
        used.retain(|n| n.starts_with("edgegate_"));
        let unique: BTreeSet<String> = described.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            described.len(),
            "described twice: {described:?}"
        );
        let missing: Vec<_> = used.difference(&unique).collect();
        assert!(missing.is_empty(), "no HELP text: {missing:?}");
        let stale: Vec<_> = unique.difference(&used).collect();
        assert!(stale.is_empty(), "described but never exported: {stale:?}");
        assert!(used.len() > 60, "the scan found only {used:?}");
    }
}
