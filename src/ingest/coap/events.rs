//! Telemetry of the CoAP endpoint: each function logs one kind of event and bumps its
//! counter; the counters every request touches are registered once ([`HotCounters`]).
//! Hostile input is logged at DEBUG.

use std::net::SocketAddr;

use super::message::code;

/// Handles of the counters every request touches, registered once: `metrics::counter!`
/// looks its key up in the registry on every call.
pub(super) struct HotCounters {
    pub(super) datagrams: metrics::Counter,
    pub(super) requests_con: metrics::Counter,
    pub(super) requests_non: metrics::Counter,
    pub(super) stored: metrics::Counter,
    pub(super) changed: metrics::Counter,
}

impl HotCounters {
    pub(super) fn new() -> HotCounters {
        HotCounters {
            datagrams: metrics::counter!("edgegate_coap_datagrams_total"),
            requests_con: metrics::counter!("edgegate_coap_requests_total", "type" => type_label(true)),
            requests_non: metrics::counter!("edgegate_coap_requests_total", "type" => type_label(false)),
            stored: metrics::counter!("edgegate_coap_stored_total"),
            changed: response_counter(code::CHANGED),
        }
    }

    /// Counts an answer by its code.
    pub(super) fn response(&self, code: u8) {
        if code == code::CHANGED {
            self.changed.increment(1);
        } else {
            response_counter(code).increment(1);
        }
    }
}

pub(super) fn type_label(confirmable: bool) -> &'static str {
    if confirmable { "con" } else { "non" }
}

pub(super) fn response_counter(code: u8) -> metrics::Counter {
    metrics::counter!("edgegate_coap_responses_total", "code" => code::label(code))
}

pub(super) fn duplicate(peer: SocketAddr, state: &'static str) {
    metrics::counter!("edgegate_coap_duplicates_total", "state" => state).increment(1);
    tracing::trace!(%peer, state, "Answered a retransmitted CoAP request from the cache.");
}

pub(super) fn forgotten(evicted: usize) {
    if evicted > 0 {
        metrics::counter!("edgegate_coap_dedup_evictions_total").increment(evicted as u64);
        tracing::debug!(
            evicted,
            "Forgot the oldest CoAP exchanges: the dedup cache is full."
        );
    }
}

pub(super) fn block_transfer(outcome: &'static str) {
    metrics::counter!("edgegate_coap_block_transfers_total", "outcome" => outcome).increment(1);
    tracing::debug!(outcome, "A block-wise upload ended.");
}

pub(super) fn separate_started() {
    metrics::counter!("edgegate_coap_separate_responses_total").increment(1);
    tracing::trace!("Sent an empty ACK; the answer follows as a separate response.");
}

pub(super) fn separate_unacknowledged(peer: SocketAddr) {
    metrics::counter!("edgegate_coap_separate_unacknowledged_total").increment(1);
    tracing::debug!(%peer, "Gave up retransmitting a separate CoAP response; the record is stored.");
}

pub(super) fn reset_received(peer: SocketAddr, matched: bool) {
    metrics::counter!("edgegate_coap_resets_total", "matched" => if matched { "yes" } else { "no" })
        .increment(1);
    tracing::debug!(%peer, matched, "A device reset a CoAP message of ours.");
}

pub(super) fn busy(peer: SocketAddr, per_peer: bool) {
    let limit = if per_peer { "peer" } else { "total" };
    metrics::counter!("edgegate_coap_busy_total", "limit" => limit).increment(1);
    tracing::debug!(%peer, limit, "Refused a CoAP request: too many exchanges in progress.");
}

pub(super) fn receive_failed(e: &std::io::Error) {
    metrics::counter!("edgegate_coap_receive_errors_total").increment(1);
    tracing::debug!(error = %e, "Could not receive a CoAP datagram.");
}

/// HELP text of the CoAP endpoint's metrics.
pub(super) fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "edgegate_coap_datagrams_total",
        "UDP datagrams received on the CoAP port."
    );
    describe_counter!(
        "edgegate_coap_requests_total",
        "CoAP requests received, by type (con, non)."
    );
    describe_counter!(
        "edgegate_coap_responses_total",
        "CoAP answers sent, by response code."
    );
    describe_counter!(
        "edgegate_coap_malformed_total",
        "Datagrams that are not well-formed CoAP requests, by kind."
    );
    describe_counter!(
        "edgegate_coap_duplicates_total",
        "Retransmitted requests answered from the dedup cache, by state."
    );
    describe_counter!(
        "edgegate_coap_pings_total",
        "CoAP pings (empty CON) answered with a Reset."
    );
    describe_counter!(
        "edgegate_coap_resets_total",
        "Resets received from devices, by whether they matched a message of ours."
    );
    describe_counter!(
        "edgegate_coap_stored_total",
        "CoAP requests stored durably."
    );
    describe_counter!(
        "edgegate_coap_busy_total",
        "CoAP requests answered 5.03 for too many exchanges, by limit (peer, total)."
    );
    describe_counter!(
        "edgegate_coap_separate_responses_total",
        "Empty ACKs sent because the append was slow; the answer follows separately."
    );
    describe_counter!(
        "edgegate_coap_retransmissions_total",
        "Retransmissions of separate responses."
    );
    describe_counter!(
        "edgegate_coap_separate_unacknowledged_total",
        "Separate responses never acknowledged (the record is stored)."
    );
    describe_counter!(
        "edgegate_coap_block_transfers_total",
        "Block-wise uploads ended, by outcome."
    );
    describe_counter!(
        "edgegate_coap_dedup_evictions_total",
        "Exchanges forgotten early because the dedup cache was full."
    );
    describe_counter!(
        "edgegate_coap_send_errors_total",
        "CoAP datagrams that could not be sent."
    );
    describe_counter!(
        "edgegate_coap_receive_errors_total",
        "Failed receives on the CoAP socket."
    );
    describe_gauge!(
        "edgegate_coap_exchanges",
        "CoAP exchanges being stored or awaiting the ACK of their separate response."
    );
    describe_gauge!(
        "edgegate_coap_dedup_entries",
        "Exchanges remembered for deduplication."
    );
    describe_gauge!(
        "edgegate_coap_block_transfers",
        "Block-wise uploads being assembled."
    );
    describe_gauge!(
        "edgegate_coap_separate_pending",
        "Separate responses awaiting their ACK."
    );
}
