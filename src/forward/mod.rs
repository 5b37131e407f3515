//! The Kafka forwarder: drains the durable log to Kafka, in order, with adaptive batching.
//!
//! ```text
//! LogReader --read_batch--> Worker --send--> librdkafka (idempotent, acks=all) --> Kafka
//!     ^                       |  in_flight: seq -> record, until finished
//!     +-------- ack(seq) -----+<-- delivery reports (channel) <-- ForwardContext
//!                             +--> dead-letter Log (records Kafka refuses for good)
//! ```
//!
//! Files: [`config`] (`[kafka]`), [`security`] (`[kafka.tls]`, `[kafka.sasl]`, secrets, the
//! preflight check), `worker` (the task), `window` (adaptive window and back-off),
//! `classify` (what a Kafka error means for a record), `context` (librdkafka callbacks:
//! delivery reports, link state, log lines), `record` (headers), [`dead_letter`] (the
//! dead-letter log: where, how big, the form of its records), `metric` (every metric, one
//! function per event).
//!
//! # Guarantees and how they are kept
//!
//! **Delete after Kafka.** A record read from the log stays in the worker's `in_flight` map
//! until Kafka acknowledged it (`acks=all`) or its dead-letter copy is durable; only then is
//! it acked in the log, at the end of the loop turn that finished it, consecutive sequence
//! numbers as one range (one lock of the log's bookkeeping per run of a Kafka batch). Anything
//! unfinished at shutdown or crash is still in the log and is read again at the next start.
//!
//! **Order.** The idempotent producer keeps the records of a partition in order across its
//! own retries — as long as no record fails *out* of its queue. That is why
//! `message.timeout.ms` is 0 (infinite) and retries are unlimited, and why
//! `[kafka.properties]` cannot change either: a retriable error (broker down, leader change,
//! not enough replicas, request timeout) is retried inside librdkafka, in order, forever; it
//! never surfaces to us, so we never re-send a record behind a newer one of the same key. Our
//! own `delivery_timeout` is only an alarm (log line, smaller window), not a give-up.
//! Records are handed to librdkafka in sequence order; when librdkafka refuses one at
//! enqueue (queue full), it and everything after it wait in `resend` and nothing new is read
//! until they are all in, in order. After a crash the log replays from its head in sequence
//! order, so per partition the first copy of every record is in order (re-sends are
//! duplicates with the same `edgegate-record-id`).
//!
//! **Permanent errors never block the queue.** A delivery report with an error means
//! librdkafka gave up for a reason retrying cannot fix (see `classify`):
//! * the topic is unknown or not authorized → the record goes to the dead-letter log;
//! * the broker rejected the *batch* for a record-level reason (`MESSAGE_TOO_LARGE` against
//!   the topic's `max.message.bytes`, `INVALID_RECORD`, `INVALID_TIMESTAMP`) → Kafka does not
//!   say which record, so each record of the batch is sent again *alone* through a second
//!   producer with one record per batch; only a record that fails alone is dead-lettered.
//!   This is the one case where per-key order can bend: the innocent records of a rejected
//!   batch land after later records of the same key that were already queued. It needs a
//!   topic limit below the producer's batch size; keep `batch_max_bytes` at or below the
//!   topics' `max.message.bytes` (records too large for librdkafka's own
//!   `message.max.bytes` are refused at enqueue, alone, without any reordering);
//! * the producer itself is broken (fatal idempotence error, fenced) → it is rebuilt and
//!   every unfinished record is sent again in sequence order.
//!
//! The dead-letter record is the original one plus `edgegate-error` and
//! `edgegate-failed-seq` headers, in a second log under `<buffer dir>/dead-letter`.
//!
//! **Adaptive batching.** Live traffic: each read returns the few records waiting and they
//! are sent at once; librdkafka's short `linger` is the only delay. Backlog: reads fill the
//! window, librdkafka's queue stays deep and its batches fill to `batch_max_records` /
//! `batch_max_bytes`. The window (records and bytes in flight) starts small, doubles with
//! each cleanly delivered window up to `max_in_flight_*`, halves on trouble (a stall longer
//! than `delivery_timeout`, librdkafka refusing records, a rebuilt producer); our re-sends
//! back off exponentially with jitter, and librdkafka's own retries use the same bounds
//! (`retry.backoff.*`; reconnects `reconnect.backoff.*` up to `reconnect_backoff_max`, 1 s by
//! default, so a returning broker is found at once; jittered by librdkafka). One INFO
//! line is logged when the window changes materially (mode flip, 4× step, a bound).
//! librdkafka's queue is capped (`queue.buffering.max.*`) at twice the largest window, so
//! memory stays flat however large the backlog on disk.
//!
//! **Memory.** A record in flight costs about 1 KiB (our `Record`, librdkafka's copy with a
//! header list, bookkeeping), so the window counts that weight, not payload bytes, and the
//! log counts each read by the same weight: a read takes no more than the window has free
//! (before 2026-12-07 it counted payload bytes and a record count derived from the lightest
//! possible record, and small records with headers went 30 % over). With the default
//! 4 MiB window a 1,000,000-record backlog drains at about 200,000 records/s to a local
//! broker with about 30 MiB of resident memory for the drain.
//!
//! **Kafka timestamps are receive times.** A record that waited in the log longer than its
//! topic's `retention.ms` is deleted by Kafka soon after it arrives (retention goes by
//! record timestamp). That is the contract's choice of timestamp, not a forwarder loss; size
//! retention for the longest outage a gateway may ride out.
//!
//! **Why `ThreadedProducer` and a custom context, not `FutureProducer`.** A
//! `FutureProducer` allocates a oneshot per record and copies every failed *and* delivered
//! message into an `OwnedMessage` for its future. We need neither: the worker already holds
//! the record (for re-sends and the dead-letter copy), so the delivery callback only sends
//! `(seq, attempt, result)` through one channel. The same context receives librdkafka's
//! error callback and statistics, which drive the link state.
//!
//! **Cancel-safe reads.** The task `select!`s over the log read and the delivery reports and
//! drops a pending read when a report arrives; `LogReader::read_batch` only awaits the
//! log's visibility watch and reads synchronously, so a dropped read loses nothing.
//!
//! **Link state** is Up once a broker connection is up (statistics) or a record is
//! delivered, Down when librdkafka reports all brokers down or a transport/authentication
//! failure; each transition is logged once (WARN down with the reason, INFO up).

