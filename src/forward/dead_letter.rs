//! The dead-letter log: records Kafka refused for good (an unknown or forbidden topic, a
//! record too large for its topic), moved out of the main log so they never block it, and
//! kept for `edgegate dead-letters`.
//!
//! It is a second [`Log`](crate::buffer::Log) in [`DIR`] under the buffer directory, with the
//! main log's settings (encryption included) but an eighth of its size and `drop_oldest`:
//! refused records must never stop the main log. A dead-lettered record is the original plus
//! two headers, [`ERROR`] and [`FAILED_SEQ`]; [`DeadLetter`] reads them back.

use std::io::Write;

use bytes::Bytes;

use crate::buffer::{LogConfig, LogError, Overflow};
use crate::record::Record;

/// The dead-letter log's directory, under the main log's.
pub const DIR: &str = "dead-letter";

/// Added to a dead-lettered record: why Kafka refused it.
pub const ERROR: &str = "edgegate-error";
/// Added to a dead-lettered record: its sequence number in the main log.
pub const FAILED_SEQ: &str = "edgegate-failed-seq";

/// The dead-letter log's config, from the main log's: in [`DIR`] beneath it, an eighth of its
/// `max_bytes` (at least two segments), dropping its oldest records when full.
pub fn log_config(main: &LogConfig) -> LogConfig {
    LogConfig {
        dir: main.dir.join(DIR),
        overflow: Overflow::DropOldest,
        max_bytes: (main.max_bytes / 8).max(main.segment_bytes * 2),
        ..main.clone()
    }
}

/// The record as it goes to the dead-letter log: unchanged, plus why and where it failed.
pub fn copy(record: &Record, seq: u64, error: &str) -> Record {
    let mut r = record.clone();
    r.headers
        .push((ERROR.to_owned(), Bytes::from(error.to_owned())));
    r.headers
        .push((FAILED_SEQ.to_owned(), Bytes::from(seq.to_string())));
    r
}

/// A record read back from the dead-letter log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record as stored, the two headers above included.
    pub record: Record,
    /// Why Kafka refused it.
    pub error: Option<String>,
    /// Its sequence number in the main log, as written.
    pub failed_seq: Option<String>,
}

impl DeadLetter {
    pub fn read(record: Record) -> DeadLetter {
        let header = |name: &str| {
            record
                .headers
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        DeadLetter {
            error: header(ERROR),
            failed_seq: header(FAILED_SEQ),
            record,
        }
    }
}

impl DeadLetter {
    /// One line of `edgegate dead-letters`: the error, where it failed, the record's fields,
    /// its headers and its payload (as text, or hex when it is not UTF-8).
    pub fn json(&self, seq: u64) -> serde_json::Value {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let r = &self.record;
        let mut line = serde_json::json!({
            "seq": seq,
            "error": self.error,
            "failed_seq": self.failed_seq,
            "received_ms": r.received_ms,
            "source": r.source.name(),
            "device": r.device,
            "origin": r.origin,
            "topic": r.kafka_topic,
            "key": r.key.as_deref().map(text),
            "headers": r
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), serde_json::Value::from(text(v))))
                .collect::<serde_json::Map<_, _>>(),
        });
        if let Some(line) = line.as_object_mut() {
            match std::str::from_utf8(&r.payload) {
                Ok(s) => line.insert("payload".into(), s.into()),
                Err(_) => line.insert(
                    "payload_hex".into(),
                    r.payload
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into(),
                ),
            };
        }
        line
    }
}

/// What [`print`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Printed {
    pub records: usize,
    /// Of which could not be read (a missing key, damage): `{"seq", "unreadable"}` lines.
    pub unreadable: usize,
}

