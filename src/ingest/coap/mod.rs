//! The CoAP listener: RFC 7252 over UDP, with block-wise uploads (RFC 7959), into the same
//! log, routes and Kafka forwarder as MQTT.
//!
//! Read top to bottom: [`serve`] hands the socket to `server.rs`, the endpoint loop that owns
//! every piece of message-layer state (`request.rs` judges each request, `exchange.rs` holds
//! the ones being stored, `events.rs` counts) → `message.rs` checks a datagram's framing and
//! parses it with coap-lite (packets and options only; docs/ARCHITECTURE.md says why nothing
//! else of it is used) and encodes answers → `dedup.rs` remembers answers by (peer, message
//! id) → `block.rs` assembles Block1 uploads → `outbox.rs` retransmits separate responses.
//!
//! # Resource
//!
//! `POST` or `PUT /{resource}/{device}[/{stream}...]` (resource `t` by default) stores the
//! payload, untouched, as one record of device `{device}`, routed by the topic
//! `{topic_prefix}/{device}[/{stream}...]` (`coap/pump7/temp`) through `[[routes]]`, exactly
//! like an MQTT topic. The record carries the headers `coap-uri-path` (`/t/pump7/temp`),
//! `coap-type` (`CON`/`NON`), `coap-method` (`POST`/`PUT`) and, when the request has one,
//! `coap-content-format` (the number, in decimal); the forwarder adds the gateway's own.
//!
//! # The contract
//!
//! A confirmable request is answered 2.04 only after its record is durable
//! ([`crate::ingest::Pipeline::submit`]): piggybacked on the ACK if the append resolves
//! within `separate_response_after`, else an empty ACK at that moment and the 2.04 later as
//! a confirmable separate response, retransmitted with exponential backoff until the device
//! ACKs or Resets it (at most one outstanding per device, NSTART = 1). A non-confirmable
//! request is stored at most once and answered with a non-confirmable 2.04 once durable,
//! unless its No-Response option (RFC 7967) declines the answer.
//!
//! Every request is deduplicated by (peer, message id): a retransmission is answered from the
//! cache (or ignored while its append is in progress) and never stored again, for
//! `exchange_lifetime` (CON) / `non_lifetime` (NON), in at most `dedup_capacity` entries.
//! A stored CON request's key rides in its record and outlives a gateway crash
//! (`ingest::receipts`): its retransmission after the restart gets 2.04 again. Refusals are not cached: nothing of the request was stored, so a retransmission is judged
//! afresh. Kafka being unreachable is not a reason to refuse: only the log's state is.
//!
//! # Answers
//!
//! | situation | answer |
//! |---|---|
//! | stored (durable) | 2.04 Changed (with the final Block1 for a block-wise upload) |
//! | non-final Block1 block accepted | 2.31 Continue with Block1 |
//! | final block of an upload already stored, sent again | 2.04 again, no second record |
//! | empty CON (ping) | RST |
//! | unparseable CON (header readable) / a response or reserved code sent as CON | RST |
//! | unparseable NON, ACK or RST, unknown version, under 4 bytes | ignored (counted) |
//! | ACK/RST from a device | ends the retransmission of our separate response |
//! | unknown critical option, malformed Block1 | 4.02 Bad Option |
//! | from a peer `[auth] anonymous` does not admit (CoAP devices have no credentials: "loopback" admits 127.0.0.0/8 and ::1, "never" nobody) | 4.01 Unauthorized, logged and counted in `edgegate_auth_failures_total{reason="anonymous"}` |
//! | path other than `/{resource}/{device}[/...]` | 4.04 Not Found |
//! | method other than POST or PUT | 4.05 Method Not Allowed |
//! | path segment not UTF-8 or with `/ + #` or control characters, device id too long, bad Content-Format | 4.00 Bad Request |
//! | no route for the topic | 4.04 Not Found (the device's path names nothing the gateway forwards) |
//! | route renders an invalid Kafka topic | 4.00 Bad Request (the path is at fault) |
//! | body over `max_body_size`, or too large for the log | 4.13 with Size1 = `max_body_size` |
//! | datagram over `max_datagram_size` | 4.13 with Size1 and Block1 (the block size to use) |
//! | Block1 out of order, block size changed, or upload expired | 4.08 Request Entity Incomplete |
//! | non-final block not exactly one block long | 4.00 Bad Request |
//! | log full (`reject_new`) or above its high watermark; exchange or upload limits; shutting down | 5.03 with Max-Age = `busy_max_age` |
//! | the disk refused the write | 5.00 |
//! | Proxy-Uri or Proxy-Scheme | 5.05 Proxying Not Supported |
//!
//! Error answers carry a short fixed diagnostic text, never an echo of the request, so an
//! answer is never bigger than what provoked it by more than a few bytes (no amplification).
//!
//! # Bounds
//!
//! The receive buffer is `max_datagram_size`; bodies `max_body_size`; partial uploads
//! `max_block_transfers`; exchanges being stored or awaiting the ACK of their separate
//! response `max_exchanges_per_peer` and `max_exchanges`; the dedup cache `dedup_capacity`.
//!
//! # Telemetry
//!
//! Counters `edgegate_coap_*`: `datagrams`, `requests{type}`, `responses{code}`,
//! `malformed{kind}`, `duplicates{state}`, `pings`, `resets{matched}`, `stored`,
//! `busy{limit}`, `separate_responses`, `retransmissions`, `separate_unacknowledged`,
//! `block_transfers{outcome}`, `dedup_evictions`, `send_errors`, `receive_errors` (each
//! `_total`); gauges `exchanges`, `dedup_entries`, `block_transfers`, `separate_pending`. A
//! request the pipeline does not store is counted once, with MQTT's, in
//! `edgegate_ingest_rejected_total{protocol="coap",reason}`. Hostile input is logged at DEBUG.

