//! A session's queue of messages waiting to be sent to its client.
//!
//! Publishers never wait on a subscriber: [`Mailbox::push`] takes a short lock and either
//! queues or drops (and counts) the message, so a slow or absent subscriber costs only
//! itself. The queue is bounded per session (messages and bytes) and across all sessions
//! (bytes, [`Totals`]); the connection serving the session takes from it as its client's
//! receive maximum allows. A persistent session's mailbox outlives its connections, so
//! what arrives while the client is away waits here (QoS 1/2 only, as MQTT allows).

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use super::journal::{Journal, Live};
use super::sessions::{self, Kept};
use super::{Command, Message};

/// Resolves once a journaled message is durable (or its write failed, said once in the log).
pub type Durable = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// How many messages and bytes one session may have waiting.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// Bytes waiting in every mailbox together, against one limit; and the messages read back
/// from the sessions journal and not yet finished, against another ([`READ_BACK_BYTES`]).
#[derive(Debug)]
pub struct Totals {
    bytes: AtomicUsize,
    limit: usize,
    reading: AtomicUsize,
    reading_limit: usize,
}

/// How much of persistent sessions' journaled messages may be read back into memory at once,
/// across every session, beyond one message per session with nothing in flight (which is
/// always let through, so no session waits on others that do not acknowledge): each counts
/// its [`Message::cost`](super::Message::cost) plus [`READ_BACK_OVERHEAD`]. Without it a
/// reconnecting device took up to its receive maximum (128 by default) of its held messages
/// into memory at once, so devices reconnecting together with a backlog each held, say,
/// 128 commands of 10 KB: 1.3 MB a device (docs/ARCHITECTURE.md, "The downlink").
pub const READ_BACK_BYTES: usize = 1 << 20;

/// What a message read back costs beyond its [`Message::cost`](super::Message::cost): the
/// record it was read into, the decoded message, its command's identity and the packet id's
/// state, about 450 bytes for a small command (heaptrack, tools/bench-downlink).
pub const READ_BACK_OVERHEAD: usize = 512;

impl Totals {
    pub fn new(limit: usize) -> Arc<Totals> {
        Totals::with_read_back(limit, READ_BACK_BYTES)
    }

    /// [`Totals::new`] with another read-back budget than [`READ_BACK_BYTES`].
    pub fn with_read_back(limit: usize, reading_limit: usize) -> Arc<Totals> {
        Arc::new(Totals {
            bytes: AtomicUsize::new(0),
            limit,
            reading: AtomicUsize::new(0),
            reading_limit,
        })
    }

    /// Bytes of journaled messages read back and not yet finished.
    pub fn reading(&self) -> usize {
        self.reading.load(Ordering::Relaxed)
    }