pub mod config;
pub mod security;

mod classify;
mod context;
pub mod dead_letter;
mod liveness;
pub(crate) mod metric;
mod persisted;
mod rebootstrap;
mod record;
pub mod transactional;
mod window;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Log, LogReader};
use crate::config::problems::Problems;
use crate::format::registry::Registry;
use config::KafkaConfig;
pub use dead_letter::{ERROR as HEADER_ERROR, FAILED_SEQ as HEADER_FAILED_SEQ};
pub use record::{
    DEVICE as HEADER_DEVICE, ORIGIN as HEADER_ORIGIN, RECEIVED_MS as HEADER_RECEIVED_MS,
    RECORD_ID as HEADER_RECORD_ID, SOURCE as HEADER_SOURCE, record_id,
};

/// Whether the gateway can reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Down,
}

/// What the forwarder has done, for status lines and the systemd watchdog.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Records delivered to Kafka since start.
    pub delivered: u64,
    /// Records moved to the dead-letter log since start.
    pub dead_lettered: u64,
    /// Records read from the log and not yet finished.
    pub in_flight: usize,
    /// Kafka answers but the producer delivers nothing (see `liveness`); cleared by the next
    /// delivery.
    pub stalled: bool,
    /// Kafka answers, but the partition of the oldest record in flight has fewer in-sync
    /// replicas than `min.insync.replicas`, so it refuses every write (found by the liveness
    /// probe); cleared by the next delivery.
    pub short_of_replicas: bool,
    pub last_delivery: Option<std::time::Instant>,
    /// Refreshed twice a second while the forwarder's loop runs, whatever Kafka does: the
    /// watchdog pings on this, so an outage does not get the gateway restarted. It stops
    /// when a stall outlives the rebuild that was to cure it.
    pub heartbeat: Option<std::time::Instant>,
}

/// A handle on the reason of the forwarder's last outage or fatal error.
#[derive(Clone)]
pub struct LastError(Arc<context::LinkTracker>);

