//! Schema-registry formats: `format = "avro"` routes encode JSON device payloads with the
//! latest schema of their subject in a Confluent-compatible registry, in the Confluent wire
//! format (magic byte 0, schema id, Avro body); `format = "json_schema"` routes validate them
//! against the subject's JSON Schema and frame them the same way (magic byte 0, schema id,
//! the payload's JSON as it came), as Confluent's JSON Schema serializer does;
//! `format = "protobuf"` routes encode them as a message of the subject's `.proto` schema
//! ([`protobuf`]). A subject's schema must be of the route's kind: an Avro schema under a
//! `json_schema` route is a mismatch, said in the dead-letter reason.
//!
//! Where: at ingest when the subject's schema is known, so the log holds what goes to Kafka
//! and a payload that cannot match is marked there and then ([`crate::format::ERROR_HEADER`]:
//! the forwarder dead-letters it, counted in `edgegate_format_errors_total{format="avro"}`;
//! like Sparkplug, the device is not refused, so the message is never lost). When the schema
//! is not known yet (the registry was never reached for that subject), the JSON is stored
//! with [`PENDING_HEADER`] naming the subject, and the forwarder encodes it when it sends it;
//! until the schema is known the forwarder waits at that record, in log order.
//!
//! What is known lives in memory and in a file under the buffer directory ([`cache`]), so a
//! restarted gateway encodes while the registry or the uplink is down. [`Registry::run`]
//! reads the latest version of every subject in use every `refresh`, and at once when a new
//! subject appears: a newer version is used for the records stored from then on. Records
//! already in the log keep the schema id they were encoded with (still valid: a consumer
//! resolves it by id); pending records take the version in force when they are sent.

pub mod avro;
pub mod cache;
pub mod client;
pub mod config;
mod members;
pub mod protobuf;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use cache::{Entry, SchemaType};
use client::{Client, FetchError, Upstream};

use crate::reload::Live;

/// The stored header of a record whose payload waits for its subject's schema: the subject.
pub const PENDING_HEADER: &str = "edgegate-schema-pending";
/// Beside [`PENDING_HEADER`], the type of schema the record waits for, when not Avro (records
/// stored before JSON Schema was supported have none): the registry's name, `JSON` or
/// `PROTOBUF`.
pub const PENDING_TYPE_HEADER: &str = "edgegate-schema-pending-type";
/// Beside [`PENDING_HEADER`], the Protobuf message the record waits to be encoded as, when
/// its route names one (without it, the schema's first message).
pub const PENDING_MESSAGE_HEADER: &str = "edgegate-schema-pending-message";

/// Whether `key` is one of the headers that mark a pending record (removed once encoded).
pub fn is_pending_header(key: &str) -> bool {
    key == PENDING_HEADER || key == PENDING_TYPE_HEADER || key == PENDING_MESSAGE_HEADER
}

/// A subject's schema as the gateway uses it.
struct Known {
    entry: Entry,
    encoder: Encoder,
}

/// What encodes by a schema, per its type.
enum Encoder {
    Avro(avro::Writer),
    Json(jsonschema::Validator),
    Protobuf(protobuf::Schema),
}

impl Encoder {
    /// The encoder of `entry`'s schema; why it cannot be one.
    fn new(entry: &Entry) -> Result<Encoder, String> {
        match entry.schema_type {
            SchemaType::Avro => Schema::parse_str(&entry.schema)
                .map(|s| Encoder::Avro(avro::Writer::new(s)))
                .map_err(|e| e.to_string()),
            SchemaType::Json => {
                let schema: serde_json::Value =
                    serde_json::from_str(&entry.schema).map_err(|e| format!("not JSON: {e}"))?;
                jsonschema::validator_for(&schema)
                    .map(Encoder::Json)
                    .map_err(|e| e.to_string())
            }
            SchemaType::Protobuf => protobuf::Schema::compile(&entry.schema).map(Encoder::Protobuf),
        }
    }

