//! Ingest: the listeners (MQTT, CoAP) and the one path every accepted message takes into
//! the log: route it, then append it. A listener acknowledges its device only when the
//! [`Durable`] future returned by [`Pipeline::submit`] resolves.

pub mod coap;
pub mod mqtt;
pub mod receipts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;

use crate::buffer::{AppendError, Durable, Log, Pressure};
use crate::format::registry::cache::SchemaType;
use crate::format::registry::{self, Encoded, Registry};
use crate::format::sparkplug::{Anomaly, FormatError, Sparkplug};
use crate::format::timestamp::{self, Outcome};
use crate::format::{self, Format};
use crate::record::{Record, Source};
use crate::reload::Live;
use crate::route::{Destination, RouteError, Router};
use receipts::Receipts;

/// How a message was delivered, in its protocol's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// MQTT, at QoS 0, 1 or 2.
    Mqtt { qos: u8 },
    /// A CoAP request, confirmable (CON) or not (NON).
    Coap { confirmable: bool },
}

impl Delivery {
    pub fn source(self) -> Source {
        match self {
            Delivery::Mqtt { .. } => Source::Mqtt,
            Delivery::Coap { .. } => Source::Coap,
        }
    }

    /// The `qos` metric label: the MQTT QoS (`0`, `1`, `2`) or the CoAP message type (`con`,
    /// `non`).
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Mqtt { qos: 0 } => "0",
            Delivery::Mqtt { qos: 1 } => "1",
            Delivery::Mqtt { .. } => "2",
            Delivery::Coap { confirmable: true } => "con",
            Delivery::Coap { confirmable: false } => "non",
        }
    }
}

/// One message as a listener received it, before routing.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub delivery: Delivery,
    /// MQTT client id / CoAP device id: the default Kafka key and `{client_id}`.
    pub device: String,
    /// MQTT topic, or the topic a CoAP listener derives from the URI; used for routing.
    pub topic: String,
    pub payload: Bytes,
    /// Protocol headers to carry into Kafka (`mqtt-qos`, `content-type`, user properties).
    pub headers: Vec<(String, Bytes)>,
    pub received_ms: i64,
}

/// A listener that could not be bound: the gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Mqtt {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for MQTT over TLS on {addr}: {source}")]
    MqttTls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for CoAP on {addr}: {source}")]
    Coap {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a message was not stored. Each maps to a protocol reason code in its listener.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// No route, or the route renders an invalid Kafka topic (MQTT 5: 0x90).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The log is full under `reject_new` (MQTT 5: 0x97, CoAP: 5.03).
    #[error("the log is full")]
    Full,
    #[error("message of {0} bytes is too large to store")]
    TooLarge(usize),
    /// The disk refused the write (MQTT 5: 0x80).
    #[error("the log could not store the message: {0}")]
    Io(String),
    #[error("the gateway is shutting down")]
    Closed,
}

impl Rejected {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::Route(RouteError::NoRoute(_)) => "no_route",
            Rejected::Route(RouteError::InvalidKafkaTopic { .. }) => "invalid_kafka_topic",
            Rejected::Full => "log_full",
            Rejected::TooLarge(_) => "too_large",
            Rejected::Io(_) => "io_error",
            Rejected::Closed => "closed",
        }
    }
}

impl From<AppendError> for Rejected {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Full => Rejected::Full,
            AppendError::TooLarge(n) => Rejected::TooLarge(n),
            AppendError::Closed => Rejected::Closed,
            other => Rejected::Io(other.to_string()),
        }
    }
}

/// Route + append, shared by every listener. Cheap to clone. It counts what it stores; what
/// it refuses, the listener counts ([`refused`]), as it also hears of appends that fail later.
#[derive(Clone)]
pub struct Pipeline {
    log: Log,
    /// The routes in force, read per message: a reload applies to the next one.
    routes: Live<Router>,
    /// The Sparkplug B session state of `sparkplug_b` routes, applied in arrival order.
    sparkplug: Arc<Sparkplug>,
    /// The schemas of `avro` routes; `None` stores their payloads as pending (tests).
    schemas: Option<Arc<Registry>>,
    /// Shared by the clones: every listener bumps the same handles.
    counters: Arc<Counters>,
    /// Where listeners keep what must survive a crash to recognise a retransmission
    /// (`receipts.rs`); `None` in tests that do not need it.
    receipts: Option<Receipts>,
}