    /// Counts `n` bytes read back; `force`: even over the budget.
    fn read_back(self: &Arc<Self>, n: usize, force: bool) -> Option<ReadBack> {
        let limit = if force {
            usize::MAX
        } else {
            self.reading_limit
        };
        add_within(&self.reading, n, limit).then(|| ReadBack {
            totals: Arc::clone(self),
            bytes: n,
        })
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn reserve(&self, n: usize) -> bool {
        add_within(&self.bytes, n, self.limit)
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Adds `n` to `counter` unless that takes it over `limit`; whether it did.
fn add_within(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
    let mut current = counter.load(Ordering::Relaxed);
    loop {
        if current.saturating_add(n) > limit {
            return false;
        }
        match counter.compare_exchange_weak(
            current,
            current + n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(now) => current = now,
        }
    }
}

/// A journaled message read back into memory, counted against [`READ_BACK_BYTES`] until
/// the last copy of its [`Outbound`] is dropped (finished, or given up with its connection).
#[derive(Debug)]
pub struct ReadBack {
    totals: Arc<Totals>,
    bytes: usize,
}

impl Drop for ReadBack {
    fn drop(&mut self) {
        self.totals.reading.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One message on its way to one session, with what its subscriptions made of it.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub message: Arc<Message>,
    /// min(the message's QoS, the subscription's).
    pub qos: u8,
    /// The RETAIN flag to send: set for retained messages sent on subscribe, and for live
    /// ones only under Retain As Published.
    pub retain: bool,
    /// The identifiers of every matching subscription that has one (MQTT 5).
    pub subscription_ids: Vec<u32>,
    /// Sent before and not acknowledged: resend with DUP.
    pub dup: bool,
    /// The packet identifier it was sent with (0: never sent); a resend reuses it
    /// [MQTT-4.4.0-1].
    pub pkid: u16,
    /// QoS 2 whose PUBREC came back: what is owed is the PUBREL, not the PUBLISH.
    pub released: bool,
    /// Its id in the sessions journal (0: not journaled: QoS 0, or a session that is not
    /// persistent); the connection reports it finished with [`Mailbox::finish`].
    pub store_id: u64,
    /// Set while it is a journaled message read back into memory ([`READ_BACK_BYTES`]).
    pub read_back: Option<Arc<ReadBack>>,
}

impl Outbound {
    /// A message's first trip to one session.
    pub fn new(
        message: Arc<Message>,
        qos: u8,
        retain: bool,
        subscription_ids: Vec<u32>,
    ) -> Outbound {
        Outbound {
            message,
            qos,
            retain,
            subscription_ids,
            dup: false,
            pkid: 0,
            released: false,
            store_id: 0,
            read_back: None,
        }
    }
}

impl Outbound {
    /// What it counts against the limits, the same in every form it is queued in.
    fn cost(&self) -> usize {
        cost32(self.message.cost()) as usize
    }
}

/// Why a message did not go into a mailbox; the label of
/// `edgegate_local_dropped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The session's queue is at its message or byte limit.
    QueueFull,
    /// Every mailbox together is at `max_queued_bytes_total`.
    TotalFull,
    /// QoS 0 for a client that is not connected (MQTT lets a server drop these).
    Offline,
    /// The message expired before it could be sent.
    Expired,
    /// Larger than the client's Maximum Packet Size [MQTT-3.1.2-25].
    TooLarge,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::TotalFull => "total_full",
            Dropped::Offline => "offline_qos0",
            Dropped::Expired => "expired",
            Dropped::TooLarge => "too_large",
        }
    }
}

/// One message in a queue.
#[derive(Debug)]
enum Entry {
    /// A message on its first trip to a session that does not journal it, as most are:
    /// held inline, so queueing it allocates nothing of its own. (Boxed, every delivery of
    /// a fan-out was a box made on the publisher's thread and freed on the subscriber's,
    /// which glibc's per-thread cache cannot serve: half of them took its slow path.)
    Live {
        message: Arc<Message>,
        /// The subscription identifiers, if any (MQTT 5): rare, so boxed and thin.
        subscription_ids: Option<Box<[u32]>>,
        qos: u8,
        retain: bool,
    },
    /// Anything else ready to send (a resend, with its DUP flag and packet id). Boxed: a
    /// queue of journaled entries stays small (an entry is 32 bytes, not 56).
    Ready(Box<Outbound>),
    /// A persistent session's QoS 1/2 message, kept only in the sessions journal (which
    /// holds its bytes until they are written, then its place in the file) and read back
    /// when taken: a held backlog (commands for a device that is away) costs this entry and
    /// the journal's place of it, not its bytes.
    Journaled {
        id: u64,
        /// A downlink command's Kafka timestamp (`None`: not a command).
        command_ms: Option<i64>,
        cost: u32,
        /// Restored from the journal: it may have been sent before the restart.
        dup: bool,
    },
}

// A held backlog of commands is a queue of these: they stay as small as a journaled one.
const _: () = assert!(std::mem::size_of::<Entry>() <= 32);

impl Entry {
    /// `out` as queued: inline when it carries nothing of an earlier trip.
    fn new(out: Outbound) -> Entry {
        if out.dup || out.pkid != 0 || out.released || out.store_id != 0 {
            return Entry::Ready(Box::new(out));
        }
        let ids = out.subscription_ids;
        Entry::Live {
            message: out.message,
            subscription_ids: (!ids.is_empty()).then(|| ids.into_boxed_slice()),
            qos: out.qos,
            retain: out.retain,
        }
    }

