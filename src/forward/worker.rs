//! The forwarder task: read the log, hand records to librdkafka within the window, turn
//! delivery reports into log acks, dead-letter what can never be delivered.
//!
//! Every record read is held in `in_flight` until it is finished (delivered or
//! dead-lettered); only then is it acknowledged in the log. The map is what makes the rest
//! possible: re-sending after a rebuilt producer, isolating a record, dead-lettering the
//! original record, and shutting down knowing exactly what is left.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::classify::{self, Disposition};
use super::context::{ClientHealth, Delivery, ForwardContext, LinkTracker, Tag};
use super::liveness::{Liveness, Verdict};
use super::window::{Backoff, Window};
use super::{ForwardError, LinkState, Progress, dead_letter, metric, record};
use crate::buffer::{AppendError, Log, LogError, LogReader, StoredRecord};
use crate::record::Record;

/// Where the forwarder reads records from: the log's reader (or an in-memory stand-in in
/// unit tests).
pub trait RecordSource: Send + 'static {
    /// Waits for at least one record, then returns up to `max_records` records whose
    /// weights ([`record::weight`](super::record::weight)) come to at most `max_bytes` (one
    /// record alone may be over). Must be cancel-safe: the forwarder drops a pending read
    /// whenever a delivery report arrives, and nothing may be lost by that.
    fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, LogError>> + Send;
    fn ack(&self, seq: u64);
    /// Acknowledges every record with `start <= seq < end` that was read.
    fn ack_range(&self, start: u64, end: u64) {
        for seq in start..end {
            self.ack(seq);
        }
    }
}

impl RecordSource for LogReader {
    fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, LogError>> + Send {
        LogReader::read_batch_by(self, max_records, max_bytes, super::record::weight)
    }

    fn ack(&self, seq: u64) {
        LogReader::ack(self, seq);
    }

    fn ack_range(&self, start: u64, end: u64) {
        LogReader::ack_range(self, start, end);
    }
}

/// Where records Kafka refuses for good are kept: the dead-letter log.
pub trait DeadLetterSink: Clone + Send + Sync + 'static {
    /// Resolves once the record is durable.
    fn store(&self, record: Record) -> impl Future<Output = Result<(), AppendError>> + Send;
}

impl DeadLetterSink for Log {
    fn store(&self, record: Record) -> impl Future<Output = Result<(), AppendError>> + Send {
        let durable = self.append(&record);
        async move { durable?.await.map(|_| ()) }
    }
}

pub(super) type KafkaProducer = ThreadedProducer<ForwardContext>;

/// One producer instance and what its statistics say about it.
struct Instance {
    producer: KafkaProducer,
    health: Arc<ClientHealth>,
    /// The statistics report after which the bootstrap brokers were last added again.
    rebootstrapped_at: u64,
    /// Times the brokers were added again while the client stayed without any.
    rebootstraps_in_a_row: u32,
    /// Times the brokers were added again over the instance's life (librdkafka keeps a copy
    /// of each list added, so this is bounded by a rebuild).
    rebootstraps: u32,
}

/// Brokers added again this many times in a row without the client knowing one afterwards:
/// rebuild instead.
const MAX_REBOOTSTRAPS_IN_A_ROW: u32 = 3;
/// Brokers added again this many times over one instance's life: rebuild instead.
const MAX_REBOOTSTRAPS: u32 = 100;
/// How long a probe waits for a Metadata answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The oldest record in flight unreported this long, with the link up: ask whether its
/// partition is short of in-sync replicas (at most once per this interval). Not the liveness
/// watch's job: a producer retrying NOT_ENOUGH_REPLICAS keeps sending its batches, and
/// bytes moving count as progress there.
const REPLICA_CHECK_AFTER: Duration = Duration::from_secs(5);
/// How long a rebuild waits for the old producer's threads to finish.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do about a client that forgot every broker.
enum Orphan {
    Rebootstrapped,
    Rebuild,
}

impl Instance {
    /// Adds the bootstrap brokers again if the client has forgotten every broker (see
    /// [`ClientHealth::orphaned`]); once per statistics report, a few times in a row at
    /// most.
    fn heal_orphan(&mut self, brokers: &str) -> Option<Orphan> {
        if !self.health.orphaned() {
            self.rebootstraps_in_a_row = 0;
            return None;
        }
        let report = self.health.reports();
        if report <= self.rebootstrapped_at {
            return None;
        }
        if self.rebootstraps_in_a_row >= MAX_REBOOTSTRAPS_IN_A_ROW
            || self.rebootstraps >= MAX_REBOOTSTRAPS
        {
            return Some(Orphan::Rebuild);
        }
        self.rebootstrapped_at = report;
        self.rebootstraps_in_a_row += 1;
        self.rebootstraps += 1;
        let added = super::rebootstrap::add_brokers(self.producer.client(), brokers);
        Some(if added > 0 {
            Orphan::Rebootstrapped
        } else {
            Orphan::Rebuild
        })
    }
}

