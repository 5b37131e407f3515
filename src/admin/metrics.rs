//! The Prometheus recorder and the gauges no stage owns.
//!
//! The `metrics` facade has one recorder per process, so [`install`] installs it once and
//! hands every later caller the same handle (tests start several gateways in one process).
//! Counters are bumped by the stages where their events happen; the gauges derived from the
//! log's statistics are set here, once a second, by [`refresh`]: the log itself does not
//! know whether it is the main log or the dead-letter log.
//!
//! Names follow Prometheus conventions (`_total`, `_seconds`, `_bytes`); label values are
//! fixed strings (protocol, QoS, reason, kind), never device ids or topics.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::Health;

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
        if let Some(handle) = handle {
            handle.run_upkeep();
        }
    }
}

/// HELP lines for the metrics operators read most.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "edgegate_messages_received_total",
        "Messages stored in the log, by protocol and QoS (MQTT 0/1/2, CoAP con/non)."
    );
    describe_counter!(
        "edgegate_received_bytes_total",
        "Payload bytes stored in the log, by protocol and QoS."
    );
    describe_counter!(
        "edgegate_ingest_rejected_total",
        "Messages not stored, by protocol and reason (no_route, log_full, too_large, io_error...), each counted once."
    );
    describe_counter!(
        "edgegate_mqtt_connections_total",
        "MQTT connections accepted."
    );
    describe_gauge!("edgegate_mqtt_connections", "MQTT connections open now.");
    describe_counter!(
        "edgegate_mqtt_connections_refused_total",
        "MQTT CONNECTs refused, by reason (authentication, limits, protocol)."
    );
    describe_counter!(
        "edgegate_auth_failures_total",
        "Devices refused for authentication or authorization, by reason (bad password, certificate, topic rights...)."
    );
    describe_counter!(
        "edgegate_mqtt_tls_handshakes_total",
        "MQTT TLS handshakes completed."
    );
    describe_counter!(
        "edgegate_mqtt_tls_handshake_failures_total",
        "MQTT TLS handshakes that failed or timed out, by reason."
    );
    describe_gauge!(
        "edgegate_log_records",
        "Records in the log not yet acknowledged by Kafka."
    );
    describe_gauge!("edgegate_log_bytes", "Bytes the log uses on disk.");
    describe_gauge!(
        "edgegate_log_oldest_record_age_seconds",
        "Age of the oldest record not yet acknowledged by Kafka (0 when none)."
    );
    describe_histogram!(
        "edgegate_log_fsync_seconds",
        "Duration of the log's fsyncs."
    );
    describe_counter!(
        "edgegate_log_dropped_records_total",
        "Records dropped by the overflow or age policy."
    );
    describe_counter!(
        "edgegate_log_corrupt_records_total",
        "Corrupt records skipped in the log."
    );
    describe_gauge!(
        "edgegate_backlog_drain_seconds",
        "Estimated time to send the backlog at the current rates (+Inf while it grows)."
    );
    describe_counter!(
        "edgegate_kafka_delivered_total",
        "Records acknowledged by Kafka."
    );
    describe_counter!(
        "edgegate_kafka_errors_total",
        "Failed sends and deliveries, by kind."
    );
    describe_gauge!(
        "edgegate_kafka_in_flight_records",
        "Records handed to Kafka and not yet acknowledged."
    );
    describe_gauge!(
        "edgegate_kafka_window_records",
        "Current in-flight window (adaptive)."
    );
    describe_gauge!(
        "edgegate_kafka_link_up",
        "1 when Kafka is reachable, 0 when the gateway is buffering."
    );
    describe_histogram!(
        "edgegate_kafka_produce_latency_seconds",
        "Time from send to Kafka's acknowledgement."
    );
    describe_counter!(
        "edgegate_kafka_dead_letter_total",
        "Records Kafka refused for good, moved to the dead-letter log."
    );
    describe_gauge!(
        "edgegate_start_time_seconds",
        "Start time of the gateway, seconds since the Unix epoch."
    );
}
