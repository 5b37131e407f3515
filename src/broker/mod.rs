//! The local MQTT broker: subscriptions, retained messages and per-session queues, so
//! applications on site (Node-RED, a dashboard, a PLC bridge) see what devices publish, and
//! devices receive what is meant for them, whether or not Kafka is reachable.
//!
//! Read top to bottom: [`Broker`] is the handle every MQTT connection shares → `filter.rs`
//! checks and matches topic filters → `index.rs` finds the sessions a topic goes to →
//! `mailbox.rs` queues each session's messages, bounded → `retained.rs` keeps one retained
//! message per topic, on disk.
//!
//! The contract with the uplink: a device's message reaches local subscribers only once it
//! is durable in the log (the connection hands it to [`Broker::publish`] when its append
//! resolves, in publish order), and publishing never waits on a subscriber: a full queue
//! drops that subscriber's copy and counts it (`edgegate_local_dropped_total{reason}`). A
//! retained publish is acknowledged only once its retained copy is durable as well.
//!
//! Sessions: a connection attaches to its client id's session. A clean start discards the
//! old session; otherwise its subscriptions and queued QoS 1/2 messages carry over, and
//! what was sent but not acknowledged is sent again with DUP. Persistent sessions outlive
//! their connections in memory until they expire (the client's Session Expiry Interval,
//! capped by `[mqtt] max_session_expiry`; 3.1.1 sessions use the cap).

pub mod filter;
pub mod index;
pub mod journal;
pub mod mailbox;
pub mod retained;
pub mod sessions;
mod small;

use small::SmallMap;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use index::{Index, Options};
use journal::Journal;
use mailbox::{Dropped, Mailbox, Outbound, QueueLimits, Totals};
use retained::{RetainError, Retained};

/// MQTT 5 properties a message carries to subscribers (and into the retained store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub payload_format_utf8: bool,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// A message as the broker passes it on: shared by every session it goes to.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The client that published it (No Local); `None` for messages from elsewhere.
    pub publisher: Option<Arc<str>>,
    /// When it expires (MQTT 5 Message Expiry Interval), Unix milliseconds.
    pub expires_ms: Option<i64>,
    pub props: Props,
    /// Set for a command from Kafka: which record it was, so its outcome can be reported.
    pub command: Option<Arc<Command>>,
}

/// A command's identity: the Kafka record it came from, and what the cloud correlates by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record's key, if any (the status record is keyed by it too).
    pub key: Option<Bytes>,
    /// The correlation the cloud sent (Correlation Data, or an id header).
    pub correlation: Option<Bytes>,
    /// Where its outcome goes.
    pub status_topic: Option<Arc<str>>,
    /// When the cloud produced it (the Kafka record's timestamp), ms since the epoch; what
    /// the age of a held command is measured from.
    pub sent_ms: i64,
}

/// What became of a command for one session; reported to the command's status topic.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub command: Arc<Command>,
    /// The session it was for (`None`: no session wanted it).
    pub client: Option<Arc<str>>,
    pub kind: OutcomeKind,
}

/// What the status writer is sent, in order.
#[derive(Debug)]
pub enum Report {
    /// An outcome to write; `then` is done once it is in the log (or could not be).
    Outcome(Outcome, Option<Finish>),
    /// Answered once every outcome sent before it is in the log, or could not be.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// A session's journal entry for a command the device is done with, finished only once the
/// command's outcome is in the log: a crash between the two delivers the command again and
/// reports it again, rather than forget the report.
#[derive(Debug)]
pub struct Finish {
    mailbox: Arc<Mailbox>,
    store_id: u64,
}

impl Finish {
    pub fn run(self) {
        self.mailbox.finish(self.store_id);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// The device acknowledged it (PUBACK, or PUBCOMP for QoS 2).
    Delivered,
    /// It expired before the device took it.
    Expired,
    /// No session subscribes to its MQTT topic.
    NoSession,
    /// The session it was queued for ended before the device acknowledged it: expired,
    /// forgotten past `max_offline_sessions`, replaced by a clean start, or one that does
    /// not outlive its connection closed. One that was in flight may have reached the
    /// device.
    SessionEnded,
    /// The session's queue was full, or the device refused it (an error PUBACK/PUBREC), or
    /// it is larger than the device accepts.
    Refused,
}

impl OutcomeKind {
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Delivered => "delivered",
            OutcomeKind::Expired => "expired",
            OutcomeKind::NoSession => "no_session",
            OutcomeKind::SessionEnded => "session_ended",
            OutcomeKind::Refused => "refused",
        }
    }
}

