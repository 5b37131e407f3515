//! Receipts: how a listener recognises, after a crash, a retransmission of a message it
//! already stored (issue 14, "exactly once into Kafka across gateway crashes").
//!
//! An MQTT QoS 2 PUBLISH from a persistent session is stored, PUBREC'd and then awaits
//! PUBREL; a client that missed the PUBREC (or whose PUBREL went unanswered) sends the
//! PUBLISH again with DUP=1 and the same packet id, possibly to a gateway that was SIGKILLed
//! meanwhile. The set of packet ids awaiting PUBREL must therefore survive the crash, and
//! must never say less than the log holds (a duplicate) nor more (a new message reusing a
//! released id would be dropped). A confirmable CoAP request is the same case with a simpler
//! end: its dedup key (peer, message id) counts for `exchange_lifetime` (RFC 7252
//! EXCHANGE_LIFETIME, 247 s) after it was received, and nothing releases it early.
//!
//! # What is on disk
//!
//! * **In the log**, the receipt of each QoS 2 record of a persistent session and of each
//!   confirmable CoAP request, inside the record's own frame (`buffer`, body flag 0x20), so
//!   record and receipt are made durable by one fsync or not at all:
//!   `kind:u8 (1 MQTT) client:u16 length + UTF-8 packet_id:u16`, or
//!   `kind:u8 (2 CoAP) family:u8 (4, 6) address[4 | 16] port:u16 message_id:u16
//!   received_ms:i64`.
//! * **`<buffer dir>/broker/receipts.journal`**, the broker's journal framing
//!   (`broker/journal.rs`, magic `EGRECEIP`), records:
//!   `awaiting` (1: client, packet id, the record's sequence number), `released` (2: the
//!   same three), `gone` (3: client, `below`: every receipt of the client with a lower
//!   sequence number is void), `checkpoint` (4: `seq`, only ever rising), `restart`
//!   (5: `seq`, the checkpoint set at start, which may be lower) and `coap` (6: the CoAP
//!   receipt's fields after its kind, then the record's sequence number).
//!
//! # The argument
//!
//! Let C be the last checkpoint the journal made durable. Three invariants:
//!
//! 1. Every receipt with a sequence number below C is reflected in the journal (an
//!    `awaiting` record, or it was released or voided). The absorber writes `checkpoint(C)`
//!    only after sending the `awaiting` records of every receipt below C, in the same or an
//!    earlier journal commit: C is the lowest sequence number of a receipt whose outcome it
//!    has not absorbed yet, or, with none pending, the number after the last receipt
//!    appended. Receipt appends take the store's lock around `Log::append_with_receipt`, so
//!    no receipt can get a number below a C computed under that lock without being pending.
//! 2. The log keeps every segment holding a record at or above C ([`Log::set_pin`], set only
//!    once `checkpoint(C)` is durable, and passed to `Log::open_pinned` at start before the
//!    commit thread can remove anything). So every receipt at or above C is still in the log.
//!    The one exception is harmless by construction: while no receipt is pending and C is
//!    past the last one appended, no record from C on carries a receipt, so the log is not
//!    pinned at all (QoS 0/1 traffic alone deletes as it always did); the next receipt pins
//!    it at C again under the store's lock *before* its own append, and a segment chosen
//!    for deletion before that holds only records already read and acknowledged, which the
//!    new one cannot be.
//! 3. A release is durable (`released`) before PUBCOMP is sent, and `gone` is durable before
//!    a new session of the client is served. Both carry the record's sequence number, so a
//!    receipt read back from the log is matched against them exactly.
//!
//! At start the journal is replayed, then the receipts of the log from C on are read
//! ([`buffer::scan_receipts`]) and applied the same way as `awaiting` records: by (1) and (2)
//! that is every receipt ever made durable, and by (3) none that was released. A record that
//! reached the file but whose fsync never returned (a SIGKILL leaves the page cache) is in the
//! log, goes to Kafka, and its receipt is found: the resent PUBLISH gets PUBREC without a
//! second copy. A record that never reached the file has no receipt either: the resent
//! PUBLISH is stored then, once. Then the store writes the receipts it found as `awaiting`
//! records and `restart(next)` with the log's next sequence number (a crash may give the
//! numbers of unsynced appends out again, so the checkpoint may go down here), waits for
//! that commit, and only then does the gateway serve. The scan starts at the segment holding
//! C, normally the tail recovery has just read; with no journal at all (the first start of a
//! build with receipts) no record can carry one and nothing is scanned.
//!
//! CoAP keys follow the same path (receipt, absorbed into `coap` records, the checkpoint and
//! the pin); at start those received within `exchange_lifetime` (the newest
//! `dedup_capacity` of them) are handed to the endpoint, which answers a retransmission of
//! one with the 2.04 it got (the token and Block1 option come from the retransmission, which
//! repeats them) instead of storing it again. The journal keeps them until a rewrite, which
//! keeps only the live ones.
//!
//! What can still go wrong is bounded and named: `drop_oldest` and `max_age` (the operator's
//! choice to lose records) ignore the pin, and a record whose body cannot be read (damage, a
//! missing key) loses its receipt; either may cost one duplicate, never a lost message.
//! Under `durability = "none"` a power cut may lose records the store already absorbed (the
//! journal is always synced): a DUP of such a QoS 2 message is then answered and not stored,
//! the loss that mode already accepts for everything it acknowledged. The
//! state kept is one entry per stored and unreleased packet id of a persistent session, so
//! it is bounded by the sessions times the receive maximum; the entries of a session that
//! expires while its client stays away are dropped when the client returns (`gone`) or at
//! the next start, once the broker's sessions are known.
//!
//! Cost: nothing for QoS 0 and QoS 1 (no receipt, no lock, no journal); for QoS 2 of a
//! persistent session a receipt of a few dozen bytes in the frame, the store's lock around
//! the append, an `awaiting` record written without waiting, and one journal commit
//! (group-committed) before each PUBCOMP. A confirmable CoAP request pays the receipt, the
//! lock and a `coap` record written without waiting (absorbed every `ABSORB_INTERVAL`, one
//! journal commit per turn off the request's path); nothing waits for the journal. That is
//! 34 bytes written per request (an IPv4 peer), beside a record of a few hundred, and a
//! rewrite of the live keys each time the journal doubles them (not measured yet): the price
//! of knowing the keys after a crash without reading minutes of log at start.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::journal::{self, Fields, Journal, put16};
use crate::buffer::seal::LogKeys;
use crate::buffer::{self, Durable, Log, LogError};