    /// The message, unless only the sessions journal holds it.
    fn message(&self) -> Option<&Message> {
        match self {
            Entry::Live { message, .. } => Some(message),
            Entry::Ready(out) => Some(&out.message),
            Entry::Journaled { .. } => None,
        }
    }

    fn is_command(&self) -> bool {
        match self {
            Entry::Journaled { command_ms, .. } => command_ms.is_some(),
            _ => self.message().is_some_and(|m| m.command.is_some()),
        }
    }

    fn command_ms(&self) -> Option<i64> {
        match self {
            Entry::Journaled { command_ms, .. } => *command_ms,
            _ => self.message()?.command.as_ref().map(|c| c.sent_ms),
        }
    }

    fn qos(&self) -> u8 {
        match self {
            Entry::Live { qos, .. } => *qos,
            Entry::Ready(out) => out.qos,
            // Only QoS 1/2 messages are journaled.
            Entry::Journaled { .. } => 1,
        }
    }

    /// What it counts against the limits: taken out as it was put in.
    fn cost(&self) -> usize {
        match self {
            Entry::Live { message, .. } => cost32(message.cost()) as usize,
            Entry::Ready(out) => out.cost(),
            Entry::Journaled { cost, .. } => *cost as usize,
        }
    }
}

/// A message's cost as a journaled entry keeps it (a message is at most an MQTT packet,
/// 256 MiB, so nothing is cut in practice).
fn cost32(cost: usize) -> u32 {
    u32::try_from(cost).unwrap_or(u32::MAX)
}

/// Slots an emptied queue keeps (VecDeque's first allocation is four).
const KEPT_ROOM: usize = 8;

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Entry>,
    bytes: usize,
    online: bool,
    /// Set while the session is persistent: where its QoS 1/2 messages are journaled.
    persist: Option<Persist>,
    /// The ids of journaled messages not yet finished, in the mailbox or in flight: what a
    /// rewrite of the journal must carry over (their bytes are the journal's).
    stored: BTreeSet<u64>,
    /// How many of `items` are commands from the downlink.
    commands: usize,
}

impl Queue {
    fn push_back(&mut self, entry: Entry) {
        self.commands += usize::from(entry.is_command());
        self.items.push_back(entry);
    }

    fn push_front(&mut self, entry: Entry) {
        self.commands += usize::from(entry.is_command());
        self.items.push_front(entry);
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let entry = self.items.pop_front()?;
        self.commands -= usize::from(entry.is_command());
        if self.items.is_empty() && self.items.capacity() > KEPT_ROOM {
            // A backlog delivered: its room goes too (10,000 sessions that each held ten
            // commands kept 1.3 MB of empty queues). A queue that keeps up empties at every
            // message: it keeps its few slots rather than allocate them again each time.
            self.items = VecDeque::new();
        }
        Some(entry)
    }

    /// Takes `id` off the unfinished messages; returns whether it was there. An emptied set
    /// lets its node go (a `BTreeSet` keeps it: 100 bytes a session).
    fn unstore(&mut self, id: u64) -> bool {
        let removed = self.stored.remove(&id);
        if removed && self.stored.is_empty() {
            self.stored = BTreeSet::new();
        }
        removed
    }

    /// Tells the journal the unfinished messages are no longer this queue's to send.
    fn forget_stored(&mut self) {
        let stored = std::mem::take(&mut self.stored);
        if let Some(p) = &self.persist {
            for id in stored {
                p.journal.forget(id);
            }
        }
    }