impl LastError {
    pub fn get(&self) -> Option<String> {
        self.0.last_error()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("invalid [kafka] configuration: {0}")]
    Config(String),
    #[error("cannot create the Kafka producer: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    #[error("cannot read or write the log's identity in {dir}: {source}")]
    Identity {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Shutdown grace used unless [`Forwarder::with_shutdown_grace`] says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The forwarding task of the configured delivery mode.
enum Engine {
    AtLeastOnce(Box<worker::Worker<LogReader, Log>>),
    ExactlyOnce(Box<transactional::Transactional<LogReader, Log>>),
}

/// The forwarder, built but not started.
pub struct Forwarder {
    engine: Engine,
    link: Arc<context::LinkTracker>,
    progress: watch::Receiver<Progress>,
}

impl Forwarder {
    /// Checks the configuration and prepares the producer's settings. No network, no
    /// threads: the producer is created when [`Forwarder::run`] starts.
    /// `log_dir` is the main log's directory (where exactly-once keeps the log's identity).
    pub fn new(
        cfg: &KafkaConfig,
        gateway_id: &str,
        log_dir: &std::path::Path,
        reader: LogReader,
        dead_letter: Log,
    ) -> Result<Forwarder, ForwardError> {
        let mut problems = Problems::default();
        cfg.validate("kafka", &mut problems);
        if !problems.is_empty() {
            let text: Vec<String> = problems
                .0
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect();
            return Err(ForwardError::Config(text.join("; ")));
        }
        for (key, warning) in cfg.warnings("kafka") {
            tracing::warn!(setting = %key, "Unwise Kafka security setting: {key} {warning}.");
        }
        let client_config = cfg
            .client_config(gateway_id)
            .map_err(|e| ForwardError::Config(e.to_string()))?;
        client_config
            .create_native_config()
            .map_err(ForwardError::Client)?;
        let link = Arc::new(context::LinkTracker::new());
        let (progress_tx, progress) = watch::channel(Progress::default());
        let settings = worker::Settings {
            grace: DEFAULT_GRACE,
            delivery_timeout: cfg.delivery_timeout.get(),
            backoff_min: cfg.retry_backoff_min.get(),
            backoff_max: cfg.retry_backoff_max.get(),
            max_in_flight_records: cfg.max_in_flight_records,
            max_in_flight_bytes: usize::try_from(cfg.max_in_flight_bytes.get())
                .unwrap_or(usize::MAX),
            stall_timeout: cfg.stall_timeout.get(),
            brokers: cfg.brokers.join(","),
        };
        let engine = match cfg.delivery {
            config::Delivery::AtLeastOnce => Engine::AtLeastOnce(Box::new(worker::Worker::new(
                settings,
                gateway_id,
                reader,
                dead_letter,
                client_config,
                link.clone(),
                progress_tx,
            ))),
            config::Delivery::ExactlyOnce => {
                let log_id = transactional::log_identity(log_dir).map_err(|source| {
                    ForwardError::Identity {
                        dir: log_dir.to_owned(),
                        source,
                    }
                })?;
                let txn = transactional::TxnSettings {
                    interval: cfg.transaction_interval.get(),
                    positions_topic: cfg.positions_topic.clone(),
                    group: config::positions_group(gateway_id),
                    log_id,
                    gateway_id: gateway_id.into(),
                };
                Engine::ExactlyOnce(Box::new(transactional::Transactional::new(
                    settings,
                    txn,
                    reader,
                    dead_letter,
                    client_config,
                    link.clone(),
                    progress_tx,
                )))
            }
        };
        Ok(Forwarder {
            engine,
            link,
            progress,
        })
    }

    /// The schemas of `avro` routes, for the records ingest stored before their schema was
    /// known (`format::registry`): encoded when sent, or waited for.
    pub fn with_schemas(mut self, schemas: Arc<Registry>) -> Forwarder {
        match &mut self.engine {
            Engine::AtLeastOnce(w) => w.set_schemas(schemas),
            Engine::ExactlyOnce(t) => t.set_schemas(schemas),
        }
        self
    }

    /// How long [`Forwarder::run`] waits for in-flight deliveries after shutdown.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Forwarder {
        match &mut self.engine {
            Engine::AtLeastOnce(w) => w.set_grace(grace),
            Engine::ExactlyOnce(t) => t.set_grace(grace),
        }
        self
    }

    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The reason of the forwarder's last outage or fatal error, read when asked.
    pub fn last_error(&self) -> LastError {
        LastError(self.link.clone())
    }

    /// Forwards until `shutdown` is cancelled (or the log is closed), then stops reading,
    /// waits up to the grace period for in-flight deliveries and returns. Records not
    /// delivered by then stay in the log.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        match self.engine {
            Engine::AtLeastOnce(w) => w.run(shutdown).await,
            Engine::ExactlyOnce(t) => t.run(shutdown).await,
        }
    }
}