/// Numbers fixed at construction.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grace: Duration,
    pub delivery_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub max_in_flight_records: usize,
    pub max_in_flight_bytes: usize,
    /// See [`super::liveness`].
    pub stall_timeout: Duration,
    /// `bootstrap.servers`, to add again to a client that forgot every broker.
    pub brokers: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Handed to librdkafka; a delivery report for `attempt` will come.
    Sending,
    /// Waiting in `resend` for its turn.
    Queued,
    /// Being appended to the dead-letter log.
    DeadLettering,
}

struct Pending {
    record: Record,
    weight: usize,
    attempt: u32,
    /// Sent on its own (after its batch was rejected as a whole).
    alone: bool,
    state: State,
    sent_at: Instant,
}

pub struct Worker<S, D> {
    settings: Settings,
    gateway_id: Arc<str>,
    source: S,
    dead_letter: D,
    client_config: ClientConfig,
    /// The same configuration with one record per batch, for isolating a record whose
    /// batch the broker rejected.
    alone_config: ClientConfig,
    producer: Option<Instance>,
    alone_producer: Option<Instance>,
    /// The producer's configuration for a client of its own that asks the brokers for
    /// metadata when the producer looks stuck.
    probe_config: ClientConfig,
    probe_tx: mpsc::UnboundedSender<Probed>,
    probe_rx: mpsc::UnboundedReceiver<Probed>,
    liveness: Liveness,
    link: Arc<LinkTracker>,
    deliveries_tx: mpsc::UnboundedSender<Delivery>,
    deliveries_rx: mpsc::UnboundedReceiver<Delivery>,
    /// Sequence numbers whose dead-letter append is durable.
    dead_lettered_tx: mpsc::UnboundedSender<u64>,
    dead_lettered_rx: mpsc::UnboundedReceiver<u64>,
    dead_letter_tasks: TaskTracker,
    in_flight: BTreeMap<u64, Pending>,
    in_flight_bytes: usize,
    /// Records to send again, in sequence order. While it is not empty nothing new is
    /// read, so a re-sent record is never overtaken by a newer one from this side.
    resend: BTreeSet<u64>,
    resend_at: Option<Instant>,
    /// Topics Kafka said it does not know: their records are sent again for a while before
    /// they are dead-lettered (the brokers may be making the topic).
    unknown_topics: classify::UnknownTopics,
    /// A rebuild of the producer is due at this time.
    rebuild_at: Option<Instant>,
    window: Window,
    backoff: Backoff,
    /// A slow delivery was reported and no delivery has happened since.
    slow: bool,
    /// Main producer instances created so far (the first is 0).
    producers_created: u32,
    /// Records delivered since start (mirrored into `progress` and the delivered counter
    /// once per batch of reports).
    delivered: u64,
    /// A probe found the oldest record's partition below `min.insync.replicas`; cleared by
    /// the next delivery. Mirrored into `progress`.
    short_of_replicas: bool,
    /// A replica check (a probe not asked by the liveness watch) is running.
    replica_check_running: bool,
    /// No replica check before this.
    next_replica_check: Instant,
    progress: watch::Sender<Progress>,
    /// The per-record metrics' handles.
    deliveries: metric::Deliveries,
    /// Where each record's id and receive time are formatted for its headers.
    header_scratch: String,
    /// The schemas of `avro` routes, for records stored before theirs was known.
    schemas: Option<Arc<crate::format::registry::Registry>>,
    /// Finished records not yet acknowledged in the log: acknowledged at the end of the
    /// loop turn that finished them, consecutive ones as one range (one lock of the log's
    /// bookkeeping per run of a Kafka batch, not one per record).
    finished: Vec<u64>,
}

/// Calls `f(start, end)` for each run of consecutive numbers `start..end` in `sorted`.
pub(super) fn for_each_run(sorted: &[u64], mut f: impl FnMut(u64, u64)) {
    let mut run: Option<(u64, u64)> = None;
    for &seq in sorted {
        run = match run {
            Some((start, end)) if seq == end => Some((start, end + 1)),
            Some((start, end)) => {
                f(start, end);
                Some((seq, seq + 1))
            }
            None => Some((seq, seq + 1)),
        };
    }
    if let Some((start, end)) = run {
        f(start, end);
    }
}

/// A probe's outcome: when it started, and what the brokers said about the topic asked
/// about, or why they did not answer.
struct Probed {
    started: Instant,
    topic: String,
    /// Asked by the liveness watch (its verdict follows), or only to learn whether the
    /// partition is short of in-sync replicas.
    liveness: bool,
    result: Result<Answer, String>,
}

/// What a probe learned about the topic of the oldest record in flight.
#[derive(Debug, Default)]
pub(super) struct Answer {
    /// Partitions with a leader.
    pub leaders: usize,
    /// The first partition with fewer in-sync replicas than the topic's
    /// `min.insync.replicas`, described: the leader answers but refuses every `acks=all`
    /// write (NOT_ENOUGH_REPLICAS), which librdkafka retries without telling anyone.
    pub short_of_replicas: Option<String>,
}

enum Sent {
    Ok,
    /// librdkafka did not take it; later records must wait behind it.
    Blocked,
    /// Finished without Kafka (dead-lettered), or scheduled for a rebuild.
    Handled,
}