/// The receipt store's journal, in the broker's directory.
pub const JOURNAL: &str = "receipts.journal";
const MAGIC: &[u8; 8] = b"EGRECEIP";

/// The kind byte of a receipt in the log.
const RECEIPT_MQTT: u8 = 1;
const RECEIPT_COAP: u8 = 2;

/// Journal record kinds.
const AWAITING: u8 = 1;
const RELEASED: u8 = 2;
const GONE: u8 = 3;
const CHECKPOINT: u8 = 4;
const RESTART: u8 = 5;
const COAP_STORED: u8 = 6;

/// How often the absorber looks at the outcomes of pending receipts while there are any:
/// one journal commit per turn at most, whatever the request rate. It bounds how long the
/// log's pin lags behind, nothing a device waits for.
const ABSORB_INTERVAL: Duration = Duration::from_millis(50);
/// How often a checkpoint that could not be written is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Why the receipt store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptsError {
    #[error("the receipt store {path}: {source}")]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the receipts in the log: {0}")]
    Log(#[from] LogError),
    #[error("the receipt store {path} could not be written: {error}")]
    Write { path: PathBuf, error: String },
}

/// A persistent MQTT session's QoS 2 packet ids awaiting PUBREL, with the sequence number of
/// each one's record.
pub type Awaiting = HashMap<u16, u64>;

/// A CoAP request's dedup key (RFC 7252 4.5): the peer and the message id.
pub type CoapKey = (SocketAddr, u16);

/// How long and how many CoAP dedup keys are kept: `[coap] exchange_lifetime` and
/// `dedup_capacity`.
#[derive(Debug, Clone, Copy)]
pub struct CoapLimits {
    pub lifetime: Duration,
    pub capacity: usize,
}

/// What a receipt says was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Receipt {
    Mqtt { client: String, pkid: u16 },
    Coap { key: CoapKey, received_ms: i64 },
}

/// The CoAP requests stored within their lifetime, oldest first, at most `capacity`.
#[derive(Debug, Default, PartialEq, Eq)]
struct CoapStored {
    keys: HashMap<CoapKey, (u64, i64)>,
    /// (key, record's sequence number), in the order they were stored.
    order: VecDeque<(CoapKey, u64)>,
}

impl CoapStored {
    fn insert(&mut self, key: CoapKey, seq: u64, received_ms: i64, capacity: usize) {
        self.keys.insert(key, (seq, received_ms));
        self.order.push_back((key, seq));
        while self.keys.len() > capacity.max(1) {
            let Some((old, old_seq)) = self.order.pop_front() else {
                break;
            };
            if self.keys.get(&old).is_some_and(|(s, _)| *s == old_seq) {
                self.keys.remove(&old);
            }
        }
    }