/// What [`Broker::publish`] did with a message.
pub struct Published {
    /// Sessions it was queued for.
    pub queued: usize,
    /// Resolves once the copies for persistent sessions are journaled (`None`: none were).
    pub durable: Option<mailbox::Durable>,
    /// Outcomes it reported for a command (refused by a full queue, or no session).
    pub reported: usize,
}

impl Message {
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|t| t <= now_ms)
    }

    /// What the message costs a queue: payload, topic and MQTT 5 properties, plus a fixed
    /// overhead. The properties count: a 256 KiB packet may be all user properties, and a
    /// queue's byte limit must hold for it as for a payload.
    pub fn cost(&self) -> usize {
        let p = &self.props;
        let props = p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + p.user_properties
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        self.payload.len() + self.topic.len() + props + 64
    }

    /// The Message Expiry Interval to send: what is left of it, at least 1 s.
    pub fn remaining_expiry(&self, now_ms: i64) -> Option<u32> {
        self.expires_ms.map(|t| {
            let secs = ((t - now_ms).max(0) + 999) / 1000;
            u32::try_from(secs).unwrap_or(u32::MAX).max(1)
        })
    }
}

/// The broker's limits, from `[mqtt]`.
#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    pub queue: QueueLimits,
    pub total_queued_bytes: usize,
    /// Persistent sessions' journaled messages read back into memory at once, beyond one
    /// per idle connection ([`mailbox::READ_BACK_BYTES`] unless a test says otherwise).
    pub read_back_bytes: usize,
    pub max_retained: usize,
    /// The longest a disconnected persistent session is kept.
    pub max_session_expiry: Duration,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Disconnected persistent sessions kept; beyond, the one closest to expiry goes.
    pub max_offline_sessions: usize,
}

/// What a SUBSCRIBE asked for, per filter.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub filter: &'a str,
    pub options: Options,
    /// 0: send retained messages; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

/// A refused subscription's reason code (MQTT 5; 3.1.1 sends 0x80 for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRefused {
    /// 0x8F Topic Filter invalid.
    FilterInvalid,
    /// No Local on a shared subscription: a protocol error [MQTT-3.8.3-4]; the connection
    /// is closed with 0x82.
    SharedNoLocal,
    /// 0x97 Quota exceeded: the session holds `max_subscriptions` already.
    Quota,
}

impl SubscribeRefused {
    pub fn code(self) -> u8 {
        match self {
            SubscribeRefused::FilterInvalid => 0x8f,
            SubscribeRefused::SharedNoLocal => 0x82,
            SubscribeRefused::Quota => 0x97,
        }
    }
}

/// A connection's hold on its session.
#[derive(Debug)]
pub struct Attached {
    pub client: Arc<str>,
    pub mailbox: Arc<Mailbox>,
    /// Whether an earlier session carried over.
    pub session_present: bool,
    /// Which connection holds the session (a takeover attaches a newer one).
    pub holder: u64,
}

#[derive(Debug)]
struct Session {
    /// Set while persistent: how long it outlives a connection (capped), and it is
    /// journaled.
    interval: Option<Duration>,
    mailbox: Arc<Mailbox>,
    /// Subscriptions by the filter as subscribed (share prefix included): a device has a
    /// few, so a list until it has many (a one-entry `HashMap` took 180 bytes a session).
    subscriptions: SmallMap<Box<str>, Options>,
    holder: Option<u64>,
    /// When a disconnected session is forgotten.
    expires: Option<Instant>,
}

/// Counters kept as handles: they are bumped once per delivery, on the fan-out path.
#[derive(Debug, Clone)]
struct Counters {
    queued: metrics::Counter,
    queue_full: metrics::Counter,
    total_full: metrics::Counter,
    offline: metrics::Counter,
    expired: metrics::Counter,
    too_large: metrics::Counter,
}

impl Counters {
    fn new() -> Counters {
        let dropped =
            |r: Dropped| metrics::counter!("edgegate_local_dropped_total", "reason" => r.label());
        Counters {
            queued: metrics::counter!("edgegate_local_queued_total"),
            queue_full: dropped(Dropped::QueueFull),
            total_full: dropped(Dropped::TotalFull),
            offline: dropped(Dropped::Offline),
            expired: dropped(Dropped::Expired),
            too_large: dropped(Dropped::TooLarge),
        }
    }

    fn dropped(&self, why: Dropped) -> &metrics::Counter {
        match why {
            Dropped::QueueFull => &self.queue_full,
            Dropped::TotalFull => &self.total_full,
            Dropped::Offline => &self.offline,
            Dropped::Expired => &self.expired,
            Dropped::TooLarge => &self.too_large,
        }
    }
}

