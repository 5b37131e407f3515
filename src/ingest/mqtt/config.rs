//! `[mqtt]` in gateway.toml.

use serde::Deserialize;

use super::tls::TlsConfig;
use crate::config::problems::Problems;
use crate::config::{ByteSize, Duration};

/// The largest packet MQTT can express (a 4-byte remaining length plus the fixed header).
const MQTT_MAX_PACKET: u64 = 268_435_455 + 5;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Address of the plaintext MQTT listener.
    pub listen: String,
    /// Largest packet accepted (whole packet, fixed header included); bigger ones are refused
    /// from their fixed header, before they are buffered. Advertised to MQTT 5 clients.
    pub max_packet_size: ByteSize,
    /// How long a new connection may take to send its CONNECT, so a half-sent CONNECT does
    /// not hold a socket forever.
    pub connect_timeout: Duration,
    /// Connections served at once; more are refused (MQTT 5 0x89, 3.1.1 0x03) so a flood of
    /// sockets cannot exhaust memory or file descriptors.
    pub max_connections: usize,
    /// QoS 1/2 messages a connection may have unacknowledged at once. Advertised to MQTT 5
    /// clients (exceeding it ends the connection with 0x93); a 3.1.1 connection simply is not
    /// read while it is at the limit. Bounds per-connection memory while appends are pending.
    pub receive_maximum: u16,
    /// Longest keepalive the gateway honours. MQTT 5 clients asking for more (or for none)
    /// are told this value as Server Keep Alive; 3.1.1 clients, which cannot be told, are held
    /// to it anyway, so an idle or dead socket is always reclaimed.
    pub max_keepalive: Duration,
    /// Longest client id accepted (the spec only requires 23); longer ones are refused
    /// (3.1.1 0x02, MQTT 5 0x85). Client ids become Kafka keys and headers.
    pub max_client_id_len: usize,
    /// MQTT 5 topic aliases per connection (0 disables them; using one then ends the
    /// connection with 0x94). Aliases save bandwidth on metered uplinks.
    pub topic_alias_maximum: u16,
    /// User properties accepted in one MQTT 5 packet; each becomes a Kafka header, so the
    /// count bounds per-message memory and header overhead. More end the connection (0x83).
    pub max_user_properties: usize,
    /// Connections from one IP address at once, over both listeners; more are closed at
    /// once, before anything is read, so one host cannot take every slot.
    pub max_connections_per_address: usize,
    /// New connections accepted per second (and in one burst) over both listeners; more are
    /// closed at once, so a reconnect storm cannot queue thousands of TLS handshakes.
    pub connection_rate: u32,
    /// New connections accepted per second (and in one burst) from one IP address.
    pub connection_rate_per_address: u32,
    /// Messages one session may have waiting to be sent to its client (a slow subscriber,
    /// or a persistent session whose client is away); more are dropped for that session and
    /// counted in `edgegate_local_dropped_total{reason="queue_full"}`.
    pub max_queued_messages: usize,
    /// Bytes (payload and topic) one session may have waiting.
    pub max_queued_bytes: ByteSize,
    /// Bytes waiting in all sessions together: the broker's memory bound.
    pub max_queued_bytes_total: ByteSize,
    /// Retained messages kept (one per topic, on disk); a retained publish to a new topic
    /// beyond this is delivered and forwarded but not retained (counted, logged).
    pub max_retained_messages: usize,
    /// The longest a disconnected persistent session (clean_session=0, or an MQTT 5
    /// Session Expiry Interval) is kept; MQTT 3.1.1 sessions, which cannot say, get this.
    pub max_session_expiry: Duration,
    /// Subscriptions one session may hold; more get SUBACK 0x97 (3.1.1: 0x80), so one client
    /// cannot grow the subscription tree without bound.
    pub max_subscriptions_per_session: usize,
    /// Disconnected persistent sessions kept at once; beyond, the one closest to expiry is
    /// forgotten (logged), so a reconnect loop with fresh client ids stays bounded.
    pub max_offline_sessions: usize,
    /// `[mqtt.tls]`: MQTT over TLS on its own port.
    pub tls: TlsConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: "127.0.0.1:1883".into(),
            max_packet_size: ByteSize::kib(256),
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
            receive_maximum: 128,
            max_keepalive: Duration::from_secs(600),
            max_client_id_len: 128,
            topic_alias_maximum: 16,
            max_user_properties: 32,
            max_connections_per_address: 256,
            connection_rate: 1000,
            connection_rate_per_address: 100,
            max_queued_messages: 1000,
            max_queued_bytes: ByteSize::mib(1),
            max_queued_bytes_total: ByteSize::mib(32),
            max_retained_messages: 10_000,
            max_session_expiry: Duration::from_secs(24 * 3600),
            max_subscriptions_per_session: 256,
            max_offline_sessions: 16_384,
            tls: TlsConfig::default(),
        }
    }
}

