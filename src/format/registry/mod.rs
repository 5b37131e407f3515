//! Schema-registry formats: `format = "avro"` routes encode JSON device payloads with the
//! latest schema of their subject in a Confluent-compatible registry, in the Confluent wire
//! format (magic byte 0, schema id, Avro body).
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use cache::Entry;
use client::{Client, FetchError};

/// The stored header of a record whose payload waits for its subject's schema: the subject.
pub const PENDING_HEADER: &str = "edgegate-schema-pending";

/// A subject's schema as the gateway uses it.
struct Known {
    entry: Entry,
    writer: avro::Writer,
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

    /// Encodes JSON `payload` with the latest known schema of `subject`.
    pub fn encode(&self, subject: &str, payload: &[u8]) -> Encoded {
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
        match known.writer.encode(known.entry.id, payload) {
            Ok(framed) => Encoded::Done(Bytes::from(framed)),
            Err(e) => Encoded::Invalid(e.to_string()),
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

    /// Takes `entry` as `subject`'s schema in force; true when it changed.
    pub fn learn(&self, subject: &str, entry: Entry) -> Result<bool, apache_avro::Error> {
        if let Ok(known) = self.known.read() {
            if known.get(subject).is_some_and(|k| k.entry == entry) {
                return Ok(false);
            }
        }
        let schema = Schema::parse_str(&entry.schema)?;
        if let Ok(mut known) = self.known.write() {
            let writer = avro::Writer::new(schema);
            known.insert(subject.to_owned(), Arc::new(Known { entry, writer }));
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

    /// Keeps the wanted subjects' schemas fresh: every `refresh`, at once when a subject is
    /// wanted that is not known, and every few seconds while one is still unknown.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        refresh: Duration,
        shutdown: CancellationToken,
    ) {
        let retry = refresh.min(Duration::from_secs(2));
        loop {
            let subjects: Vec<String> = self
                .wanted
                .lock()
                .map(|w| w.iter().cloned().collect())
                .unwrap_or_default();
            let (registry, client2) = (self.clone(), client.clone());
            let all_known =
                tokio::task::spawn_blocking(move || registry.refresh(&client2, &subjects))
                    .await
                    .unwrap_or(false);
            let wait = if all_known { refresh } else { retry };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
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

/// A payload of an `avro` route that does not match its schema: counted and logged here,
/// at ingest or when the forwarder encodes a pending record.
pub fn invalid(record: &crate::record::Record, why: &str) {
    metrics::counter!("edgegate_format_errors_total", "format" => "avro").increment(1);
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
        }
    }

    #[test]
    fn an_unknown_subject_is_pending_and_wanted() {
        let r = Registry::in_memory();
        assert_eq!(r.encode("t-value", br#"{"a":1}"#), Encoded::Pending);
        assert!(r.wanted.lock().unwrap().contains("t-value"));
        assert!(r.learn("t-value", entry(1, 1, V1)).unwrap());
        assert!(!r.learn("t-value", entry(1, 1, V1)).unwrap());
        assert_eq!(
            r.encode("t-value", br#"{"a":1}"#),
            Encoded::Done(Bytes::from_static(&[0, 0, 0, 0, 1, 2]))
        );
        assert!(matches!(
            r.encode("t-value", br#"{"a":"one"}"#),
            Encoded::Invalid(_)
        ));
    }

    #[test]
    fn a_new_version_is_used_from_then_on() {
        let r = Registry::in_memory();
        r.learn("t-value", entry(1, 1, V1)).unwrap();
        assert!(r.learn("t-value", entry(2, 2, V2)).unwrap());
        assert_eq!(
            r.encode("t-value", br#"{"a":1,"b":"y"}"#),
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
        assert_eq!(r.encode("t-value", br#"{"a":1}"#), Encoded::Pending);
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
            r.encode("t-value", br#"{"a":1}"#),
            Encoded::Done(_)
        ));
        match r.encode("u-value", br#"{"a":1}"#) {
            Encoded::Invalid(why) => assert!(why.contains("[schema_registry]"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
