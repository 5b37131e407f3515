//! The forwarder's metrics, one function per event. Label values are fixed strings (error
//! kinds from [`super::classify::kind`], never topics or device ids).

use std::time::Duration;

use super::LinkState;
use super::window::Change;

pub const DELIVERED: &str = "edgegate_kafka_delivered_total";
pub const DEAD_LETTER: &str = "edgegate_kafka_dead_letter_total";
pub const ERRORS: &str = "edgegate_kafka_errors_total";
pub const CLIENT_ERRORS: &str = "edgegate_kafka_client_errors_total";
pub const IN_FLIGHT_RECORDS: &str = "edgegate_kafka_in_flight_records";
pub const IN_FLIGHT_BYTES: &str = "edgegate_kafka_in_flight_bytes";
pub const WINDOW_RECORDS: &str = "edgegate_kafka_window_records";
pub const WINDOW_BYTES: &str = "edgegate_kafka_window_bytes";
pub const LINK_UP: &str = "edgegate_kafka_link_up";
pub const LATENCY: &str = "edgegate_kafka_produce_latency_seconds";
pub const REBUILDS: &str = "edgegate_kafka_producer_rebuilds_total";
pub const REBOOTSTRAPS: &str = "edgegate_kafka_rebootstraps_total";
pub const EPOCH_BUMPS: &str = "edgegate_kafka_epoch_bumps_total";
pub const STALLS: &str = "edgegate_kafka_stalls_total";
pub const SHORT_OF_REPLICAS: &str = "edgegate_kafka_short_of_replicas";
pub const TRANSACTIONS: &str = "edgegate_kafka_transactions_total";
pub const TRANSACTION_SECONDS: &str = "edgegate_kafka_transaction_seconds";

/// Handles of the metrics every delivered record touches, taken once when the forwarder
/// starts: `metrics::counter!` looks its key up in the registry (a lock) on every call,
/// which showed in the uplink's profile.
pub struct Deliveries {
    delivered: metrics::Counter,
    latency: metrics::Histogram,
}

impl Deliveries {
    pub fn new() -> Deliveries {
        Deliveries {
            delivered: metrics::counter!(DELIVERED),
            latency: metrics::histogram!(LATENCY),
        }
    }

    /// `n` records were acknowledged by Kafka (counted once per batch of reports).
    pub fn delivered(&self, n: u64) {
        self.delivered.increment(n);
    }

    /// One record's time from send to Kafka's acknowledgement.
    pub fn latency(&self, d: Duration) {
        self.latency.record(d.as_secs_f64());
    }
}

pub fn dead_lettered() {
    metrics::counter!(DEAD_LETTER).increment(1);
}

/// A failed send or delivery, by kind.
pub fn error(kind: &'static str) {
    metrics::counter!(ERRORS, "kind" => kind).increment(1);
}

/// An error reported by librdkafka's error callback (connections, authentication).
pub fn client_error(kind: &'static str) {
    metrics::counter!(CLIENT_ERRORS, "kind" => kind).increment(1);
}

/// A transaction ended (`committed`, `aborted` or `failed`) after `took`.
pub fn transaction(outcome: &'static str, took: Duration) {
    metrics::counter!(TRANSACTIONS, "outcome" => outcome).increment(1);
    metrics::histogram!(TRANSACTION_SECONDS).record(took.as_secs_f64());
}

pub fn rebuilt() {
    metrics::counter!(REBUILDS).increment(1);
}

/// A client that forgot every broker was given its bootstrap brokers again.
pub fn rebootstrapped() {
    metrics::counter!(REBOOTSTRAPS).increment(1);
}

/// A transaction aborted (for anything but a record Kafka refused): the next runs under a
/// new producer epoch.
pub fn epoch_bumped() {
    metrics::counter!(EPOCH_BUMPS).increment(1);
}

/// The liveness probe found Kafka answering while the producer delivered nothing.
pub fn stalled() {
    metrics::counter!(STALLS).increment(1);
}

/// 1 while Kafka refuses writes for want of in-sync replicas (see `Progress`), else 0.
pub fn short_of_replicas(short: bool) {
    metrics::gauge!(SHORT_OF_REPLICAS).set(if short { 1.0 } else { 0.0 });
}

pub fn in_flight(records: usize, bytes: usize) {
    metrics::gauge!(IN_FLIGHT_RECORDS).set(records as f64);
    metrics::gauge!(IN_FLIGHT_BYTES).set(bytes as f64);
}

pub fn window(records: usize, bytes: usize) {
    metrics::gauge!(WINDOW_RECORDS).set(records as f64);
    metrics::gauge!(WINDOW_BYTES).set(bytes as f64);
}

pub fn link(state: LinkState) {
    metrics::gauge!(LINK_UP).set(if state == LinkState::Up { 1.0 } else { 0.0 });
}

/// The window changed materially: one log line and the gauges.
pub fn window_changed(change: Change) {
    window(change.records, change.bytes);
    tracing::info!(
        records = change.records,
        bytes = change.bytes,
        mode = change.mode.as_str(),
        reason = change.reason,
        "Kafka batch window changed."
    );
}

/// HELP text of the forwarder's metrics.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(DELIVERED, "Records acknowledged by Kafka.");
    describe_counter!(
        DEAD_LETTER,
        "Records Kafka refused for good, moved to the dead-letter log."
    );
    describe_counter!(ERRORS, "Failed sends and deliveries, by kind.");
    describe_counter!(
        CLIENT_ERRORS,
        "Errors librdkafka reported about its connections, by kind (transport, authentication...)."
    );
    describe_counter!(
        REBUILDS,
        "Kafka producers rebuilt (a fatal error, a stall); their unfinished records were sent again."
    );
    describe_counter!(
        REBOOTSTRAPS,
        "Kafka clients that had forgotten every broker and were given the bootstrap brokers again."
    );
    describe_counter!(
        EPOCH_BUMPS,
        "Exactly-once transactions aborted (for anything but a record Kafka refused), their records sent again by a new producer (a new epoch)."
    );
    describe_counter!(
        STALLS,
        "Times Kafka answered while the producer had delivered nothing for stall_timeout."
    );
    describe_gauge!(
        IN_FLIGHT_RECORDS,
        "Records handed to Kafka and not yet acknowledged."
    );
    describe_gauge!(
        IN_FLIGHT_BYTES,
        "Weight (bytes, with overhead) of the records handed to Kafka and not yet acknowledged."
    );
    describe_gauge!(
        WINDOW_RECORDS,
        "Current in-flight window (adaptive), in records."
    );
    describe_gauge!(
        WINDOW_BYTES,
        "Current in-flight window (adaptive), in bytes."
    );
    describe_gauge!(
        SHORT_OF_REPLICAS,
        "1 while Kafka answers but refuses writes: a partition has fewer in-sync replicas than min.insync.replicas."
    );
    describe_gauge!(
        LINK_UP,
        "1 when Kafka is reachable, 0 when the gateway is buffering."
    );
    describe_histogram!(LATENCY, "Time from send to Kafka's acknowledgement.");
    describe_counter!(
        TRANSACTIONS,
        "Exactly once: Kafka transactions ended, by outcome (committed, aborted and sent again, failed and the producer replaced)."
    );
    describe_histogram!(
        TRANSACTION_SECONDS,
        "Exactly once: time from a transaction's begin to its end."
    );
}