    /// `payload` (JSON) framed for Kafka with schema `id` (as Protobuf `message`, when the
    /// schema is Protobuf and the route names one).
    fn encode(&self, id: u32, message: Option<&str>, payload: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Encoder::Protobuf(schema) => schema.encode(id, message, payload),
            Encoder::Avro(writer) => writer.encode(id, payload).map_err(|e| e.to_string()),
            Encoder::Json(validator) => {
                let value: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| format!("the payload is not JSON: {e}"))?;
                let errors: Vec<String> = validator
                    .iter_errors(&value)
                    .take(3)
                    .map(|e| {
                        let at = e.instance_path().to_string();
                        let at = if at.is_empty() { "/".into() } else { at };
                        format!("at {at}: {e}")
                    })
                    .collect();
                if !errors.is_empty() {
                    return Err(format!(
                        "the payload does not match JSON Schema {id}: {}",
                        errors.join("; ")
                    ));
                }
                let mut framed = Vec::with_capacity(5 + payload.len());
                framed.push(0);
                framed.extend_from_slice(&id.to_be_bytes());
                framed.extend_from_slice(payload);
                Ok(framed)
            }
        }
    }
}

/// What became of one payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// Framed for Kafka.
    Done(Bytes),
    /// The subject's schema is not known yet: the payload waits.
    Pending,
    /// It cannot match: why.
    Invalid(String),
}

/// The schemas of the registry's subjects in use. Shared by ingest and the forwarder.
pub struct Registry {
    known: RwLock<HashMap<String, Arc<Known>>>,
    /// Every subject a route has asked for (and those in the cache): what [`Registry::run`]
    /// keeps fresh.
    wanted: Mutex<BTreeSet<String>>,
    /// A subject was asked for that is not known.
    wake: Notify,
    /// The cache file; `None` keeps the cache in memory only (tests).
    path: Option<PathBuf>,
    /// [`Registry::run`] learns subjects from a configured registry. Without one, a subject
    /// not in the cache is never learnt: its records are marked invalid rather than left
    /// waiting, which would hold every record behind them for good.
    learns: AtomicBool,
}

impl Registry {
    /// A registry whose cache is the file at `path`, loaded now. A damaged file is set aside
    /// and logged, never an error: the registry is asked again.
    pub fn open(path: PathBuf) -> Registry {
        let (entries, damaged) = cache::load(&path);
        if let Some(why) = damaged {
            tracing::warn!(path = %path.display(), why, "The schema cache is damaged; starting without it (the registry is asked again).");
        }
        let registry = Registry::in_memory();
        for (subject, entry) in entries {
            if let Err(e) = registry.learn(&subject, entry) {
                tracing::warn!(subject, error = %e, "A cached schema does not parse; asking the registry again.");
            }
            registry.want(&subject);
        }
        Registry {
            path: Some(path),
            learns: AtomicBool::new(false),
            ..registry
        }
    }

    /// Says that [`Registry::run`] keeps the subjects fresh from a configured registry.
    pub fn will_learn(&self) {
        self.learns.store(true, Ordering::Relaxed);
    }

    pub fn in_memory() -> Registry {
        Registry {
            known: RwLock::default(),
            wanted: Mutex::default(),
            wake: Notify::new(),
            path: None,
            learns: AtomicBool::new(true),
        }
    }

    /// Encodes JSON `payload` with the latest known schema of `subject`, which must be of
    /// type `kind`.
    pub fn encode(&self, subject: &str, kind: SchemaType, payload: &[u8]) -> Encoded {
        self.encode_as(subject, kind, None, payload)
    }

    /// [`Registry::encode`], as Protobuf message `message` when the schema is Protobuf (its
    /// first message when `None`).
    pub fn encode_as(
        &self,
        subject: &str,
        kind: SchemaType,
        message: Option<&str>,
        payload: &[u8],
    ) -> Encoded {
        let known = self.known.read().ok().and_then(|k| k.get(subject).cloned());
        let Some(known) = known else {
            if !self.learns.load(Ordering::Relaxed) {
                return Encoded::Invalid(format!(
                    "no schema of subject {subject} is known, and without [schema_registry] none can be learnt"
                ));
            }
            self.want(subject);
            return Encoded::Pending;
        };
        if known.entry.schema_type != kind {
            return Encoded::Invalid(format!(
                "the latest schema of subject {subject} (id {}) is {}; a {} route needs {}",
                known.entry.id,
                known.entry.schema_type.name(),
                kind.format(),
                kind.name()
            ));
        }
        match known.encoder.encode(known.entry.id, message, payload) {
            Ok(framed) => Encoded::Done(Bytes::from(framed)),
            Err(why) => Encoded::Invalid(why),
        }
    }

