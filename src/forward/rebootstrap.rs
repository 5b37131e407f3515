//! Giving a librdkafka client back its bootstrap brokers after it forgot every broker.
//!
//! librdkafka 2.10 and later decommission the learned brokers that a Metadata response does
//! not list. A Kafka broker in controlled shutdown answers Metadata with no brokers at all
//! (it has fenced itself), so when the last broker a client knows goes through a controlled
//! shutdown, or a whole cluster restarts, the client is left with none. It then never sends
//! another request, never reports "all brokers down" and never re-bootstraps: the producer
//! holds its records forever (librdkafka issue 5301, open for 2.12 and 2.13). That is what
//! stalled the forwarder after a few quick Kafka restarts (issue 10).
//!
//! The remedy is what librdkafka's own re-bootstrap does: add the bootstrap brokers again.
//! The client keeps its idempotent state (producer id, sequence numbers, queued records),
//! reconnects once a broker answers and delivers what it holds, in order, with nothing sent
//! twice. The alternative, rebuilding the producer, re-sends every record in flight (up to
//! `max_in_flight_records`) as duplicates.
//!
//! # Why `unsafe`
//!
//! The rdkafka crate has no safe wrapper for `rd_kafka_brokers_add`, so this module calls
//! it through the bindings the crate re-exports (so does [`super::persisted`]); the measured
//! need (duplicates avoided per Kafka restart) is in docs/ARCHITECTURE.md.

#![allow(unsafe_code)]

use std::ffi::CString;

use rdkafka::client::Client;
use rdkafka::producer::ProducerContext;

/// Adds `brokers` (comma-separated `host:port`, as `bootstrap.servers`) to the client.
/// Returns how many brokers librdkafka added (0 when all were known already or none
/// parsed).
pub fn add_brokers<C: ProducerContext>(client: &Client<C>, brokers: &str) -> usize {
    let Ok(list) = CString::new(brokers) else {
        return 0;
    };
    // SAFETY: `client.native_ptr()` is the live `rd_kafka_t` the borrowed client owns, valid
    // for the whole call; `rd_kafka_brokers_add` is thread-safe (it takes the client's own
    // write lock), copies the string, and does not keep the pointer.
    let added =
        unsafe { rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), list.as_ptr()) };
    usize::try_from(added).unwrap_or(0)
}