/// Handles of the counters every stored message bumps, taken once: `metrics::counter!`
/// hashes its labels and looks the key up in the registry (a lock) on every call, which
/// showed in the uplink's profile.
struct Counters {
    /// (`edgegate_messages_received_total`, `edgegate_received_bytes_total`) per
    /// [`Delivery`]: MQTT QoS 0, 1, 2, then CoAP CON and NON.
    by_delivery: [(metrics::Counter, metrics::Counter); 5],
}

impl Counters {
    const DELIVERIES: [Delivery; 5] = [
        Delivery::Mqtt { qos: 0 },
        Delivery::Mqtt { qos: 1 },
        Delivery::Mqtt { qos: 2 },
        Delivery::Coap { confirmable: true },
        Delivery::Coap { confirmable: false },
    ];

    fn new() -> Counters {
        Counters {
            by_delivery: Self::DELIVERIES.map(|d| {
                let (protocol, qos) = (d.source().name(), d.label());
                (
                    metrics::counter!("edgegate_messages_received_total", "protocol" => protocol, "qos" => qos),
                    metrics::counter!("edgegate_received_bytes_total", "protocol" => protocol, "qos" => qos),
                )
            }),
        }
    }

    fn stored(&self, delivery: Delivery, bytes: u64) {
        let i = match delivery {
            Delivery::Mqtt { qos } => usize::from(qos.min(2)),
            Delivery::Coap { confirmable: true } => 3,
            Delivery::Coap { confirmable: false } => 4,
        };
        let (messages, payload) = &self.by_delivery[i];
        messages.increment(1);
        payload.increment(bytes);
    }
}

impl Pipeline {
    /// Routes by `routes` (a [`Router`] that never changes, or the reloadable one) into `log`.
    /// Takes its counter handles: build it after the metrics recorder is installed.
    pub fn new(log: Log, routes: impl Into<Live<Router>>) -> Self {
        Pipeline {
            log,
            routes: routes.into(),
            sparkplug: Arc::default(),
            schemas: None,
            counters: Arc::new(Counters::new()),
            receipts: None,
        }
    }

    /// Keeps receipts of QoS 2 messages of persistent sessions in `receipts`.
    pub fn with_receipts(mut self, receipts: Receipts) -> Self {
        self.receipts = Some(receipts);
        self
    }

    /// The receipt store, when there is one.
    pub fn receipts(&self) -> Option<&Receipts> {
        self.receipts.as_ref()
    }

    /// Keeps the Sparkplug B births in the journal at `path`, so they outlive a restart
    /// (without it they are kept in memory only).
    pub fn with_sparkplug_journal(mut self, path: &std::path::Path) -> std::io::Result<Self> {
        self.sparkplug = Arc::new(Sparkplug::open(path)?);
        Ok(self)
    }

    /// Encodes the payloads of `avro` routes with the schemas of `schemas`.
    pub fn with_schemas(mut self, schemas: Arc<Registry>) -> Self {
        self.schemas = Some(schemas);
        self
    }

    /// The log messages go to.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Routes and appends one message. On success the returned future resolves once the
    /// record is durable: only then may the device be acknowledged.
    pub fn submit(&self, msg: Inbound) -> Result<Durable, Rejected> {
        self.submit_with_receipt(msg, &[])
    }

