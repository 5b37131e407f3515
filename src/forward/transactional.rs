//! Exactly once into Kafka (`[kafka] delivery = "exactly_once"`): the log is forwarded in
//! Kafka transactions, and the log position each transaction covers is committed in the same
//! transaction, so a gateway that crashed resumes exactly after what Kafka has.
//!
//! ```text
//! log --read--> batch [a, b] --begin, produce a..=b, position b+1, commit--> Kafka
//!  ^                                                                          |
//!  +------------------------- ack a..=b (after the commit) -------------------+
//! ```
//!
//! # The position
//!
//! Each transaction ends with `send_offsets_to_transaction`: the offset of partition 0 of
//! `[kafka] positions_topic` in the consumer group `edgegate-<gateway id>-positions` is set to
//! `b + 1` (every record of the log below it is in Kafka or in the dead-letter log), with the
//! metadata `edgegate-position v1 log=<log identity>`. Kafka stores it with the records, in
//! one transaction: both or neither. The topic only has to exist (Kafka refuses offsets for an
//! unknown partition); nothing is written to it. Reading the position is one OffsetFetch,
//! whatever the age of the gateway, and `kafka-consumer-groups.sh --describe --group
//! edgegate-<id>-positions` shows it to a person. A position under another log's identity
//! (the log directory was replaced) is ignored: sequence numbers start again in a new log.
//!
//! # Start, and after any doubt
//!
//! A producer with `transactional.id = edgegate-<gateway id>` calls `init_transactions`,
//! which fences any earlier instance and settles the transaction it left open (committed if
//! its commit had reached the coordinator, aborted otherwise). Only then is the position read
//! (`read_committed`, so a pending commit is waited for): the records of the log below it are
//! acknowledged in the log without being sent. That is also what happens after a fatal error
//! or a commit whose outcome is unknown: a new producer, the position read again, and the
//! rest sent again in order. An abortable error (a record Kafka refused, a timeout) aborts the
//! transaction and sends its records again in a new one, in order.
//!
//! # What the local log sees
//!
//! A record is acknowledged in the log only after the transaction that carries it committed,
//! or after its dead-letter copy is durable and the transaction that moves the position past
//! it committed. The log's own cursor (persisted every 500 ms) can lag; the position in Kafka
//! is what decides what is sent again, so a crash anywhere costs re-reading, never a
//! duplicate.
//!
//! # Batching
//!
//! One transaction at a time. Records that arrived while the last one committed go into the
//! next at once; live traffic waits at most `transaction_interval` for more; a transaction
//! holds at most `max_in_flight_records` records and `max_in_flight_bytes` of weight. A record
//! Kafka rejected with its batch (too large for the topic) is sent again in a transaction of
//! its own, and dead-lettered only if it fails alone.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaError};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::{self, Disposition};
use super::context::{ClientHealth, Delivery, ForwardContext, LinkTracker, Tag};
use super::window::Backoff;
use super::worker::{DeadLetterSink, KafkaProducer, RecordSource, Settings, for_each_run};
use super::{ForwardError, LinkState, Progress, dead_letter, metric, record};
use crate::buffer::{AppendError, LogError, StoredRecord};
use crate::record::Record;

/// Bound of one blocking transactional call; retriable timeouts are retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A blocking librdkafka call still running this long after its own timeout, with Kafka
/// reachable all that time, is hung: some never return (librdkafka issues 5456 and 5511:
/// `send_offsets_to_transaction` ignores its timeout, and waits for good on a group
/// coordinator that left the cluster's metadata). The session is then replaced and the call
/// left behind. While the link is down a call may rightly outlive its timeout (its request
/// waits for the coordinator with librdkafka's own, longer, request timeout), so the clock
/// starts again whenever the link is seen down: an outage alone does not replace a session,
/// up to [`OUTAGE_SLACK`].
const HUNG_SLACK: Duration = Duration::from_secs(3);
/// A blocking call still running this long after its own timeout is hung, whatever the link
/// state says: librdkafka's request timeout (30 s) bounds a call that waits out an outage,
/// and the link state may be stale (learned from a producer's connections and deliveries;
/// a stuck producer makes neither). Kafka away for good costs a session every so often,
/// never a stall for good.
const OUTAGE_SLACK: Duration = Duration::from_secs(60);
/// How long a replaced producer's threads are waited for.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the delivery reports of an aborted transaction are waited for.
const REPORTS_TIMEOUT: Duration = Duration::from_secs(5);
/// A transaction unfinished this long: ask whether its partition is short of in-sync
/// replicas.
const REPLICA_CHECK_AFTER: Duration = Duration::from_secs(5);
/// Brokers added again this many times over one session: a new session instead.
const MAX_REBOOTSTRAPS: u32 = 100;
/// Statistics reports (2 s each) between two rebootstraps of a stranded client.
const STRANDED_HEAL_EVERY: u64 = 5;
/// How long a position-and-commit call waits before its client is checked for being
/// stranded (see `heal_orphans`); the call takes well under a second when all is well.
const HEAL_AFTER: Duration = Duration::from_secs(4);
/// The metadata prefix of a committed position.
const POSITION_TAG: &str = "edgegate-position v1 log=";
/// The file in the log directory that names the log (see [`log_identity`]).
pub const IDENTITY_FILE: &str = "identity";

/// What exactly-once adds to the forwarder's settings.
#[derive(Debug, Clone)]
pub struct TxnSettings {
    pub interval: Duration,
    pub positions_topic: String,
    pub group: String,
    /// The log's identity: a position is valid only for the log that wrote it.
    pub log_id: String,
    /// For the record ids.
    pub gateway_id: Arc<str>,
}

/// A record read from the log and not yet committed.
struct Pending {
    seq: u64,
    record: Record,
    /// Rejected with its batch once: sent in a transaction of its own.
    alone: bool,
    /// Its dead-letter copy is durable: it is only carried by the position.
    dead: bool,
}

/// The producer and what goes with it for one run of transactions.
struct Session {
    producer: Arc<KafkaProducer>,
    health: Arc<ClientHealth>,
    /// Times the bootstrap brokers were added again (librdkafka keeps a copy of each list).
    rebootstraps: AtomicU32,
    /// The statistics report they were last added at (see `heal_orphans`).
    healed_at: AtomicU64,
    group: Arc<ConsumerGroupMetadata>,
}

/// A probe's topic and what the brokers said about it.
type ProbeAnswer = (String, Result<super::worker::Answer, String>);

/// Why a session could not be opened: Kafka not reachable (yet), which the link state
/// reports, or a broker that answered and refused, which is an ERROR every time.
struct OpenError {
    reason: String,
    unreachable: bool,
    /// No broker answered at all (a timeout, no connection): the link is down. A fresh
    /// client's statistics cannot say so when each attempt makes a new one (a frozen broker
    /// accepts connections and answers nothing, so each looks like it is still connecting).
    silent: bool,
}

impl OpenError {
    fn refused(reason: impl Into<String>) -> OpenError {
        OpenError {
            reason: reason.into(),
            unreachable: false,
            silent: false,
        }
    }

    /// `reason`, unreachable if `code` says the brokers did not answer (in time).
    fn from_code(reason: String, code: Option<RDKafkaErrorCode>) -> OpenError {
        let silent =
            code.is_some_and(|code| classify::is_link_error(code) || classify::is_timeout(code));
        let unreachable = silent
            || code.is_some_and(|code| {
                matches!(
                    code,
                    RDKafkaErrorCode::CoordinatorNotAvailable
                        | RDKafkaErrorCode::NotCoordinator
                        | RDKafkaErrorCode::CoordinatorLoadInProgress
                        | RDKafkaErrorCode::LeaderNotAvailable
                        | RDKafkaErrorCode::NotController
                )
            });
        OpenError {
            reason,
            unreachable,
            silent,
        }
    }
}