    /// Forgets keys received before `before_ms`.
    fn expire(&mut self, before_ms: i64) {
        while let Some(&(key, seq)) = self.order.front() {
            match self.keys.get(&key) {
                Some(&(s, received_ms)) if s == seq => {
                    if received_ms >= before_ms {
                        break;
                    }
                    self.keys.remove(&key);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }
}

/// The state the journal and the log's receipts describe.
#[derive(Debug, Default, PartialEq, Eq)]
struct Replayed {
    mqtt: HashMap<String, Awaiting>,
    /// Every CoAP request stored, in order (the lifetime and capacity apply at the end).
    coap: Vec<(CoapKey, u64, i64)>,
    /// Every receipt below this is reflected in the journal.
    checkpoint: u64,
    /// Releases, to match receipts read back from the log exactly.
    released: HashSet<(String, u16, u64)>,
    /// Per client, receipts below this are void.
    gone: HashMap<String, u64>,
}

impl Replayed {
    fn replay(bodies: &[Bytes]) -> (Replayed, usize) {
        let mut r = Replayed::default();
        let mut bad = 0;
        for body in bodies {
            if r.apply(body.clone()).is_none() {
                bad += 1;
            }
        }
        (r, bad)
    }

    fn apply(&mut self, body: Bytes) -> Option<()> {
        let mut f = Fields(body);
        match f.u8()? {
            CHECKPOINT => self.checkpoint = self.checkpoint.max(f.u64()?),
            RESTART => self.checkpoint = f.u64()?,
            kind @ (AWAITING | RELEASED) => {
                let client = f.str16()?;
                let (pkid, seq) = (f.u16()?, f.u64()?);
                if kind == AWAITING {
                    self.awaiting(client, pkid, seq);
                } else {
                    if let Some(ids) = self.mqtt.get_mut(&client) {
                        if ids.get(&pkid) == Some(&seq) {
                            ids.remove(&pkid);
                        }
                        if ids.is_empty() {
                            self.mqtt.remove(&client);
                        }
                    }
                    self.released.insert((client, pkid, seq));
                }
            }
            COAP_STORED => {
                let (key, received_ms) = decode_coap(&mut f)?;
                let seq = f.u64()?;
                self.coap.push((key, seq, received_ms));
            }
            GONE => {
                let client = f.str16()?;
                let below = f.u64()?;
                if let Some(ids) = self.mqtt.get_mut(&client) {
                    ids.retain(|_, seq| *seq >= below);
                    if ids.is_empty() {
                        self.mqtt.remove(&client);
                    }
                }
                let at = self.gone.entry(client).or_insert(below);
                *at = (*at).max(below);
            }
            _ => return None,
        }
        f.is_empty().then_some(())
    }

    /// A stored record's receipt (from an `awaiting` record or from the log): applied unless
    /// released or voided. A newer record under the same packet id replaces an older one
    /// (the id was released in between, or the client could not have reused it).
    fn awaiting(&mut self, client: String, pkid: u16, seq: u64) -> bool {
        if self.gone.get(&client).is_some_and(|&below| seq < below)
            || self.released.contains(&(client.clone(), pkid, seq))
        {
            return false;
        }
        let ids = self.mqtt.entry(client).or_default();
        match ids.get(&pkid) {
            Some(&known) if known >= seq => false,
            _ => {
                ids.insert(pkid, seq);
                true
            }
        }
    }

    /// A receipt read back from the log: what it stored, if that still counts.
    fn read_back(&mut self, seq: u64, receipt: Bytes) -> Option<Receipt> {
        match decode_receipt(receipt)? {
            Receipt::Mqtt { client, pkid } => self
                .awaiting(client.clone(), pkid, seq)
                .then_some(Receipt::Mqtt { client, pkid }),
            Receipt::Coap { key, received_ms } => {
                self.coap.push((key, seq, received_ms));
                Some(Receipt::Coap { key, received_ms })
            }
        }
    }

    /// The CoAP keys still within `limits` at `now_ms`.
    fn coap_stored(&mut self, limits: CoapLimits, now_ms: i64) -> CoapStored {
        let mut stored = CoapStored::default();
        self.coap.sort_by_key(|&(_, seq, _)| seq);
        for (key, seq, received_ms) in self.coap.drain(..) {
            stored.insert(key, seq, received_ms, limits.capacity);
        }
        stored.expire(now_ms - limits.lifetime.as_millis() as i64);
        stored
    }
}

/// The journal read at start, before the log is opened: its checkpoint is the pin the log
/// must open with.
pub struct Found {
    path: PathBuf,
    found: journal::Found,
    replayed: Replayed,
    /// No journal yet: the first start of a build with receipts (or the broker's state was
    /// removed), so no record in the log carries one and there is nothing to scan.
    fresh: bool,
}

impl Found {
    /// The sequence number from which the log's receipts are still needed (`u64::MAX`:
    /// none are).
    pub fn checkpoint(&self) -> u64 {
        if self.fresh {
            u64::MAX
        } else {
            self.replayed.checkpoint
        }
    }
}

/// Reads `<dir>/receipts.journal` (creating `dir` if needed).
pub fn read(dir: &Path) -> Result<Found, ReceiptsError> {
    let path = dir.join(JOURNAL);
    let io = |source| ReceiptsError::Journal {
        path: path.clone(),
        source,
    };
    journal::create_private_dir(dir).map_err(io)?;
    let fresh = !path.try_exists().map_err(io)?;
    let found = journal::read(&path, MAGIC, crate::ingest::now_ms()).map_err(io)?;
    let (replayed, bad) = Replayed::replay(&found.bodies);
    if bad > 0 {
        tracing::warn!(path = %path.display(), records = bad, "Skipped receipt records this version cannot read.");
    }
    Ok(Found {
        path,
        found,
        replayed,
        fresh,
    })
}

/// The durable QoS 2 state of persistent MQTT sessions. Cheap to clone.
#[derive(Clone)]
pub struct Receipts {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts").finish_non_exhaustive()
    }
}

struct Inner {
    log: Log,
    journal: Journal,
    path: PathBuf,
    /// Journal records are sent to the writer under this lock, so their order in the file
    /// is the order of the changes they describe.
    state: Mutex<State>,
    /// Wakes the absorber when the first receipt is pending.
    wake: Notify,
}

#[derive(Default)]
struct State {
    mqtt: HashMap<String, Awaiting>,
    coap: CoapStored,
    coap_limits: Option<CoapLimits>,
    /// Receipts appended whose outcome the absorber has not taken yet, by sequence number.
    pending: BTreeMap<u64, Pending>,
    /// Every receipt appended so far has a lower sequence number.
    appended_to: u64,
    /// The checkpoint last sent to the journal.
    checkpoint: u64,
    /// The checkpoint last made durable.
    durable: u64,
    /// The log is not pinned: every receipt appended is in the journal, so no record from
    /// the checkpoint on carries one it lacks (with only QoS 0/1 traffic the log deletes as
    /// it always did). The next receipt pins the log at the durable checkpoint before it
    /// is appended.
    unpinned: bool,
}

struct Pending {
    receipt: Receipt,
    /// Released (PUBREL) or its session gone before the absorber took it: not `awaiting`.
    void: bool,
}

impl Receipts {
    /// Rebuilds the state from what [`read`] found and the receipts in `log` from its
    /// checkpoint on, makes that durable with the new checkpoint, and pins the log there.
    /// Call it after opening the log (with [`Found::checkpoint`] as its pin) and before
    /// anything appends.
    /// `coap` bounds the CoAP keys (`None`: no CoAP listener, none are kept).
    pub async fn start(
        found: Found,
        log: &Log,
        keys: Option<&LogKeys>,
        coap: Option<CoapLimits>,
    ) -> Result<Receipts, ReceiptsError> {
        let from = found.checkpoint();
        let Found {
            path,
            found,
            mut replayed,
            ..
        } = found;
        let next = log.next_seq();
        let mut from_log = Vec::new();
        // Fresh: a gateway upgraded with a backlog does not read all of it for nothing.
        if from != u64::MAX {
            buffer::scan_receipts(log.dir(), keys, from, |seq, receipt| {
                if seq < next {
                    if let Some(receipt) = replayed.read_back(seq, receipt) {
                        from_log.push(stored_record(&receipt, seq));
                    }
                }
            })?;
        }
        let now = crate::ingest::now_ms();
        let coap_stored = coap
            .map(|limits| replayed.coap_stored(limits, now))
            .unwrap_or_default();
        let state = State {
            mqtt: std::mem::take(&mut replayed.mqtt),
            coap: coap_stored,
            coap_limits: coap,
            pending: BTreeMap::new(),
            appended_to: next,
            checkpoint: next,
            durable: next,
            unpinned: false,
        };
        let counted: usize = state.mqtt.values().map(HashMap::len).sum();
        let coap_keys = state.coap.keys.len();
        let io = |source| ReceiptsError::Journal {
            path: path.clone(),
            source,
        };
        // The journal's writer asks for a snapshot when it rewrites; the store it snapshots
        // is built after the journal, so the closure finds it through this slot.
        let holder: Arc<Mutex<Option<std::sync::Weak<Inner>>>> = Arc::default();
        let for_snapshot = Arc::clone(&holder);
        let snapshot: journal::Snapshot = Box::new(move || {
            let weak = lock(&for_snapshot).clone();
            weak.and_then(|w| w.upgrade())
                .map(|inner| {
                    inner
                        .snapshot()
                        .into_iter()
                        .map(journal::Live::Body)
                        .collect()
                })
                .unwrap_or_default()
        });
        let journal = Journal::start(&path, MAGIC, &found, snapshot).map_err(io)?;
        let inner = Arc::new(Inner {
            log: log.clone(),
            journal,
            path: path.clone(),
            state: Mutex::new(state),
            wake: Notify::new(),
        });
        *lock(&holder) = Some(Arc::downgrade(&inner));
        let done = {
            let _st = lock(&inner.state);
            for record in &from_log {
                inner.journal.append_later(record);
            }
            inner.journal.append(&checkpoint_record(RESTART, next))
        };
        if let Err(error) = done.await {
            // A full disk must not keep the gateway from starting (and draining the log,
            // which frees space). The old checkpoint stays the durable one: the log keeps
            // what it found from there, and the journal is rewritten whole at its next
            // write.
            tracing::error!(%error, path = %path.display(), "Cannot write the receipt store at start; going on with its last durable checkpoint.");
            inner.lock().durable = from.min(next);
        }
        inner.pin(&mut inner.lock());
        tracing::info!(
            awaiting_release = counted,
            coap_keys,
            from_log = from_log.len(),
            checkpoint = next,
            "Rebuilt the QoS 2 state of persistent sessions and the CoAP dedup keys."
        );
        Ok(Receipts { inner })
    }

    /// Takes the outcomes of pending receipts into the journal until `shutdown`, moving the
    /// checkpoint and the log's pin behind them.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let (idle, behind) = {
                let st = self.inner.lock();
                (st.pending.is_empty(), st.durable < st.checkpoint)
            };
            if idle && !behind {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.inner.wake.notified() => {}
                }
            }
            // A turn's receipts (resolved in the meantime) go in one journal commit; a
            // checkpoint that could not be written (a full disk) is tried again, less often.
            let wait = if behind {
                RETRY_INTERVAL
            } else {
                ABSORB_INTERVAL
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            self.inner.absorb().await;
        }
        self.inner.absorb().await;
    }

    /// Appends a QoS 2 message of a persistent session with its receipt: `append` is given
    /// the receipt's bytes and appends the record with them.
    pub fn append_mqtt<E>(
        &self,
        client: &str,
        pkid: u16,
        append: impl FnOnce(&[u8]) -> Result<Durable, E>,
    ) -> Result<Durable, E> {
        let receipt = Receipt::Mqtt {
            client: client.to_owned(),
            pkid,
        };
        self.append_with(receipt, append)
    }

    /// Appends a confirmable CoAP request with its receipt (see [`Receipts::append_mqtt`]).
    pub fn append_coap<E>(
        &self,
        key: CoapKey,
        received_ms: i64,
        append: impl FnOnce(&[u8]) -> Result<Durable, E>,
    ) -> Result<Durable, E> {
        self.append_with(Receipt::Coap { key, received_ms }, append)
    }

    /// The CoAP requests stored before the gateway started and still within their lifetime,
    /// with their receive times: the endpoint answers a retransmission of one as stored.
    pub fn coap_stored(&self) -> HashMap<CoapKey, i64> {
        let st = self.inner.lock();
        st.coap
            .keys
            .iter()
            .map(|(key, &(_, received_ms))| (*key, received_ms))
            .collect()
    }

    fn append_with<E>(
        &self,
        receipt: Receipt,
        append: impl FnOnce(&[u8]) -> Result<Durable, E>,
    ) -> Result<Durable, E> {
        let bytes = encode_receipt(&receipt);
        let mut st = self.inner.lock();
        if st.unpinned {
            // Before the append, under the lock: the record cannot be in a segment the log
            // chose to delete while it was not pinned (those were read and acknowledged).
            st.unpinned = false;
            self.inner.log.set_pin(st.durable);
        }
        let durable = match append(&bytes) {
            Ok(durable) => durable,
            Err(e) => {
                // Refused at once: nothing to protect after all.
                self.inner.pin(&mut st);
                return Err(e);
            }
        };
        let seq = durable.seq();
        let first = st.pending.is_empty();
        st.pending.insert(
            seq,
            Pending {
                receipt,
                void: false,
            },
        );
        st.appended_to = st.appended_to.max(seq + 1);
        drop(st);
        if first {
            self.inner.wake.notify_one();
        }
        Ok(durable)
    }

    /// The packet ids of `client`'s session awaiting PUBREL, for a client that comes back
    /// to a session the gateway does not have in memory (after a restart).
    pub fn awaiting(&self, client: &str) -> Awaiting {
        self.inner
            .lock()
            .mqtt
            .get(client)
            .cloned()
            .unwrap_or_default()
    }

    /// PUBREL for `pkid`, whose record got `seq`: `None` if the store never had it (the
    /// PUBCOMP may go at once), else a future that resolves once the release is durable.
    pub fn release(
        &self,
        client: &str,
        pkid: u16,
        seq: u64,
    ) -> Option<impl Future<Output = Result<(), String>> + Send + use<>> {
        let mut st = self.inner.lock();
        let mut known = false;
        if let Some(p) = st.pending.get_mut(&seq) {
            known = p.receipt.is_mqtt(client, Some(pkid));
            p.void |= known;
        }
        if let Some(ids) = st.mqtt.get_mut(client) {
            if ids.get(&pkid) == Some(&seq) {
                ids.remove(&pkid);
                known = true;
            }
            if ids.is_empty() {
                st.mqtt.remove(client);
            }
        }
        known.then(|| {
            self.inner
                .journal
                .append(&id_record(RELEASED, client, pkid, seq))
        })
    }

    /// `client`'s session ended or starts afresh: its packet ids are forgotten. `None` if
    /// there were none; else a future that resolves once that is durable, which the new
    /// session waits for before it is served.
    pub fn forget(
        &self,
        client: &str,
    ) -> Option<impl Future<Output = Result<(), String>> + Send + use<>> {
        let mut st = self.inner.lock();
        let mut had = st.mqtt.remove(client).is_some();
        for p in st.pending.values_mut() {
            if p.receipt.is_mqtt(client, None) && !p.void {
                p.void = true;
                had = true;
            }
        }
        if !had {
            return None;
        }
        // Every receipt of the ended session was appended before this: appends of a session
        // that is ending are made without a receipt (the caller saw to it).
        let below = self.inner.log.next_seq();
        let mut body = vec![GONE];
        put16(&mut body, client.as_bytes());
        body.put_u64_le(below);
        Some(self.inner.journal.append(&body))
    }

    /// Drops the state of clients `keep` says have no session any more (at start, once the
    /// broker's persistent sessions are known).
    pub fn retain_clients(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = {
            let st = self.inner.lock();
            st.mqtt.keys().filter(|c| !keep(c)).cloned().collect()
        };
        for client in gone {
            drop(self.forget(&client));
        }
    }

    /// The journal's path, for log lines.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Takes the resolved pending receipts (in sequence order: appends resolve in order),
    /// writes them as `awaiting` and the new checkpoint, and pins the log there once durable.
    async fn absorb(&self) {
        let (checkpoint, done) = {
            let mut st = self.lock();
            while let Some(entry) = st.pending.first_entry() {
                let seq = *entry.key();
                let Some(outcome) = self.log.outcome(seq) else {
                    break;
                };
                let p = entry.remove();
                if outcome.is_err() || p.void {
                    continue;
                }
                self.journal.append_later(&stored_record(&p.receipt, seq));
                match p.receipt {
                    Receipt::Mqtt { client, pkid } => {
                        st.mqtt.entry(client).or_default().insert(pkid, seq);
                    }
                    Receipt::Coap { key, received_ms } => {
                        if let Some(limits) = st.coap_limits {
                            st.coap.insert(key, seq, received_ms, limits.capacity);
                        }
                    }
                }
            }
            if let Some(limits) = st.coap_limits {
                let before = crate::ingest::now_ms() - limits.lifetime.as_millis() as i64;
                st.coap.expire(before);
            }
            let checkpoint = st
                .pending
                .first_key_value()
                .map_or(st.appended_to, |(seq, _)| *seq);
            // Again after a failed write too, until the durable checkpoint catches up.
            let checkpoint = checkpoint.max(st.checkpoint);
            if checkpoint == st.checkpoint && st.durable >= st.checkpoint {
                return;
            }
            st.checkpoint = checkpoint;
            let done = self
                .journal
                .append(&checkpoint_record(CHECKPOINT, checkpoint));
            (checkpoint, done)
        };
        match done.await {
            Ok(()) => {
                let mut st = self.lock();
                st.durable = st.durable.max(checkpoint);
                self.pin(&mut st);
            }
            // The pin stays: the log keeps the segments until a later checkpoint is written.
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "Cannot write the receipt store; the log keeps its segments meanwhile.")
            }
        }
    }

    /// Pins the log at the durable checkpoint, or not at all once every receipt appended is
    /// durable in the journal. Under the lock, so a receipt appended meanwhile is not left
    /// unprotected by a pin computed before it.
    fn pin(&self, st: &mut State) {
        st.unpinned = st.pending.is_empty() && st.durable >= st.appended_to;
        self.log
            .set_pin(if st.unpinned { u64::MAX } else { st.durable });
    }

    /// The live state as journal records, for a rewrite: every awaiting id and the checkpoint
    /// it reflects.
    fn snapshot(&self) -> Vec<Bytes> {
        let st = self.lock();
        let mut out: Vec<Bytes> = st
            .mqtt
            .iter()
            .flat_map(|(client, ids)| {
                ids.iter()
                    .map(|(&pkid, &seq)| Bytes::from(awaiting_record(client, pkid, seq)))
            })
            .collect();
        out.extend(st.coap.order.iter().filter_map(|(key, seq)| {
            let &(s, received_ms) = st.coap.keys.get(key)?;
            (s == *seq).then(|| {
                Bytes::from(stored_record(
                    &Receipt::Coap {
                        key: *key,
                        received_ms,
                    },
                    s,
                ))
            })
        }));
        out.push(Bytes::from(checkpoint_record(CHECKPOINT, st.checkpoint)));
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receipt {
    /// Whether this is a receipt of `client` (and of `pkid`, if given).
    fn is_mqtt(&self, of: &str, pkid_of: Option<u16>) -> bool {
        matches!(self, Receipt::Mqtt { client, pkid } if client == of && pkid_of.is_none_or(|p| p == *pkid))
    }
}

/// A receipt as the log carries it: `kind:u8`, then for MQTT `client:str16 packet_id:u16`,
/// for CoAP `peer message_id:u16 received_ms:i64`, `peer` being
/// `family:u8 (4 or 6) address[4 or 16] port:u16`.
fn encode_receipt(receipt: &Receipt) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    match receipt {
        Receipt::Mqtt { client, pkid } => {
            out.push(RECEIPT_MQTT);
            put16(&mut out, client.as_bytes());
            out.put_u16_le(*pkid);
        }
        Receipt::Coap { key, received_ms } => {
            out.push(RECEIPT_COAP);
            put_coap(&mut out, *key, *received_ms);
        }
    }
    out
}