    /// [`Pipeline::submit`] with a receipt (`receipts.rs`) in the record's frame; a message
    /// that becomes several records carries it in the last, the one whose durability is
    /// waited for.
    pub fn submit_with_receipt(&self, msg: Inbound, receipt: &[u8]) -> Result<Durable, Rejected> {
        let mut dest = self
            .routes
            .borrow()
            .route(&msg.topic, &msg.device, msg.received_ms)?;
        let delivery = msg.delivery;
        let bytes = msg.payload.len() as u64;
        let mut headers = msg.headers;
        // Sparkplug records are timed one by one, after conversion.
        let json = !matches!(dest.format, Format::SparkplugB);
        if let (Some(policy), true) = (&dest.device_time, json) {
            let outcome = policy.extract(&msg.payload, msg.received_ms);
            if let (Outcome::Used(at), true) = (outcome, dest.timed) {
                // Rendered again at the device's time by the table in force now (a reload
                // in between may have dropped the route: then the first rendering stands).
                if let Ok(d) = self.routes.borrow().route(&msg.topic, &msg.device, at) {
                    (dest.kafka_topic, dest.key) = (d.kafka_topic, d.key);
                }
            }
            device_time(&mut headers, outcome);
        }
        let record = Record {
            source: msg.delivery.source(),
            received_ms: msg.received_ms,
            device: msg.device,
            origin: msg.topic,
            kafka_topic: std::mem::take(&mut dest.kafka_topic),
            key: dest.key.take(),
            headers,
            payload: msg.payload,
        };
        let durable = match dest.format {
            Format::Raw => self.log.append_with_receipt(&record, receipt)?,
            Format::Json => {
                let mut record = record;
                check_json(&mut record);
                self.log.append_with_receipt(&record, receipt)?
            }
            Format::Avro => {
                let mut record = record;
                self.encode_registry(&mut record, &dest, SchemaType::Avro);
                self.log.append_with_receipt(&record, receipt)?
            }
            Format::JsonSchema => {
                let mut record = record;
                self.encode_registry(&mut record, &dest, SchemaType::Json);
                self.log.append_with_receipt(&record, receipt)?
            }
            Format::Protobuf => {
                let mut record = record;
                self.encode_registry(&mut record, &dest, SchemaType::Protobuf);
                self.log.append_with_receipt(&record, receipt)?
            }
            Format::SparkplugB => self.append_sparkplug(record, &dest, receipt)?,
        };
        self.counters.stored(delivery, bytes);
        Ok(durable)
    }

    /// Encodes an `avro`, `json_schema` or `protobuf` route's payload (or a converted
    /// Sparkplug record of a route with `encoding = "avro"`) with its subject's schema, of
    /// type `kind`. A payload that cannot match is stored as it came, marked for the
    /// dead-letter log; one whose schema is not known yet is stored as it came, marked
    /// pending (with its type when not Avro, and its Protobuf message when the route names
    /// one), and encoded by the forwarder.
    fn encode_registry(&self, record: &mut Record, dest: &Destination, kind: SchemaType) {
        let subject = dest
            .naming
            .as_ref()
            .map(|n| n.subject(&record.kafka_topic))
            .unwrap_or_default();
        let message = dest.naming.as_ref().and_then(|n| n.message.as_deref());
        let encoded = match &self.schemas {
            Some(schemas) => schemas.encode_as(&subject, kind, message, &record.payload),
            None => Encoded::Pending,
        };
        // Only the gateway says what a record's payload is.
        record.headers.retain(|(k, _)| {
            !registry::is_pending_header(k)
                && k != format::ERROR_HEADER
                && k != format::FORMAT_HEADER
        });
        match encoded {
            Encoded::Done(framed) => {
                record.payload = framed;
                record.headers.push((
                    format::FORMAT_HEADER.to_owned(),
                    Bytes::from_static(kind.format().as_bytes()),
                ));
            }
            Encoded::Pending => {
                record
                    .headers
                    .push((registry::PENDING_HEADER.to_owned(), Bytes::from(subject)));
                if !kind.is_avro() {
                    record.headers.push((
                        registry::PENDING_TYPE_HEADER.to_owned(),
                        Bytes::from_static(kind.name().as_bytes()),
                    ));
                }
                if let Some(message) = message {
                    record.headers.push((
                        registry::PENDING_MESSAGE_HEADER.to_owned(),
                        Bytes::from(message.to_owned()),
                    ));
                }
            }
            Encoded::Invalid(why) => {
                registry::invalid(record, kind, &why);
                record
                    .headers
                    .push((format::ERROR_HEADER.to_owned(), Bytes::from(why)));
            }
        }
    }