/// How a transaction ended.
enum Outcome {
    Committed,
    /// Aborted; its records are sent again in a new transaction, by a new producer
    /// (`new_epoch`) unless Kafka refused one of its records outright: see
    /// [`Transactional::abort`].
    Aborted {
        reason: String,
        new_epoch: bool,
        /// Its records that timed out or that Kafka may hold (see [`may_be_in_kafka`]).
        in_doubt: usize,
    },
    /// The producer is unusable or the outcome unknown: a new session reads the position.
    Fatal(String),
    /// Shutdown before it could finish: the transaction is left open (Kafka aborts it after
    /// the transaction timeout, or the next start's `init_transactions` at once); its
    /// records stay in the log.
    Stopped,
}

pub struct Transactional<S, D> {
    settings: Settings,
    txn: TxnSettings,
    gateway_id: Arc<str>,
    source: S,
    dead_letter: D,
    client_config: ClientConfig,
    /// The producer's connection and security settings only, for the admin client.
    admin_config: ClientConfig,
    consumer_config: ClientConfig,
    link: Arc<LinkTracker>,
    progress: watch::Sender<Progress>,
    deliveries_tx: mpsc::UnboundedSender<Delivery>,
    deliveries_rx: mpsc::UnboundedReceiver<Delivery>,
    deliveries: metric::Deliveries,
    header_scratch: String,
    /// The schemas of `avro` routes, for records stored before theirs was known.
    schemas: Option<Arc<crate::format::registry::Registry>>,
    /// Read from the log and not yet committed, in sequence order.
    pending: VecDeque<Pending>,
    /// Every record below this is in Kafka (or dead-lettered) per the committed position.
    committed: u64,
    /// Transactions begun so far; a record's tag carries it, so a stale report is known.
    transactions: u32,
    delivered: u64,
    dead_lettered: u64,
    backoff: Backoff,
    /// A probe found the oldest record's partition short of in-sync replicas; cleared by the
    /// next commit. Mirrored into `progress`.
    short_of_replicas: bool,
    source_closed: bool,
    stopping: bool,
}