/// Writes the dead-letter log of the main log `main` to `out` as JSON lines, oldest first,
/// at most `limit` of them. Reads the files without opening the log (no lock), so it works
/// beside the running gateway. `None` when there is no dead-letter log.
pub fn print(
    main: &LogConfig,
    limit: Option<usize>,
    mut out: impl Write,
) -> Option<Result<Printed, LogError>> {
    let dir = log_config(main).dir;
    if !dir.exists() {
        return None;
    }
    let mut printed = Printed::default();
    let result = crate::buffer::inspect(&dir, main.keys.as_deref(), |seq, record| {
        let line = match record {
            Ok(record) => DeadLetter::read(record).json(seq),
            Err(why) => {
                printed.unreadable += 1;
                serde_json::json!({ "seq": seq, "unreadable": why })
            }
        };
        printed.records += 1;
        writeln!(out, "{line}").is_ok() && limit.is_none_or(|l| printed.records < l)
    });
    Some(result.map(|()| printed))
}

/// Why ingest could not convert a record's payload (`crate::format`), if it could not: such a
/// record never goes to Kafka, whose consumers expect the converted form. Both delivery modes
/// dead-letter it with this reason.
pub(super) fn format_error(record: &Record) -> Option<String> {
    record.headers.iter().find_map(|(k, v)| {
        (k == crate::format::ERROR_HEADER)
            .then(|| format!("format: {}", String::from_utf8_lossy(v)))
    })
}