    /// Appends the records a Sparkplug B message becomes (the first durable append covers
    /// none of the later ones, so the last one is waited for: the log makes records durable
    /// in order). A message that does not convert is stored as it came, marked for the
    /// dead-letter log.
    fn append_sparkplug(
        &self,
        mut record: Record,
        dest: &Destination,
        receipt: &[u8],
    ) -> Result<Durable, Rejected> {
        let converted = self
            .sparkplug
            .convert(&record.origin, &record.payload, dest.records);
        let converted = match converted {
            Ok(c) if !c.records.is_empty() => c,
            Ok(_) => return Ok(self.log.append_with_receipt(&record, receipt)?),
            Err(e) => {
                format_error(&record, &e);
                record
                    .headers
                    .push((format::ERROR_HEADER.to_owned(), Bytes::from(e.to_string())));
                return Ok(self.log.append_with_receipt(&record, receipt)?);
            }
        };
        for anomaly in &converted.anomalies {
            sparkplug_anomaly(&record, *anomaly);
        }
        // Records encoded to Avro say so themselves (`encode_registry`).
        let avro = dest.naming.is_some();
        if !avro {
            record.headers.extend([
                (
                    format::FORMAT_HEADER.to_owned(),
                    Bytes::from_static(b"sparkplug_b"),
                ),
                (
                    "content-type".to_owned(),
                    Bytes::from_static(b"application/json"),
                ),
            ]);
        }
        let mut last = None;
        let n = converted.records.len();
        for (i, value) in converted.records.into_iter().enumerate() {
            let receipt = if i + 1 == n { receipt } else { &[] };
            let mut one = Record {
                payload: value,
                ..record.clone()
            };
            if let Some(policy) = &dest.device_time {
                let outcome = policy.extract(&one.payload, one.received_ms);
                if let (Outcome::Used(at), true) = (outcome, dest.timed) {
                    // As for raw payloads above.
                    if let Ok(d) = self.routes.borrow().route(&one.origin, &one.device, at) {
                        (one.kafka_topic, one.key) = (d.kafka_topic, d.key);
                    }
                }
                device_time(&mut one.headers, outcome);
            }
            if avro {
                // With the topic final: the subject may be named after it.
                self.encode_registry(&mut one, dest, SchemaType::Avro);
            }
            last = Some(self.log.append_with_receipt(&one, receipt)?);
        }
        last.ok_or(Rejected::Closed)
    }

    /// Above the log's high watermark listeners stop reading their sockets.
    pub fn pressure(&self) -> watch::Receiver<Pressure> {
        self.log.pressure()
    }
}

/// The one place a message that was not stored is counted, by protocol and reason, and
/// logged (at DEBUG: a device can cause it at will). Listeners call it once per message,
/// whether the pipeline refused it at once or its append failed later.
/// `client_id` is the MQTT client's (a CoAP request's device is in its path, and in the
/// reason when that is the route).
pub fn refused(delivery: Delivery, rejected: &Rejected, peer: SocketAddr, client_id: Option<&str>) {
    let (protocol, reason) = (delivery.source().name(), rejected.reason());
    metrics::counter!("edgegate_ingest_rejected_total", "protocol" => protocol, "reason" => reason)
        .increment(1);
    tracing::debug!(%peer, client_id, protocol, qos = delivery.label(), reason, error = %rejected, "Did not store a message.");
}

/// A message on a converting route whose payload does not convert: counted and logged here.
fn format_error(record: &Record, error: &FormatError) {
    metrics::counter!("edgegate_format_errors_total", "format" => "sparkplug_b").increment(1);
    tracing::warn!(device = %record.device, topic = %record.origin, error = %error, "A payload does not convert; it goes to the dead-letter log.");
}

/// A `json` route's payload, checked: one that is not JSON (a single value, UTF-8, nothing
/// after it) is stored as it came, marked for the dead-letter log, counted and logged here.
fn check_json(record: &mut Record) {
    // Only the gateway says what is wrong with a payload.
    record.headers.retain(|(k, _)| k != format::ERROR_HEADER);
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&record.payload) {
        let why = format!("the payload is not JSON: {e}");
        metrics::counter!("edgegate_format_errors_total", "format" => "json").increment(1);
        tracing::warn!(device = %record.device, topic = %record.origin, error = why, "A payload is not JSON; it goes to the dead-letter log.");
        record
            .headers
            .push((format::ERROR_HEADER.to_owned(), Bytes::from(why)));
    }
}

