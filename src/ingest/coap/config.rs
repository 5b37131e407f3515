//! `[coap]` in gateway.toml.

use serde::Deserialize;

use crate::config::problems::Problems;
use crate::config::{ByteSize, Duration};

/// The largest UDP payload there is; a bigger datagram limit means nothing.
const UDP_MAX: u64 = 65_507;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    /// Whether the CoAP listener runs at all; a gateway with MQTT devices only can close the
    /// UDP port.
    pub enabled: bool,
    /// UDP address of the CoAP listener (5683 is CoAP's registered port).
    pub listen: String,
    /// First Uri-Path segment of the telemetry resource: `POST /{resource}/{device}/...`.
    /// Other paths get 4.04, so the gateway can share a CoAP namespace with other services.
    pub resource: String,
    /// First level of the topic a request is routed by: `/t/pump7/temp` becomes
    /// `{topic_prefix}/pump7/temp`, so `[[routes]]` can tell CoAP from MQTT traffic.
    pub topic_prefix: String,
    /// A confirmable request whose append is not durable within this time gets an empty ACK
    /// at once and its 2.04 later as a separate response, so the client does not retransmit
    /// (its ACK_TIMEOUT is 2 s or more). "0ms" always answers separately.
    pub separate_response_after: Duration,
    /// Largest datagram read; a bigger one is answered 4.13 with the Block1 size the gateway
    /// takes, so the device switches to block-wise transfer. Bounds the receive buffer.
    pub max_datagram_size: ByteSize,
    /// Kernel receive buffer of the UDP socket (SO_RCVBUF): datagrams that arrive while the
    /// listener is busy wait here; when it is full the kernel drops them and devices must
    /// retransmit (after 2 s or more). Linux caps it at `net.core.rmem_max` (208 KiB on
    /// many systems) unless the gateway may use SO_RCVBUFFORCE (root or CAP_NET_ADMIN); a
    /// capped size is logged with a WARN. Each small datagram takes about 1–2 KiB of it.
    pub receive_buffer: ByteSize,
    /// Largest request body, whole or assembled from Block1 blocks; more is refused with 4.13
    /// and this size in Size1. Bounds the memory of one upload.
    pub max_body_size: ByteSize,
    /// Largest Block1 block accepted (16 to 1024 bytes, a power of two); bigger blocks are
    /// accepted once and the client is told to continue with this size.
    pub max_block_size: ByteSize,
    /// Block-wise uploads assembled at once; more are answered 5.03. With `max_body_size` it
    /// bounds the memory held by partial uploads.
    pub max_block_transfers: usize,
    /// An upload whose next block does not arrive within this time is dropped (its device
    /// hears 4.08 if it continues), so abandoned uploads do not hold memory.
    pub block_timeout: Duration,
    /// How long the reply to a confirmable request is remembered, so a retransmission is
    /// answered again and not stored twice (RFC 7252 EXCHANGE_LIFETIME).
    pub exchange_lifetime: Duration,
    /// The same for non-confirmable requests (RFC 7252 NON_LIFETIME).
    pub non_lifetime: Duration,
    /// Remembered exchanges at most; beyond this the oldest are forgotten (counted), so a
    /// flood of requests cannot grow memory. A retransmission of a forgotten request would be
    /// stored again; the record id header lets consumers drop it.
    pub dedup_capacity: usize,
    /// Requests of one peer being stored or awaiting their separate response; more are
    /// answered 5.03, so one device cannot take every slot.
    pub max_exchanges_per_peer: usize,
    /// The same for all peers together; bounds tasks and memory under a flood.
    pub max_exchanges: usize,
    /// Max-Age (seconds until retry) sent with 5.03 when the log is full or above its high
    /// watermark, or a limit above is reached.
    pub busy_max_age: Duration,
    /// First retransmission timeout of a separate response (RFC 7252 ACK_TIMEOUT; the
    /// random factor 1.5 is applied), doubled on each retransmission.
    pub ack_timeout: Duration,
    /// Retransmissions of a separate response before the gateway gives up on its ACK (RFC
    /// 7252 MAX_RETRANSMIT). The record is stored either way.
    pub max_retransmit: u8,
    /// Longest device id (the second path segment) accepted; device ids become Kafka keys
    /// and headers.
    pub max_device_len: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            enabled: true,
            listen: "127.0.0.1:5683".into(),
            resource: "t".into(),
            topic_prefix: "coap".into(),
            separate_response_after: Duration::from_millis(500),
            max_datagram_size: ByteSize(1280),
            receive_buffer: ByteSize::mib(4),
            max_body_size: ByteSize::kib(64),
            max_block_size: ByteSize(1024),
            max_block_transfers: 64,
            block_timeout: Duration::from_secs(60),
            exchange_lifetime: Duration::from_secs(247),
            non_lifetime: Duration::from_secs(145),
            dedup_capacity: 16_384,
            max_exchanges_per_peer: 16,
            max_exchanges: 4096,
            busy_max_age: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(2),
            max_retransmit: 4,
            max_device_len: 128,
        }
    }
}

