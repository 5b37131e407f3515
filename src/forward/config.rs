//! `[kafka]`: where the forwarder sends records and how hard it may push.
//!
//! Every default lives in [`KafkaConfig::default`]. [`KafkaConfig::client_config`] turns the
//! section into librdkafka properties; the few properties the gateway's guarantees depend on
//! (idempotence, `acks=all`, infinite delivery timeout, unlimited retries) cannot be
//! overridden from `[kafka.properties]`, everything else can. How the gateway proves itself
//! to the brokers (`[kafka.tls]`, `[kafka.sasl]`, secrets, the preflight check) is in
//! [`super::security`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};

use rdkafka::ClientConfig;
use serde::Deserialize;

use super::security::{KafkaSasl, KafkaTls, Redacted, SecretError, is_sensitive};
use crate::config::problems::Problems;
use crate::config::{ByteSize, Duration};

/// `[kafka]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// Kafka client id; `edgegate-<gateway id>` by default so broker logs and quotas name
    /// the gateway.
    pub client_id: Option<String>,
    /// Batch compression. lz4 by default: cheap on ARM CPUs and good on JSON telemetry.
    pub compression: Compression,
    /// How long librdkafka waits to fill a batch (`linger.ms`). Short, because it only
    /// matters for live traffic: a backlog fills batches without waiting.
    pub linger: Duration,
    /// Records per Kafka batch (`batch.num.messages`): the backlog batch size.
    pub batch_max_records: usize,
    /// Bytes per Kafka batch (`batch.size`). Keep it at or below the topics'
    /// `max.message.bytes`, or whole batches are rejected.
    pub batch_max_bytes: ByteSize,
    /// Upper bound of the adaptive window: records handed to librdkafka and not yet
    /// acknowledged by Kafka. librdkafka's own queue is capped to match, so memory stays
    /// flat however large the backlog on disk is.
    pub max_in_flight_records: usize,
    /// Upper bound of the adaptive window in bytes of memory: payload, key and headers as
    /// both we and librdkafka hold them, plus about 1 KiB of bookkeeping per record. 4 MiB
    /// drains a backlog of 100-byte records as fast as 16 MiB on a 2-core machine (about
    /// 200,000 records/s to a local broker) with about 30 MiB of resident memory.
    pub max_in_flight_bytes: ByteSize,
    /// First back-off after an error (librdkafka retries and reconnects, and our own
    /// re-sends); it doubles, with jitter, up to `retry_backoff_max`.
    pub retry_backoff_min: Duration,
    pub retry_backoff_max: Duration,
    /// Longest wait between two attempts to connect to a broker that refused or dropped the
    /// connection. Short (librdkafka's own default is 10 s): every second of it is a second
    /// the backlog waits after Kafka is back, and a broker that is up only briefly (a
    /// flapping link, a rolling restart) is missed entirely by a longer one.
    pub reconnect_backoff_max: Duration,
    /// A delivery that takes longer than this counts as a timeout: the window shrinks and a
    /// warning is logged. The record itself is never given up on (the log is the buffer).
    pub delivery_timeout: Duration,
    /// The forwarder's own liveness bound (see `forward::liveness`): records are in flight,
    /// nothing has been delivered and no bytes have moved for this long, a broker answers a
    /// metadata request, and still nothing moves for this long again. Then the producer is
    /// stuck (not Kafka away, not a slow link): it is logged as an ERROR and rebuilt, and
    /// every unfinished record is sent again in order.
    pub stall_timeout: Duration,
    /// TLS to the brokers (`SSL`, or `SASL_SSL` with `sasl`). Off when absent.
    pub tls: Option<KafkaTls>,
    /// SASL authentication (SCRAM or PLAIN), over TLS only. Off when absent.
    pub sasl: Option<KafkaSasl>,
    /// At least once (the default) or exactly once (Kafka transactions; see
    /// `forward::transactional`).
    pub delivery: Delivery,
    /// Exactly once: how long a transaction stays open taking new records (each is sent as
    /// it is read) before it commits; a full one (the in-flight bounds) commits at once. Each
    /// commit costs a few round trips and a marker per partition, so shorter means more
    /// overhead and less latency to a `read_committed` consumer.
    pub transaction_interval: Duration,
    /// Exactly once: `transaction.timeout.ms`. A transaction the gateway left open (it
    /// crashed, or the link dropped mid-commit) is aborted by Kafka after this long, and
    /// until then it holds back `read_committed` consumers of its partitions. Also the
    /// longest a record may wait inside librdkafka before its transaction is aborted and
    /// sent again. At most the brokers' `transaction.max.timeout.ms` (15 minutes by default).
    pub transaction_timeout: Duration,
    /// Exactly once: the topic whose committed offset (of the gateway's own consumer group)
    /// carries the log position each transaction covers. It needs one partition; the
    /// gateway creates it if it is missing.
    pub positions_topic: String,
    /// Raw librdkafka properties, applied after ours (partitioner, socket options, ...).
    pub properties: RawProperties,
}