impl<S: RecordSource, D: DeadLetterSink> Worker<S, D> {
    pub fn new(
        settings: Settings,
        gateway_id: &str,
        source: S,
        dead_letter: D,
        client_config: ClientConfig,
        link: Arc<LinkTracker>,
        progress: watch::Sender<Progress>,
    ) -> Worker<S, D> {
        let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
        let (dead_lettered_tx, dead_lettered_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let mut probe_config = client_config.clone();
        // A plain client: no producer id to acquire, no statistics, named as the probe in
        // broker logs.
        let probe_id = format!(
            "{}-probe",
            client_config.get("client.id").unwrap_or("edgegate")
        );
        probe_config
            .set("enable.idempotence", "false")
            .set("statistics.interval.ms", "0")
            .set("client.id", probe_id);
        let liveness = Liveness::new(settings.stall_timeout, Instant::now());
        let mut alone_config = client_config.clone();
        alone_config
            .set("batch.num.messages", "1")
            .set("linger.ms", "0");
        let window = Window::new(settings.max_in_flight_records, settings.max_in_flight_bytes);
        let backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
        Worker {
            settings,
            gateway_id: Arc::from(gateway_id),
            source,
            dead_letter,
            client_config,
            alone_config,
            producer: None,
            alone_producer: None,
            probe_config,
            probe_tx,
            probe_rx,
            liveness,
            link,
            deliveries_tx,
            deliveries_rx,
            dead_lettered_tx,
            dead_lettered_rx,
            dead_letter_tasks: TaskTracker::new(),
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            resend: BTreeSet::new(),
            resend_at: None,
            unknown_topics: classify::UnknownTopics::default(),
            rebuild_at: None,
            window,
            backoff,
            slow: false,
            producers_created: 0,
            delivered: 0,
            short_of_replicas: false,
            replica_check_running: false,
            next_replica_check: Instant::now(),
            progress,
            deliveries: metric::Deliveries::new(),
            header_scratch: String::with_capacity(64),
            schemas: None,
            finished: Vec::with_capacity(1024),
        }
    }

    pub fn set_schemas(&mut self, schemas: Arc<crate::format::registry::Registry>) {
        self.schemas = Some(schemas);
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.settings.grace = grace;
    }

    fn create_producer(&mut self, alone: bool) -> Result<Instance, ForwardError> {
        let bootstrap = self.settings.brokers.split(',').filter(|b| !b.is_empty());
        let health = Arc::new(ClientHealth::new(bootstrap.count()));
        let context = ForwardContext {
            deliveries: self.deliveries_tx.clone(),
            link: self.link.clone(),
            health: health.clone(),
        };
        let config = if alone {
            &self.alone_config
        } else {
            &self.client_config
        };
        #[cfg(debug_assertions)]
        let faulty = if alone {
            None
        } else {
            crate::fault::producer_config(config, self.producers_created)
        };
        #[cfg(debug_assertions)]
        let config = faulty.as_ref().unwrap_or(config);
        let producer = KafkaProducer::from_config_and_context(config, context)
            .map_err(ForwardError::Client)?;
        if !alone {
            self.producers_created += 1;
        }
        Ok(Instance {
            producer,
            health,
            rebootstrapped_at: 0,
            rebootstraps_in_a_row: 0,
            rebootstraps: 0,
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        self.producer = Some(self.create_producer(false)?);
        self.liveness.new_producer(Instant::now());
        let (records, bytes) = self.window.limits();
        metric::window(records, bytes);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<Instant> = None;
        let mut source_closed = false;
        let mut reports = Vec::with_capacity(1024);
        let mut read_backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut read_after: Option<Instant> = None;

        loop {
            let now = Instant::now();
            if self.rebuild_at.is_some_and(|at| at <= now) {
                self.rebuild().await?;
            }
            if self.rebuild_at.is_none() && self.resend_at.is_none_or(|at| at <= now) {
                self.pump_resends();
            }
            if read_after.is_some_and(|at| at <= now) {
                read_after = None;
            }
            let (want_records, want_bytes) = self.room();
            let can_read = deadline.is_none()
                && !source_closed
                && read_after.is_none()
                && self.resend.is_empty()
                && self.rebuild_at.is_none()
                && want_records > 0;
            let wake = [self.resend_at, self.rebuild_at, read_after]
                .into_iter()
                .flatten()
                .min();

            // Biased, in this order: stopping first; timers next (rarely ready, must not
            // starve); then reading, which the window bounds, before delivery reports, so a
            // steady stream of reports cannot starve reads and turn the drain into
            // stop-and-go.
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    tracing::info!(in_flight = self.in_flight.len(), grace = ?self.settings.grace, "Forwarder stopping: no more reads, waiting for in-flight deliveries.");
                    deadline = Some(Instant::now() + self.settings.grace);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => break,
                _ = tick.tick() => self.housekeeping(),
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                read = self.source.read_batch(want_records, want_bytes), if can_read => match read {
                    Ok(batch) => {
                        read_backoff.reset();
                        self.admit(batch, want_records, want_bytes);
                    }
                    Err(LogError::Closed) => {
                        tracing::info!(in_flight = self.in_flight.len(), "The log is closed; forwarding what is in flight.");
                        source_closed = true;
                        if deadline.is_none() {
                            deadline = Some(Instant::now() + self.settings.grace);
                        }
                    }
                    Err(e) => {
                        let wait = read_backoff.next_delay();
                        tracing::error!(error = %e, retry_in = ?wait, "Cannot read the log.");
                        metric::error("log_read");
                        read_after = Some(Instant::now() + wait);
                    }
                },
                Some(seq) = self.dead_lettered_rx.recv() => self.finish(seq),
                Some(probed) = self.probe_rx.recv() => self.on_probe(probed),
                n = self.deliveries_rx.recv_many(&mut reports, 4096) => {
                    if n > 0 {
                        let before = self.delivered;
                        let now = Instant::now();
                        for report in reports.drain(..) {
                            self.on_delivery(report, now);
                        }
                        if self.delivered != before {
                            let delivered = self.delivered;
                            self.deliveries.delivered(delivered - before);
                            self.progress.send_modify(|pr| {
                                pr.delivered = delivered;
                                pr.last_delivery = Some(std::time::Instant::now());
                            });
                        }
                    }
                }
            }

            self.ack_finished();
            if deadline.is_some() && self.in_flight.is_empty() {
                break;
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Room left in the window as (records, bytes), or zero when less than an eighth is
    /// free (so a backlog is read in chunks, not one record per delivery report). The log
    /// counts a read's bytes by [`record::weight`], so in-flight memory stays within the
    /// window (a record heavier than the whole window still goes, alone).
    fn room(&self) -> (usize, usize) {
        let (records, bytes) = self.window.limits();
        let free_records = records.saturating_sub(self.in_flight.len());
        let free_bytes = bytes.saturating_sub(self.in_flight_bytes);
        if free_records < (records / 8).max(1) || free_bytes < (bytes / 8).max(1) {
            return (0, 0);
        }
        (free_records, free_bytes)
    }

    fn admit(&mut self, batch: Vec<StoredRecord>, want_records: usize, want_bytes: usize) {
        // One clock read per batch: the records of a batch are handed over within
        // microseconds of each other.
        let now = Instant::now();
        let mut bytes = 0;
        let count = batch.len();
        for stored in batch {
            let weight = record::weight(&stored.record);
            bytes += stored.record.payload.len();
            self.in_flight_bytes += weight;
            self.in_flight.insert(
                stored.seq,
                Pending {
                    record: stored.record,
                    weight,
                    attempt: 0,
                    alone: false,
                    state: State::Queued,
                    sent_at: now,
                },
            );
            if self.resend.is_empty() && self.rebuild_at.is_none() {
                match self.send(stored.seq, now) {
                    Sent::Ok | Sent::Handled => {}
                    Sent::Blocked => {
                        self.resend.insert(stored.seq);
                    }
                }
            } else {
                self.resend.insert(stored.seq);
            }
        }
        if let Some(change) = self
            .window
            .on_read(count >= want_records || bytes >= want_bytes)
        {
            metric::window_changed(change);
        }
    }

    /// Hands one record to librdkafka; `now` is its send time.
    fn send(&mut self, seq: u64, now: Instant) -> Sent {
        let alone = match self.in_flight.get_mut(&seq) {
            Some(p) => {
                // Stored before its schema was known: encoded now, or it waits (and every
                // record after it, in order) until the registry has answered.
                if !dead_letter::encode_pending(&mut p.record, self.schemas.as_deref()) {
                    return Sent::Blocked;
                }
                // Ingest could not convert its payload (crate::format): it never goes to
                // Kafka, whose consumers expect the converted form.
                if let Some(reason) = dead_letter::format_error(&p.record) {
                    self.dead_letter(seq, &reason);
                    return Sent::Handled;
                }
                p.alone
            }
            None => return Sent::Handled,
        };
        if alone && self.alone_producer.is_none() {
            match self.create_producer(true) {
                Ok(p) => self.alone_producer = Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot create the producer for isolated re-sends.");
                    return Sent::Blocked;
                }
            }
        }
        let producer = if alone {
            &self.alone_producer
        } else {
            &self.producer
        };
        let Some(Instance { producer, .. }) = producer else {
            return Sent::Blocked;
        };
        let Some(p) = self.in_flight.get_mut(&seq) else {
            return Sent::Handled;
        };
        p.attempt = p.attempt.wrapping_add(1);
        let headers =
            record::kafka_headers(&self.gateway_id, seq, &p.record, &mut self.header_scratch);
        let tag = Box::new(Tag {
            seq,
            attempt: p.attempt,
        });
        let mut base =
            BaseRecord::<[u8], [u8], Box<Tag>>::with_opaque_to(&p.record.kafka_topic, tag)
                .payload(&p.record.payload[..])
                .timestamp(record::timestamp_ms(&p.record))
                .headers(headers);
        if let Some(key) = &p.record.key {
            base = base.key(&key[..]);
        }
        let sent = producer.send(base).map_err(|(e, _)| e);
        match sent {
            Ok(()) => {
                p.state = State::Sending;
                p.sent_at = now;
                Sent::Ok
            }
            Err(e) => {
                p.state = State::Queued;
                let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown);
                metric::error(classify::kind(code));
                let link_up = self.link.state() == LinkState::Up;
                match self
                    .unknown_topics
                    .enqueue(code, &p.record.kafka_topic, now, link_up)
                {
                    Disposition::DeadLetter | Disposition::Isolate => {
                        self.dead_letter(seq, &e.to_string());
                        Sent::Handled
                    }
                    Disposition::Rebuild => {
                        self.resend.insert(seq);
                        self.schedule_rebuild(&e.to_string());
                        Sent::Handled
                    }
                    Disposition::Retry => {
                        let wait = self.backoff.next_delay();
                        tracing::debug!(seq, error = %e, retry_in = ?wait, "librdkafka did not take a record; sending it again.");
                        if let Some(change) = self.window.on_trouble("librdkafka refused a record")
                        {
                            metric::window_changed(change);
                        }
                        self.resend_at = Some(Instant::now() + wait);
                        Sent::Blocked
                    }
                }
            }
        }
    }

    /// Sends queued records in sequence order until librdkafka pushes back.
    fn pump_resends(&mut self) {
        self.resend_at = None;
        let now = Instant::now();
        while let Some(seq) = self.resend.pop_first() {
            match self.send(seq, now) {
                Sent::Ok | Sent::Handled => {}
                Sent::Blocked => {
                    self.resend.insert(seq);
                    if self.resend_at.is_none() {
                        self.resend_at = Some(Instant::now() + self.backoff.next_delay());
                    }
                    return;
                }
            }
        }
    }

    /// One delivery report, received at `now` (one clock read per batch of reports).
    fn on_delivery(&mut self, report: Delivery, now: Instant) {
        let Some(p) = self.in_flight.get_mut(&report.seq) else {
            return;
        };
        // Reports for an earlier send (purged by a rebuild, or superseded) are stale.
        if p.attempt != report.attempt || p.state != State::Sending {
            return;
        }
        self.liveness.progress(now);
        match report.result {
            Ok(()) => {
                self.deliveries
                    .latency(now.saturating_duration_since(p.sent_at));
                self.slow = false;
                if self.short_of_replicas {
                    self.short_of_replicas = false;
                    metric::short_of_replicas(false);
                    self.progress.send_modify(|pr| pr.short_of_replicas = false);
                    tracing::info!("Kafka takes records again: enough replicas are in sync.");
                }
                self.backoff.reset();
                self.unknown_topics.known(&p.record.kafka_topic);
                self.finish(report.seq);
                self.delivered += 1;
                if let Some(change) = self.window.on_delivered(1) {
                    metric::window_changed(change);
                }
            }
            Err(code) => {
                metric::error(classify::kind(code));
                let link_up = self.link.state() == LinkState::Up;
                match self.unknown_topics.delivery(
                    code,
                    p.alone,
                    &p.record.kafka_topic,
                    now,
                    link_up,
                ) {
                    Disposition::Isolate => {
                        tracing::debug!(seq = report.seq, error = %code, "Kafka rejected a batch; sending this record alone.");
                        p.alone = true;
                        p.state = State::Queued;
                        self.resend.insert(report.seq);
                    }
                    Disposition::DeadLetter => self.dead_letter(report.seq, &code.to_string()),
                    Disposition::Rebuild => {
                        p.state = State::Queued;
                        self.resend.insert(report.seq);
                        self.schedule_rebuild(&code.to_string());
                    }
                    Disposition::Retry => {
                        p.state = State::Queued;
                        self.resend.insert(report.seq);
                        if self.resend_at.is_none() {
                            self.resend_at = Some(Instant::now() + self.backoff.next_delay());
                        }
                        if let Some(change) = self.window.on_trouble("a delivery failed") {
                            metric::window_changed(change);
                        }
                    }
                }
            }
        }
    }

    /// The record is done with (delivered or dead-lettered): it may leave the log, which is
    /// told at the end of this loop turn ([`Worker::ack_finished`]).
    fn finish(&mut self, seq: u64) {
        if let Some(p) = self.in_flight.remove(&seq) {
            self.in_flight_bytes -= p.weight;
            self.finished.push(seq);
        }
    }

    /// Acknowledges the finished records in the log, each run of consecutive sequence
    /// numbers at once.
    fn ack_finished(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        self.finished.sort_unstable();
        for_each_run(&self.finished, |start, end| {
            self.source.ack_range(start, end)
        });
        self.finished.clear();
    }

    /// Moves a record Kafka will never take to the dead-letter log; it is acknowledged in
    /// the main log once the dead-letter copy is durable. Counted and logged here.
    fn dead_letter(&mut self, seq: u64, error: &str) {
        let Some(p) = self.in_flight.get_mut(&seq) else {
            return;
        };
        p.state = State::DeadLettering;
        metric::dead_lettered();
        self.progress.send_modify(|pr| pr.dead_lettered += 1);
        tracing::warn!(seq, topic = %p.record.kafka_topic, error, "A record cannot go to Kafka; moving it to the dead-letter log.");
        let dead = dead_letter::copy(&p.record, seq, error);
        let sink = self.dead_letter.clone();
        let done = self.dead_lettered_tx.clone();
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        self.dead_letter_tasks.spawn(async move {
            loop {
                match sink.store(dead.clone()).await {
                    Ok(()) => break,
                    Err(AppendError::Closed) => return,
                    Err(e) => {
                        let wait = backoff.next_delay();
                        tracing::error!(seq, error = %e, retry_in = ?wait, "Cannot write to the dead-letter log; the record stays in the main log.");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let _ = done.send(seq);
        });
    }

    fn schedule_rebuild(&mut self, reason: &str) {
        if self.rebuild_at.is_none() {
            let wait = self.backoff.next_delay();
            tracing::error!(reason, rebuild_in = ?wait, in_flight = self.in_flight.len(), "The Kafka producer is unusable; rebuilding it and sending in-flight records again.");
            metric::rebuilt();
            if let Some(change) = self.window.on_trouble("producer rebuilt") {
                metric::window_changed(change);
            }
            self.rebuild_at = Some(Instant::now() + wait);
        }
    }

    /// Replaces the producer; everything it had is sent again in sequence order. Some of
    /// it may already be in Kafka: those are duplicates with the same record id.
    async fn rebuild(&mut self) -> Result<(), ForwardError> {
        let old: Vec<KafkaProducer> = self
            .producer
            .take()
            .into_iter()
            .chain(self.alone_producer.take())
            .map(|i| i.producer)
            .collect();
        for (seq, p) in self.in_flight.iter_mut() {
            if p.state == State::Sending {
                p.state = State::Queued;
                self.resend.insert(*seq);
            }
        }
        // Dropping a producer purges and joins its threads: blocking. A client wedged badly
        // enough that its threads never finish is left behind rather than stopping the
        // forwarder with it; its reports are stale and ignored.
        let dropped = tokio::task::spawn_blocking(move || drop(old));
        if tokio::time::timeout(DROP_TIMEOUT, dropped).await.is_err() {
            tracing::error!(waited = ?DROP_TIMEOUT, "The old Kafka producer did not shut down; leaving it behind and going on with a new one.");
        }
        self.link.take_fatal();
        self.producer = Some(self.create_producer(false)?);
        self.liveness.new_producer(Instant::now());
        self.rebuild_at = None;
        self.resend_at = None;
        Ok(())
    }

    fn housekeeping(&mut self) {
        if self.link.take_fatal() {
            self.schedule_rebuild("fatal error reported by librdkafka");
        }
        self.heal_orphans();
        let (records, bytes) = self.window.limits();
        metric::window(records, bytes);
        metric::in_flight(self.in_flight.len(), self.in_flight_bytes);
        let oldest = self
            .in_flight
            .iter()
            .find(|(_, p)| p.state == State::Sending);
        if let Some((seq, p)) = oldest {
            let waited = p.sent_at.elapsed();
            if waited > self.settings.delivery_timeout && !self.slow {
                self.slow = true;
                metric::error("timeout");
                tracing::warn!(seq = *seq, waited = ?waited, in_flight = self.in_flight.len(), "Kafka deliveries are slow; retrying without limit.");
                if let Some(change) = self.window.on_trouble("deliveries slow") {
                    metric::window_changed(change);
                }
            }
        }
        let now = Instant::now();
        let bytes_moved = self
            .producer
            .iter()
            .chain(&self.alone_producer)
            .map(|i| i.health.bytes_moved())
            .sum();
        if let Some(instance) = &self.producer {
            self.liveness
                .connects_failed(instance.health.failed_connects());
        }
        if let Some((_, p)) = oldest {
            let topic = p.record.kafka_topic.clone();
            if p.sent_at.elapsed() >= REPLICA_CHECK_AFTER
                && !self.short_of_replicas
                && !self.replica_check_running
                && now >= self.next_replica_check
                && self.link.state() == LinkState::Up
            {
                self.replica_check_running = true;
                self.next_replica_check = now + REPLICA_CHECK_AFTER;
                self.start_probe(now, topic.clone(), false);
            }
            if self.liveness.check(now, true, bytes_moved) {
                self.start_probe(now, topic, true);
            }
        } else {
            self.liveness.check(now, false, bytes_moved);
        }
        let stalled = self.liveness.stalled();
        let stuck = self.liveness.stuck(now);
        let in_flight = self.in_flight.len();
        self.progress.send_modify(|pr| {
            pr.in_flight = in_flight;
            pr.stalled = stalled;
            // The watchdog's food: withheld once a rebuild did not cure a stall, so systemd
            // restarts the gateway as a last resort.
            if !stuck {
                pr.heartbeat = Some(std::time::Instant::now());
            }
        });
    }

    /// Gives a client that forgot every broker its bootstrap brokers back (see
    /// [`super::rebootstrap`]), or rebuilds it when that does not help.
    fn heal_orphans(&mut self) {
        let brokers = self.settings.brokers.clone();
        let in_flight = self.in_flight.len();
        let mut rebuild = false;
        for instance in self
            .producer
            .iter_mut()
            .chain(self.alone_producer.iter_mut())
        {
            match instance.heal_orphan(&brokers) {
                None => {}
                Some(Orphan::Rebootstrapped) => {
                    metric::rebootstrapped();
                    tracing::warn!(
                        in_flight,
                        brokers = %brokers,
                        "The Kafka client forgot every broker (a broker in controlled shutdown listed none: librdkafka issue 5301); adding the bootstrap brokers again."
                    );
                }
                Some(Orphan::Rebuild) => rebuild = true,
            }
        }
        if rebuild {
            self.schedule_rebuild("the Kafka client knows no broker, and adding the bootstrap brokers again did not help");
        }
    }

    /// Asks the brokers, through a client of its own, for `topic`'s partitions.
    fn start_probe(&mut self, started: Instant, topic: String, liveness: bool) {
        let config = self.probe_config.clone();
        let done = self.probe_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = ask_brokers(&config, &topic);
            let _ = done.send(Probed {
                started,
                topic,
                liveness,
                result,
            });
        });
    }

    /// A probe's answer: a stall (rebuild), or nothing to do yet. The link state stays the
    /// producer's own (its errors, statistics and deliveries): a second opinion from another
    /// client would only make the log lines flap.
    fn on_probe(&mut self, probed: Probed) {
        let short_of_replicas = match &probed.result {
            Ok(a) => a.short_of_replicas.clone(),
            Err(_) => None,
        };
        if !probed.liveness {
            self.replica_check_running = false;
            if let Some(reason) = short_of_replicas {
                self.found_short_of_replicas(&reason);
            }
            return;
        }
        let now = Instant::now();
        // A partition without a leader, or short of in-sync replicas, is Kafka's outage,
        // not the producer's stall.
        let answered =
            matches!(&probed.result, Ok(a) if a.leaders > 0 && a.short_of_replicas.is_none());
        match self.liveness.probed(now, probed.started, answered) {
            Verdict::Moving => {}
            Verdict::Unreachable if short_of_replicas.is_some() => {
                self.found_short_of_replicas(&short_of_replicas.unwrap_or_default());
            }
            Verdict::Answering => {
                tracing::debug!(topic = %probed.topic, quiet_for = ?self.liveness.quiet_for(now), "Kafka answers while nothing was delivered; giving the producer time to get back to it.");
            }
            Verdict::Unreachable => {
                let reason = match &probed.result {
                    Ok(_) => format!("no partition of {} has a leader", probed.topic),
                    Err(e) => format!("the brokers do not answer a metadata request: {e}"),
                };
                tracing::debug!(
                    reason,
                    "Probed Kafka while nothing was delivered: an outage."
                );
            }
            Verdict::Stalled => {
                let (brokers, reports, states, queued) =
                    self.producer
                        .as_ref()
                        .map_or((0, 0, String::new(), 0), |i| {
                            (
                                i.health.brokers(),
                                i.health.reports(),
                                i.health.broker_states(),
                                i.producer.in_flight_count(),
                            )
                        });
                let oldest = self
                    .in_flight
                    .iter()
                    .find(|(_, p)| p.state == State::Sending)
                    .map(|(seq, _)| *seq);
                metric::stalled();
                tracing::error!(
                    quiet_for = ?self.liveness.quiet_for(now),
                    in_flight = self.in_flight.len(),
                    oldest_seq = ?oldest,
                    topic = %probed.topic,
                    producer_brokers = brokers,
                    producer_broker_states = %states,
                    producer_queue = queued,
                    producer_stats_reports = reports,
                    link = ?self.link.state(),
                    "Kafka answers but the producer has delivered nothing: it is stalled. Rebuilding it and sending the unfinished records again in order."
                );
                // Said now, not at the next tick: a rebuild that delivers within the half
                // second would otherwise leave `/readyz` never saying it.
                self.progress.send_modify(|pr| pr.stalled = true);
                self.schedule_rebuild("the producer stalled while Kafka answers");
            }
        }
    }

    /// A probe found the oldest record's partition below `min.insync.replicas`: Kafka
    /// refuses writes until enough replicas are back. Reported once; the next delivery
    /// clears it.
    fn found_short_of_replicas(&mut self, reason: &str) {
        if self.short_of_replicas {
            return;
        }
        self.short_of_replicas = true;
        metric::short_of_replicas(true);
        self.link.set_last_error(reason);
        self.progress.send_modify(|pr| pr.short_of_replicas = true);
        tracing::warn!(
            reason,
            in_flight = self.in_flight.len(),
            "Kafka answers but has too few in-sync replicas to take records; they stay in the log until enough replicas return."
        );
    }

    /// After the loop: give librdkafka a last moment, then drop the producers (which purges
    /// what is left; those records stay in the log and are sent after the restart).
    async fn stop(mut self) {
        let producers: Vec<KafkaProducer> = self
            .producer
            .take()
            .into_iter()
            .chain(self.alone_producer.take())
            .map(|i| i.producer)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for p in &producers {
                let _ = p.flush(Duration::from_millis(100));
            }
            drop(producers);
        })
        .await;
        // Reports that arrived during the flush still count.
        let before = self.delivered;
        let now = Instant::now();
        while let Ok(report) = self.deliveries_rx.try_recv() {
            self.on_delivery(report, now);
        }
        self.deliveries.delivered(self.delivered - before);
        while let Ok(seq) = self.dead_lettered_rx.try_recv() {
            self.finish(seq);
        }
        self.ack_finished();
        self.dead_letter_tasks.close();
        metric::in_flight(self.in_flight.len(), self.in_flight_bytes);
        let in_flight = self.in_flight.len();
        self.progress.send_modify(|pr| pr.in_flight = in_flight);
        match self.in_flight.keys().next() {
            None => {
                tracing::info!("Forwarder stopped; every record read from the log was delivered.")
            }
            Some(first) => tracing::warn!(
                undelivered = self.in_flight.len(),
                first_seq = *first,
                "Forwarder stopped before every delivery finished; the rest stays in the log and is sent after the restart."
            ),
        }
    }
}

/// The topic's `min.insync.replicas`, asked through an admin client on the probe's settings;
/// `None` when the brokers do not say (no DescribeConfigs permission, a timeout): then a
/// partition short of replicas is not told apart from a stalled producer.
/// Asks the brokers, through a client of its own made from `config`, about `topic`'s
/// partitions: how many have a leader, and whether one is short of in-sync replicas.
/// Blocking (at most about two `PROBE_TIMEOUT`s).
pub(super) fn ask_brokers(config: &ClientConfig, topic: &str) -> Result<Answer, String> {
    let client = config.create::<BaseProducer>().map_err(|e| e.to_string())?;
    let metadata = client
        .client()
        .fetch_metadata(Some(topic), PROBE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let partitions: Vec<_> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .filter(|p| p.leader() >= 0)
        .collect();
    // Only a partition short of replicas is worth a DescribeConfigs request.
    let under_replicated = partitions
        .iter()
        .filter(|p| p.isr().len() < p.replicas().len())
        .map(|p| (p.id(), p.isr().len(), p.replicas().len()))
        .collect::<Vec<_>>();
    let short_of_replicas = if under_replicated.is_empty() {
        None
    } else {
        min_insync_replicas(config, topic).and_then(|min| {
            under_replicated
                .iter()
                .find(|(_, isr, _)| *isr < min)
                .map(|(id, isr, replicas)| {
                    format!(
                        "{topic} partition {id} has {isr} of {replicas} replicas in sync, \
                         min.insync.replicas={min}: Kafka refuses acks=all writes"
                    )
                })
        })
    };
    Ok(Answer {
        leaders: partitions.len(),
        short_of_replicas,
    })
}

fn min_insync_replicas(config: &ClientConfig, topic: &str) -> Option<usize> {
    let admin: AdminClient<DefaultClientContext> = config.create().ok()?;
    let options = AdminOptions::new().request_timeout(Some(PROBE_TIMEOUT));
    let results = futures::executor::block_on(
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options),
    )
    .ok()?;
    let resource = results.into_iter().next()?.ok()?;
    resource
        .get("min.insync.replicas")?
        .value
        .as_deref()?
        .parse()
        .ok()
}

#[cfg(test)]
mod run_tests {
    use super::for_each_run;

    fn runs(seqs: &[u64]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for_each_run(seqs, |start, end| out.push((start, end)));
        out
    }

    #[test]
    fn finished_records_are_acknowledged_in_runs() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[7]), [(7, 8)]);
        assert_eq!(runs(&[1, 2, 3, 4]), [(1, 5)]);
        assert_eq!(runs(&[1, 2, 4, 5, 9]), [(1, 3), (4, 6), (9, 10)]);
        // A duplicate cannot happen (a record finishes once) but must not widen a run.
        assert_eq!(runs(&[3, 3, 4]), [(3, 4), (3, 5)]);
    }
}