fn decode_receipt(receipt: Bytes) -> Option<Receipt> {
    let mut f = Fields(receipt);
    let receipt = match f.u8()? {
        RECEIPT_MQTT => Receipt::Mqtt {
            client: f.str16()?,
            pkid: f.u16()?,
        },
        RECEIPT_COAP => {
            let (key, received_ms) = decode_coap(&mut f)?;
            Receipt::Coap { key, received_ms }
        }
        _ => return None,
    };
    f.is_empty().then_some(receipt)
}

fn put_coap(out: &mut Vec<u8>, (peer, mid): CoapKey, received_ms: i64) {
    match peer.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.put_u16_le(peer.port());
    out.put_u16_le(mid);
    out.put_i64_le(received_ms);
}

fn decode_coap(f: &mut Fields) -> Option<(CoapKey, i64)> {
    let ip = match f.u8()? {
        4 => IpAddr::from(f.u32()?.to_le_bytes()),
        6 => {
            let (hi, lo) = (f.u64()?, f.u64()?);
            let mut octets = [0u8; 16];
            octets[..8].copy_from_slice(&hi.to_le_bytes());
            octets[8..].copy_from_slice(&lo.to_le_bytes());
            IpAddr::from(octets)
        }
        _ => return None,
    };
    let port = f.u16()?;
    let mid = f.u16()?;
    let received_ms = f.i64()?;
    Some(((SocketAddr::new(ip, port), mid), received_ms))
}

