//! Separate responses (RFC 7252 5.2.2): confirmable 2.04s sent after an empty ACK, each
//! retransmitted with exponential backoff until the device ACKs or Resets it, at most one
//! outstanding per device (NSTART = 1, 4.7); the others wait their turn in order.
//!
//! This module only keeps the state and says what to send when; the server sends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// One confirmable response to deliver.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub mid: u16,
    pub datagram: Bytes,
}

struct Active {
    out: Outgoing,
    /// Retransmissions so far.
    attempts: u8,
    timeout: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct Peer {
    active: Option<Active>,
    queue: VecDeque<Outgoing>,
}

pub(super) struct Outbox {
    peers: HashMap<SocketAddr, Peer>,
    /// Deadlines of active responses; stale items (already finished) are skipped.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr, u16)>>,
    ack_timeout: Duration,
    max_retransmit: u8,
}

impl Outbox {
    pub fn new(ack_timeout: Duration, max_retransmit: u8) -> Outbox {
        Outbox {
            peers: HashMap::new(),
            timers: BinaryHeap::new(),
            ack_timeout,
            max_retransmit,
        }
    }

    /// Queues a response; returns it if it is to be sent now (nothing else outstanding).
    pub fn push(&mut self, peer: SocketAddr, out: Outgoing, now: Instant) -> Option<Bytes> {
        let state = self.peers.entry(peer).or_default();
        if state.active.is_some() {
            state.queue.push_back(out);
            return None;
        }
        Some(self.activate(peer, out, now))
    }

    fn activate(&mut self, peer: SocketAddr, out: Outgoing, now: Instant) -> Bytes {
        // ACK_TIMEOUT × ACK_RANDOM_FACTOR (1.5): a random point in between.
        let spread = self.ack_timeout.mul_f64(rand::random::<f64>() * 0.5);
        let timeout = self.ack_timeout + spread;
        let deadline = now + timeout;
        self.timers.push(Reverse((deadline, peer, out.mid)));
        let datagram = out.datagram.clone();
        self.peers.entry(peer).or_default().active = Some(Active {
            out,
            attempts: 0,
            timeout,
            deadline,
        });
        datagram
    }

    /// An ACK or RST from `peer` for `mid`. Returns whether it matched, and the next
    /// response of that peer to send now.
    pub fn answer(&mut self, peer: SocketAddr, mid: u16, now: Instant) -> (bool, Option<Bytes>) {
        let matched = self
            .peers
            .get(&peer)
            .and_then(|p| p.active.as_ref())
            .is_some_and(|a| a.out.mid == mid);
        if !matched {
            return (false, None);
        }
        (true, self.next(peer, now))
    }

    /// Ends the peer's active response and activates its next one.
    fn next(&mut self, peer: SocketAddr, now: Instant) -> Option<Bytes> {
        let state = self.peers.get_mut(&peer)?;
        state.active = None;
        match state.queue.pop_front() {
            Some(out) => Some(self.activate(peer, out, now)),
            None => {
                self.peers.remove(&peer);
                None
            }
        }
    }

    /// When the next retransmission is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Everything due by `now`: datagrams to send, and responses given up.
    pub fn due(&mut self, now: Instant) -> (Vec<(SocketAddr, Bytes)>, Vec<SocketAddr>) {
        let mut send = Vec::new();
        let mut gave_up = Vec::new();
        while let Some(&Reverse((at, peer, mid))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(active) = self.peers.get_mut(&peer).and_then(|p| p.active.as_mut()) else {
                continue;
            };
            if active.out.mid != mid || active.deadline != at {
                continue;
            }
            if active.attempts < self.max_retransmit {
                active.attempts += 1;
                active.timeout *= 2;
                active.deadline = now + active.timeout;
                self.timers.push(Reverse((active.deadline, peer, mid)));
                send.push((peer, active.out.datagram.clone()));
            } else {
                gave_up.push(peer);
                if let Some(next) = self.next(peer, now) {
                    send.push((peer, next));
                }
            }
        }
        (send, gave_up)
    }

    /// Responses not yet acknowledged, active or queued.
    pub fn len(&self) -> usize {
        self.peers
            .values()
            .map(|p| p.queue.len() + usize::from(p.active.is_some()))
            .sum()
    }

    /// At shutdown: every queued response not yet sent once, to send now regardless of
    /// NSTART (there will be no later).
    pub fn drain_unsent(&mut self) -> Vec<(SocketAddr, Bytes)> {
        let mut out = Vec::new();
        for (peer, state) in &mut self.peers {
            out.extend(state.queue.drain(..).map(|o| (*peer, o.datagram)));
        }
        out
    }
}