/// `[kafka] delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Idempotent producer; after a crash, records the gateway sent but had not yet marked
    /// done are sent again (duplicates with the same `edgegate-record-id`).
    AtLeastOnce,
    /// Transactional producer; the log position each transaction covers is committed in
    /// the same transaction, so a restarted gateway resumes exactly after it.
    ExactlyOnce,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: vec!["127.0.0.1:9092".into()],
            client_id: None,
            compression: Compression::Lz4,
            linger: Duration::from_millis(5),
            batch_max_records: 10_000,
            batch_max_bytes: ByteSize::mib(1),
            max_in_flight_records: 20_000,
            max_in_flight_bytes: ByteSize::mib(4),
            retry_backoff_min: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
            reconnect_backoff_max: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            tls: None,
            sasl: None,
            delivery: Delivery::AtLeastOnce,
            transaction_interval: Duration::from_millis(100),
            transaction_timeout: Duration::from_secs(60),
            positions_topic: "edgegate.positions".into(),
            properties: RawProperties::default(),
        }
    }
}

/// `compression.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// `[kafka.properties]`: raw librdkafka properties. `Debug` redacts the values of the ones
/// that carry secrets, so a config dump in a log leaks nothing.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RawProperties(pub BTreeMap<String, String>);

impl Deref for RawProperties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for RawProperties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a RawProperties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for RawProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &dyn fmt::Debug = if is_sensitive(k) { &Redacted } else { v };
                (k, shown)
            }))
            .finish()
    }
}

/// Properties that `[kafka.properties]` may not change, and why. Each either carries a
/// contract (docs/ARCHITECTURE.md: delete after Kafka, order, bounded duplicates) or has its
/// own key.
const FIXED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "must stay true: the idempotent producer is what keeps per-key order and bounds duplicates",
    ),
    (
        "acks",
        "must stay `all`: a record leaves the log only once every in-sync replica has it",
    ),
    (
        "request.required.acks",
        "must stay `all`: a record leaves the log only once every in-sync replica has it",
    ),
    (
        "message.timeout.ms",
        "must stay 0 (infinite): a record that timed out inside librdkafka could be overtaken by a later record of the same key; use kafka.delivery_timeout",
    ),
    (
        "delivery.timeout.ms",
        "must stay 0 (infinite): a record that timed out inside librdkafka could be overtaken by a later record of the same key; use kafka.delivery_timeout",
    ),
    (
        "retries",
        "cannot be limited: retriable errors retry forever, the log is the buffer",
    ),
    (
        "message.send.max.retries",
        "cannot be limited: retriable errors retry forever, the log is the buffer",
    ),
    (
        "transactional.id",
        "derived from the gateway id under kafka.delivery = \"exactly_once\", so a restarted gateway fences its predecessor",
    ),
    (
        "transaction.timeout.ms",
        "set kafka.transaction_timeout instead",
    ),
    (
        "isolation.level",
        "the gateway reads its committed position with read_committed",
    ),
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("metadata.broker.list", "set kafka.brokers instead"),
    ("client.id", "set kafka.client_id instead"),
    ("compression.type", "set kafka.compression instead"),
    ("compression.codec", "set kafka.compression instead"),
    ("linger.ms", "set kafka.linger instead"),
    ("queue.buffering.max.ms", "set kafka.linger instead"),
    ("batch.num.messages", "set kafka.batch_max_records instead"),
    ("batch.size", "set kafka.batch_max_bytes instead"),
    (
        "statistics.interval.ms",
        "the forwarder's link state and liveness checks read librdkafka's statistics every 2s",
    ),
    ("dr_cb", "the forwarder owns delivery reports"),
    ("dr_msg_cb", "the forwarder owns delivery reports"),
];

/// Values that hold the contract even when written explicitly.
fn harmless_override(key: &str, value: &str) -> bool {
    let value = value.trim();
    match key {
        "enable.idempotence" => value == "true",
        "acks" | "request.required.acks" => value == "all" || value == "-1",
        "message.timeout.ms" | "delivery.timeout.ms" => value == "0",
        _ => false,
    }
}

