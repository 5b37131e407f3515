//! The QoS 1/2 packet-id state of one connection: what is being stored, what awaits PUBREL.

use std::collections::HashSet;

use super::registry::{Qos2, Released};

/// The QoS 1/2 packet-id state of one connection, apart from I/O so it can be tested alone.
///
/// A packet id is *storing* from its PUBLISH until its append resolves, then (QoS 2 only)
/// *awaiting release* until PUBREL. A PUBLISH reusing an id in either state is a
/// retransmission and is not stored again, whatever its DUP flag says (an id stays in use
/// until its flow completes).
#[derive(Debug)]
pub(super) struct Inflight {
    storing: HashSet<u16>,
    awaiting_rel: Released,
    /// At most this many ids awaiting release. MQTT 5's receive maximum counts them anyway;
    /// 3.1.1 has none, and a client that never sends PUBREL would otherwise grow the
    /// session's state (in memory and in the receipt store) up to every packet id.
    max_awaiting: usize,
}

impl Default for Inflight {
    fn default() -> Inflight {
        Inflight::new(Released::default(), usize::from(u16::MAX))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum OnPublish {
    /// New: store it (the id is now storing).
    Store,
    /// Being stored already: its ack will come when the append resolves.
    Duplicate,
    /// QoS 2 stored already; the client missed our PUBREC.
    ResendPubRec,
    /// More QoS 1/2 in flight than the receive maximum (MQTT 5: 0x93).
    OverLimit,
}

impl Inflight {
    /// `awaiting_rel` is the session's, shared with its other connections.
    pub(super) fn new(awaiting_rel: Released, max_awaiting: usize) -> Inflight {
        Inflight {
            storing: HashSet::new(),
            awaiting_rel,
            max_awaiting,
        }
    }

    /// The session's QoS 2 state, locked: a QoS 2 append of a persistent session is made
    /// under it (see [`Qos2::ended`]).
    pub(super) fn released(&self) -> std::sync::MutexGuard<'_, Qos2> {
        self.awaiting_rel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A PUBLISH arrived. `limit` is the receive maximum to enforce, if any.
    pub(super) fn publish(&mut self, qos: u8, pkid: u16, limit: Option<usize>) -> OnPublish {
        if qos == 0 {
            return OnPublish::Store;
        }
        if self.storing.contains(&pkid) {
            return OnPublish::Duplicate;
        }
        let awaiting_rel = self.released();
        if qos == 2 && awaiting_rel.ids.contains_key(&pkid) {
            return OnPublish::ResendPubRec;
        }
        let awaiting = awaiting_rel.ids.len();
        drop(awaiting_rel);
        let in_flight = self.storing.len() + awaiting;
        if limit.is_some_and(|limit| in_flight >= limit)
            || (qos == 2 && awaiting >= self.max_awaiting)
        {
            return OnPublish::OverLimit;
        }
        self.storing.insert(pkid);
        OnPublish::Store
    }

    /// The append of `pkid` resolved (`Some` with its record's sequence number if stored),
    /// or was refused at once.
    pub(super) fn stored(&mut self, qos: u8, pkid: u16, seq: Option<u64>) {
        if qos == 0 {
            return;
        }
        self.storing.remove(&pkid);
        if let (2, Some(seq)) = (qos, seq) {
            self.released().ids.insert(pkid, seq);
        }
    }

    /// PUBREL: `Ok` with the released record's sequence number if the id was awaiting
    /// release, or `Err` if the id is still being stored (no PUBREC was sent yet, so the
    /// client skipped a step).
    pub(super) fn release(&mut self, pkid: u16) -> Result<Option<u64>, ()> {
        if self.storing.contains(&pkid) {
            return Err(());
        }
        Ok(self.released().ids.remove(&pkid))
    }

    /// QoS 1/2 appends pending.
    pub(super) fn storing(&self) -> usize {
        self.storing.len()
    }
}