    /// The id of the schema in force for `subject`, if known.
    pub fn schema_id(&self, subject: &str) -> Option<u32> {
        let known = self.known.read().ok()?;
        known.get(subject).map(|k| k.entry.id)
    }

    /// Asks [`Registry::run`] to keep `subject` known (at once, if it is not).
    pub fn want(&self, subject: &str) {
        let Ok(mut wanted) = self.wanted.lock() else {
            return;
        };
        if !wanted.contains(subject) {
            wanted.insert(subject.to_owned());
            self.wake.notify_one();
        }
    }

    /// Takes `entry` as `subject`'s schema in force; true when it changed. A schema that
    /// does not parse (or compile, for JSON Schema) is refused: why.
    pub fn learn(&self, subject: &str, entry: Entry) -> Result<bool, String> {
        if let Ok(known) = self.known.read() {
            if known.get(subject).is_some_and(|k| k.entry == entry) {
                return Ok(false);
            }
        }
        let encoder = Encoder::new(&entry)?;
        if let Ok(mut known) = self.known.write() {
            known.insert(subject.to_owned(), Arc::new(Known { entry, encoder }));
        }
        Ok(true)
    }

    fn snapshot(&self) -> BTreeMap<String, Entry> {
        self.known
            .read()
            .map(|k| {
                k.iter()
                    .map(|(s, known)| (s.clone(), known.entry.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keeps the wanted subjects' schemas fresh from the registry in force in `upstream`:
    /// every `refresh`, at once when a subject is wanted that is not known, every few seconds
    /// while one is still unknown, and at once when a reload changes the registry. Without a
    /// registry (none configured, or removed by a reload) it only waits for one.
    pub async fn run(self: Arc<Self>, mut upstream: Live<Upstream>, shutdown: CancellationToken) {
        loop {
            let current = upstream.current();
            self.learns
                .store(current.client.is_some(), Ordering::Relaxed);
            let wait = match &current.client {
                Some(client) => {
                    let subjects: Vec<String> = self
                        .wanted
                        .lock()
                        .map(|w| w.iter().cloned().collect())
                        .unwrap_or_default();
                    let (registry, client) = (self.clone(), client.clone());
                    let all_known =
                        tokio::task::spawn_blocking(move || registry.refresh(&client, &subjects))
                            .await
                            .unwrap_or(false);
                    if all_known {
                        current.refresh
                    } else {
                        current.refresh.min(Duration::from_secs(2))
                    }
                }
                None => Duration::MAX,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait.min(Duration::from_secs(86_400))) => {}
                _ = self.wake.notified() => {}
                _ = upstream.changed() => {}
            }
        }
    }

    /// Reads the latest version of each of `subjects`; stores the cache if anything changed.
    /// True when every subject is known afterwards.
    fn refresh(&self, client: &Client, subjects: &[String]) -> bool {
        let mut changed = false;
        let mut all_known = true;
        for subject in subjects {
            match client.latest(subject) {
                Ok(entry) => {
                    let (id, version) = (entry.id, entry.version);
                    match self.learn(subject, entry) {
                        Ok(true) => {
                            changed = true;
                            tracing::info!(subject, id, version, "Using a new schema version.");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(subject, id, error = %e, "The registry's schema does not parse; keeping the one in use.");
                        }
                    }
                }
                Err(e) => {
                    let level_warn = matches!(e, FetchError::Invalid(_));
                    if level_warn {
                        tracing::warn!(subject, error = %e, "Cannot read the subject's latest schema.");
                    } else {
                        tracing::debug!(subject, error = %e, "Cannot read the subject's latest schema.");
                    }
                    metrics::counter!("edgegate_schema_registry_errors_total").increment(1);
                }
            }
            all_known &= self.schema_id(subject).is_some();
        }
        if changed {
            if let Some(path) = &self.path {
                if let Err(e) = cache::store(path, &self.snapshot()) {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot store the schema cache; the schemas stay in memory.");
                }
            }
        }
        all_known
    }
}

/// A payload of an `avro` or `json_schema` route that does not match its schema: counted and
/// logged here, at ingest or when the forwarder encodes a pending record.
pub fn invalid(record: &crate::record::Record, kind: SchemaType, why: &str) {
    metrics::counter!("edgegate_format_errors_total", "format" => kind.format()).increment(1);
    tracing::warn!(device = %record.device, topic = %record.origin, error = why, "A payload does not match its schema; it goes to the dead-letter log.");
}

/// HELP text of the registry's metrics.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "edgegate_schema_registry_errors_total",
        "Failed reads of a subject's latest schema from the schema registry (unreachable, no such subject, an invalid answer)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#;
    const V2: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},
        {"name":"b","type":"string","default":"x"}]}"#;

