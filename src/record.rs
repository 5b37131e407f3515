//! What a device message is once the gateway has accepted it: a [`Record`]. Ingest builds it
//! (routing decides its Kafka topic and key before it is stored), the log stores it
//! (`buffer`, which knows only how to frame and checksum it), and the forwarder turns it into
//! a Kafka message (`forward::record`, which adds the gateway's headers).

use bytes::Bytes;

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Mqtt,
    Coap,
}

impl Source {
    /// The protocol's name: the `protocol` metric label and the `edgegate-source` header.
    pub fn name(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Coap => "coap",
        }
    }
}

/// One message as the pipeline stores it. Routing has already happened at ingest: the Kafka
/// topic and key are decided before the record is written, so a config reload never changes
/// where an already-acknowledged record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub source: Source,
    /// Receive time, milliseconds since the Unix epoch: the Kafka timestamp, unless ingest
    /// accepted the device's own time (`format::timestamp`, carried as a header).
    pub received_ms: i64,
    /// Device identity: MQTT client id or CoAP device id.
    pub device: String,
    /// The topic it was routed by: the MQTT topic, or the one a CoAP listener derives from
    /// the URI path (`coap/pump7/temp`).
    pub origin: String,
    /// Destination Kafka topic (already rendered and validated).
    pub kafka_topic: String,
    /// Kafka key (already rendered); `None` means no key.
    pub key: Option<Bytes>,
    /// Extra Kafka headers (QoS, content type, user properties, will marker, ...), in order.
    pub headers: Vec<(String, Bytes)>,
    /// The Kafka value, untouched.
    pub payload: Bytes,
}

#[cfg(test)]
impl Record {
    /// A test's MQTT record from device `d` on `o` to Kafka topic `t`, with no key.
    pub(crate) fn mqtt_for_test(payload: &'static [u8], headers: Vec<(String, Bytes)>) -> Record {
        Record {
            source: Source::Mqtt,
            received_ms: 1,
            device: "d".into(),
            origin: "o".into(),
            kafka_topic: "t".into(),
            key: None,
            headers,
            payload: Bytes::from_static(payload),
        }
    }
}