impl<S: RecordSource, D: DeadLetterSink> Transactional<S, D> {
    pub fn new(
        settings: Settings,
        txn: TxnSettings,
        source: S,
        dead_letter: D,
        client_config: ClientConfig,
        link: Arc<LinkTracker>,
        progress: watch::Sender<Progress>,
    ) -> Transactional<S, D> {
        let (deliveries_tx, deliveries_rx) = mpsc::unbounded_channel();
        let mut admin_config = ClientConfig::new();
        // The producer's connection and security settings, none of its own.
        for (key, value) in client_config.config_map() {
            if is_connection_setting(key) {
                admin_config.set(key, value);
            }
        }
        admin_config.set(
            "client.id",
            format!(
                "{}-positions",
                client_config.get("client.id").unwrap_or("edgegate")
            ),
        );
        let mut consumer_config = admin_config.clone();
        consumer_config
            .set("group.id", &txn.group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed");
        let backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
        Transactional {
            settings,
            gateway_id: txn.gateway_id.clone(),
            txn,
            source,
            dead_letter,
            client_config,
            admin_config,
            consumer_config,
            link,
            progress,
            deliveries_tx,
            deliveries_rx,
            deliveries: metric::Deliveries::new(),
            header_scratch: String::with_capacity(64),
            schemas: None,
            pending: VecDeque::new(),
            committed: 0,
            transactions: 0,
            delivered: 0,
            dead_lettered: 0,
            backoff,
            short_of_replicas: false,
            source_closed: false,
            stopping: false,
        }
    }

    pub fn set_schemas(&mut self, schemas: Arc<crate::format::registry::Registry>) {
        self.schemas = Some(schemas);
    }

    pub fn set_grace(&mut self, grace: Duration) {
        self.settings.grace = grace;
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        let mut first = true;
        loop {
            let Some(session) = self.open_session(&shutdown, first).await else {
                break;
            };
            first = false;
            self.backoff.reset();
            let replace = self.transactions_of(&session, &shutdown).await;
            self.close_session(session).await;
            if !replace {
                break;
            }
            let wait = self.backoff.next_delay();
            if !self.sleep(wait, &shutdown).await {
                break;
            }
        }
        self.stop();
        Ok(())
    }

    /// Runs transactions on `session` until the forwarder stops (false) or the session must
    /// be replaced (true).
    async fn transactions_of(&mut self, session: &Session, shutdown: &CancellationToken) -> bool {
        loop {
            if !self.gather(shutdown).await {
                return false;
            }
            if self.pending.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.transact(session, shutdown).await {
                Outcome::Committed => {
                    self.backoff.reset();
                    metric::transaction("committed", started.elapsed());
                }
                Outcome::Aborted {
                    reason,
                    new_epoch,
                    in_doubt,
                } => {
                    metric::transaction("aborted", started.elapsed());
                    if new_epoch {
                        metric::epoch_bumped();
                        tracing::warn!(
                            reason,
                            records = self.pending.len(),
                            in_doubt,
                            "A Kafka transaction was aborted; sending its records again in order, under a new producer epoch (a new producer)."
                        );
                        return true;
                    }
                    let wait = self.backoff.next_delay();
                    tracing::warn!(reason, records = self.pending.len(), retry_in = ?wait, "A Kafka transaction was aborted; sending its records again in a new one, in order.");
                    if !self.sleep(wait, shutdown).await {
                        return false;
                    }
                }
                Outcome::Fatal(reason) => {
                    metric::transaction("failed", started.elapsed());
                    metric::rebuilt();
                    tracing::error!(
                        reason,
                        records = self.pending.len(),
                        "The transactional producer is unusable or a commit's outcome is unknown; starting a new one, which reads the committed position again."
                    );
                    return true;
                }
                Outcome::Stopped => return false,
            }
        }
    }

    /// Waits `wait`, refreshing the heartbeat; false on shutdown.
    async fn sleep(&mut self, wait: Duration, shutdown: &CancellationToken) -> bool {
        let until = Instant::now() + wait;
        loop {
            self.heartbeat();
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Runs `f`, librdkafka call `name` bounded by its own `timeout`, on the blocking pool,
    /// refreshing the heartbeat while it runs; [`Hung`] if it outlives that timeout by
    /// [`HUNG_SLACK`] with the link up (it is left running). A call on a session's producer
    /// passes the session and its [`ClientWatch`]: the client is watched meanwhile.
    async fn blocking<T: Send + 'static>(
        &mut self,
        mut watched: Option<(&Session, &mut ClientWatch)>,
        name: &'static str,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Hung> {
        let mut call = tokio::task::spawn_blocking(f);
        let clock = CallClock::default();
        clock.begin(name, timeout);
        let mut idle = None;
        loop {
            self.heartbeat();
            if let Some((session, watch)) = watched.as_mut() {
                self.watch(session, watch);
            }
            if let Some(hung) = clock.hung(self.link.state()) {
                return Err(hung);
            }
            let probe = match watched.as_mut() {
                Some((_, watch)) => &mut watch.probe,
                None => &mut idle,
            };
            tokio::select! {
                done = &mut call => match done {
                    Ok(v) => return Ok(v),
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                },
                Some((topic, answer)) = answer_of(probe) => self.take_probe(&topic, answer),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// One look at `session`'s client while a call on it waits: the brokers are asked
    /// every [`REPLICA_CHECK_AFTER`] once the watch's first probe is due (an answer is a
    /// link up: the hang watch runs, and a client that cannot reach them gets its brokers
    /// again), and once the call has waited [`HEAL_AFTER`] a client that lost its brokers
    /// gets them again (see [`Transactional::heal_orphans`]). A call that takes its usual
    /// moment never gets that far. Too many rebootstraps end the session at the call's
    /// next retry.
    fn watch(&mut self, session: &Session, watch: &mut ClientWatch) {
        let now = Instant::now();
        if watch.probe.is_none() && now >= watch.next_probe {
            watch.next_probe = now + REPLICA_CHECK_AFTER;
            watch.probe = self.start_probe();
        }
        if now.duration_since(watch.waiting_since) >= HEAL_AFTER {
            self.heal_orphans(session);
        }
    }

    fn heartbeat(&self) {
        let in_flight = self.pending.len();
        self.progress.send_modify(|pr| {
            pr.in_flight = in_flight;
            pr.heartbeat = Some(std::time::Instant::now());
        });
    }

    /// A new producer, its transactions initialised, and the committed position read; the
    /// pending records below it acknowledged. `None` on shutdown.
    async fn open_session(&mut self, shutdown: &CancellationToken, first: bool) -> Option<Session> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match self.try_open_session(first).await {
                Ok(session) => return Some(session),
                Err(OpenError {
                    reason,
                    unreachable,
                    silent,
                }) => {
                    if silent {
                        self.link.down(&reason);
                    }
                    let wait = self.backoff.next_delay();
                    metric::error("transactions");
                    // Kafka away is the link's news (one WARN when it goes down); a broker
                    // that answers and still refuses is an ERROR every time.
                    if unreachable {
                        tracing::debug!(reason, retry_in = ?wait, "Cannot start exactly-once forwarding while Kafka is unreachable; records stay in the log.");
                    } else {
                        tracing::error!(reason, retry_in = ?wait, "Cannot start exactly-once forwarding; records stay in the log.");
                        self.link.set_last_error(&reason);
                    }
                    if !self.sleep(wait, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn try_open_session(&mut self, first: bool) -> Result<Session, OpenError> {
        self.ensure_positions_topic().await?;
        let health = Arc::new(ClientHealth::new(
            self.settings
                .brokers
                .split(',')
                .filter(|b| !b.is_empty())
                .count(),
        ));
        let context = ForwardContext {
            deliveries: self.deliveries_tx.clone(),
            link: self.link.clone(),
            health: health.clone(),
        };
        let producer = Arc::new(
            KafkaProducer::from_config_and_context(&self.client_config, context).map_err(|e| {
                OpenError::refused(format!("cannot create the transactional producer: {e}"))
            })?,
        );
        let p = producer.clone();
        let init = match self
            .blocking(None, "init_transactions", CALL_TIMEOUT, move || {
                p.init_transactions(CALL_TIMEOUT)
            })
            .await
        {
            Ok(init) => init,
            Err(hung) => return Err(OpenError::refused(hung.to_string())),
        };
        if let Err(e) = init {
            drop_bounded(producer).await;
            return Err(OpenError::from_code(
                format!(
                    "init_transactions (transactional.id {}): {}",
                    self.client_config
                        .get("transactional.id")
                        .unwrap_or_default(),
                    reason(&e)
                ),
                e.rdkafka_error_code(),
            ));
        }
        self.link.take_fatal();
        // The transaction coordinator answered.
        self.link.up();
        let consumer: BaseConsumer = self
            .consumer_config
            .create()
            .map_err(|e| OpenError::refused(format!("cannot create the positions client: {e}")))?;
        let consumer = Arc::new(consumer);
        let group = consumer
            .group_metadata()
            .ok_or_else(|| OpenError::refused("the positions client has no group metadata"))?;
        let position = self.read_position(&consumer).await?;
        match position {
            Some(p) if p > self.committed => {
                if first {
                    tracing::info!(
                        position = p,
                        "Exactly once: resuming after the position committed in Kafka; records below it are not sent again."
                    );
                }
                self.committed = p;
            }
            None if first => tracing::info!(
                group = %self.txn.group,
                "Exactly once: no position committed in Kafka for this log yet; sending from the log's head."
            ),
            _ => {}
        }
        self.drop_committed();
        Ok(Session {
            producer,
            health,
            rebootstraps: AtomicU32::new(0),
            healed_at: AtomicU64::new(0),
            group: Arc::new(group),
        })
    }

    async fn close_session(&mut self, session: Session) {
        self.link.take_fatal();
        drop_bounded(session).await;
    }

    /// Creates the positions topic if it is missing: one partition, compacted (nothing is
    /// written to it; only its existence matters for the offsets).
    async fn ensure_positions_topic(&mut self) -> Result<(), OpenError> {
        let admin: AdminClient<DefaultClientContext> = self
            .admin_config
            .create()
            .map_err(|e| OpenError::refused(format!("cannot create an admin client: {e}")))?;
        let topic = NewTopic::new(&self.txn.positions_topic, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let options = AdminOptions::new().request_timeout(Some(CALL_TIMEOUT));
        let created = tokio::time::timeout(
            CALL_TIMEOUT + HUNG_SLACK,
            admin.create_topics([&topic], &options),
        )
        .await
        .map_err(|_| {
            OpenError::refused(Hung::new("create_topics", CALL_TIMEOUT, true).to_string())
        })?;
        let result = created.map_err(|e| {
            OpenError::from_code(
                format!("cannot create topic {}: {e}", self.txn.positions_topic),
                error_code(&e),
            )
        })?;
        for r in result {
            match r {
                Ok(_) => {
                    tracing::info!(topic = %self.txn.positions_topic, "Created the topic of the exactly-once positions.")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(OpenError::from_code(
                        format!("cannot create topic {name}: {code}"),
                        Some(code),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The position committed for this log, if any.
    async fn read_position(
        &mut self,
        consumer: &Arc<BaseConsumer>,
    ) -> Result<Option<u64>, OpenError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.txn.positions_topic, 0);
        let c = consumer.clone();
        let committed = self
            .blocking(None, "committed_offsets", CALL_TIMEOUT, move || {
                c.committed_offsets(tpl, CALL_TIMEOUT)
            })
            .await
            .map_err(|hung| OpenError::refused(hung.to_string()))?
            .map_err(|e| {
                OpenError::from_code(
                    format!("cannot read the committed position: {}", reason(&e)),
                    e.rdkafka_error_code(),
                )
            })?;
        let Some(elem) = committed.elements().into_iter().next() else {
            return Ok(None);
        };
        let Offset::Offset(offset) = elem.offset() else {
            return Ok(None);
        };
        match parse_position(elem.metadata(), &self.txn.log_id, offset) {
            Ok(p) => Ok(Some(p)),
            Err(other) => {
                tracing::warn!(
                    found = other,
                    this_log = %self.txn.log_id,
                    "The position committed in Kafka belongs to another log (the log directory was replaced); sending from this log's head."
                );
                Ok(None)
            }
        }
    }

    /// Acknowledges the pending records the committed position covers.
    fn drop_committed(&mut self) {
        let mut acked = Vec::new();
        while self.pending.front().is_some_and(|p| p.seq < self.committed) {
            if let Some(p) = self.pending.pop_front() {
                acked.push(p.seq);
            }
        }
        for_each_run(&acked, |start, end| self.source.ack_range(start, end));
    }

    /// Waits until there is something to send: what is left of an aborted transaction, or a
    /// record read from the log. False when the forwarder is to stop.
    async fn gather(&mut self, shutdown: &CancellationToken) -> bool {
        if !self.pending.is_empty() {
            return !self.stopping;
        }
        let mut read_backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        while self.pending.is_empty() {
            if self.stopping || self.source_closed {
                return false;
            }
            let (room, room_bytes) = self.room(0, 0);
            self.heartbeat();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => self.stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                read = self.source.read_batch(room, room_bytes) => {
                    if let Some(wait) = self.take_read(read, &mut read_backoff) {
                        if !self.sleep(wait, shutdown).await {
                            self.stopping = true;
                        }
                    }
                }
            }
        }
        true
    }

    /// What one transaction may still take, as (records, bytes) for a log read, given the
    /// records and weight it holds.
    fn room(&self, records: usize, weight: usize) -> (usize, usize) {
        let room = self.settings.max_in_flight_records.saturating_sub(records);
        let room_bytes = self.settings.max_in_flight_bytes.saturating_sub(weight);
        if room_bytes < record::MIN_WEIGHT {
            return (0, 0);
        }
        // The read counts its bytes by the same weight.
        (room, room_bytes)
    }

    /// Takes the outcome of a log read; returns how long to wait before reading again after
    /// an error.
    fn take_read(
        &mut self,
        read: Result<Vec<StoredRecord>, LogError>,
        backoff: &mut Backoff,
    ) -> Option<Duration> {
        match read {
            Ok(batch) => {
                backoff.reset();
                self.admit(batch);
                None
            }
            Err(LogError::Closed) => {
                self.source_closed = true;
                None
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::error!(error = %e, retry_in = ?wait, "Cannot read the log.");
                metric::error("log_read");
                Some(wait)
            }
        }
    }

    /// Takes records read from the log; those the committed position covers are only
    /// acknowledged.
    fn admit(&mut self, batch: Vec<StoredRecord>) {
        let mut covered = Vec::new();
        for stored in batch {
            if stored.seq < self.committed {
                covered.push(stored.seq);
                continue;
            }
            self.pending.push_back(Pending {
                seq: stored.seq,
                record: stored.record,
                alone: false,
                dead: false,
            });
        }
        for_each_run(&covered, |start, end| self.source.ack_range(start, end));
    }

    /// One transaction over the head of `pending`: up to the first record that must go
    /// alone, or that record alone. A fresh transaction keeps taking records from the log,
    /// sending each at once, until `transaction_interval` has passed since it began or it is
    /// full; then the position, then the commit.
    async fn transact(&mut self, session: &Session, shutdown: &CancellationToken) -> Outcome {
        let mut count = match self.pending.front() {
            Some(p) if p.alone => 1,
            _ => self
                .pending
                .iter()
                .position(|p| p.alone)
                .unwrap_or(self.pending.len()),
        };
        // Only a transaction over everything pending (no record waiting to go alone) may
        // grow: records read now come after all of them.
        let growing = count == self.pending.len() && !self.pending[0].alone;
        let mut weight: usize = self
            .pending
            .iter()
            .take(count)
            .map(|p| record::weight(&p.record))
            .sum();

        self.transactions = self.transactions.wrapping_add(1);
        let txn = self.transactions;
        if let Err(e) = session.producer.begin_transaction() {
            return Outcome::Fatal(format!("begin_transaction: {}", reason(&e)));
        }
        let started = Instant::now();
        let close_at = started + self.txn.interval;
        // Longer than any retry inside the transaction should take: then the outcome is in
        // doubt, and a new producer settles it.
        let give_up = started + self.settings.delivery_timeout.max(CALL_TIMEOUT) * 4;
        let mut produced = 0usize;
        let mut read_backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut i = 0;
        loop {
            while i < count {
                if self.pending[i].dead {
                    i += 1;
                    continue;
                }
                // Stored before its schema was known: encoded now, or the transaction is
                // aborted and tried again after a back-off, until the registry has answered.
                if !dead_letter::encode_pending(
                    &mut self.pending[i].record,
                    self.schemas.as_deref(),
                ) {
                    return self
                        .abort(
                            session,
                            txn,
                            produced,
                            "a record waits for its schema from the schema registry",
                            false,
                            give_up,
                            shutdown,
                        )
                        .await;
                }
                // Payloads ingest could not convert (crate::format) never go to Kafka.
                if let Some(why) = dead_letter::format_error(&self.pending[i].record) {
                    if !self.dead_letter(i, &why, shutdown).await {
                        return Outcome::Stopped;
                    }
                    i += 1;
                    continue;
                }
                match self.produce(session, i, txn) {
                    Ok(()) => {
                        produced += 1;
                        i += 1;
                    }
                    Err(RDKafkaErrorCode::QueueFull) => {
                        // librdkafka's queue is full: it drains as the batches go out.
                        if Instant::now() > give_up {
                            return Outcome::Fatal(
                                "librdkafka's queue stayed full for the whole transaction".into(),
                            );
                        }
                        if !self.sleep(Duration::from_millis(1), shutdown).await {
                            return Outcome::Stopped;
                        }
                    }
                    Err(code) => match classify::enqueue(code) {
                        Disposition::Retry => {
                            // The transaction can take no more (it hit an abortable error:
                            // librdkafka answers _STATE): never commit it short of its
                            // records; abort it and send them all again.
                            metric::error(classify::kind(code));
                            return self
                                .abort(
                                    session,
                                    txn,
                                    produced,
                                    &format!("librdkafka refused a record mid-transaction: {code}"),
                                    classify::is_timeout(code),
                                    give_up,
                                    shutdown,
                                )
                                .await;
                        }
                        Disposition::DeadLetter | Disposition::Isolate => {
                            metric::error(classify::kind(code));
                            if !self.dead_letter(i, &code.to_string(), shutdown).await {
                                return Outcome::Stopped;
                            }
                            i += 1;
                        }
                        Disposition::Rebuild => {
                            return Outcome::Fatal(format!("librdkafka refused a record: {code}"));
                        }
                    },
                }
            }
            if !growing || self.stopping || self.source_closed || Instant::now() >= close_at {
                break;
            }
            let (room, room_bytes) = self.room(count, weight);
            if room == 0 {
                break;
            }
            self.heartbeat();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => self.stopping = true,
                _ = tokio::time::sleep_until(close_at) => break,
                read = self.source.read_batch(room, room_bytes) => {
                    let before = self.pending.len();
                    if let Some(wait) = self.take_read(read, &mut read_backoff) {
                        if !self.sleep(wait.min(close_at.saturating_duration_since(Instant::now())), shutdown).await {
                            self.stopping = true;
                        }
                    }
                    weight += self
                        .pending
                        .iter()
                        .skip(before)
                        .map(|p| record::weight(&p.record))
                        .sum::<usize>();
                    count = self.pending.len();
                }
            }
        }

        let last = self.pending[count - 1].seq;
        let filled = started.elapsed();
        let mut offsets = TopicPartitionList::new();
        if let Err(e) = offsets.add_partition_offset(
            &self.txn.positions_topic,
            0,
            Offset::Offset(position_offset(last + 1)),
        ) {
            return Outcome::Fatal(format!("cannot build the position: {e}"));
        }
        if let Some(mut elem) = offsets.find_partition(&self.txn.positions_topic, 0) {
            elem.set_metadata(format!("{POSITION_TAG}{}", self.txn.log_id));
        }
        let offsets = Arc::new(offsets);

        // The position, then the commit, in one call on the blocking pool; retriable errors
        // are retried in place, from the step that failed. Meanwhile the next transaction's
        // records are read from the log.
        let mut step = 0;
        let mut retriable_since: Option<Instant> = None;
        let mut warned = false;
        let offsets_took = loop {
            let producer = session.producer.clone();
            let (offsets, group) = (offsets.clone(), session.group.clone());
            let clock = Arc::new(CallClock::default());
            let steps = clock.clone();
            #[cfg(debug_assertions)]
            let link_down = self.link.state() == LinkState::Down;
            let call =
                tokio::task::spawn_blocking(move || -> Result<Duration, (u8, KafkaError)> {
                    let at = std::time::Instant::now();
                    if step == 0 {
                        steps.begin("send_offsets_to_transaction", CALL_TIMEOUT);
                        #[cfg(debug_assertions)]
                        crate::fault::maybe_hang_commit(link_down);
                        producer
                            .send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
                            .map_err(|e| (0, e))?;
                    }
                    let offsets_took = at.elapsed();
                    steps.begin("the deliveries before commit_transaction", CALL_TIMEOUT);
                    // rdkafka's commit_transaction flushes first, and its flush waits in steps of
                    // up to 100 ms on an event queue that the producer's own polling thread
                    // empties: 100 ms lost per transaction. Waiting here for librdkafka's queue to
                    // empty (delivery reports served) makes that flush return at once.
                    let flushed_by = std::time::Instant::now() + CALL_TIMEOUT;
                    while producer.in_flight_count() > 0 && std::time::Instant::now() < flushed_by {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    steps.begin("commit_transaction", CALL_TIMEOUT);
                    producer
                        .commit_transaction(CALL_TIMEOUT)
                        .map_err(|e| (1, e))?;
                    Ok(offsets_took)
                });
            let done = match self
                .read_ahead(session, call, &clock, count, started, shutdown)
                .await
            {
                Ok(done) => done,
                Err(hung) => return Outcome::Fatal(hung.to_string()),
            };
            match done {
                Ok(took) => break took,
                Err((failed, e)) => {
                    step = failed;
                    let retriable = match transaction_error(&e) {
                        Some(t) if t.is_fatal() => return Outcome::Fatal(reason(&e)),
                        Some(t) if t.txn_requires_abort() => {
                            let timed_out = classify::is_timeout(t.code());
                            return self
                                .abort(
                                    session,
                                    txn,
                                    produced,
                                    &reason(&e),
                                    timed_out,
                                    give_up,
                                    shutdown,
                                )
                                .await;
                        }
                        Some(t) => t.is_retriable(),
                        // rdkafka's commit_transaction flushes first; a flush that timed out
                        // (Kafka away longer than the call) leaves the transaction open, to be
                        // committed again like a retriable commit.
                        None if commit_flush_timed_out(&e) => true,
                        None => return Outcome::Fatal(format!("transaction: {e}")),
                    };
                    if retriable {
                        metric::error("timeout");
                        let since = *retriable_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= CALL_TIMEOUT && !warned {
                            warned = true;
                            tracing::warn!(error = %reason(&e), records = count, waited = ?started.elapsed(), "A Kafka transaction cannot commit yet; retrying.");
                        }
                        if self.stopping && started.elapsed() > self.settings.grace {
                            return Outcome::Stopped;
                        }
                        if Instant::now() > give_up {
                            // Kafka has long aborted it by now (transaction timeout) or the
                            // client is stuck: let a new producer settle it.
                            return Outcome::Fatal(format!(
                                "the transaction could not finish: {}",
                                reason(&e)
                            ));
                        }
                        if shutdown.is_cancelled() {
                            self.stopping = true;
                        }
                        if started.elapsed() >= REPLICA_CHECK_AFTER {
                            self.probe_brokers().await;
                        }
                        if !self.heal_orphans(session) {
                            return Outcome::Fatal(
                                "the Kafka client keeps forgetting every broker".into(),
                            );
                        }
                        continue;
                    }
                    return Outcome::Fatal(reason(&e));
                }
            }
        };

        tracing::debug!(
            records = count,
            produced,
            filled = ?filled,
            position = ?offsets_took,
            commit = ?started.elapsed().saturating_sub(filled + offsets_took),
            "Kafka transaction committed."
        );
        // Committed: every record of the transaction is in Kafka.
        let done: Vec<u64> = self.pending.drain(..count).map(|p| p.seq).collect();
        self.committed = last + 1;
        for_each_run(&done, |start, end| self.source.ack_range(start, end));
        self.delivered += produced as u64;
        self.deliveries.delivered(produced as u64);
        self.deliveries.latency(started.elapsed());
        let delivered = self.delivered;
        self.progress.send_modify(|pr| {
            pr.delivered = delivered;
            pr.last_delivery = Some(std::time::Instant::now());
            pr.short_of_replicas = false;
        });
        // A commit is Kafka's answer.
        self.link.up();
        if self.short_of_replicas {
            self.short_of_replicas = false;
            metric::short_of_replicas(false);
            tracing::info!("Kafka takes records again: enough replicas are in sync.");
        }
        // Reports of a committed transaction say nothing new.
        while self.deliveries_rx.try_recv().is_ok() {}
        Outcome::Committed
    }

    /// Waits for `call` (the position and the commit of the transaction over the first
    /// `count` pending records), reading the next transaction's records from the log
    /// meanwhile, within the bounds of one transaction.
    /// While the transaction (begun at `started`) has been unfinished for
    /// `REPLICA_CHECK_AFTER`, the brokers are asked about it meanwhile, every
    /// `REPLICA_CHECK_AFTER` at most (see [`Transactional::probe_brokers`]): the blocking
    /// call itself may take up to three of its timeouts before it says anything.
    async fn read_ahead<T: Send + 'static>(
        &mut self,
        session: &Session,
        mut call: tokio::task::JoinHandle<T>,
        clock: &CallClock,
        count: usize,
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<T, Hung> {
        let mut watch = ClientWatch::new(started);
        let mut weight: usize = self
            .pending
            .iter()
            .skip(count)
            .map(|p| record::weight(&p.record))
            .sum();
        let mut read_backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut read_after: Option<Instant> = None;
        loop {
            self.heartbeat();
            let (room, room_bytes) = self.room(self.pending.len() - count, weight);
            let can_read = room > 0
                && !self.stopping
                && !self.source_closed
                && read_after.is_none_or(|at| at <= Instant::now());
            self.watch(session, &mut watch);
            if let Some(hung) = clock.hung(self.link.state()) {
                return Err(hung);
            }
            tokio::select! {
                biased;
                done = &mut call => match done {
                    Ok(v) => return Ok(v),
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                },
                Some((topic, answer)) = answer_of(&mut watch.probe) => self.take_probe(&topic, answer),
                _ = shutdown.cancelled(), if !self.stopping => self.stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                read = self.source.read_batch(room, room_bytes), if can_read => {
                    let before = self.pending.len();
                    if let Some(wait) = self.take_read(read, &mut read_backoff) {
                        read_after = Some(Instant::now() + wait);
                    }
                    weight += self
                        .pending
                        .iter()
                        .skip(before)
                        .map(|p| record::weight(&p.record))
                        .sum::<usize>();
                }
            }
        }
    }

    /// Hands record `i` of `pending` to librdkafka in transaction `txn`.
    fn produce(&mut self, session: &Session, i: usize, txn: u32) -> Result<(), RDKafkaErrorCode> {
        let p = &self.pending[i];
        let headers =
            record::kafka_headers(&self.gateway_id, p.seq, &p.record, &mut self.header_scratch);
        let tag = Box::new(Tag {
            seq: p.seq,
            attempt: txn,
        });
        let mut base =
            BaseRecord::<[u8], [u8], Box<Tag>>::with_opaque_to(&p.record.kafka_topic, tag)
                .payload(&p.record.payload[..])
                .timestamp(record::timestamp_ms(&p.record))
                .headers(headers);
        if let Some(key) = &p.record.key {
            base = base.key(&key[..]);
        }
        session
            .producer
            .send(base)
            .map_err(|(e, _)| e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Unknown))
    }

    /// Aborts transaction `txn`: reads its delivery reports to learn which records Kafka
    /// refused for good (dead-lettered) or with their batch (sent alone next), then aborts.
    ///
    /// An abort asks for a new producer epoch unless Kafka refused a record of it outright
    /// ([`new_epoch_after_abort`]): after a timeout (`timed_out`), with a record Kafka may
    /// hold ([`may_be_in_kafka`]), or for any other cause. Kafka's own client bumps the
    /// epoch after a timeout (KIP-360): a request that went unanswered may still be in the
    /// broker's hands (a frozen broker reads it once it runs again) or already in its log (a
    /// broker stopped while the request was in flight), while librdkafka's abort rewinds the
    /// partition's sequence numbers over it. The next transaction's first batch is then out
    /// of sequence, which librdkafka takes for a fatal error (CI:
    /// `faults::frozen_broker_exactly_once`, `faults::quick_restarts_exactly_once`).
    /// librdkafka 2.12 bumps the epoch itself only for an unknown producer id, and offers no
    /// call to do it, so the session is replaced: `init_transactions` of the new producer is
    /// the bump.
    #[allow(clippy::too_many_arguments)]
    async fn abort(
        &mut self,
        session: &Session,
        txn: u32,
        produced: usize,
        why: &str,
        timed_out: bool,
        give_up: Instant,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let p = session.producer.clone();
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        // An abort after a commit nobody answered waits on the same client: it needs the
        // transaction coordinator, which it can only look up through a broker. CI caught
        // one after a frozen broker (`faults::frozen_broker_exactly_once`) whose client had
        // forgotten every broker: with nobody asking the brokers, the link stayed down and
        // the abort retried for two minutes until the session was replaced.
        let mut watch = ClientWatch::new(Instant::now());
        let aborted = loop {
            let p = p.clone();
            match self
                .blocking(
                    Some((session, &mut watch)),
                    "abort_transaction",
                    CALL_TIMEOUT,
                    move || p.abort_transaction(CALL_TIMEOUT),
                )
                .await
            {
                Err(hung) => break Err(hung.to_string()),
                Ok(Ok(())) => break Ok(()),
                Ok(Err(e)) if transaction_error(&e).is_some_and(|t| t.is_retriable()) => {
                    if shutdown.is_cancelled() || Instant::now() > give_up {
                        break Err(reason(&e));
                    }
                    let wait = backoff.next_delay();
                    tracing::debug!(error = %reason(&e), retry_in = ?wait, "Cannot abort a Kafka transaction yet; retrying.");
                    if !self.sleep(wait, shutdown).await {
                        break Err(reason(&e));
                    }
                }
                Ok(Err(e)) => break Err(reason(&e)),
            }
        };
        // Every message of the transaction has reported by now (delivered, failed or
        // purged); take what the reports say.
        let mut reports = Vec::new();
        let until = Instant::now() + REPORTS_TIMEOUT;
        while reports.len() < produced {
            match tokio::time::timeout_at(until, self.deliveries_rx.recv()).await {
                Ok(Some(d)) if d.attempt == txn => reports.push(d),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        let mut refused = Vec::new();
        let mut short_of_replicas = false;
        let mut in_doubt = 0;
        let mut refusal = false;
        for d in reports {
            let Err(code) = d.result else { continue };
            in_doubt += usize::from(may_be_in_kafka(code, d.possibly_persisted));
            metric::error(classify::kind(code));
            short_of_replicas |= matches!(
                code,
                RDKafkaErrorCode::NotEnoughReplicas
                    | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            );
            let Some(i) = self.pending.iter().position(|p| p.seq == d.seq) else {
                continue;
            };
            let alone = self.pending[i].alone;
            match classify::delivery(code, alone) {
                Disposition::Isolate => {
                    refusal = true;
                    self.pending[i].alone = true;
                }
                Disposition::DeadLetter => {
                    refusal = true;
                    refused.push((i, code.to_string()));
                }
                Disposition::Rebuild | Disposition::Retry => {}
            }
        }
        if short_of_replicas && !self.short_of_replicas {
            self.probe_brokers().await;
        }
        for (i, error) in refused {
            if !self.dead_letter(i, &error, shutdown).await {
                return Outcome::Stopped;
            }
        }
        match aborted {
            Ok(()) => Outcome::Aborted {
                reason: why.to_owned(),
                new_epoch: new_epoch_after_abort(timed_out, in_doubt, refusal),
                in_doubt,
            },
            Err(e) => Outcome::Fatal(format!("{why}; then abort_transaction: {e}")),
        }
    }

    /// Moves record `i` of `pending` to the dead-letter log and waits until that is durable
    /// (the next committed position passes it). False on shutdown.
    async fn dead_letter(&mut self, i: usize, error: &str, shutdown: &CancellationToken) -> bool {
        let p = &mut self.pending[i];
        if p.dead {
            return true;
        }
        let seq = p.seq;
        metric::dead_lettered();
        self.dead_lettered += 1;
        let dead_lettered = self.dead_lettered;
        self.progress
            .send_modify(|pr| pr.dead_lettered = dead_lettered);
        tracing::warn!(seq, topic = %p.record.kafka_topic, error, "A record cannot go to Kafka; moving it to the dead-letter log.");
        let dead = dead_letter::copy(&p.record, seq, error);
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        loop {
            match self.dead_letter.store(dead.clone()).await {
                Ok(()) => break,
                Err(AppendError::Closed) => return false,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::error!(seq, error = %e, retry_in = ?wait, "Cannot write to the dead-letter log; the record stays in the main log.");
                    if !self.sleep(wait, shutdown).await {
                        return false;
                    }
                }
            }
        }
        self.pending[i].dead = true;
        true
    }

    /// Asks the brokers, through a client of its own, about the partition of the oldest
    /// pending record while a transaction cannot finish. No answer: the link is down (a
    /// frozen broker keeps its connections open and the transaction's requests only time
    /// out, which the producer's statistics do not show while nothing else is sent). An
    /// answer with the partition short of in-sync replicas: it refuses every write and
    /// librdkafka retries without a word, so the gateway reports itself degraded with the
    /// reason until a commit goes through.
    async fn probe_brokers(&mut self) {
        if let Some(probe) = self.start_probe() {
            if let Ok((topic, answer)) = probe.await {
                self.take_probe(&topic, answer);
            }
        }
    }

    /// Starts a probe of the oldest pending record's topic on the blocking pool.
    fn start_probe(&self) -> Option<tokio::task::JoinHandle<ProbeAnswer>> {
        let topic = self.pending.front()?.record.kafka_topic.clone();
        let config = self.admin_config.clone();
        Some(tokio::task::spawn_blocking(move || {
            let answer = super::worker::ask_brokers(&config, &topic);
            (topic, answer)
        }))
    }

    /// What a probe of `topic` found: see [`Transactional::probe_brokers`].
    fn take_probe(&mut self, topic: &str, answer: Result<super::worker::Answer, String>) {
        let answer = match answer {
            Err(e) => {
                return self.link.down(&format!(
                    "the brokers do not answer a metadata request: {e}"
                ));
            }
            Ok(super::worker::Answer { leaders: 0, .. }) => {
                return self
                    .link
                    .down(&format!("no partition of {topic} has a leader"));
            }
            Ok(answer) => answer,
        };
        // The brokers answered: the link is up, whatever the producer's own connections
        // say. A producer stuck in a call sends nothing that would reconnect them, and the
        // hang watch waits while the link is down.
        self.link.up();
        match answer.short_of_replicas {
            Some(reason) if !self.short_of_replicas => {
                self.short_of_replicas = true;
                metric::short_of_replicas(true);
                self.link.set_last_error(&reason);
                self.progress.send_modify(|pr| pr.short_of_replicas = true);
                tracing::warn!(
                    reason,
                    in_flight = self.pending.len(),
                    "Kafka answers but has too few in-sync replicas to take records; they stay in the log until enough replicas return."
                );
            }
            _ => {}
        }
    }

    /// A client that forgot every broker (see [`ClientHealth::orphaned`]), or is stranded
    /// without a connection while the brokers answer (see [`ClientHealth::stranded`]; this
    /// runs only while a transaction call waits on the client), gets the bootstrap brokers
    /// again, once per statistics report at most; a commit retried or waiting meanwhile
    /// then finds its coordinator. False when that was done too often: the session is to
    /// be replaced.
    fn heal_orphans(&self, session: &Session) -> bool {
        let orphaned = session.health.orphaned();
        let stranded = !orphaned && session.health.stranded(self.link.up_for());
        if orphaned || stranded {
            // Once per report for an orphan (a controlled shutdown decommissions the
            // bootstrap broker added too); a stranded client gets one broker at a time,
            // every five reports: a broker it connects to is all it needs.
            let report = session.health.reports();
            let last = session.healed_at.load(Ordering::Relaxed);
            let due = if stranded {
                last == 0 || report >= last + STRANDED_HEAL_EVERY
            } else {
                report > last
            };
            if !due {
                return true;
            }
            session.healed_at.store(report, Ordering::Relaxed);
            if session.rebootstraps.fetch_add(1, Ordering::Relaxed) >= MAX_REBOOTSTRAPS {
                return false;
            }
            let added =
                super::rebootstrap::add_brokers(session.producer.client(), &self.settings.brokers);
            if added > 0 {
                metric::rebootstrapped();
                if stranded {
                    tracing::warn!(brokers = %self.settings.brokers, "The Kafka client has no broker connection while the brokers answer (librdkafka issue 5301: its broker is being decommissioned); adding the bootstrap brokers again.");
                } else {
                    tracing::warn!(brokers = %self.settings.brokers, "The Kafka client forgot every broker (librdkafka issue 5301); adding the bootstrap brokers again.");
                }
            }
        }
        true
    }

    fn stop(&mut self) {
        let in_flight = self.pending.len();
        self.progress.send_modify(|pr| pr.in_flight = in_flight);
        match self.pending.front() {
            None => tracing::info!(
                "Forwarder stopped; every record read from the log was committed to Kafka."
            ),
            Some(first) => tracing::warn!(
                uncommitted = in_flight,
                first_seq = first.seq,
                "Forwarder stopped before its last transaction committed; those records stay in the log, and the committed position decides after the restart what is sent again."
            ),
        }
    }
}

/// A librdkafka call that outlived its own timeout by [`HUNG_SLACK`] with Kafka reachable,
/// or by [`OUTAGE_SLACK`] in any case.
#[derive(Debug)]
struct Hung {
    call: &'static str,
    timeout: Duration,
    /// Kafka was reachable all along the slack.
    reachable: bool,
}

impl Hung {
    fn new(call: &'static str, timeout: Duration, reachable: bool) -> Hung {
        metric::error("hung_call");
        Hung {
            call,
            timeout,
            reachable,
        }
    }
}

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (call, timeout) = (self.call, self.timeout);
        if self.reachable {
            write!(
                f,
                "librdkafka's {call} has not returned {HUNG_SLACK:?} after its own timeout of {timeout:?} with Kafka reachable (librdkafka issues 5456, 5511); the call is left behind"
            )
        } else {
            write!(
                f,
                "librdkafka's {call} has not returned {OUTAGE_SLACK:?} after its own timeout of {timeout:?}, Kafka unreachable for part of it; the call is left behind"
            )
        }
    }
}

/// Which step of a blocking call made of several librdkafka calls runs, and when it is due
/// to return: [`Transactional::read_ahead`] watches it for [`Hung`] steps.
#[derive(Default)]
struct CallClock {
    step: std::sync::Mutex<Option<Step>>,
}

/// A running step of a blocking call.
struct Step {
    name: &'static str,
    timeout: Duration,
    /// Hung from then on; moved on while the link is down.
    hung_at: Instant,
    /// Hung from then on, whatever the link.
    hung_anyway_at: Instant,
}

impl CallClock {
    /// Step `name` starts, bounded by `timeout`.
    fn begin(&self, name: &'static str, timeout: Duration) {
        let now = Instant::now();
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = Some(Step {
            name,
            timeout,
            hung_at: now + timeout + HUNG_SLACK,
            hung_anyway_at: now + timeout + OUTAGE_SLACK,
        });
    }

    /// The running step, if it is hung; with the link `Down` its clock starts again, up to
    /// [`OUTAGE_SLACK`] after its timeout.
    fn hung(&self, link: LinkState) -> Option<Hung> {
        self.hung_at(link, Instant::now())
    }

    fn hung_at(&self, link: LinkState, now: Instant) -> Option<Hung> {
        let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let step = step.as_mut()?;
        if link == LinkState::Down {
            step.hung_at = step.hung_at.max(now + step.timeout + HUNG_SLACK);
        }
        let reachable = now >= step.hung_at;
        (reachable || now >= step.hung_anyway_at)
            .then(|| Hung::new(step.name, step.timeout, reachable))
    }
}

/// What a wait on a call of a session's producer watches: see [`Transactional::watch`].
struct ClientWatch {
    /// When the wait began.
    waiting_since: Instant,
    /// When the brokers are asked next.
    next_probe: Instant,
    /// The probe under way.
    probe: Option<tokio::task::JoinHandle<ProbeAnswer>>,
}

impl ClientWatch {
    /// A wait from now whose first probe is due [`REPLICA_CHECK_AFTER`] after `since`.
    fn new(since: Instant) -> ClientWatch {
        ClientWatch {
            waiting_since: Instant::now(),
            next_probe: since + REPLICA_CHECK_AFTER,
            probe: None,
        }
    }
}

/// The answer of the probe under way, taken out of `probe` (`None` if its thread
/// panicked); pending for good when no probe runs. Cancel-safe: the probe stays in
/// `probe` until it answers.
async fn answer_of(
    probe: &mut Option<tokio::task::JoinHandle<ProbeAnswer>>,
) -> Option<ProbeAnswer> {
    let Some(running) = probe.as_mut() else {
        return std::future::pending().await;
    };
    let answer = running.await.ok();
    *probe = None;
    answer
}

/// Drops a producer (or what holds one) on the blocking pool, waiting for its threads at
/// most [`DROP_TIMEOUT`].
async fn drop_bounded<T: Send + 'static>(producer: T) {
    let dropped = tokio::task::spawn_blocking(move || drop(producer));
    if tokio::time::timeout(DROP_TIMEOUT, dropped).await.is_err() {
        tracing::error!(waited = ?DROP_TIMEOUT, "The old Kafka producer did not shut down; leaving it behind and going on with a new one.");
    }
}

/// The offset a position is stored as. Kafka offsets are signed; a log's sequence numbers
/// never come near 2^63.
fn position_offset(next: u64) -> i64 {
    i64::try_from(next).unwrap_or(i64::MAX)
}

/// The position in a committed offset and its metadata, or the other log's identity found.
fn parse_position(metadata: &str, log_id: &str, offset: i64) -> Result<u64, String> {
    match metadata.strip_prefix(POSITION_TAG) {
        Some(id) if id == log_id => Ok(u64::try_from(offset).unwrap_or(0)),
        Some(id) => Err(id.to_owned()),
        None => Err(format!("(not a position: {metadata:?})")),
    }
}

/// Whether a record of an aborted transaction that failed with `code` may be in Kafka's log
/// or on its way there: it timed out, or librdkafka marked it possibly persisted (a request
/// carrying it went unanswered; the mark stays through later attempts and the abort's purge,
/// whose own code says nothing of it). Such an abort asks for a new producer epoch.
fn may_be_in_kafka(code: RDKafkaErrorCode, possibly_persisted: bool) -> bool {
    possibly_persisted || classify::is_timeout(code)
}

/// Whether the next transaction after an abort needs a new producer epoch: always, except
/// when Kafka refused a record of it outright (`refusal`: the record is sent alone next, or
/// dead-lettered) and nothing timed out or is in doubt. The possibly-persisted mark alone
/// did not cover every case: CI's `faults::quick_restarts_exactly_once` met the
/// out-of-sequence fatal error again after an abort (a commit's offsets refused with "not
/// coordinator" by a broker just restarted) none of whose reports was marked. A new epoch
/// starts the sequence numbers again, which no rewind by librdkafka can then contradict,
/// for about 0.4 s per abort; aborts over a refused record (a device sending what the
/// broker will never take) keep the producer, as they cost nothing in sequence.
fn new_epoch_after_abort(timed_out: bool, in_doubt: usize, refusal: bool) -> bool {
    timed_out || in_doubt > 0 || !refusal
}

/// What rdkafka's `commit_transaction` returns when its flush before the commit timed out.
fn commit_flush_timed_out(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
}

/// The librdkafka error code of `e`, an admin operation's own error included: rdkafka
/// gives that none, so an admin call the brokers did not answer (a timeout) would not count
/// as a link down (CI: a broker frozen while the gateway started kept the link "up").
fn error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    }
}

fn transaction_error(e: &KafkaError) -> Option<&RDKafkaError> {
    match e {
        KafkaError::Transaction(t) => Some(t),
        _ => None,
    }
}

fn reason(e: &KafkaError) -> String {
    match e {
        KafkaError::Transaction(t) => format!("{} ({})", t.string(), t.code()),
        other => other.to_string(),
    }
}

/// The producer settings a client of the same cluster needs too: where, and how to prove
/// itself.
fn is_connection_setting(key: &str) -> bool {
    key == "bootstrap.servers"
        || key.starts_with("security.")
        || key.starts_with("ssl.")
        || key.starts_with("sasl.")
        || key.starts_with("reconnect.backoff")
        || key.starts_with("socket.")
        || key == "client.dns.lookup"
        || key == "broker.address.family"
}

/// The identity of the log in `dir`: read from its identity file, or made up (random) and
/// written there (durably) the first time.
pub fn log_identity(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_identity(s.trim()) => return Ok(s.trim().to_owned()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not hold a log identity", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(id)
}

fn valid_identity(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_call_nobody_answered_is_a_link_down() {
        let timed_out = KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut);
        let open = OpenError::from_code(timed_out.to_string(), error_code(&timed_out));
        assert!(open.silent && open.unreachable, "{}", open.reason);
        let denied = KafkaError::AdminOp(RDKafkaErrorCode::TopicAuthorizationFailed);
        let open = OpenError::from_code(denied.to_string(), error_code(&denied));
        assert!(!open.silent && !open.unreachable, "{}", open.reason);
        assert_eq!(
            error_code(&KafkaError::Flush(RDKafkaErrorCode::QueueFull)),
            Some(RDKafkaErrorCode::QueueFull)
        );
    }

    #[test]
    fn an_abort_after_a_timeout_asks_for_a_new_epoch() {
        for code in [
            RDKafkaErrorCode::OperationTimedOut,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::MessageTimedOut,
        ] {
            assert!(classify::is_timeout(code), "{code}");
        }
        for code in [
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::State,
            RDKafkaErrorCode::PurgeQueue,
        ] {
            assert!(!classify::is_timeout(code), "{code}");
        }
    }

    #[test]
    fn an_abort_over_a_record_kafka_may_hold_asks_for_a_new_epoch() {
        // CI, quick_restarts_exactly_once: a batch in flight when the broker stopped, then
        // refused by the restarted broker (not leader yet), purged by the abort.
        assert!(may_be_in_kafka(RDKafkaErrorCode::PurgeQueue, true));
        assert!(may_be_in_kafka(RDKafkaErrorCode::PurgeInflight, true));
        assert!(may_be_in_kafka(RDKafkaErrorCode::MessageTimedOut, false));
        // Never sent, or refused outright: the sequence numbers librdkafka rewinds are free.
        assert!(!may_be_in_kafka(RDKafkaErrorCode::PurgeQueue, false));
        assert!(!may_be_in_kafka(RDKafkaErrorCode::InvalidRecord, false));
        assert!(!may_be_in_kafka(
            RDKafkaErrorCode::NotLeaderForPartition,
            false
        ));
    }

    #[test]
    fn only_an_abort_over_a_refused_record_keeps_its_producer() {
        // CI: "not coordinator" on the commit's offsets, no report marked, and the next
        // transaction out of sequence.
        assert!(new_epoch_after_abort(false, 0, false));
        assert!(new_epoch_after_abort(true, 0, false));
        assert!(new_epoch_after_abort(false, 3, true));
        assert!(!new_epoch_after_abort(false, 0, true));
    }

    #[test]
    fn a_commit_whose_flush_timed_out_is_retried_not_rebuilt() {
        assert!(commit_flush_timed_out(&KafkaError::Flush(
            RDKafkaErrorCode::OperationTimedOut
        )));
        assert!(!commit_flush_timed_out(&KafkaError::Flush(
            RDKafkaErrorCode::Fatal
        )));
        assert!(!commit_flush_timed_out(&KafkaError::Canceled));
    }

    /// A call waiting out an outage is not hung: its clock runs only while Kafka is
    /// reachable (a 25 s outage mid-commit once replaced the session).
    #[test]
    fn a_call_is_hung_only_after_its_timeout_with_the_link_up() {
        let clock = CallClock::default();
        let mut now = Instant::now();
        assert!(clock.hung_at(LinkState::Up, now).is_none(), "no step yet");
        clock.begin("send_offsets_to_transaction", CALL_TIMEOUT);
        let tick = Duration::from_millis(500);
        // Down for three of its timeouts: never hung.
        let until = now + 3 * CALL_TIMEOUT;
        while now < until {
            assert!(clock.hung_at(LinkState::Down, now).is_none());
            now += tick;
        }
        // Up again: hung once its timeout and the slack have passed since, not before.
        let up = now;
        while clock.hung_at(LinkState::Up, now).is_none() {
            now += tick;
            assert!(now - up <= CALL_TIMEOUT + HUNG_SLACK + tick, "never hung");
        }
        assert!(now - up >= CALL_TIMEOUT + HUNG_SLACK - tick);
        // Up all along: hung after its timeout and the slack.
        clock.begin("commit_transaction", CALL_TIMEOUT);
        let start = Instant::now();
        assert!(clock.hung_at(LinkState::Up, start).is_none());
        assert!(clock.hung_at(LinkState::Up, start + CALL_TIMEOUT).is_none());
        let hung = clock.hung_at(LinkState::Up, start + CALL_TIMEOUT + HUNG_SLACK + tick);
        assert_eq!(hung.map(|h| h.call), Some("commit_transaction"));
    }

    /// The link state comes from the producer's own connections, which a stuck producer may
    /// never make again: a call is hung [`OUTAGE_SLACK`] past its timeout whatever the link.
    #[test]
    fn a_call_is_hung_after_the_outage_slack_even_with_the_link_down() {
        let clock = CallClock::default();
        clock.begin("send_offsets_to_transaction", CALL_TIMEOUT);
        let start = Instant::now();
        let tick = Duration::from_millis(500);
        let mut now = start;
        while clock.hung_at(LinkState::Down, now).is_none() {
            now += tick;
            assert!(
                now - start <= CALL_TIMEOUT + OUTAGE_SLACK + tick,
                "never hung"
            );
        }
        assert!(now - start >= CALL_TIMEOUT + OUTAGE_SLACK);
        let hung = clock.hung_at(LinkState::Down, now).expect("hung");
        assert!(!hung.reachable);
        assert!(
            hung.to_string().contains("unreachable for part of it"),
            "{hung}"
        );
    }

    #[test]
    fn a_position_is_valid_only_for_its_log() {
        let meta = format!("{POSITION_TAG}abc");
        assert_eq!(parse_position(&meta, "abc", 42), Ok(42));
        assert_eq!(parse_position(&meta, "def", 42), Err("abc".to_owned()));
        assert!(parse_position("", "abc", 42).is_err());
        assert_eq!(parse_position(&meta, "abc", -5), Ok(0));
    }

    #[test]
    fn the_log_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = log_identity(dir.path()).expect("made");
        assert!(valid_identity(&first));
        assert_eq!(log_identity(dir.path()).expect("read"), first);
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(log_identity(other.path()).expect("made"), first);
        std::fs::write(dir.path().join(IDENTITY_FILE), "garbage").expect("write");
        assert!(log_identity(dir.path()).is_err());
    }

    #[test]
    fn the_positions_client_takes_only_connection_settings() {
        assert!(is_connection_setting("bootstrap.servers"));
        assert!(is_connection_setting("sasl.password"));
        assert!(is_connection_setting("ssl.ca.location"));
        assert!(!is_connection_setting("transactional.id"));
        assert!(!is_connection_setting("linger.ms"));
    }
}