impl KafkaConfig {
    /// Pushes every problem in this section to `problems`, keyed by its path under `path`
    /// (normally `kafka`).
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.brokers.is_empty() {
            problems.push(format!("{path}.brokers"), "at least one broker is needed");
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            if let Err(why) = check_broker(broker) {
                problems.push(format!("{path}.brokers[{i}]"), why);
            }
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.chars().any(char::is_control) {
                problems.push(
                    format!("{path}.client_id"),
                    "must be non-empty, without control characters",
                );
            }
        }
        if self.linger.get() > std::time::Duration::from_secs(900) {
            problems.push(
                format!("{path}.linger"),
                "must be at most 900s (librdkafka's limit)",
            );
        }
        if !(1..=1_000_000).contains(&self.batch_max_records) {
            problems.push(
                format!("{path}.batch_max_records"),
                "must be between 1 and 1000000",
            );
        }
        if !(1..=(i32::MAX as u64)).contains(&self.batch_max_bytes.get()) {
            problems.push(
                format!("{path}.batch_max_bytes"),
                "must be between 1 byte and 2GiB",
            );
        }
        if !(1..=10_000_000).contains(&self.max_in_flight_records) {
            problems.push(
                format!("{path}.max_in_flight_records"),
                "must be between 1 and 10000000",
            );
        }
        let in_flight_bytes = self.max_in_flight_bytes.get();
        if in_flight_bytes < 1024 || in_flight_bytes / 1024 > i32::MAX as u64 {
            problems.push(
                format!("{path}.max_in_flight_bytes"),
                "must be between 1KiB and 2TiB",
            );
        }
        let min = self.retry_backoff_min.get();
        let max = self.retry_backoff_max.get();
        if min.is_zero() || min > std::time::Duration::from_secs(300) {
            problems.push(
                format!("{path}.retry_backoff_min"),
                "must be between 1ms and 300s",
            );
        }
        if max < min || max > std::time::Duration::from_secs(300) {
            problems.push(
                format!("{path}.retry_backoff_max"),
                "must be at least retry_backoff_min and at most 300s",
            );
        }
        let reconnect = self.reconnect_backoff_max.get();
        if reconnect < min || reconnect > std::time::Duration::from_secs(300) {
            problems.push(
                format!("{path}.reconnect_backoff_max"),
                "must be at least retry_backoff_min and at most 300s",
            );
        }
        if self.delivery_timeout.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{path}.delivery_timeout"), "must be at least 1s");
        }
        // Shorter than a produce request's own timeout, a stall could not be told from a
        // request librdkafka is about to retry.
        if self.stall_timeout.get() < std::time::Duration::from_secs(5) {
            problems.push(format!("{path}.stall_timeout"), "must be at least 5s");
        }

        let interval = self.transaction_interval.get();
        if interval.is_zero() || interval > std::time::Duration::from_secs(60) {
            problems.push(
                format!("{path}.transaction_interval"),
                "must be between 1ms and 60s",
            );
        }
        let timeout = self.transaction_timeout.get();
        if timeout < std::time::Duration::from_secs(10)
            || timeout > std::time::Duration::from_secs(3600)
            || timeout <= interval
        {
            problems.push(
                format!("{path}.transaction_timeout"),
                "must be between 10s and 1h, and longer than transaction_interval",
            );
        }
        if !crate::route::valid_kafka_topic(&self.positions_topic) {
            problems.push(
                format!("{path}.positions_topic"),
                "must be 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-'",
            );
        }

        let mut raw_ok = true;
        for (key, value) in &self.properties {
            let at = format!("{path}.properties.\"{key}\"");
            if let Some(why) = self.security_conflict(key) {
                problems.push(
                    at,
                    format!("conflicts with [kafka.tls]/[kafka.sasl]: {why}"),
                );
                raw_ok = false;
            } else if let Some((_, why)) = FIXED_PROPERTIES.iter().find(|(k, _)| k == key) {
                if !harmless_override(key, value) {
                    problems.push(at, *why);
                    raw_ok = false;
                }
            } else if (key == "max.in.flight.requests.per.connection" || key == "max.in.flight")
                && value
                    .trim()
                    .parse::<u32>()
                    .map_or(true, |n| !(1..=5).contains(&n))
            {
                problems.push(at, "must be 1 to 5 with the idempotent producer");
                raw_ok = false;
            }
        }
        // librdkafka itself checks every name and value (no network, no client created),
        // which catches typos in `[kafka.properties]` before the gateway starts.
        if raw_ok {
            for (key, value) in &self.properties {
                let mut one = ClientConfig::new();
                one.set(key, value);
                if let Err(e) = one.create_native_config() {
                    problems.push(
                        format!("{path}.properties.\"{key}\""),
                        librdkafka_reason(&e),
                    );
                }
            }
        }
        self.validate_security(path, problems);
    }

    /// The client id used when none is configured.
    pub fn client_id_for(&self, gateway_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("edgegate-{gateway_id}"))
    }

    /// The librdkafka configuration of the forwarding producer: ours, then the raw
    /// properties, then TLS/SASL and the fixed ones again so nothing can weaken them. Reads
    /// the secrets, which is what can fail.
    pub fn client_config(&self, gateway_id: &str) -> Result<ClientConfig, SecretError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", self.client_id_for(gateway_id))
            .set("compression.type", self.compression.as_str())
            .set("linger.ms", self.linger.get().as_millis().to_string())
            .set("batch.num.messages", self.batch_max_records.to_string())
            .set(
                "batch.size",
                self.batch_max_bytes.get().min(i32::MAX as u64).to_string(),
            )
            // librdkafka's queue is never the buffer: it is sized to hold the forwarder's
            // largest window plus headroom for headers and re-sends, no more.
            .set(
                "queue.buffering.max.messages",
                self.max_in_flight_records
                    .saturating_mul(2)
                    .clamp(1, i32::MAX as usize)
                    .to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (self.max_in_flight_bytes.get() / 1024)
                    .saturating_mul(2)
                    .clamp(1, i32::MAX as u64)
                    .to_string(),
            )
            .set(
                "retry.backoff.ms",
                millis(self.retry_backoff_min).to_string(),
            )
            .set(
                "retry.backoff.max.ms",
                millis(self.retry_backoff_max).to_string(),
            )
            .set(
                "reconnect.backoff.ms",
                millis(self.retry_backoff_min).to_string(),
            )
            .set(
                "reconnect.backoff.max.ms",
                millis(self.reconnect_backoff_max).to_string(),
            )
            // Broker states for the link-state tracker, also when no record is moving.
            .set("statistics.interval.ms", "2000");
        for (key, value) in &self.properties {
            c.set(key, value);
        }
        self.apply_security(&mut c)?;
        c.set("enable.idempotence", "true").set("acks", "all");
        match self.delivery {
            // Infinite: retriable errors are retried inside librdkafka, in order, forever.
            Delivery::AtLeastOnce => c.set("message.timeout.ms", "0"),
            // librdkafka refuses a message timeout longer than the transaction's; a record
            // that times out aborts its transaction, which is then sent again whole, in
            // order, so nothing is overtaken.
            // A transaction's AddOffsetsToTxn meets CONCURRENT_TRANSACTIONS while the broker
            // still writes the previous one's markers, and librdkafka retries it after
            // retry.backoff.ms: 100 ms lost on one transaction in five at the default.
            // Retries still back off exponentially up to retry.backoff.max.ms.
            Delivery::ExactlyOnce => c
                .set(
                    "retry.backoff.ms",
                    millis(self.retry_backoff_min).min(20).to_string(),
                )
                .set("transactional.id", transactional_id(gateway_id))
                .set(
                    "transaction.timeout.ms",
                    millis(self.transaction_timeout).to_string(),
                )
                .set(
                    "message.timeout.ms",
                    millis(self.transaction_timeout).to_string(),
                ),
        };
        Ok(c)
    }
}