/// A Sparkplug B anomaly (sequence gap, data before its birth, a stale death): counted and
/// logged here; the records carry it too.
fn sparkplug_anomaly(record: &Record, anomaly: Anomaly) {
    metrics::counter!("edgegate_sparkplug_anomalies_total", "kind" => anomaly.label()).increment(1);
    tracing::info!(device = %record.device, topic = %record.origin, kind = anomaly.label(), "Sparkplug B anomaly.");
}

/// A record's device-time outcome on a route that takes device timestamps: the header the
/// forwarder and consumers read, and the one place it is counted.
fn device_time(headers: &mut Vec<(String, Bytes)>, outcome: Outcome) {
    metrics::counter!("edgegate_device_timestamps_total", "outcome" => outcome.label())
        .increment(1);
    // Only this function says what the Kafka timestamp is: a device's MQTT 5 user property
    // of the same name would otherwise pass a time the window refused.
    headers.retain(|(k, _)| k != timestamp::DEVICE_MS_HEADER && k != timestamp::REJECTED_HEADER);
    headers.push(match outcome {
        Outcome::Used(at) => (
            timestamp::DEVICE_MS_HEADER.to_owned(),
            Bytes::from(at.to_string()),
        ),
        rejected => (
            timestamp::REJECTED_HEADER.to_owned(),
            Bytes::from_static(rejected.label().as_bytes()),
        ),
    });
}

/// HELP text of the pipeline's metrics.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "edgegate_messages_received_total",
        "Messages stored in the log, by protocol and QoS (MQTT 0/1/2, CoAP con/non)."
    );
    metrics::describe_counter!(
        "edgegate_received_bytes_total",
        "Payload bytes stored in the log, by protocol and QoS."
    );
    metrics::describe_counter!(
        "edgegate_format_errors_total",
        "Messages on converting routes whose payload did not convert (stored as they came and moved to the dead-letter log), by format."
    );
    metrics::describe_counter!(
        "edgegate_sparkplug_anomalies_total",
        "Sparkplug B messages with a sequence gap, data before its birth, or a death of an older session, by kind."
    );
    metrics::describe_counter!(
        "edgegate_device_timestamps_total",
        "Records on routes with timestamp = \"payload\", by outcome: used (the Kafka timestamp is the device's), missing, invalid or out_of_window (the receive time is kept)."
    );
    metrics::describe_counter!(
        "edgegate_ingest_rejected_total",
        "Messages not stored, by protocol and reason (no_route, log_full, too_large, io_error...), each counted once."
    );
}

/// Milliseconds since the Unix epoch, for `Inbound::received_ms`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &'static [u8], headers: Vec<(String, Bytes)>) -> Record {
        Record::mqtt_for_test(payload, headers)
    }

    #[test]
    fn a_json_route_marks_what_is_not_json_and_nothing_else() {
        for good in [&br#"{"a":[1,2.5,null]}"#[..], b" 42 ", b"\"x\"", b"[]"] {
            let mut r = record(good, vec![]);
            check_json(&mut r);
            assert!(r.headers.is_empty(), "{}", String::from_utf8_lossy(good));
            assert_eq!(&r.payload[..], good);
        }
        for bad in [&b"{\"a\":"[..], b"", b"{} {}", b"\xff", b"NaN", b"{'a':1}"] {
            let mut r = record(bad, vec![]);
            check_json(&mut r);
            assert_eq!(r.headers.len(), 1, "{}", String::from_utf8_lossy(bad));
            assert_eq!(r.headers[0].0, format::ERROR_HEADER);
            assert!(r.headers[0].1.starts_with(b"the payload is not JSON: "));
            assert_eq!(&r.payload[..], bad);
        }
        // A device's own header of that name does not send good JSON to the dead letters.
        let mut r = record(
            b"{}",
            vec![(format::ERROR_HEADER.to_owned(), Bytes::from_static(b"x"))],
        );
        check_json(&mut r);
        assert!(r.headers.is_empty());
    }
}