#[cfg(test)]
mod source_tests {
    use bytes::Bytes;

    use super::RecordSource;
    use crate::buffer::{Log, LogConfig};
    use crate::forward::record;
    use crate::record::{Record, Source};

    /// The log, read as the forwarder reads it, keeps a batch within the window's free
    /// weight. Small records with headers (command outcomes: about 1,350 of weight for 120
    /// payload bytes) had gone about 30 % over when a read counted payload bytes and the
    /// lightest record's weight.
    #[tokio::test]
    async fn a_read_takes_no_more_weight_than_the_window_has_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = Log::open(LogConfig::new(dir.path())).expect("open");
        let outcome = Record {
            source: Source::Mqtt,
            received_ms: 1_764_000_000_000,
            device: "dev-00042".into(),
            origin: "$edgegate/downlink/iot.commands".into(),
            kafka_topic: "iot.commands.status".into(),
            key: Some(Bytes::from_static(b"dev-00042")),
            headers: vec![
                ("edgegate-outcome".into(), Bytes::from_static(b"delivered")),
                (
                    "edgegate-correlation".into(),
                    Bytes::from_static(b"req-0001"),
                ),
            ],
            payload: Bytes::from(vec![b'x'; 120]),
        };
        let heavy = record::weight(&outcome);
        assert!(heavy > record::MIN_WEIGHT + 240, "{heavy}");
        let mut durable = Vec::new();
        for _ in 0..200 {
            durable.push(log.append(&outcome).expect("append"));
        }
        for d in durable {
            d.await.expect("durable");
        }
        let mut reader = log.reader().expect("reader");
        let free = 40 * record::MIN_WEIGHT;
        let mut read = 0;
        while read < 200 {
            let batch = RecordSource::read_batch(&mut reader, 1000, free)
                .await
                .expect("read");
            let weight: usize = batch.iter().map(|r| record::weight(&r.record)).sum();
            assert!(
                weight <= free,
                "{} records of {weight} weight in {free}",
                batch.len()
            );
            assert_eq!(
                batch.len(),
                (free / heavy).min(200 - read),
                "as many as fit"
            );
            read += batch.len();
        }
    }
}