/// The transactional id of a gateway: stable across restarts, so the broker fences the
/// instance before a crash and aborts the transaction it left open.
pub fn transactional_id(gateway_id: &str) -> String {
    format!("edgegate-{gateway_id}")
}

/// The consumer group under which a gateway commits its log position (exactly once).
pub fn positions_group(gateway_id: &str) -> String {
    format!("edgegate-{gateway_id}-positions")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.get().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

pub(super) fn librdkafka_reason(e: &rdkafka::error::KafkaError) -> String {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description.clone(),
        rdkafka::error::KafkaError::ClientCreation(description) => description.clone(),
        other => other.to_string(),
    }
}

/// `host:port`, `[v6]:port`, optionally with a `protocol://` prefix as librdkafka allows.
fn check_broker(broker: &str) -> Result<(), String> {
    let rest = broker.split_once("://").map_or(broker, |(_, rest)| rest);
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .ok_or_else(|| format!("`{broker}` is not host:port"))?;
        (host, port)
    } else {
        rest.rsplit_once(':')
            .ok_or_else(|| format!("`{broker}` is not host:port"))?
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(format!("`{broker}` has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{broker}` has no valid port (1-65535)")),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::forward) fn problems_of(cfg: &KafkaConfig) -> Vec<String> {
        let mut p = Problems::default();
        cfg.validate("kafka", &mut p);
        p.0.into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(problems_of(&KafkaConfig::default()), Vec::<String>::new());
    }

    #[test]
    fn parses_units_and_rejects_unknown_keys() {
        let cfg: KafkaConfig = toml::from_str(
            r#"
            brokers = ["k1:9092", "[::1]:9093", "SSL://k2:9094"]
            compression = "zstd"
            linger = "2ms"
            max_in_flight_bytes = "16MiB"
            [properties]
            "security.protocol" = "plaintext"
            "#,
        )
        .expect("valid [kafka]");
        assert_eq!(cfg.compression, Compression::Zstd);
        assert_eq!(cfg.max_in_flight_bytes, ByteSize::mib(16));
        assert_eq!(problems_of(&cfg), Vec::<String>::new());
        assert!(toml::from_str::<KafkaConfig>("brokrs = []").is_err());
        assert!(toml::from_str::<KafkaConfig>("compression = \"brotli\"").is_err());
    }

    #[test]
    fn reports_every_problem() {
        let mut cfg = KafkaConfig {
            brokers: vec!["nohost".into(), ":9092".into(), "h:0".into()],
            retry_backoff_min: Duration::from_secs(5),
            retry_backoff_max: Duration::from_secs(1),
            ..KafkaConfig::default()
        };
        cfg.properties
            .insert("enable.idempotence".into(), "false".into());
        cfg.properties.insert("acks".into(), "1".into());
        cfg.properties
            .insert("message.timeout.ms".into(), "30000".into());
        let problems = problems_of(&cfg);
        for expected in [
            "kafka.brokers[0]",
            "kafka.brokers[1]",
            "kafka.brokers[2]",
            "kafka.retry_backoff_max",
            "kafka.properties.\"enable.idempotence\"",
            "kafka.properties.\"acks\"",
            "kafka.properties.\"message.timeout.ms\"",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected} missing in {problems:?}"
            );
        }
        assert!(
            problems_of(&KafkaConfig {
                brokers: vec![],
                ..KafkaConfig::default()
            })[0]
                .starts_with("kafka.brokers")
        );
    }

    #[test]
    fn librdkafka_checks_raw_properties() {
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("no.such.property".into(), "1".into());
        cfg.properties
            .insert("socket.timeout.ms".into(), "soon".into());
        let problems = problems_of(&cfg);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn fixed_properties_win_over_raw_ones() {
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("acks".into(), "-1".into());
        cfg.properties
            .insert("socket.keepalive.enable".into(), "true".into());
        assert!(problems_of(&cfg).is_empty());
        let c = cfg.client_config("gw1").expect("no secrets to read");
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        assert_eq!(c.get("client.id"), Some("edgegate-gw1"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert!(c.create_native_config().is_ok());
    }

    #[test]
    fn exactly_once_is_a_transactional_producer_named_after_the_gateway() {
        let cfg: KafkaConfig = toml::from_str(
            "delivery = \"exactly_once\"\ntransaction_timeout = \"30s\"\ntransaction_interval = \"20ms\"",
        )
        .expect("parses");
        assert!(problems_of(&cfg).is_empty(), "{:?}", problems_of(&cfg));
        let c = cfg.client_config("gw1").expect("no secrets to read");
        assert_eq!(c.get("transactional.id"), Some("edgegate-gw1"));
        assert_eq!(c.get("transaction.timeout.ms"), Some("30000"));
        // librdkafka refuses a message timeout beyond the transaction's.
        assert_eq!(c.get("message.timeout.ms"), Some("30000"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert!(c.create_native_config().is_ok());
        assert_eq!(positions_group("gw1"), "edgegate-gw1-positions");

        let at_least_once = KafkaConfig::default().client_config("gw1").expect("config");
        assert_eq!(at_least_once.get("transactional.id"), None);
        assert_eq!(at_least_once.get("message.timeout.ms"), Some("0"));
    }

    #[test]
    fn transaction_settings_are_checked() {
        let cfg: KafkaConfig = toml::from_str(
            "delivery = \"exactly_once\"\ntransaction_timeout = \"2s\"\ntransaction_interval = \"0ms\"\npositions_topic = \"no spaces\"\n[properties]\n\"transactional.id\" = \"mine\"\n\"isolation.level\" = \"read_uncommitted\"",
        )
        .expect("parses");
        let problems = problems_of(&cfg).join("\n");
        for key in [
            "kafka.transaction_timeout",
            "kafka.transaction_interval",
            "kafka.positions_topic",
            "\"transactional.id\"",
            "\"isolation.level\"",
        ] {
            assert!(problems.contains(key), "{key} missing in {problems}");
        }
        assert!(toml::from_str::<KafkaConfig>("delivery = \"twice\"").is_err());
    }
}
