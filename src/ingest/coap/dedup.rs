//! Message deduplication (RFC 7252 4.5): the answer to each request, remembered by (peer,
//! message id) for EXCHANGE_LIFETIME (CON) or NON_LIFETIME (NON), so a retransmission is
//! answered again instead of being stored again.
//!
//! In memory; the keys of stored CON requests also outlive a restart through the receipt
//! store (`ingest::receipts`, `Server::recovered`).
//!
//! Bounded: at `capacity` entries the oldest answered one is forgotten (counted by the
//! caller). Entries still waiting for their append are never forgotten that way; there are
//! at most `max_exchanges` of them, which validation keeps below the capacity.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

pub(super) type Key = (SocketAddr, u16);

/// What a request with this key got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// Its append is in progress; a retransmission is ignored (the answer is coming).
    Pending,
    /// This datagram was sent as the answer (empty: nothing is sent, e.g. No-Response).
    Answered(Bytes),
}

struct Entry {
    seen: Seen,
    expires: Instant,
    /// Matches the queue item that owns this entry; an older item for a re-used key is
    /// stale and removes nothing.
    generation: u64,
}

pub(super) struct Dedup {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for expiry and eviction. The two lifetimes differ, so an entry may
    /// outlive its lifetime by up to the difference; that errs on the side of answering.
    order: VecDeque<(Key, u64)>,
    capacity: usize,
    next_generation: u64,
}

impl Dedup {
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            next_generation: 0,
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Seen> {
        self.entries.get(key).map(|e| &e.seen)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Remembers `key` for `lifetime`; returns how many answered entries were forgotten to
    /// make room.
    pub fn insert(&mut self, key: Key, seen: Seen, lifetime: Duration, now: Instant) -> usize {
        let mut evicted = 0;
        let mut requeued = 0;
        while self.order.len() >= self.capacity && requeued <= self.order.len() {
            let Some((old, generation)) = self.order.pop_front() else {
                break;
            };
            match self.entries.get(&old) {
                Some(e) if e.generation == generation && e.seen == Seen::Pending => {
                    self.order.push_back((old, generation));
                    requeued += 1;
                }
                Some(e) if e.generation == generation => {
                    self.entries.remove(&old);
                    evicted += 1;
                }
                _ => {}
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.entries.insert(
            key,
            Entry {
                seen,
                expires: now + lifetime,
                generation,
            },
        );
        self.order.push_back((key, generation));
        evicted
    }

    /// Records the answer of a pending entry (kept if the entry was forgotten meanwhile).
    pub fn answer(&mut self, key: &Key, datagram: Bytes) {
        if let Some(e) = self.entries.get_mut(key) {
            e.seen = Seen::Answered(datagram);
        }
    }

    /// Forgets expired entries from the front of the queue.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(key, generation)) = self.order.front() {
            match self.entries.get(&key) {
                Some(e) if e.generation == generation => {
                    if e.expires > now || e.seen == Seen::Pending {
                        break;
                    }
                    self.entries.remove(&key);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }
}