/// A record ingest stored before its subject's schema was known (`format::registry`),
/// encoded now if the schema is known: its payload framed for Kafka, or, when it cannot
/// match, marked with the format-error header ([`format_error`] then dead-letters it).
/// False while the schema is still unknown: the record must wait, in log order.
pub(super) fn encode_pending(
    record: &mut Record,
    schemas: Option<&crate::format::registry::Registry>,
) -> bool {
    use crate::format::registry::{self, Encoded, cache::SchemaType};
    let Some(at) = record
        .headers
        .iter()
        .position(|(k, _)| k == registry::PENDING_HEADER)
    else {
        return true;
    };
    let subject = String::from_utf8_lossy(&record.headers[at].1).into_owned();
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let named = header(registry::PENDING_TYPE_HEADER);
    let kind = SchemaType::from_name(named.as_deref()).ok_or_else(|| named.unwrap_or_default());
    let message = header(registry::PENDING_MESSAGE_HEADER);
    let (kind, encoded) = match (kind, schemas) {
        (Ok(kind), Some(s)) => (
            kind,
            s.encode_as(&subject, kind, message.as_deref(), &record.payload),
        ),
        // Nothing could ever encode it: waiting would hold every record behind it.
        (Ok(kind), None) => (
            kind,
            Encoded::Invalid(format!(
                "stored waiting for the schema of subject {subject}, and this forwarder has no schemas"
            )),
        ),
        // Written by a newer gateway, read by an older one after a downgrade.
        (Err(other), _) => (
            SchemaType::Avro,
            Encoded::Invalid(format!(
                "stored waiting for a schema of type {other}, which this gateway does not know"
            )),
        ),
    };
    let encoded = match encoded {
        Encoded::Pending => return false,
        Encoded::Done(framed) => Ok(framed),
        Encoded::Invalid(why) => Err(why),
    };
    record
        .headers
        .retain(|(k, _)| !registry::is_pending_header(k));
    match encoded {
        Ok(framed) => {
            record.payload = framed;
            record.headers.push((
                crate::format::FORMAT_HEADER.to_owned(),
                Bytes::from_static(kind.format().as_bytes()),
            ));
        }
        Err(why) => {
            registry::invalid(record, kind, &why);
            record
                .headers
                .push((crate::format::ERROR_HEADER.to_owned(), Bytes::from(why)));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Source;

    /// A record of a registry route as ingest stores it while its schema is unknown.
    fn waiting(payload: &'static [u8], headers: Vec<(String, Bytes)>) -> Record {
        Record::mqtt_for_test(payload, headers)
    }

    #[test]
    fn a_copy_reads_back_as_what_it_says() {
        let record = Record {
            source: Source::Coap,
            received_ms: 1,
            device: "d".into(),
            origin: "coap/d".into(),
            kafka_topic: "t".into(),
            key: None,
            headers: vec![("unit".into(), Bytes::from_static(b"C"))],
            payload: Bytes::from_static(b"x"),
        };
        let copy = copy(&record, 99, "Broker: Message size too large");
        assert_eq!(copy.payload, record.payload);
        assert_eq!(copy.headers.len(), 3);
        assert_eq!(
            copy.headers[1],
            (
                ERROR.to_owned(),
                Bytes::from_static(b"Broker: Message size too large")
            )
        );
        assert_eq!(
            copy.headers[2],
            (FAILED_SEQ.to_owned(), Bytes::from_static(b"99"))
        );
        let read = DeadLetter::read(copy.clone());
        assert_eq!(
            read.error.as_deref(),
            Some("Broker: Message size too large")
        );
        assert_eq!(read.failed_seq.as_deref(), Some("99"));
        assert_eq!(read.record, copy);
        assert_eq!(DeadLetter::read(record).error, None);
    }

    #[test]
    fn a_pending_record_is_encoded_once_its_schema_is_known() {
        use crate::format::registry::{PENDING_HEADER, Registry, cache::Entry, cache::SchemaType};
        let pending = |payload: &'static [u8]| {
            waiting(
                payload,
                vec![(PENDING_HEADER.into(), Bytes::from_static(b"t-value"))],
            )
        };
        let schemas = Registry::in_memory();
        let mut record = pending(br#"{"a":1}"#);
        assert!(!encode_pending(&mut record, Some(&schemas)));
        assert_eq!(record, pending(br#"{"a":1}"#));
        let mut orphan = pending(br#"{"a":1}"#);
        assert!(encode_pending(&mut orphan, None));
        assert!(
            format_error(&orphan).is_some(),
            "dead-lettered, not waiting"
        );
        schemas
            .learn(
                "t-value",
                Entry {
                    id: 3,
                    version: 1,
                    schema: r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#
                        .into(),
                    schema_type: SchemaType::Avro,
                },
            )
            .unwrap();
        assert!(encode_pending(&mut record, Some(&schemas)));
        assert_eq!(&record.payload[..], &[0, 0, 0, 0, 3, 2]);
        assert_eq!(
            record.headers,
            vec![(
                crate::format::FORMAT_HEADER.to_owned(),
                Bytes::from_static(b"avro")
            )]
        );
        assert_eq!(format_error(&record), None);
        // Encoded records and records of other routes pass as they are.
        assert!(encode_pending(&mut record, Some(&schemas)));
        assert_eq!(&record.payload[..], &[0, 0, 0, 0, 3, 2]);

        let mut bad = pending(br#"{"a":"x"}"#);
        assert!(encode_pending(&mut bad, Some(&schemas)));
        assert_eq!(&bad.payload[..], br#"{"a":"x"}"#);
        let why = format_error(&bad).expect("marked");
        assert!(
            why.starts_with("format: the payload does not match schema 3"),
            "{why}"
        );
    }

    /// A `json_schema` route's pending record says so, and waits for a JSON Schema: the
    /// subject's Avro schema is a mismatch, not a way to encode it.
    #[test]
    fn a_pending_json_schema_record_is_validated_by_its_kind() {
        use crate::format::registry::{
            PENDING_HEADER, PENDING_TYPE_HEADER, Registry, cache::Entry, cache::SchemaType,
        };
        let pending = |payload: &'static [u8]| {
            waiting(
                payload,
                vec![
                    (PENDING_HEADER.into(), Bytes::from_static(b"j-value")),
                    (PENDING_TYPE_HEADER.into(), Bytes::from_static(b"JSON")),
                ],
            )
        };
        let schemas = Registry::in_memory();
        let mut record = pending(br#"{"a":1}"#);
        assert!(!encode_pending(&mut record, Some(&schemas)));
        assert_eq!(record, pending(br#"{"a":1}"#), "untouched while it waits");
        let entry = |schema_type, schema: &str| Entry {
            id: 8,
            version: 1,
            schema: schema.into(),
            schema_type,
        };
        schemas
            .learn(
                "j-value",
                entry(
                    SchemaType::Avro,
                    r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#,
                ),
            )
            .unwrap();
        let mut mismatched = pending(br#"{"a":1}"#);
        assert!(encode_pending(&mut mismatched, Some(&schemas)));
        let why = format_error(&mismatched).expect("marked");
        assert!(why.contains("is AVRO"), "{why}");
        schemas
            .learn(
                "j-value",
                entry(
                    SchemaType::Json,
                    r#"{"properties":{"a":{"type":"integer"}}}"#,
                ),
            )
            .unwrap();
        assert!(encode_pending(&mut record, Some(&schemas)));
        assert_eq!(&record.payload[..], b"\0\0\0\0\x08{\"a\":1}");
        assert_eq!(
            record.headers,
            vec![(
                crate::format::FORMAT_HEADER.to_owned(),
                Bytes::from_static(b"json_schema")
            )]
        );
    }

    /// A `protobuf` route's pending record waits for a Protobuf schema and is encoded as the
    /// message its route named; a type this gateway does not know is dead-lettered, not
    /// taken for Avro.
    #[test]
    fn a_pending_protobuf_record_is_encoded_as_its_message() {
        use crate::format::registry::{
            PENDING_HEADER, PENDING_MESSAGE_HEADER, PENDING_TYPE_HEADER, Registry, cache::Entry,
            cache::SchemaType,
        };
        let pending = |payload: &'static [u8], kind: &'static [u8]| {
            waiting(
                payload,
                vec![
                    (PENDING_HEADER.into(), Bytes::from_static(b"p-value")),
                    (PENDING_TYPE_HEADER.into(), Bytes::from_static(kind)),
                    (
                        PENDING_MESSAGE_HEADER.into(),
                        Bytes::from_static(b"iot.Alarm"),
                    ),
                ],
            )
        };
        let schemas = Registry::in_memory();
        let mut record = pending(br#"{"text":"t"}"#, b"PROTOBUF");
        assert!(!encode_pending(&mut record, Some(&schemas)));
        schemas
            .learn(
                "p-value",
                Entry {
                    id: 4,
                    version: 1,
                    schema: "syntax = \"proto3\"; package iot; message Reading { string device = 1; } message Alarm { string text = 1; }".into(),
                    schema_type: SchemaType::Protobuf,
                },
            )
            .unwrap();
        assert!(encode_pending(&mut record, Some(&schemas)));
        assert_eq!(&record.payload[..], &[0, 0, 0, 0, 4, 2, 2, 10, 1, b't']);
        assert_eq!(
            record.headers,
            vec![(
                crate::format::FORMAT_HEADER.to_owned(),
                Bytes::from_static(b"protobuf")
            )]
        );
        let mut unknown = pending(br#"{"text":"t"}"#, b"XSD");
        assert!(encode_pending(&mut unknown, Some(&schemas)));
        let why = format_error(&unknown).expect("marked");
        assert!(why.contains("a schema of type XSD"), "{why}");
    }

    #[test]
    fn the_dead_letter_log_is_an_eighth_of_the_main_one_beneath_it() {
        let main = LogConfig::new("/var/lib/edgegate/log");
        let dead = log_config(&main);
        assert_eq!(dead.dir, main.dir.join("dead-letter"));
        assert_eq!(dead.max_bytes, main.max_bytes / 8);
        assert_eq!(dead.overflow, Overflow::DropOldest);
        let small = LogConfig {
            max_bytes: 1 << 20,
            segment_bytes: 256 << 10,
            ..main
        };
        assert_eq!(log_config(&small).max_bytes, 512 << 10);
    }
}
