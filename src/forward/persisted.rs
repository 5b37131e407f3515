//! Whether Kafka may hold a record that librdkafka reported as failed.
//!
//! librdkafka keeps a persistence status on every message: not persisted, possibly
//! persisted (a request carrying it went unanswered: a timeout, a connection that broke
//! while it was in flight) or persisted. The status never goes back from "possibly" to
//! "not", whatever later attempts say, and it is still there on the delivery report of a
//! message purged by `abort_transaction`. The transactional forwarder needs it: librdkafka's
//! abort rewinds the partition's sequence numbers over the purged messages, so when one of
//! them is in the broker's log after all, the next transaction's first batch is out of
//! sequence and librdkafka raises a fatal error (see [`super::transactional`]).
//!
//! # Why `unsafe`
//!
//! The rdkafka crate has no safe wrapper for `rd_kafka_message_status`; this module calls it
//! through the bindings the crate re-exports.

#![allow(unsafe_code)]

use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::message::BorrowedMessage;

/// True when Kafka may have written `message` although it was not acknowledged.
pub fn possibly(message: &BorrowedMessage<'_>) -> bool {
    // SAFETY: `message.ptr()` is the `rd_kafka_message_t` of the delivery report being
    // served, valid for the borrow; `rd_kafka_message_status` only reads its status field.
    let status = unsafe { rd_kafka_message_status(message.ptr()) };
    status == rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED
}