    fn entry(id: u32, version: i32, schema: &str) -> Entry {
        Entry {
            id,
            version,
            schema: schema.into(),
            schema_type: SchemaType::Avro,
        }
    }

    #[test]
    fn an_unknown_subject_is_pending_and_wanted() {
        let r = Registry::in_memory();
        assert_eq!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":1}"#),
            Encoded::Pending
        );
        assert!(r.wanted.lock().unwrap().contains("t-value"));
        assert!(r.learn("t-value", entry(1, 1, V1)).unwrap());
        assert!(!r.learn("t-value", entry(1, 1, V1)).unwrap());
        assert_eq!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":1}"#),
            Encoded::Done(Bytes::from_static(&[0, 0, 0, 0, 1, 2]))
        );
        assert!(matches!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":"one"}"#),
            Encoded::Invalid(_)
        ));
    }

    #[test]
    fn a_new_version_is_used_from_then_on() {
        let r = Registry::in_memory();
        r.learn("t-value", entry(1, 1, V1)).unwrap();
        assert!(r.learn("t-value", entry(2, 2, V2)).unwrap());
        assert_eq!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":1,"b":"y"}"#),
            Encoded::Done(Bytes::from_static(&[0, 0, 0, 0, 2, 2, 2, b'y']))
        );
        // A version that does not parse is refused; the one in force stays.
        assert!(r.learn("t-value", entry(3, 3, "{nope")).is_err());
        assert_eq!(r.schema_id("t-value"), Some(2));
    }

    #[test]
    fn the_cache_file_brings_the_schemas_back_and_damage_does_not_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = cache::path(dir.path());
        let mut subjects = BTreeMap::new();
        subjects.insert("t-value".to_owned(), entry(5, 1, V1));
        subjects.insert("bad-value".to_owned(), entry(6, 1, "{nope"));
        cache::store(&path, &subjects).unwrap();
        let r = Registry::open(path.clone());
        assert_eq!(r.schema_id("t-value"), Some(5));
        assert_eq!(r.schema_id("bad-value"), None);
        // Both are wanted: the unknown one is asked for again.
        assert_eq!(r.wanted.lock().unwrap().len(), 2);
        std::fs::write(&path, b"{\"version\":1,\"subj").unwrap();
        let r = Registry::open(path);
        r.will_learn();
        assert_eq!(r.schema_id("t-value"), None);
        assert_eq!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":1}"#),
            Encoded::Pending
        );
    }

    #[test]
    fn without_a_registry_an_unknown_subject_is_invalid_not_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = cache::path(dir.path());
        let mut subjects = BTreeMap::new();
        subjects.insert("t-value".to_owned(), entry(5, 1, V1));
        cache::store(&path, &subjects).unwrap();
        // No [schema_registry]: what the cache knows still encodes; nothing else waits.
        let r = Registry::open(path);
        assert!(matches!(
            r.encode("t-value", SchemaType::Avro, br#"{"a":1}"#),
            Encoded::Done(_)
        ));
        match r.encode("u-value", SchemaType::Avro, br#"{"a":1}"#) {
            Encoded::Invalid(why) => assert!(why.contains("[schema_registry]"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    const JSON_V1: &str = r#"{"type":"object","properties":{"a":{"type":"integer"},
        "tags":{"type":"array","items":{"type":"string"}}},"required":["a"]}"#;

    fn json_entry(id: u32, schema: &str) -> Entry {
        Entry {
            schema_type: SchemaType::Json,
            ..entry(id, 1, schema)
        }
    }

    #[test]
    fn json_schema_payloads_are_validated_and_framed_as_they_came() {
        let r = Registry::in_memory();
        assert_eq!(
            r.encode("j-value", SchemaType::Json, br#"{"a":1}"#),
            Encoded::Pending
        );
        assert!(r.learn("j-value", json_entry(9, JSON_V1)).unwrap());
        let payload = br#"{ "a": 7, "tags": ["x"] }"#;
        let mut framed = vec![0, 0, 0, 0, 9];
        framed.extend_from_slice(payload);
        assert_eq!(
            r.encode("j-value", SchemaType::Json, payload),
            Encoded::Done(Bytes::from(framed))
        );
        match r.encode("j-value", SchemaType::Json, br#"{"tags":["x",3]}"#) {
            Encoded::Invalid(why) => {
                assert!(
                    why.starts_with("the payload does not match JSON Schema 9: "),
                    "{why}"
                );
                assert!(why.contains("at /tags/1"), "{why}");
                assert!(why.contains("\"a\" is a required property"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        r.learn(
            "k-value",
            json_entry(7, r#"{"properties":{"kwh":{"minimum":0}}}"#),
        )
        .unwrap();
        assert_eq!(
            r.encode("k-value", SchemaType::Json, br#"{"kwh":-1.0}"#),
            Encoded::Invalid(
                "the payload does not match JSON Schema 7: at /kwh: -1.0 is less than the minimum of 0"
                    .into()
            )
        );
        match r.encode("j-value", SchemaType::Json, b"{nope") {
            Encoded::Invalid(why) => assert!(why.contains("not JSON"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    const PROTO_V1: &str = r#"syntax = "proto3"; package iot;
        message Reading { string device = 1; double temp = 2; }
        message Alarm { string text = 1; }"#;

    #[test]
    fn protobuf_payloads_are_encoded_as_the_routes_message() {
        let r = Registry::in_memory();
        assert_eq!(
            r.encode_as("p-value", SchemaType::Protobuf, None, br#"{"device":"d"}"#),
            Encoded::Pending
        );
        let v1 = Entry {
            schema_type: SchemaType::Protobuf,
            ..entry(12, 1, PROTO_V1)
        };
        assert!(r.learn("p-value", v1).unwrap());
        // The first message: indexes [0] as one byte, then field 1 "d".
        assert_eq!(
            r.encode_as("p-value", SchemaType::Protobuf, None, br#"{"device":"d"}"#),
            Encoded::Done(Bytes::from_static(&[0, 0, 0, 0, 12, 0, 10, 1, b'd']))
        );
        // The second: indexes [1].
        assert_eq!(
            r.encode_as(
                "p-value",
                SchemaType::Protobuf,
                Some("iot.Alarm"),
                br#"{"text":"t"}"#
            ),
            Encoded::Done(Bytes::from_static(&[0, 0, 0, 0, 12, 2, 2, 10, 1, b't']))
        );
        match r.encode_as("p-value", SchemaType::Protobuf, None, br#"{"temp":"hot"}"#) {
            Encoded::Invalid(why) => assert!(
                why.starts_with(
                    "the payload does not match message iot.Reading of Protobuf schema 12: at temp: "
                ),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        // An Avro route on a Protobuf subject, and a .proto that does not compile.
        match r.encode("p-value", SchemaType::Avro, br#"{"device":"d"}"#) {
            Encoded::Invalid(why) => {
                assert!(
                    why.contains("is PROTOBUF; a avro route needs AVRO"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        let broken = Entry {
            schema_type: SchemaType::Protobuf,
            ..entry(13, 2, "message {")
        };
        assert!(r.learn("p-value", broken).is_err());
        assert_eq!(r.schema_id("p-value"), Some(12));
    }

    #[test]
    fn a_subject_of_the_other_schema_type_is_a_mismatch_and_a_bad_schema_is_refused() {
        let r = Registry::in_memory();
        r.learn("t-value", entry(1, 1, V1)).unwrap();
        match r.encode("t-value", SchemaType::Json, br#"{"a":1}"#) {
            Encoded::Invalid(why) => {
                assert!(
                    why.contains("is AVRO; a json_schema route needs JSON"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        r.learn("j-value", json_entry(2, JSON_V1)).unwrap();
        assert!(matches!(
            r.encode("j-value", SchemaType::Avro, br#"{"a":1}"#),
            Encoded::Invalid(_)
        ));
        assert!(r.learn("j-value", json_entry(3, "{nope")).is_err());
        assert!(
            r.learn("j-value", json_entry(4, r#"{"type":"no-such-type"}"#))
                .is_err()
        );
        assert_eq!(r.schema_id("j-value"), Some(2));
    }
}
