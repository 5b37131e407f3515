//! Telemetry of the MQTT sessions: each function logs one kind of event and bumps its
//! counter. Hostile or broken clients must not flood the log, so their events are DEBUG;
//! lifecycle events are DEBUG too (one line per connection would drown a gateway with
//! thousands of devices).

use std::net::SocketAddr;

use super::connection::{Frame, FrameError};
use super::packet::{DecodeError, Refusal, Unsupported, Version};
use crate::ingest::{Delivery, Rejected};

pub(super) fn connected(peer: SocketAddr, client_id: &str, version: Version, keep_alive: u16) {
    tracing::debug!(%peer, client_id, ?version, keep_alive, "Client connected.");
}

pub(super) fn disconnected(peer: SocketAddr, client_id: &str, why: &str) {
    tracing::debug!(%peer, client_id, why, "Client disconnected.");
}

pub(super) fn protocol_error(peer: SocketAddr, client_id: Option<&str>, e: DecodeError) {
    metrics::counter!("edgegate_mqtt_protocol_errors_total", "kind" => e.kind()).increment(1);
    tracing::debug!(%peer, client_id, kind = e.kind(), detail = e.detail(), "Closing a connection that broke the protocol.");
}

pub(super) fn frame_error(peer: SocketAddr, client_id: Option<&str>, e: &FrameError) {
    let kind = match e {
        FrameError::TooLarge { .. } => "too_large",
        FrameError::BadLength => "malformed",
        // The peer went away mid-packet: its business, not a protocol error.
        FrameError::Truncated | FrameError::Io(_) => {
            tracing::debug!(%peer, client_id, error = %e, "Connection failed.");
            return;
        }
    };
    metrics::counter!("edgegate_mqtt_protocol_errors_total", "kind" => kind).increment(1);
    tracing::debug!(%peer, client_id, kind, error = %e, "Closing a connection that sent a bad packet.");
}

pub(super) fn io_error(peer: SocketAddr, client_id: &str, e: &std::io::Error) {
    tracing::debug!(%peer, client_id, error = %e, "Could not write to the client.");
}

pub(super) fn unsupported(peer: SocketAddr, frame: &Frame, answer: Unsupported) {
    let kind = if frame.packet_type() == 1 {
        "unsupported_version"
    } else {
        "protocol"
    };
    metrics::counter!("edgegate_mqtt_protocol_errors_total", "kind" => kind).increment(1);
    tracing::debug!(%peer, kind, ?answer, "Refused a connection that does not speak MQTT 3.1.1 or 5.");
}

pub(super) fn timed_out(peer: SocketAddr, client_id: Option<&str>, kind: &'static str) {
    metrics::counter!("edgegate_mqtt_timeouts_total", "kind" => kind).increment(1);
    tracing::debug!(%peer, client_id, kind, "Closing a connection that went silent.");
}

pub(super) fn refused(peer: SocketAddr, client_id: &str, refusal: Refusal) {
    let reason = match refusal {
        Refusal::ClientId => "client_id",
        Refusal::Busy => "busy",
        Refusal::AuthMethod => "auth_method",
        Refusal::Invalid(_) => "invalid",
        Refusal::BadCredentials => "bad_credentials",
        Refusal::NotAuthorized => "not_authorized",
    };
    metrics::counter!("edgegate_mqtt_connections_refused_total", "reason" => reason).increment(1);
    tracing::debug!(%peer, client_id, reason, "Refused a CONNECT.");
}

pub(super) fn taken_over(peer: SocketAddr, client_id: &str) {
    metrics::counter!("edgegate_mqtt_takeovers_total").increment(1);
    tracing::debug!(%peer, client_id, "Closing a connection whose client id connected again.");
}

/// One filter of a SUBSCRIBE answered: the QoS granted, or why not ("invalid", "denied";
/// a denial also has its audit line from `auth::failed`).
pub(super) fn subscribed(
    peer: SocketAddr,
    client_id: &str,
    filter: &str,
    outcome: Result<u8, &'static str>,
) {
    let label = match outcome {
        Ok(_) => "granted",
        Err(why) => why,
    };
    metrics::counter!("edgegate_mqtt_subscriptions_total", "outcome" => label).increment(1);
    match outcome {
        Ok(qos) => tracing::debug!(%peer, client_id, filter, qos, "Subscribed."),
        Err(why) => tracing::debug!(%peer, client_id, filter, why, "Refused a subscription."),
    }
}

pub(super) fn will_stored(
    peer: SocketAddr,
    client_id: &str,
    qos: u8,
    result: Result<u64, Rejected>,
) {
    match result {
        Ok(seq) => {
            metrics::counter!("edgegate_mqtt_wills_total", "outcome" => "stored").increment(1);
            tracing::debug!(%peer, client_id, seq, "Stored the will of a client that went away.");
        }
        Err(e) => {
            metrics::counter!("edgegate_mqtt_wills_total", "outcome" => "rejected").increment(1);
            crate::ingest::refused(Delivery::Mqtt { qos }, &e, peer, Some(client_id));
        }
    }
}

/// The counter of durable messages acknowledged by `packet` (PUBACK for QoS 1, PUBREC for
/// QoS 2); the sessions take its handles once ([`super::session::Counters`]).
pub(super) fn acknowledged(packet: &'static str) -> metrics::Counter {
    metrics::counter!("edgegate_mqtt_acks_total", "packet" => packet)
}

/// HELP text of the sessions' metrics.
pub(super) fn describe() {
    use metrics::describe_counter;
    describe_counter!(
        "edgegate_mqtt_messages_total",
        "MQTT PUBLISH packets received (before routing and storing), by QoS."
    );
    describe_counter!(
        "edgegate_mqtt_acks_total",
        "PUBACKs and PUBRECs sent for durable messages, by packet."
    );
    describe_counter!(
        "edgegate_mqtt_protocol_errors_total",
        "MQTT connections closed for breaking the protocol, by kind."
    );
    describe_counter!(
        "edgegate_mqtt_timeouts_total",
        "MQTT connections closed for silence, by kind (connect, keepalive)."
    );
    describe_counter!(
        "edgegate_mqtt_takeovers_total",
        "MQTT connections closed because their client id connected again."
    );
    describe_counter!(
        "edgegate_mqtt_subscriptions_total",
        "Topic filters subscribed to, by outcome (granted, invalid, denied, quota)."
    );
    describe_counter!(
        "edgegate_mqtt_wills_total",
        "Wills of clients that went away, by outcome (stored, rejected)."
    );
}