mod block;
pub mod config;
mod dedup;
mod events;
mod exchange;
mod message;
mod outbox;
mod request;
mod server;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::ingest::{BindError, Pipeline};
use crate::reload::Live;
use config::CoapConfig;

/// Serves CoAP on `socket` until `shutdown`; then stops taking requests (answering 5.03),
/// finishes the appends in progress, sends their answers and returns. The caller bounds
/// that wait with its grace period.
pub async fn serve(
    socket: UdpSocket,
    config: Arc<CoapConfig>,
    auth: Live<Auth>,
    pipeline: Pipeline,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    server::run(socket, config, auth, pipeline, shutdown).await
}

/// HELP text of the CoAP listener's metrics.
pub(crate) fn describe() {
    events::describe();
}

/// Binds `[coap] listen` and sizes its receive buffer; returns the socket and its address.
pub async fn bind(config: &CoapConfig) -> Result<(UdpSocket, SocketAddr), BindError> {
    let bind_error = |source| BindError::Coap {
        addr: config.listen.clone(),
        source,
    };
    let socket = UdpSocket::bind(&config.listen).await.map_err(bind_error)?;
    let addr = socket.local_addr().map_err(bind_error)?;
    size_receive_buffer(&socket, config);
    Ok((socket, addr))
}

/// Asks the kernel for `config.receive_buffer` bytes of receive buffer on the CoAP socket:
/// with SO_RCVBUFFORCE when the process may (root or CAP_NET_ADMIN), else SO_RCVBUF, which
/// Linux caps at `net.core.rmem_max`. Logs the size obtained, with a WARN when it is less
/// than asked; never fails the start (a small buffer costs retransmissions, not data).
fn size_receive_buffer(socket: &UdpSocket, config: &CoapConfig) {
    use rustix::net::sockopt;
    let wanted = usize::try_from(config.receive_buffer.get()).unwrap_or(usize::MAX);
    if sockopt::set_socket_recv_buffer_size_force(socket, wanted).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(socket, wanted);
    }
    // Linux reports twice the size set (the other half is its bookkeeping).
    match sockopt::socket_recv_buffer_size(socket) {
        Ok(got) if got / 2 >= wanted => {
            tracing::debug!(bytes = got / 2, "Sized the CoAP receive buffer.");
        }
        Ok(got) => tracing::warn!(
            wanted,
            got = got / 2,
            "The kernel capped the CoAP receive buffer (net.core.rmem_max): under bursts of \
             requests datagrams are dropped and devices retransmit. Raise the cap \
             (sysctl net.core.rmem_max) or give the gateway CAP_NET_ADMIN."
        ),
        Err(e) => tracing::warn!(error = %e, "Could not read the CoAP receive buffer size."),
    }
}

/// Runs one datagram through the server's parse → validation → request classification with
/// the default `[coap]` config, no socket and no log; returns the answer it would send at
/// once. For the cargo-fuzz target `coap_datagram` (see README, "Fuzzing"), which builds it
/// with the feature `fuzz`; the unit tests check `request::classify` itself.
#[cfg(feature = "fuzz")]
pub fn fuzz_datagram(datagram: &[u8]) -> Option<Vec<u8>> {
    static CONFIG: std::sync::OnceLock<CoapConfig> = std::sync::OnceLock::new();
    request::classify(CONFIG.get_or_init(CoapConfig::default), datagram)
}