impl CoapConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "`{}` is not an address such as \"0.0.0.0:5683\"",
                    self.listen
                ),
            );
        }
        if !valid_segment(&self.resource) {
            problems.push(
                format!("{path}.resource"),
                "must be one non-empty path segment without `/`, `+`, `#` or control characters",
            );
        }
        if !valid_segment(&self.topic_prefix) {
            problems.push(
                format!("{path}.topic_prefix"),
                "must be one non-empty topic level without `/`, `+`, `#` or control characters",
            );
        }
        if self.separate_response_after.get() > std::time::Duration::from_secs(2) {
            problems.push(
                format!("{path}.separate_response_after"),
                "must be at most 2s (a client's ACK_TIMEOUT): later, it retransmits first",
            );
        }
        let datagram = self.max_datagram_size.get();
        // A 1024-byte block with its header, token and options must fit.
        if !(1152..=UDP_MAX).contains(&datagram) {
            problems.push(
                format!("{path}.max_datagram_size"),
                format!("must be between 1152 bytes (RFC 7252) and {UDP_MAX} bytes"),
            );
        }
        let block = self.max_block_size.get();
        if !(16..=1024).contains(&block) || !block.is_power_of_two() {
            problems.push(
                format!("{path}.max_block_size"),
                "must be 16, 32, 64, 128, 256, 512 or 1024 bytes (RFC 7959)",
            );
        }
        if !(4096..=1 << 30).contains(&self.receive_buffer.get()) {
            problems.push(
                format!("{path}.receive_buffer"),
                "must be between 4KiB and 1GiB",
            );
        }
        if self.max_body_size.get() == 0 || self.max_body_size.get() > u64::from(u32::MAX) {
            problems.push(
                format!("{path}.max_body_size"),
                "must be between 1 byte and 4GiB (Size1's limit)",
            );
        }
        for (key, value) in [
            ("max_block_transfers", self.max_block_transfers),
            ("dedup_capacity", self.dedup_capacity),
            ("max_exchanges_per_peer", self.max_exchanges_per_peer),
            ("max_exchanges", self.max_exchanges),
            ("max_device_len", self.max_device_len),
        ] {
            if value == 0 {
                problems.push(format!("{path}.{key}"), "must be at least 1");
            }
        }
        if self.max_exchanges_per_peer > self.max_exchanges {
            problems.push(
                format!("{path}.max_exchanges_per_peer"),
                "must not exceed max_exchanges",
            );
        }
        if self.dedup_capacity < self.max_exchanges {
            problems.push(
                format!("{path}.dedup_capacity"),
                "must be at least max_exchanges: every exchange in progress is remembered",
            );
        }
        for (key, value) in [
            ("block_timeout", self.block_timeout),
            ("exchange_lifetime", self.exchange_lifetime),
            ("non_lifetime", self.non_lifetime),
            ("ack_timeout", self.ack_timeout),
        ] {
            if value.get().is_zero() {
                problems.push(format!("{path}.{key}"), "must be greater than zero");
            }
        }
        let max_age = self.busy_max_age.get();
        if max_age < std::time::Duration::from_secs(1) || max_age.as_secs() > u64::from(u32::MAX) {
            problems.push(
                format!("{path}.busy_max_age"),
                "must be between 1s and 4294967295s (Max-Age's limit)",
            );
        }
        if self.max_retransmit > 20 {
            problems.push(
                format!("{path}.max_retransmit"),
                "must be at most 20: the backoff doubles every time",
            );
        }
    }

    pub(crate) fn datagram_limit(&self) -> usize {
        usize::try_from(self.max_datagram_size.get().min(UDP_MAX)).unwrap_or(65_507)
    }

    pub(crate) fn body_limit(&self) -> usize {
        usize::try_from(self.max_body_size.get()).unwrap_or(usize::MAX)
    }

    /// The largest block as RFC 7959's SZX exponent (size = 2^(szx + 4)).
    pub(crate) fn max_szx(&self) -> u8 {
        let block = self.max_block_size.get().clamp(16, 1024);
        // 16 → 0 … 1024 → 6.
        (63 - block.leading_zeros() as u8).saturating_sub(4).min(6)
    }

    /// Max-Age for 5.03 in whole seconds.
    pub(crate) fn busy_max_age_secs(&self) -> u32 {
        u32::try_from(self.busy_max_age.get().as_secs())
            .unwrap_or(u32::MAX)
            .max(1)
    }
}

/// One path segment or topic level that cannot fake a level boundary or a wildcard.
pub(crate) fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#']) && !s.chars().any(char::is_control)
}