/// What the broker holds, for metrics and `edgegate status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BrokerStats {
    pub sessions_online: usize,
    pub sessions_offline: usize,
    pub subscriptions: usize,
    pub retained: usize,
    pub queued_messages: usize,
    pub queued_bytes: usize,
    /// Of persistent sessions' journaled messages, the bytes read back into memory and not
    /// yet finished (sent and waiting for their acknowledgement).
    pub read_back_bytes: usize,
    /// Commands from the downlink waiting for their devices (not yet sent).
    pub commands_held: usize,
    /// When the oldest of them was produced to Kafka (ms since the epoch).
    pub oldest_command_ms: Option<i64>,
    /// Records on the downlink's topics not yet consumed, as the consumer last reported
    /// (`None`: no downlink, or no report yet).
    pub downlink_lag: Option<i64>,
}

struct Inner {
    config: BrokerConfig,
    index: RwLock<Index>,
    /// Shared with the sessions journal's writer, which snapshots it for a rewrite.
    sessions: Arc<Mutex<HashMap<Arc<str>, Session>>>,
    retained: Retained,
    journal: Journal,
    /// Ids of journaled messages.
    ids: Arc<AtomicU64>,
    totals: Arc<Totals>,
    counters: Counters,
    next_holder: AtomicU64,
    /// The index's size, readable without its lock.
    subscriptions: std::sync::atomic::AtomicUsize,
    /// Where command outcomes go: kept in the channel until the status writer takes its
    /// end, so an outcome reported before it runs (a session restored from the journal,
    /// delivering as soon as the listener is up) is written, not dropped.
    outcomes: tokio::sync::mpsc::UnboundedSender<Report>,
    /// The channel's other end, until [`Broker::take_outcomes`].
    outcomes_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Report>>>,
    /// The downlink consumer's lag as last reported; negative: unknown.
    downlink_lag: std::sync::atomic::AtomicI64,
    /// The downlink's position as journaled (shared with the journal's snapshot).
    marks: Arc<Mutex<sessions::Marks>>,
}