/// The journal record saying `receipt`'s record (`seq`) is stored.
fn stored_record(receipt: &Receipt, seq: u64) -> Vec<u8> {
    match receipt {
        Receipt::Mqtt { client, pkid } => awaiting_record(client, *pkid, seq),
        Receipt::Coap { key, received_ms } => {
            let mut out = vec![COAP_STORED];
            put_coap(&mut out, *key, *received_ms);
            out.put_u64_le(seq);
            out
        }
    }
}

fn id_record(kind: u8, client: &str, pkid: u16, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + client.len());
    out.push(kind);
    put16(&mut out, client.as_bytes());
    out.put_u16_le(pkid);
    out.put_u64_le(seq);
    out
}

fn awaiting_record(client: &str, pkid: u16, seq: u64) -> Vec<u8> {
    id_record(AWAITING, client, pkid, seq)
}

fn checkpoint_record(kind: u8, seq: u64) -> Vec<u8> {
    let mut out = vec![kind];
    out.put_u64_le(seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::LogConfig;
    use crate::record::{Record, Source};

    fn record(i: u64) -> Record {
        Record {
            source: Source::Mqtt,
            received_ms: 1_764_000_000_000,
            device: "dev".into(),
            origin: format!("t/{i}"),
            kafka_topic: "telemetry".into(),
            key: None,
            headers: Vec::new(),
            payload: Bytes::from(vec![1u8; 200]),
        }
    }

    fn config(dir: &Path) -> LogConfig {
        LogConfig {
            segment_bytes: 4096,
            commit_delay: Duration::from_millis(1),
            ..LogConfig::new(dir.join("log"))
        }
    }

    /// Opens the log and the store as the gateway's start does.
    async fn open(dir: &Path) -> (Log, Receipts) {
        let found = read(&dir.join("broker")).expect("read");
        let (log, _) = Log::open_pinned(config(dir), found.checkpoint()).expect("open");
        let receipts = Receipts::start(found, &log, None, Some(LIMITS))
            .await
            .expect("start");
        (log, receipts)
    }

    async fn store(receipts: &Receipts, log: &Log, client: &str, pkid: u16, i: u64) -> u64 {
        let durable = receipts
            .append_mqtt(client, pkid, |receipt| {
                log.append_with_receipt(&record(i), receipt)
            })
            .expect("append");
        durable.await.expect("durable")
    }

    /// The crash window the receipt closes: the record (and its receipt) is durable, the
    /// store never heard of it. After the restart the id is awaiting release again.
    #[tokio::test]
    async fn a_record_durable_before_the_store_caught_up_is_found_in_the_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fresh = read(&tmp.path().join("broker")).expect("read");
        assert_eq!(
            fresh.checkpoint(),
            u64::MAX,
            "no journal: no receipt to look for"
        );
        drop(fresh);
        let (log, receipts) = open(tmp.path()).await;
        let seq = store(&receipts, &log, "dev-1", 7, 0).await;
        // No absorber ran: the store's journal has no `awaiting` record.
        assert!(!receipts.awaiting("dev-1").contains_key(&7));
        drop(receipts);
        log.close().await.expect("close");
        drop(log);

        let found = read(&tmp.path().join("broker")).expect("read");
        assert_eq!(found.checkpoint(), 0, "the store never absorbed record 0");
        drop(found);
        let (log, receipts) = open(tmp.path()).await;
        assert_eq!(receipts.awaiting("dev-1"), HashMap::from([(7, seq)]));
        assert!(receipts.awaiting("dev-2").is_empty());
        // Absorbed at start: a second restart finds it in the journal alone.
        drop(receipts);
        log.close().await.expect("close");
        drop(log);
        let (_log, receipts) = open(tmp.path()).await;
        assert_eq!(receipts.awaiting("dev-1"), HashMap::from([(7, seq)]));
    }

    /// PUBREL is durable before PUBCOMP, whether the absorber took the receipt already or
    /// not: after a restart the id is free, and a new message under it is stored.
    #[tokio::test]
    async fn a_durable_release_frees_the_id_across_a_restart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, receipts) = open(tmp.path()).await;
        let shutdown = CancellationToken::new();
        let absorber = tokio::spawn(receipts.clone().run(shutdown.clone()));
        let absorbed = store(&receipts, &log, "dev-1", 1, 0).await;
        while !receipts.awaiting("dev-1").contains_key(&1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        absorber.await.expect("absorber");
        // Released before the absorber saw it: only the log holds its receipt.
        let pending = store(&receipts, &log, "dev-1", 2, 1).await;
        let kept = store(&receipts, &log, "dev-1", 3, 2).await;
        for (pkid, seq) in [(1, absorbed), (2, pending)] {
            receipts
                .release("dev-1", pkid, seq)
                .expect("known")
                .await
                .expect("durable");
        }
        assert!(receipts.release("dev-1", 9, 99).is_none(), "never stored");
        drop(receipts);
        log.close().await.expect("close");
        drop(log);

        let (_log, receipts) = open(tmp.path()).await;
        assert_eq!(receipts.awaiting("dev-1"), HashMap::from([(3, kept)]));
    }

    /// A new session forgets the old one's ids durably, including a receipt still pending.
    #[tokio::test]
    async fn a_new_session_forgets_the_old_ones_ids() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, receipts) = open(tmp.path()).await;
        store(&receipts, &log, "dev-1", 5, 0).await;
        let other = store(&receipts, &log, "dev-2", 5, 1).await;
        receipts
            .forget("dev-1")
            .expect("had ids")
            .await
            .expect("durable");
        assert!(receipts.forget("dev-1").is_none(), "nothing left to forget");
        // The new session stores under the same id: that one counts.
        let new = store(&receipts, &log, "dev-1", 5, 2).await;
        drop(receipts);
        log.close().await.expect("close");
        drop(log);

        let (_log, receipts) = open(tmp.path()).await;
        assert_eq!(receipts.awaiting("dev-1"), HashMap::from([(5, new)]));
        assert_eq!(receipts.awaiting("dev-2"), HashMap::from([(5, other)]));
    }

    /// The log keeps acknowledged segments whose receipts the store has not absorbed, and
    /// lets them go once the checkpoint passes them.
    #[tokio::test]
    async fn the_log_keeps_segments_until_the_store_has_their_receipts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, receipts) = open(tmp.path()).await;
        for i in 0..60 {
            store(&receipts, &log, "dev-1", (i % 10) as u16 + 1, i).await;
        }
        let mut reader = log.reader().expect("reader");
        let mut read = 0;
        while read < 60 {
            let batch = reader.read_batch(100, 1 << 20).await.expect("read");
            if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                reader.ack_range(first.seq, last.seq + 1);
            }
            read += batch.len();
        }
        let segments = || {
            std::fs::read_dir(tmp.path().join("log"))
                .expect("read_dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                })
                .count()
        };
        // Past the cursor interval: without the pin the head's segments would go now.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(segments() > 3, "kept: {}", segments());
        let shutdown = CancellationToken::new();
        let absorber = tokio::spawn(receipts.clone().run(shutdown.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while segments() > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(segments(), 1, "only the tail once the store caught up");
        shutdown.cancel();
        absorber.await.expect("absorber");
        log.close().await.expect("close");
    }

    fn mqtt(client: &str, pkid: u16) -> Receipt {
        Receipt::Mqtt {
            client: client.to_owned(),
            pkid,
        }
    }

    const LIMITS: CoapLimits = CoapLimits {
        lifetime: Duration::from_secs(247),
        capacity: 3,
    };

    /// A confirmable CoAP request stored just before a crash (the store never absorbed it)
    /// is known after the restart, with its receive time; keys past their lifetime or
    /// beyond the capacity are forgotten, the newest kept.
    #[tokio::test]
    async fn coap_keys_survive_a_restart_within_their_lifetime_and_capacity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, receipts) = open(tmp.path()).await;
        let peer: SocketAddr = "10.0.0.7:5683".parse().expect("addr");
        let v6: SocketAddr = "[2001:db8::1]:40000".parse().expect("addr");
        let now = crate::ingest::now_ms();
        let coap = |key: CoapKey, received_ms: i64, i: u64| {
            let durable = receipts
                .append_coap(key, received_ms, |r| log.append_with_receipt(&record(i), r))
                .expect("append");
            async move { durable.await.expect("durable") }
        };
        // Too old by the time the gateway starts again.
        coap((peer, 1), now - 300_000, 0).await;
        let shutdown = CancellationToken::new();
        let absorber = tokio::spawn(receipts.clone().run(shutdown.clone()));
        coap((peer, 2), now, 1).await;
        coap((v6, 2), now, 2).await;
        while receipts.inner.lock().coap.keys.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        absorber.await.expect("absorber");
        // Durable in the log only.
        coap((peer, 3), now, 3).await;
        coap((peer, 4), now, 4).await;
        drop(receipts);
        log.close().await.expect("close");
        drop(log);

        let (_log, receipts) = open(tmp.path()).await;
        let stored = receipts.coap_stored();
        assert_eq!(
            stored,
            HashMap::from([((v6, 2), now), ((peer, 3), now), ((peer, 4), now)]),
            "the newest three within the lifetime"
        );
    }

    /// With only QoS 0/1 traffic (no receipts) the log deletes acknowledged segments as it
    /// always did, also after a receipt append the log refused; a receipt pins it again.
    #[tokio::test]
    async fn without_receipts_pending_the_log_is_not_pinned() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, receipts) = open(tmp.path()).await;
        let refused = receipts.append_mqtt("dev-1", 1, |_| -> Result<Durable, ()> { Err(()) });
        assert!(refused.is_err());
        let segments = || {
            std::fs::read_dir(tmp.path().join("log"))
                .expect("read_dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                })
                .count()
        };
        let mut reader = log.reader().expect("reader");
        let (mut appended, mut acked) = (0, 0);
        for round in 0..2u64 {
            for i in 0..60 {
                log.append(&record(i))
                    .expect("append")
                    .await
                    .expect("durable");
            }
            appended += 60;
            while acked < appended {
                let batch = reader.read_batch(100, 1 << 20).await.expect("read");
                if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                    reader.ack_range(first.seq, last.seq + 1);
                }
                acked += batch.len() as u64;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while segments() > 1 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(segments(), 1, "round {round}: acknowledged segments go");
            if round == 0 {
                // A receipt absorbed and durable leaves the log unpinned again.
                let shutdown = CancellationToken::new();
                let absorber = tokio::spawn(receipts.clone().run(shutdown.clone()));
                store(&receipts, &log, "dev-1", 2, 60).await;
                while !receipts.awaiting("dev-1").contains_key(&2) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                shutdown.cancel();
                absorber.await.expect("absorber");
                appended += 1;
            }
        }
        log.close().await.expect("close");
    }

    #[test]
    fn receipts_round_trip_and_junk_is_refused() {
        for receipt in [
            mqtt("dev-ü", 65535),
            Receipt::Coap {
                key: ("192.0.2.1:1".parse().expect("addr"), 7),
                received_ms: -1,
            },
            Receipt::Coap {
                key: ("[::1]:5683".parse().expect("addr"), 0),
                received_ms: i64::MAX,
            },
        ] {
            let bytes = Bytes::from(encode_receipt(&receipt));
            assert_eq!(decode_receipt(bytes.clone()), Some(receipt));
            for cut in 0..bytes.len() {
                assert_eq!(decode_receipt(bytes.slice(..cut)), None);
            }
        }
        assert_eq!(decode_receipt(Bytes::from_static(b"\x02\x05")), None);
    }

    #[test]
    fn replay_matches_releases_and_voids_exactly() {
        let bodies: Vec<Bytes> = [
            awaiting_record("a", 1, 10),
            awaiting_record("a", 2, 11),
            id_record(RELEASED, "a", 1, 10),
            // A release of an older record under a reused id leaves the newer one.
            awaiting_record("b", 1, 20),
            id_record(RELEASED, "b", 1, 3),
            awaiting_record("c", 1, 12),
            {
                let mut g = vec![GONE];
                put16(&mut g, b"c");
                g.put_u64_le(13);
                g
            },
            checkpoint_record(CHECKPOINT, 30),
            checkpoint_record(CHECKPOINT, 25),
            vec![99],
        ]
        .into_iter()
        .map(Bytes::from)
        .collect();
        let (mut r, bad) = Replayed::replay(&bodies);
        assert_eq!(bad, 1);
        assert_eq!(r.checkpoint, 30);
        assert_eq!(r.mqtt.get("a"), Some(&HashMap::from([(2, 11)])));
        assert_eq!(r.mqtt.get("b"), Some(&HashMap::from([(1, 20)])));
        assert_eq!(r.mqtt.get("c"), None);
        // Receipts read back from the log: released and voided ones stay out.
        assert_eq!(
            r.read_back(10, Bytes::from(encode_receipt(&mqtt("a", 1)))),
            None
        );
        assert_eq!(
            r.read_back(12, Bytes::from(encode_receipt(&mqtt("c", 1)))),
            None
        );
        assert_eq!(
            r.read_back(14, Bytes::from(encode_receipt(&mqtt("c", 1)))),
            Some(mqtt("c", 1))
        );
        assert_eq!(r.read_back(15, Bytes::from_static(b"\x07junk")), None);
        let (r2, _) = Replayed::replay(&[Bytes::from(checkpoint_record(RESTART, 4))]);
        assert_eq!(r2.checkpoint, 4);
    }
}