impl MqttConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "`{}` is not an address such as \"0.0.0.0:1883\"",
                    self.listen
                ),
            );
        }
        // A CONNECT with a will and a client id must fit; below 1 KiB devices cannot connect.
        if self.max_packet_size.get() < 1024 || self.max_packet_size.get() > MQTT_MAX_PACKET {
            problems.push(
                format!("{path}.max_packet_size"),
                format!("must be between 1KiB and {MQTT_MAX_PACKET} bytes (MQTT's limit)"),
            );
        }
        if self.connect_timeout.get().is_zero() {
            problems.push(
                format!("{path}.connect_timeout"),
                "must be greater than zero",
            );
        }
        if self.max_connections == 0 {
            problems.push(format!("{path}.max_connections"), "must be at least 1");
        }
        if self.max_connections_per_address == 0 {
            problems.push(
                format!("{path}.max_connections_per_address"),
                "must be at least 1",
            );
        }
        if self.connection_rate == 0 {
            problems.push(format!("{path}.connection_rate"), "must be at least 1");
        }
        if self.connection_rate_per_address == 0 {
            problems.push(
                format!("{path}.connection_rate_per_address"),
                "must be at least 1",
            );
        }
        self.tls.validate(&format!("{path}.tls"), problems);
        if self.max_subscriptions_per_session == 0 {
            problems.push(
                format!("{path}.max_subscriptions_per_session"),
                "must be at least 1",
            );
        }
        if self.max_queued_messages == 0 {
            problems.push(format!("{path}.max_queued_messages"), "must be at least 1");
        }
        if self.max_queued_bytes.get() < self.max_packet_size.get().min(MQTT_MAX_PACKET) {
            problems.push(
                format!("{path}.max_queued_bytes"),
                "must be at least max_packet_size, or a largest message could never be queued",
            );
        }
        if self.max_queued_bytes_total.get() < self.max_queued_bytes.get() {
            problems.push(
                format!("{path}.max_queued_bytes_total"),
                "must be at least max_queued_bytes",
            );
        }
        if self.receive_maximum == 0 {
            problems.push(
                format!("{path}.receive_maximum"),
                "must be between 1 and 65535",
            );
        }
        let keepalive = self.max_keepalive.get();
        if keepalive < std::time::Duration::from_secs(1)
            || keepalive > std::time::Duration::from_secs(u16::MAX.into())
        {
            problems.push(
                format!("{path}.max_keepalive"),
                "must be between 1s and 65535s (MQTT's limit)",
            );
        }
        if self.max_client_id_len < 23 || self.max_client_id_len > usize::from(u16::MAX) {
            problems.push(
                format!("{path}.max_client_id_len"),
                "must be between 23 (MQTT's minimum) and 65535",
            );
        }
    }

    /// The local broker's limits.
    pub(crate) fn broker(&self) -> crate::broker::BrokerConfig {
        let bytes = |b: ByteSize| usize::try_from(b.get()).unwrap_or(usize::MAX);
        crate::broker::BrokerConfig {
            queue: crate::broker::mailbox::QueueLimits {
                messages: self.max_queued_messages,
                bytes: bytes(self.max_queued_bytes),
            },
            total_queued_bytes: bytes(self.max_queued_bytes_total),
            read_back_bytes: crate::broker::mailbox::READ_BACK_BYTES,
            max_retained: self.max_retained_messages,
            max_session_expiry: self.max_session_expiry.get(),
            max_subscriptions: self.max_subscriptions_per_session,
            max_offline_sessions: self.max_offline_sessions,
        }
    }

    /// The packet limit as a `usize` for framing.
    pub(crate) fn packet_limit(&self) -> usize {
        usize::try_from(self.max_packet_size.get().min(MQTT_MAX_PACKET)).unwrap_or(usize::MAX)
    }

    /// The keepalive cap in whole seconds, as MQTT expresses it.
    pub(crate) fn keepalive_cap(&self) -> u16 {
        u16::try_from(self.max_keepalive.get().as_secs())
            .unwrap_or(u16::MAX)
            .max(1)
    }
}