/// The handle every connection shares.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens the broker's state in `dir` (the retained messages' journal).
    pub fn open(dir: &Path, config: BrokerConfig) -> std::io::Result<Broker> {
        let now_ms = crate::ingest::now_ms();
        let retained = Retained::open(dir, config.max_retained, now_ms)?;
        if !retained.is_empty() {
            tracing::info!(retained = retained.len(), "Loaded the retained messages.");
        }
        let path = dir.join("sessions.journal");
        let found = journal::read(&path, sessions::MAGIC, now_ms)?;
        let sessions::Replayed {
            sessions: restored,
            max_id,
            marks,
            bad,
        } = sessions::replay(&found.bodies, &found.offsets);
        if bad > 0 {
            tracing::warn!(records = bad, path = %path.display(), "Skipped session records that do not decode.");
        }
        let marks = Arc::new(Mutex::new(marks));
        let map: Arc<Mutex<HashMap<Arc<str>, Session>>> = Arc::default();
        let live = Arc::clone(&map);
        let live_marks = Arc::clone(&marks);
        let snapshot: journal::Snapshot = Box::new(move || {
            let mut out: Vec<journal::Live> = live_marks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((topic, partition), offset)| {
                    Bytes::from(sessions::mark(topic, *partition, *offset)).into()
                })
                .collect();
            let sessions = live.lock().unwrap_or_else(|p| p.into_inner());
            for (client, s) in sessions.iter() {
                let Some(interval) = s.interval else {
                    continue;
                };
                out.push(Bytes::from(sessions::session(client, millis(interval))).into());
                for (filter, o) in s.subscriptions.iter() {
                    out.push(Bytes::from(sessions::sub(client, filter, o)).into());
                }
                s.mailbox.snapshot(&mut out);
            }
            out
        });
        let journal = Journal::start(&path, sessions::MAGIC, &found, snapshot)?;
        let (outcomes, outcomes_rx) = tokio::sync::mpsc::unbounded_channel();
        let broker = Broker {
            inner: Arc::new(Inner {
                totals: Totals::with_read_back(config.total_queued_bytes, config.read_back_bytes),
                config,
                index: RwLock::new(Index::default()),
                sessions: map,
                retained,
                journal,
                ids: Arc::new(AtomicU64::new(max_id + 1)),
                counters: Counters::new(),
                next_holder: AtomicU64::new(1),
                subscriptions: std::sync::atomic::AtomicUsize::new(0),
                outcomes,
                outcomes_rx: Mutex::new(Some(outcomes_rx)),
                downlink_lag: std::sync::atomic::AtomicI64::new(-1),
                marks,
            }),
        };
        broker.restore(restored);
        Ok(broker)
    }

    /// Brings back the persistent sessions the journal holds, disconnected as of now.
    fn restore(&self, restored: HashMap<String, sessions::Restored>) {
        if restored.is_empty() {
            return;
        }
        let (count, mut queued) = (restored.len(), 0);
        let mut sessions = self.sessions();
        let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
        for (client_id, r) in restored {
            let client: Arc<str> = Arc::from(client_id);
            let interval = Duration::from_millis(r.interval_ms);
            let mailbox = self.mailbox(&client, true);
            for (filter, options) in &r.subscriptions {
                if let Ok(parsed) = filter::parse(filter) {
                    index.insert(parsed.share, parsed.filter, &client, *options, &mailbox);
                }
            }
            queued += r.queue.len();
            mailbox.restore(r.queue);
            sessions.insert(
                client,
                Session {
                    interval: Some(interval),
                    mailbox,
                    subscriptions: r
                        .subscriptions
                        .into_iter()
                        .map(|(filter, o)| (filter.into_boxed_str(), o))
                        .collect(),
                    holder: None,
                    expires: Some(Instant::now() + interval),
                },
            );
        }
        self.count(&index);
        tracing::info!(
            sessions = count,
            queued,
            "Restored the persistent MQTT sessions."
        );
    }

    /// A new mailbox, journaling its QoS 1/2 messages when `persistent`.
    fn mailbox(&self, client: &Arc<str>, persistent: bool) -> Arc<Mailbox> {
        let mailbox = Mailbox::new(self.inner.config.queue, Arc::clone(&self.inner.totals));
        if persistent {
            mailbox.set_persist(Some(self.persist(client)));
        }
        mailbox
    }

    fn persist(&self, client: &Arc<str>) -> mailbox::Persist {
        mailbox::Persist {
            client: Arc::clone(client),
            journal: self.inner.journal.clone(),
            ids: Arc::clone(&self.inner.ids),
        }
    }

    /// How long a session with `keep` outlives its connection, capped; `None`: not at all.
    fn interval(&self, keep: Option<Option<Duration>>) -> Option<Duration> {
        let cap = self.inner.config.max_session_expiry;
        keep.map(|limit| limit.map_or(cap, |l| l.min(cap)))
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Session>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `client_id` has a session that outlives its connection and has not expired
    /// (the receipt store drops the QoS 2 state of clients without one at start).
    pub fn has_persistent_session(&self, client_id: &str) -> bool {
        let now = Instant::now();
        self.sessions().get(client_id).is_some_and(|s| {
            s.interval.is_some() && (s.holder.is_some() || s.expires.is_none_or(|t| t > now))
        })
    }

    /// Attaches a new connection to `client_id`'s session: a fresh one on a clean start (or
    /// when none is alive), the earlier one otherwise. `keep` is how long the session is to
    /// outlive this connection (`None`: not at all, `Some(None)`: up to
    /// `max_session_expiry`); a session that is to outlive it is journaled.
    pub fn attach(
        &self,
        client_id: &str,
        clean_start: bool,
        keep: Option<Option<Duration>>,
    ) -> Attached {
        let holder = self.inner.next_holder.fetch_add(1, Ordering::Relaxed);
        let interval = self.interval(keep);
        let now = Instant::now();
        let mut sessions = self.sessions();
        let existing = sessions
            .get_key_value(client_id)
            .map(|(k, _)| Arc::clone(k));
        if let Some(key) = existing {
            // A session that ends with its connection (no interval) ends on a takeover too,
            // so a new connection finds nothing to resume in it.
            let alive = sessions.get(&key).is_some_and(|s| {
                s.interval.is_some() && (s.holder.is_some() || s.expires.is_none_or(|t| t > now))
            });
            if !clean_start && alive {
                if let Some(session) = sessions.get_mut(&key) {
                    session.holder = Some(holder);
                    session.expires = None;
                    self.repersist(&key, session, interval);
                    session.mailbox.set_online(true);
                    return Attached {
                        client: key,
                        mailbox: Arc::clone(&session.mailbox),
                        session_present: true,
                        holder,
                    };
                }
            }
            if let Some(old) = sessions.remove(&key) {
                self.discard(&key, old);
            }
        }
        let client: Arc<str> = Arc::from(client_id);
        let mailbox = self.mailbox(&client, interval.is_some());
        if let Some(interval) = interval {
            self.inner
                .journal
                .append_later(&sessions::session(&client, millis(interval)));
        }
        mailbox.set_online(true);
        sessions.insert(
            Arc::clone(&client),
            Session {
                interval,
                mailbox: Arc::clone(&mailbox),
                subscriptions: SmallMap::default(),
                holder: Some(holder),
                expires: None,
            },
        );
        Attached {
            client,
            mailbox,
            session_present: false,
            holder,
        }
    }

    /// A resumed session whose client now asks for another expiry: journaled from now on,
    /// no longer, or with the new interval.
    fn repersist(&self, client: &Arc<str>, session: &mut Session, interval: Option<Duration>) {
        if session.interval == interval {
            return;
        }
        match interval {
            Some(i) => {
                let journal = &self.inner.journal;
                journal.append_later(&sessions::session(client, millis(i)));
                if session.interval.is_none() {
                    for (filter, o) in session.subscriptions.iter() {
                        journal.append_later(&sessions::sub(client, filter, o));
                    }
                    session.mailbox.set_persist(Some(self.persist(client)));
                }
            }
            None => {
                self.inner.journal.append_later(&sessions::gone(client));
                session.mailbox.set_persist(None);
            }
        }
        session.interval = interval;
    }

    /// The connection `holder` ended. `keep` is how long the session outlives it (`None`:
    /// not at all, `Some(None)`: up to `max_session_expiry`); `unacked` are the QoS 1/2
    /// messages it sent without an acknowledgement, queued again for the next connection.
    pub fn detach(
        &self,
        attached: &Attached,
        unacked: Vec<Outbound>,
        keep: Option<Option<Duration>>,
    ) {
        let mut sessions = self.sessions();
        let Some(session) = sessions
            .get_mut(&attached.client)
            .filter(|s| Arc::ptr_eq(&s.mailbox, &attached.mailbox))
        else {
            // A clean start replaced the session: what this connection held goes with it.
            self.ended(&attached.client, unacked.iter());
            return;
        };
        if keep.is_some() {
            attached.mailbox.requeue(unacked);
        } else {
            self.ended(&attached.client, unacked.iter());
        }
        if session.holder != Some(attached.holder) {
            // Taken over by a newer connection to the same session, which now serves it.
            return;
        }
        match keep {
            Some(limit) => {
                let cap = self.inner.config.max_session_expiry;
                session.holder = None;
                session.expires = Some(Instant::now() + limit.map_or(cap, |l| l.min(cap)));
                session.mailbox.set_online(false);
                self.evict_over_limit(&mut sessions);
            }
            None => {
                if let Some(old) = sessions.remove(&attached.client) {
                    self.discard(&attached.client, old);
                }
            }
        }
    }

    /// Past `max_offline_sessions`, forgets the disconnected sessions closest to expiry (a
    /// reconnect loop with fresh client ids must not grow memory without bound).
    fn evict_over_limit(&self, sessions: &mut HashMap<Arc<str>, Session>) {
        let offline = sessions.values().filter(|s| s.holder.is_none()).count();
        let over = offline.saturating_sub(self.inner.config.max_offline_sessions);
        if over == 0 {
            return;
        }
        let mut candidates: Vec<(Instant, Arc<str>)> = sessions
            .iter()
            .filter(|(_, s)| s.holder.is_none())
            .filter_map(|(k, s)| Some((s.expires?, Arc::clone(k))))
            .collect();
        candidates.sort();
        for (_, key) in candidates.into_iter().take(over) {
            if let Some(old) = sessions.remove(&key) {
                tracing::warn!(client_id = %key, "Forgot a disconnected session: max_offline_sessions reached.");
                self.discard(&key, old);
            }
        }
    }

    /// Reports the commands among `dropped` as [`OutcomeKind::SessionEnded`]: their session
    /// will never send them.
    fn ended<'a>(&self, client: &Arc<str>, dropped: impl Iterator<Item = &'a Outbound>) {
        for out in dropped {
            if let Some(command) = &out.message.command {
                self.outcome(command, Some(client), OutcomeKind::SessionEnded);
            }
        }
    }

    /// Removes a session's subscriptions from the index and empties its queue; the commands
    /// it held are reported, since no one will deliver them now.
    fn discard(&self, client: &Arc<str>, session: Session) {
        if session.interval.is_some() {
            self.inner.journal.append_later(&sessions::gone(client));
        }
        if !session.subscriptions.is_empty() {
            let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
            for (filter, _) in session.subscriptions.iter() {
                if let Ok(parsed) = filter::parse(filter) {
                    index.remove(parsed.share, parsed.filter, client);
                }
            }
            self.count(&index);
        }
        for command in session.mailbox.clear_commands() {
            self.outcome(&command, Some(client), OutcomeKind::SessionEnded);
        }
    }

    /// Forgets disconnected sessions whose expiry has passed; returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut sessions = self.sessions();
        let expired: Vec<Arc<str>> = sessions
            .iter()
            .filter(|(_, s)| s.holder.is_none() && s.expires.is_some_and(|t| t <= now))
            .map(|(k, _)| Arc::clone(k))
            .collect();
        for key in &expired {
            if let Some(old) = sessions.remove(key) {
                self.discard(key, old);
            }
        }
        expired.len()
    }

    /// Adds (or replaces) one subscription; returns the QoS granted. Retained messages it
    /// matches are queued to the session, after the SUBACK the caller sends.
    pub fn subscribe(
        &self,
        attached: &Attached,
        request: &Request<'_>,
    ) -> Result<u8, SubscribeRefused> {
        let parsed = filter::parse(request.filter).map_err(|_| SubscribeRefused::FilterInvalid)?;
        if parsed.share.is_some() && request.options.no_local {
            return Err(SubscribeRefused::SharedNoLocal);
        }
        let options = request.options;
        let existed = {
            let mut sessions = self.sessions();
            let Some(session) = sessions.get_mut(&attached.client) else {
                return Err(SubscribeRefused::FilterInvalid);
            };
            if session.subscriptions.len() >= self.inner.config.max_subscriptions
                && session.subscriptions.get(request.filter).is_none()
            {
                return Err(SubscribeRefused::Quota);
            }
            let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
            index.insert(
                parsed.share,
                parsed.filter,
                &attached.client,
                options,
                &attached.mailbox,
            );
            self.count(&index);
            if session.interval.is_some() {
                self.inner.journal.append_later(&sessions::sub(
                    &attached.client,
                    request.filter,
                    &options,
                ));
            }
            session
                .subscriptions
                .insert(request.filter.into(), options)
                .is_some()
        };
        // No retained messages for a new shared subscription (MQTT 5 §4.8.2).
        let send_retained = parsed.share.is_none()
            && match request.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
        if send_retained {
            let now = crate::ingest::now_ms();
            for message in self.inner.retained.matching(parsed.filter, now) {
                let qos = message.qos.min(options.qos);
                // [MQTT-3.3.1-8] retained messages sent on subscribe keep RETAIN set.
                let out = Outbound::new(message, qos, true, options.id.into_iter().collect());
                // Durable with the journal's next commit; the SUBACK need not wait for it.
                let _ = self.queue(&attached.mailbox, out);
            }
        }
        Ok(options.qos)
    }

    /// Removes one subscription; returns whether it existed.
    pub fn unsubscribe(&self, attached: &Attached, text: &str) -> bool {
        let Ok(parsed) = filter::parse(text) else {
            return false;
        };
        let mut sessions = self.sessions();
        let Some(session) = sessions.get_mut(&attached.client) else {
            return false;
        };
        if session.subscriptions.remove(text).is_none() {
            return false;
        }
        if session.interval.is_some() {
            self.inner
                .journal
                .append_later(&sessions::unsub(&attached.client, text));
        }
        let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
        let removed = index.remove(parsed.share, parsed.filter, &attached.client);
        self.count(&index);
        removed
    }

    fn count(&self, index: &Index) {
        self.inner
            .subscriptions
            .store(index.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends a durable message to every matching session. Never waits.
    pub fn publish(&self, message: &Arc<Message>) -> Published {
        // Pushed under the index's read lock (pushing never waits), so the targets borrow
        // from it. Lock order: index, then a mailbox; nothing takes them the other way.
        let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
        let targets = index.targets(&message.topic, message.publisher.as_deref());
        let mut durable = None;
        let (mut queued, mut full, mut reported) = (0usize, 0u64, 0usize);
        let cost = message.cost();
        for t in targets {
            let qos = message.qos.min(t.qos);
            // A full queue is seen without its lock or a copy of the message: a subscriber
            // slower than the publishers is refused most of them, and each refusal should
            // cost next to nothing.
            let result = match t.mailbox.refuses(qos, cost) {
                Some(why) => Err(why),
                None => t.mailbox.push(Outbound::new(
                    Arc::clone(message),
                    qos,
                    message.retain && t.retain_as_published,
                    t.subscription_ids,
                )),
            };
            // The journal commits in order: the last copy's write covers the others.
            match result {
                Ok(Some(d)) => {
                    queued += 1;
                    durable = Some(d);
                }
                Ok(None) => queued += 1,
                Err(why) => {
                    if why == Dropped::QueueFull {
                        full += 1;
                    } else {
                        self.count_dropped(why, 1);
                    }
                    if let Some(command) = &message.command {
                        self.outcome(command, Some(t.client), OutcomeKind::Refused);
                        reported += 1;
                    }
                }
            }
        }
        drop(index);
        if queued > 0 {
            self.inner.counters.queued.increment(queued as u64);
        }
        if full > 0 {
            self.count_dropped(Dropped::QueueFull, full);
        }
        if queued == 0 {
            if let Some(command) = &message.command {
                self.outcome(command, None, OutcomeKind::NoSession);
                reported += 1;
            }
        }
        Published {
            queued,
            durable,
            reported,
        }
    }

    /// The last offset of `topic`/`partition` the downlink handled, as journaled: records up
    /// to it are not taken again (they are queued, or were reported).
    pub fn handled(&self, topic: &str, partition: i32) -> Option<i64> {
        let marks = self.inner.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.get(&(topic.to_owned(), partition)).copied()
    }

    /// Resolves once the sessions' journal holds everything recorded so far (the messages a
    /// client acknowledged, in particular).
    pub fn sync_sessions(&self) -> impl Future<Output = Result<(), String>> + Send + use<> {
        self.inner.journal.sync()
    }

    /// Records that the downlink handled `offset`; resolves once durable. The journal
    /// commits in order, so anything queued before is durable then too.
    pub fn mark_handled(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> impl Future<Output = Result<(), String>> + Send + use<> {
        {
            let mut marks = self.inner.marks.lock().unwrap_or_else(|p| p.into_inner());
            let at = marks.entry((topic.to_owned(), partition)).or_insert(offset);
            *at = (*at).max(offset);
        }
        self.inner
            .journal
            .append(&sessions::mark(topic, partition, offset))
    }

    /// The downlink consumer's lag (records not yet consumed), from its statistics.
    pub fn set_downlink_lag(&self, lag: i64) {
        self.inner.downlink_lag.store(lag, Ordering::Relaxed);
    }

    /// The outcomes of commands, for the status writer: every one reported since the broker
    /// opened, and all after. `None` once taken.
    pub fn take_outcomes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Report>> {
        self.inner
            .outcomes_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Reports what became of a command for `client`.
    pub fn outcome(&self, command: &Arc<Command>, client: Option<&Arc<str>>, kind: OutcomeKind) {
        self.report(command, client, kind, None);
    }

    fn report(
        &self,
        command: &Arc<Command>,
        client: Option<&Arc<str>>,
        kind: OutcomeKind,
        then: Option<Finish>,
    ) {
        metrics::counter!("edgegate_downlink_outcomes_total", "outcome" => kind.label())
            .increment(1);
        let outcome = Outcome {
            command: Arc::clone(command),
            client: client.cloned(),
            kind,
        };
        // Fails only once the writer has stopped (shutdown): nothing is written then, and
        // a journaled command is not finished, so it is delivered and reported after the
        // restart.
        let _ = self.inner.outcomes.send(Report::Outcome(outcome, then));
    }

    /// Resolves once every outcome reported before the call is in the log: `false` if the
    /// writer stopped first (shutdown).
    pub fn outcomes_written(&self) -> impl Future<Output = bool> + Send + use<> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.inner.outcomes.send(Report::Barrier(tx)).is_ok();
        async move { sent && rx.await.is_ok() }
    }

    /// Whether a session subscribes to `topic` now (what [`Broker::publish`] would find).
    pub fn has_subscriber(&self, topic: &str) -> bool {
        let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
        !index.targets(topic, None).is_empty()
    }

    /// A session's client is done with a message: off the journal; a command's outcome is
    /// reported. A journaled command with a status topic leaves the journal only once its
    /// outcome is in the log.
    pub fn finished(&self, attached: &Attached, out: &Outbound, kind: OutcomeKind) {
        match &out.message.command {
            Some(command) if out.store_id != 0 && command.status_topic.is_some() => {
                let then = Finish {
                    mailbox: Arc::clone(&attached.mailbox),
                    store_id: out.store_id,
                };
                self.report(command, Some(&attached.client), kind, Some(then));
            }
            command => {
                attached.mailbox.finish(out.store_id);
                if let Some(command) = command {
                    self.outcome(command, Some(&attached.client), kind);
                }
            }
        }
    }

    /// Keeps `message` as its topic's retained message (an empty payload clears it), durably.
    pub async fn retain(&self, message: &Arc<Message>) -> Result<(), RetainError> {
        self.start_retain(message)?.await
    }

    /// Takes `message` as retained now, in call order; the future resolves once it is
    /// durable. A refusal is logged and counted here.
    pub fn start_retain(
        &self,
        message: &Arc<Message>,
    ) -> Result<impl Future<Output = Result<(), RetainError>> + Send + use<>, RetainError> {
        self.inner
            .retained
            .start(message)
            .inspect_err(|e| retain_refused(&message.topic, e))
    }

    /// Whether any subscription exists: without one, a publish needs no [`Message`] unless
    /// it is retained.
    pub fn has_subscribers(&self) -> bool {
        self.inner
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }

    fn queue(&self, mailbox: &Mailbox, out: Outbound) -> Result<Option<mailbox::Durable>, Dropped> {
        match mailbox.push(out) {
            Ok(durable) => {
                self.inner.counters.queued.increment(1);
                Ok(durable)
            }
            Err(why) => {
                self.count_dropped(why, 1);
                Err(why)
            }
        }
    }

    /// Counts messages dropped on their way to a subscriber.
    pub fn count_dropped(&self, why: Dropped, n: u64) {
        self.inner.counters.dropped(why).increment(n);
    }

    pub fn stats(&self) -> BrokerStats {
        let (online, offline, held) = {
            let sessions = self.sessions();
            let online = sessions.values().filter(|s| s.holder.is_some()).count();
            let mut held = mailbox::Held::default();
            for s in sessions.values() {
                let h = s.mailbox.held();
                held.messages += h.messages;
                held.commands += h.commands;
                held.oldest_command_ms = match (held.oldest_command_ms, h.oldest_command_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            (online, sessions.len() - online, held)
        };
        BrokerStats {
            sessions_online: online,
            sessions_offline: offline,
            subscriptions: self
                .inner
                .index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            retained: self.inner.retained.len(),
            queued_messages: held.messages,
            queued_bytes: self.inner.totals.bytes(),
            read_back_bytes: self.inner.totals.reading(),
            commands_held: held.commands,
            oldest_command_ms: held.oldest_command_ms,
            downlink_lag: match self.inner.downlink_lag.load(Ordering::Relaxed) {
                lag if lag < 0 => None,
                lag => Some(lag),
            },
        }
    }
}

/// The HELP text of the broker's metrics.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "edgegate_local_queued_total",
        "Messages queued for local subscribers (one per subscriber session)."
    );
    describe_counter!(
        "edgegate_local_dropped_total",
        "Messages not delivered to a local subscriber, by reason (queue_full, total_full, offline_qos0, expired, too_large)."
    );
    describe_counter!(
        "edgegate_local_delivered_total",
        "Messages sent to local subscribers, by QoS."
    );
    describe_gauge!(
        "edgegate_downlink_commands_held",
        "Commands from the downlink waiting in sessions' queues for their devices."
    );
    describe_gauge!(
        "edgegate_downlink_oldest_command_age_seconds",
        "Age of the oldest command held (since it was produced to Kafka); 0 when none is held."
    );
    describe_gauge!(
        "edgegate_downlink_consumer_lag",
        "Records on the downlink's Kafka topics not yet consumed by this gateway (its consumer's last statistics)."
    );
    describe_gauge!(
        "edgegate_mqtt_sessions",
        "MQTT sessions, by state (online: connected; offline: persistent, client away)."
    );
    describe_gauge!(
        "edgegate_mqtt_subscriptions",
        "Subscriptions of all sessions."
    );
    describe_gauge!("edgegate_retained_messages", "Retained messages stored.");
    describe_gauge!(
        "edgegate_local_queued_messages",
        "Messages waiting to be sent to local subscribers."
    );
    describe_gauge!(
        "edgegate_local_queued_bytes",
        "Bytes waiting to be sent to local subscribers (bounded by max_queued_bytes_total)."
    );
    describe_gauge!(
        "edgegate_local_read_back_bytes",
        "Bytes of persistent sessions' queued messages read back from disk and not yet acknowledged (1 MiB at once, beyond one per idle connection)."
    );
    describe_counter!(
        "edgegate_downlink_outcomes_total",
        "Outcomes of commands from Kafka, per session, by outcome (delivered, expired, no_session, refused, session_ended)."
    );
    describe_counter!(
        "edgegate_retained_refused_total",
        "Retained publishes not retained (max_retained_messages reached, or a write failed)."
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One place for a retained publish that was not retained: logged and counted.
fn retain_refused(topic: &str, error: &RetainError) {
    metrics::counter!("edgegate_retained_refused_total").increment(1);
    tracing::warn!(topic, error = %error, "A retained message was not retained.");
}

/// How often disconnected sessions are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Forgets expired sessions every [`SWEEP_INTERVAL`] until `shutdown`.
pub async fn sweep(broker: Broker, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = broker.sweep();
        if expired > 0 {
            tracing::info!(expired, "Forgot expired MQTT sessions.");
        }
    }
}

#[cfg(test)]
mod tests;