    /// The message an entry stands for; `None` for a journaled one whose record is gone
    /// or does not decode (said in the log; it cannot be sent).
    fn open(&mut self, entry: Entry) -> Option<Outbound> {
        match entry {
            Entry::Live {
                message,
                subscription_ids,
                qos,
                retain,
            } => Some(Outbound::new(
                message,
                qos,
                retain,
                subscription_ids.map_or_else(Vec::new, Vec::from),
            )),
            Entry::Ready(out) => Some(*out),
            Entry::Journaled { id, dup, .. } => {
                if !self.stored.contains(&id) {
                    return None;
                }
                let journal = &self.persist.as_ref()?.journal;
                // Usually in the page cache: written recently, or read at start.
                let decoded = journal.read_kept(id).and_then(sessions::unqueue);
                match decoded {
                    Some(mut out) => {
                        out.dup = dup;
                        Some(out)
                    }
                    None => {
                        journal.forget(id);
                        self.unstore(id);
                        tracing::error!(
                            id,
                            "A queued message of a persistent session cannot be read back; it is dropped."
                        );
                        None
                    }
                }
            }
        }
    }
}

/// What one mailbox holds, for the broker's statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    pub messages: usize,
    /// Commands from the downlink among them, and when the oldest was produced to Kafka.
    pub commands: usize,
    pub oldest_command_ms: Option<i64>,
}

/// Where a persistent session's messages are journaled.
#[derive(Debug, Clone)]
pub struct Persist {
    pub client: Arc<str>,
    pub journal: Journal,
    /// Message ids, shared by every session of the gateway.
    pub ids: Arc<AtomicU64>,
}

/// A session's waiting messages.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    /// Wakes the connection serving the session when something arrives.
    notify: Notify,
    limits: QueueLimits,
    totals: Arc<Totals>,
    /// Bytes the queue has room for (0 at its message limit) and whether its client is
    /// connected, as of the last time the lock was let go ([`Locked`]): a publisher sees
    /// a full queue without the lock ([`Mailbox::refuses`]).
    room: AtomicUsize,
    online: AtomicBool,
}

/// The queue, locked. Letting go of it publishes the room it has left, so no change to the
/// queue can leave [`Mailbox::refuses`] with a stale answer once the lock is free.
struct Locked<'a> {
    queue: MutexGuard<'a, Queue>,
    mailbox: &'a Mailbox,
}

impl Deref for Locked<'_> {
    type Target = Queue;

    fn deref(&self) -> &Queue {
        &self.queue
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let limits = &self.mailbox.limits;
        let room = if self.queue.items.len() >= limits.messages {
            0
        } else {
            limits.bytes.saturating_sub(self.queue.bytes)
        };
        self.mailbox.room.store(room, Ordering::Release);
        self.mailbox
            .online
            .store(self.queue.online, Ordering::Release);
    }
}

