//! The durable log. (Module header with the on-disk format and guarantees: to be written by
//! the implementation.)
//!
//! API CONTRACT (fixed; the rest of the gateway is written against it):
//!
//! * `Log::open(LogConfig)` recovers the directory and returns the log plus a report.
//! * `Log::append(&Record)` assigns the next sequence number and returns at once:
//!   `Err(AppendError::Full)` fails fast under `reject_new`; otherwise a [`Durable`] future
//!   that resolves to the record's sequence number once it is fsync'd (group commit).
//! * `Log::reader()` hands out the single reader (the forwarder). It reads in sequence order
//!   from the oldest unacknowledged record; `LogReader::ack` may be called out of order.
//! * `Log::pressure()` is a watch of the high/low watermark state for listeners.
//! * `Log::stats()` is a snapshot for metrics and status.
//! * `Log::close()` flushes, persists the cursor and stops the background thread.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Source {
    Mqtt = 1,
    Coap = 2,
}

/// One message as the pipeline stores it. Routing has already happened at ingest: the Kafka
/// topic and key are decided before the record is written, so a config reload never changes
/// where an already-acknowledged record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub source: Source,
    /// Receive time, milliseconds since the Unix epoch (becomes the Kafka timestamp).
    pub received_ms: i64,
    /// Device identity: MQTT client id or CoAP device id.
    pub device: String,
    /// The original MQTT topic or CoAP URI path.
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

/// A record read back from the log, with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub record: Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    RejectNew,
    DropOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync (sync_data) before an append resolves. The default.
    Fsync,
    /// No fsync: appends resolve once written to the OS. Loses data on power cut.
    None,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    pub overflow: Overflow,
    pub durability: Durability,
    /// Group commit: longest wait before an fsync once a record is pending.
    pub commit_delay: Duration,
    /// Group commit: pending bytes that trigger an fsync at once.
    pub commit_bytes: usize,
    /// Fractions of `max_bytes`: above `high_watermark` listeners pause reading; they resume
    /// below `low_watermark`.
    pub high_watermark: f64,
    pub low_watermark: f64,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            max_age: None,
            overflow: Overflow::RejectNew,
            durability: Durability::Fsync,
            commit_delay: Duration::from_millis(2),
            commit_bytes: 1 << 20,
            high_watermark: 0.9,
            low_watermark: 0.8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the log is closed")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log holds `max_bytes` and the policy is `reject_new`: tell the device "busy".
    #[error("the log is full")]
    Full,
    /// The record alone is larger than a segment can hold.
    #[error("record of {0} bytes is too large for the log")]
    TooLarge(usize),
    /// Writing or syncing failed (disk full, I/O error); nothing already stored is lost.
    #[error("log write failed: {0}")]
    Io(String),
    #[error("the log is closed")]
    Closed,
}

/// Whether listeners should stop reading from their sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    Normal,
    /// Above the high watermark (until it falls below the low one).
    High,
}

/// Damage found and repaired on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub torn_tail_bytes: u64,
    pub corrupt_records: u64,
    pub cursor_repaired: bool,
}

#[derive(Debug, Clone, Default)]
pub struct LogStats {
    pub records: u64,
    pub bytes: u64,
    pub oldest_age: Option<Duration>,
    pub segments: usize,
    pub next_seq: u64,
    pub head_seq: u64,
    pub dropped_records: u64,
    pub corrupt_records: u64,
    pub fsyncs: u64,
}

/// The durable log. Cheap to clone; all clones share one log.
#[derive(Clone)]
pub struct Log {
    _todo: (),
}

/// Resolves to the record's sequence number once the record is durable.
pub struct Durable {
    _todo: (),
}

impl std::future::Future for Durable {
    type Output = Result<u64, AppendError>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        todo!()
    }
}

/// The single reader (the forwarder's handle).
pub struct LogReader {
    _todo: (),
}

impl Log {
    /// Opens (creating if needed) and recovers the log in `config.dir`. Blocking I/O: call it
    /// at startup or from `spawn_blocking`.
    pub fn open(_config: LogConfig) -> Result<(Log, RecoveryReport), LogError> {
        todo!()
    }

    /// Assigns the next sequence number and queues the record for the next group commit.
    /// Fails fast with `Full` under `reject_new`.
    pub fn append(&self, _record: &Record) -> Result<Durable, AppendError> {
        todo!()
    }

    /// The single reader; `None` if it was already taken.
    pub fn reader(&self) -> Option<LogReader> {
        todo!()
    }

    pub fn pressure(&self) -> tokio::sync::watch::Receiver<Pressure> {
        todo!()
    }

    pub fn stats(&self) -> LogStats {
        todo!()
    }

    /// Commits everything pending, persists the cursor, stops the background thread.
    pub async fn close(&self) -> Result<(), LogError> {
        todo!()
    }
}

impl LogReader {
    /// Waits until at least one unread record is durable, then returns up to `max_records`
    /// records / `max_bytes` payload bytes (always at least one record) in sequence order.
    /// Returns `Err(LogError::Closed)` once the log is closed and everything was read.
    pub async fn read_batch(
        &mut self,
        _max_records: usize,
        _max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        todo!()
    }

    /// Marks one record as delivered. Acks may come in any order; the head advances over
    /// the contiguous acknowledged prefix and is persisted in the cursor file.
    pub fn ack(&self, _seq: u64) {
        todo!()
    }
}
