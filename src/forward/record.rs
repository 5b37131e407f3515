//! What a log record looks like in Kafka (the dead-letter copy is in `dead_letter`).

use std::fmt::Write;

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};

use crate::format::timestamp::DEVICE_MS_HEADER;
use crate::record::Record;

/// The header carrying `<gateway id>:<log sequence>`: the same on every re-send, so a
/// consumer can drop the duplicates a crash may cause (docs/ARCHITECTURE.md, contract 4).
pub const RECORD_ID: &str = "edgegate-record-id";
pub const SOURCE: &str = "edgegate-source";
pub const DEVICE: &str = "edgegate-device";
pub const ORIGIN: &str = "edgegate-origin";
pub const RECEIVED_MS: &str = "edgegate-received-ms";

/// The Kafka timestamp of a record: the device's time when ingest accepted it
/// (`format::timestamp`), else the receive time. Only records of routes that take device
/// timestamps carry the header, so for the others this is a walk over a few header names.
pub fn timestamp_ms(record: &Record) -> i64 {
    record
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == DEVICE_MS_HEADER)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(record.received_ms)
}

pub fn record_id(gateway_id: &str, seq: u64) -> String {
    format!("{gateway_id}:{seq}")
}

/// The Kafka headers of a record, in their fixed order: ours first, then the record's own
/// (QoS, content type, user properties, will marker) as ingest stored them. The readable
/// form of [`kafka_headers`], which tests compare against.
#[cfg(test)]
pub fn headers(gateway_id: &str, seq: u64, record: &Record) -> Vec<(String, Bytes)> {
    let mut out = Vec::with_capacity(5 + record.headers.len());
    out.push((
        RECORD_ID.to_owned(),
        Bytes::from(record_id(gateway_id, seq)),
    ));
    out.push((
        SOURCE.to_owned(),
        Bytes::from_static(record.source.name().as_bytes()),
    ));
    out.push((DEVICE.to_owned(), Bytes::from(record.device.clone())));
    out.push((ORIGIN.to_owned(), Bytes::from(record.origin.clone())));
    out.push((
        RECEIVED_MS.to_owned(),
        Bytes::from(record.received_ms.to_string()),
    ));
    out.extend(record.headers.iter().cloned());
    out
}

/// The same headers, built straight into librdkafka's structure (the hot path: no
/// intermediate vector). The record id and receive time are formatted into `scratch`, one
/// buffer the caller keeps for every record, instead of two new strings each time;
/// librdkafka copies every header.
pub fn kafka_headers(
    gateway_id: &str,
    seq: u64,
    record: &Record,
    scratch: &mut String,
) -> OwnedHeaders {
    scratch.clear();
    // Writing into a String cannot fail.
    let _ = write!(scratch, "{gateway_id}:{seq}");
    let id_end = scratch.len();
    let _ = write!(scratch, "{}", record.received_ms);
    let (id, received) = scratch.split_at(id_end);
    let mut h = OwnedHeaders::new_with_capacity(5 + record.headers.len())
        .insert(Header {
            key: RECORD_ID,
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: SOURCE,
            value: Some(record.source.name().as_bytes()),
        })
        .insert(Header {
            key: DEVICE,
            value: Some(record.device.as_bytes()),
        })
        .insert(Header {
            key: ORIGIN,
            value: Some(record.origin.as_bytes()),
        })
        .insert(Header {
            key: RECEIVED_MS,
            value: Some(received.as_bytes()),
        });
    for (key, value) in &record.headers {
        h = h.insert(Header {
            key: key.as_str(),
            value: Some(&value[..]),
        });
    }
    h
}

const PER_HEADER: usize = 48;
const PER_RECORD: usize = 640;
/// The weight of the smallest possible record: a transaction with less room than this takes
/// nothing more.
pub const MIN_WEIGHT: usize = 5 * PER_HEADER + PER_RECORD;

/// What a record costs while in flight: our copy (a `Record` and its slices of the log's
/// read buffer) plus librdkafka's (the copied payload, key and headers, a header list with
/// one allocation per header, and its message bookkeeping). Measured, roughly: a 100-byte
/// record with 7 headers costs about 1 KiB in the drain's resident memory.
pub fn weight(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + PER_HEADER)
        .sum();
    2 * record.payload.len()
        + record.key.as_ref().map_or(0, Bytes::len)
        + 2 * (record.device.len() + record.origin.len())
        + headers
        + 5 * PER_HEADER
        + PER_RECORD
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;
    use crate::record::Source;

    fn sample() -> Record {
        Record {
            source: Source::Mqtt,
            received_ms: 1_700_000_000_123,
            device: "dev-7".into(),
            origin: "plant/a/dev-7/telemetry".into(),
            kafka_topic: "iot.a.telemetry".into(),
            key: Some(Bytes::from_static(b"dev-7")),
            headers: vec![
                ("mqtt-qos".into(), Bytes::from_static(b"1")),
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                ("unit".into(), Bytes::from_static(b"C")),
            ],
            payload: Bytes::from_static(b"{\"t\":21.5}"),
        }
    }

    #[test]
    fn headers_in_contract_order() {
        let h = headers("gw-1", 42, &sample());
        let keys: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "edgegate-record-id",
                "edgegate-source",
                "edgegate-device",
                "edgegate-origin",
                "edgegate-received-ms",
                "mqtt-qos",
                "content-type",
                "unit"
            ]
        );
        assert_eq!(h[0].1, "gw-1:42");
        assert_eq!(h[1].1, "mqtt");
        assert_eq!(h[2].1, "dev-7");
        assert_eq!(h[3].1, "plant/a/dev-7/telemetry");
        assert_eq!(h[4].1, "1700000000123");
    }

    #[test]
    fn librdkafka_headers_match_the_list() {
        let record = sample();
        let list = headers("gw-1", 42, &record);
        let mut scratch = String::from("left over from the last record");
        let owned = kafka_headers("gw-1", 42, &record, &mut scratch);
        assert_eq!(owned.count(), list.len());
        for (i, (key, value)) in list.iter().enumerate() {
            let h = owned.get(i);
            assert_eq!(h.key, key);
            assert_eq!(h.value, Some(&value[..]));
        }
    }

    #[test]
    fn coap_source_header() {
        let mut record = sample();
        record.source = Source::Coap;
        assert_eq!(headers("g", 1, &record)[1].1, "coap");
    }

    #[test]
    fn kafka_timestamp_is_the_accepted_device_time_else_the_receive_time() {
        let mut record = sample();
        assert_eq!(timestamp_ms(&record), 1_700_000_000_123);
        record.headers.push((
            DEVICE_MS_HEADER.into(),
            Bytes::from_static(b"1699999999000"),
        ));
        assert_eq!(timestamp_ms(&record), 1_699_999_999_000);
        // The receive time header stays the receive time.
        assert_eq!(headers("g", 1, &record)[4].1, "1700000000123");
        record.headers.last_mut().expect("pushed").1 = Bytes::from_static(b"soon");
        assert_eq!(timestamp_ms(&record), 1_700_000_000_123);
    }
}