impl Mailbox {
    pub fn new(limits: QueueLimits, totals: Arc<Totals>) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            limits,
            totals,
            room: AtomicUsize::new(0),
            online: AtomicBool::new(false),
        });
        // Letting go of the lock publishes the empty queue's room (one formula, in `Locked`).
        drop(mailbox.lock());
        mailbox
    }

    fn lock(&self) -> Locked<'_> {
        Locked {
            queue: self.queue.lock().unwrap_or_else(|p| p.into_inner()),
            mailbox: self,
        }
    }

    /// Why a message of `qos` costing `cost` would be refused, judged without the lock
    /// from what the queue held when it was last let go; `None`: try [`Mailbox::push`],
    /// which decides under the lock. A queue that changes meanwhile is a race the
    /// publisher could have lost or won by a microsecond either way.
    pub fn refuses(&self, qos: u8, cost: usize) -> Option<Dropped> {
        if qos == 0 && !self.online.load(Ordering::Acquire) {
            return Some(Dropped::Offline);
        }
        (cost32(cost) as usize > self.room.load(Ordering::Acquire)).then_some(Dropped::QueueFull)
    }

    /// Queues `out` at the back, or says why not. For a persistent session a QoS 1/2
    /// message is journaled too; what is returned resolves once that is durable.
    pub fn push(&self, mut out: Outbound) -> Result<Option<Durable>, Dropped> {
        let cost = out.cost();
        let durable = {
            let mut q = self.lock();
            if !q.online && out.qos == 0 {
                return Err(Dropped::Offline);
            }
            if q.items.len() >= self.limits.messages
                || q.bytes.saturating_add(cost) > self.limits.bytes
            {
                return Err(Dropped::QueueFull);
            }
            if !self.totals.reserve(cost) {
                return Err(Dropped::TotalFull);
            }
            let (entry, durable) = match &q.persist {
                Some(p) if out.qos > 0 => {
                    let id = p.ids.fetch_add(1, Ordering::Relaxed);
                    out.store_id = id;
                    let body = sessions::queued(&p.client, id, &out);
                    // Appended under the queue's lock: the journal keeps the queue's order.
                    let wait = p.journal.append_kept(id, Bytes::from(body));
                    q.stored.insert(id);
                    let entry = Entry::Journaled {
                        id,
                        dup: false,
                        cost: cost32(cost),
                        command_ms: out.message.command.as_ref().map(|c| c.sent_ms),
                    };
                    (entry, Some(Box::pin(wait) as Durable))
                }
                _ => (Entry::new(out), None),
            };
            q.bytes += cost;
            q.push_back(entry);
            durable
        };
        self.notify.notify_one();
        Ok(durable)
    }

    /// Puts back messages restored from the journal, in order, whatever the limits (they
    /// were within them when queued).
    pub fn restore(&self, restored: impl IntoIterator<Item = (u64, Kept)>) {
        let mut q = self.lock();
        let Some(journal) = q.persist.as_ref().map(|p| p.journal.clone()) else {
            return;
        };
        for (id, kept) in restored {
            journal.keep_at(id, kept.offset, kept.len);
            let entry = Entry::Journaled {
                id,
                dup: true,
                cost: cost32(kept.cost),
                command_ms: kept.command_ms,
            };
            self.totals.bytes.fetch_add(entry.cost(), Ordering::Relaxed);
            q.bytes += entry.cost();
            q.stored.insert(id);
            q.push_back(entry);
        }
    }

    /// A journaled message is finished (acknowledged, expired, or dropped as too large).
    pub fn finish(&self, store_id: u64) {
        if store_id == 0 {
            return;
        }
        let mut q = self.lock();
        if q.unstore(store_id) {
            if let Some(p) = &q.persist {
                p.journal.forget(store_id);
                p.journal.append_later(&sessions::done(&p.client, store_id));
            }
        }
    }

    /// Makes the session persistent (its QoS 1/2 messages journaled from now on) or not.
    pub fn set_persist(&self, persist: Option<Persist>) {
        let mut q = self.lock();
        if persist.is_none() {
            // No journal to send them from any more: decoded, in order.
            let items = std::mem::take(&mut q.items);
            let mut kept = VecDeque::with_capacity(items.len());
            for entry in items {
                let (cost, command) = (entry.cost(), entry.is_command());
                match q.open(entry) {
                    Some(out) => kept.push_back(Entry::Ready(Box::new(out))),
                    None => {
                        q.bytes -= cost;
                        q.commands -= usize::from(command);
                        self.totals.release(cost);
                    }
                }
            }
            q.items = kept;
            q.forget_stored();
        }
        q.persist = persist;
    }

    /// What a rewrite of the journal needs for this session's unfinished messages.
    pub fn snapshot(&self, out: &mut Vec<Live>) {
        let q = self.lock();
        out.extend(q.stored.iter().copied().map(Live::Kept));
    }

    /// Puts messages that were sent but not acknowledged back at the front, in order, for the
    /// session's next connection. Never refused: they were already counted once.
    pub fn requeue(&self, unacked: Vec<Outbound>) {
        if unacked.is_empty() {
            return;
        }
        let mut q = self.lock();
        for mut out in unacked.into_iter().rev() {
            let cost = out.cost();
            // They were released when taken; take them back (may overshoot the total
            // briefly, which is better than losing an acknowledged-to-be QoS 1 message).
            self.totals.bytes.fetch_add(cost, Ordering::Relaxed);
            q.bytes += cost;
            out.dup = true;
            // Counted in the queue's bytes again, no longer as read back in flight.
            out.read_back = None;
            q.push_front(Entry::Ready(Box::new(out)));
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes up to `qos_slots` QoS 1/2 messages (and any QoS 0 messages before and between
    /// them) from the front; expired ones are dropped and returned apart.
    ///
    /// A journaled message is read back only within the gateway's read-back budget
    /// ([`READ_BACK_BYTES`]), except the first of a turn while `idle` (the connection has
    /// nothing in flight): a connection with something in flight takes again when it is
    /// acknowledged, so a refusal here leaves none waiting for good, and one that is idle
    /// always gets one.
    pub fn take(&self, qos_slots: usize, max: usize, now_ms: i64, idle: bool) -> Taken {
        let mut q = self.lock();
        // Sized once for what the window lets out (QoS 0 among them may grow it): growing
        // from nothing reallocated it three or four times a turn.
        let mut taken = Taken {
            ready: Vec::with_capacity(q.items.len().min(max).min(qos_slots.max(1))),
            expired: Vec::new(),
        };
        let mut slots = qos_slots;
        // Given back to the shared total once a turn: an atomic every publisher also
        // updates, so one per message was a cache line crossing cores per delivery.
        let mut released = 0;
        // Whether an acknowledgement will call the connection back to take again.
        let mut called_back = !idle;
        while taken.ready.len() < max {
            let Some(front) = q.items.front() else {
                break;
            };
            if front.qos() > 0 && slots == 0 {
                break;
            }
            // Held until the message is dropped: checked before reading it back.
            let read_back = match front {
                Entry::Journaled { cost, .. } => {
                    let charge = *cost as usize + READ_BACK_OVERHEAD;
                    match self.totals.read_back(charge, !called_back) {
                        Some(r) => Some(Arc::new(r)),
                        None => break,
                    }
                }
                _ => None,
            };
            let Some(entry) = q.pop_front() else {
                break;
            };
            let cost = entry.cost();
            q.bytes -= cost;
            released += cost;
            let Some(mut out) = q.open(entry) else {
                continue;
            };
            out.read_back = read_back;
            if out.message.expired(now_ms) {
                // Finished (off the journal) by whoever reports it.
                taken.expired.push(out);
                continue;
            }
            if out.qos > 0 {
                slots -= 1;
                called_back = true;
            }
            taken.ready.push(out);
        }
        self.totals.release(released);
        taken
    }

    /// Waits until something may have been pushed.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Marks the session connected (QoS 0 is queued) or not (QoS 0 is dropped).
    pub fn set_online(&self, online: bool) {
        self.lock().online = online;
        if online {
            self.notify.notify_one();
        }
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What is waiting: messages, and the downlink's commands among them. The queue is in
    /// the order commands were taken, so the first one found is the oldest.
    pub fn held(&self) -> Held {
        let q = self.lock();
        let oldest_command_ms = if q.commands == 0 {
            None
        } else {
            q.items.iter().find_map(Entry::command_ms)
        };
        Held {
            messages: q.items.len(),
            commands: q.commands,
            oldest_command_ms,
        }
    }

    /// Empties the mailbox (the session ended for good) like [`Mailbox::clear`], returning
    /// the commands it held, in order, so their outcome can be reported. A journaled one is
    /// read back for it (commands only: a held backlog of other messages is not read).
    pub fn clear_commands(&self) -> Vec<Arc<Command>> {
        let mut commands = Vec::new();
        {
            let mut q = self.lock();
            if q.commands > 0 {
                for entry in std::mem::take(&mut q.items) {
                    if entry.is_command() {
                        if let Some(command) = q.open(entry).and_then(|o| o.message.command.clone())
                        {
                            commands.push(command);
                        }
                    }
                }
            }
        }
        self.clear();
        commands
    }

    /// Empties the mailbox (the session ended for good), returning its bytes to the total.
    pub fn clear(&self) {
        let mut q = self.lock();
        self.totals.release(q.bytes);
        q.bytes = 0;
        q.items = VecDeque::new();
        q.commands = 0;
        q.forget_stored();
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.clear();
    }
}

/// What [`Mailbox::take`] found.
#[derive(Debug, Default)]
pub struct Taken {
    pub ready: Vec<Outbound>,
    pub expired: Vec<Outbound>,
}
