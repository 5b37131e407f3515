//! Messages this connection sent its client and the client has not finished acknowledging:
//! their packet identifiers, the client's Receive Maximum, and what goes back to the session
//! when the connection ends.
//!
//! QoS 1: PUBLISH → PUBACK. QoS 2: PUBLISH → PUBREC → (PUBREL) → PUBCOMP. A message is
//! finished at PUBACK or PUBCOMP (or a PUBREC with an error code, which ends the flow
//! MQTT 5 §4.3.3). At most `window` are unfinished at once
//! [MQTT-3.3.4-9]; a packet id is not reused while unfinished [MQTT-2.2.1-3].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::broker::mailbox::Outbound;

/// What the client owes for a message.
#[derive(Debug)]
enum State {
    /// QoS 1 sent, waiting for PUBACK.
    Ack,
    /// QoS 2 sent, waiting for PUBREC.
    Rec,
    /// PUBREL sent, waiting for PUBCOMP.
    Comp,
}

#[derive(Debug)]
struct Sent {
    /// Send order, so what goes back to the session keeps it.
    order: u64,
    /// The message, where it is needed after it was written (see [`Outflight::send_with`]).
    out: Option<Outbound>,
    state: State,
}

/// What an ack from the client means.
#[derive(Debug)]
pub enum AckResult {
    /// The message is finished; a slot is free. The message if it was held.
    Finished(Option<Outbound>),
    /// PUBREC accepted: send PUBREL.
    SendRel,
    /// No message in flight with this packet id in the state the ack belongs to.
    Unknown,
}

/// Hashes a packet identifier by one multiplication. The keys are the gateway's own
/// identifiers, handed out in sequence, so they need no defence against chosen collisions;
/// SipHash was a visible part of a busy subscriber's cost per message. Fibonacci hashing
/// spreads consecutive ids over the high bits, which the table's probing looks at.
#[derive(Debug, Default)]
struct PkidHasher(u64);

/// 2^64 divided by the golden ratio, odd: consecutive ids land far apart.
const FIBONACCI: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for PkidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = u64::from(id).wrapping_mul(FIBONACCI);
    }
}

/// The unfinished messages of one connection.
#[derive(Debug)]
pub struct Outflight {
    sent: HashMap<u16, Sent, BuildHasherDefault<PkidHasher>>,
    next_pkid: u16,
    order: u64,
    window: usize,
}

impl Outflight {
    /// `window`: how many may be unfinished at once (the client's Receive Maximum, capped
    /// by the gateway).
    pub fn new(window: usize) -> Outflight {
        Outflight {
            sent: HashMap::default(),
            next_pkid: 1,
            order: 0,
            window: window.max(1),
        }
    }

    /// How many more QoS 1/2 messages may be sent now.
    pub fn slots(&self) -> usize {
        self.window.saturating_sub(self.sent.len())
    }

    /// Nothing is unfinished: no acknowledgement is on its way.
    pub fn is_idle(&self) -> bool {
        self.sent.is_empty()
    }

    /// Registers `out` (QoS 1 or 2) as sent and returns its packet id: the one it had if it
    /// is a resend and that id is free, else the next free one.
    pub fn send(&mut self, out: Outbound) -> u16 {
        match self.send_with(out, true, |_, _| true) {
            Ok(pkid) | Err((_, pkid)) => pkid,
        }
    }

    /// Picks `out`'s packet id (as [`Outflight::send`]) and lets `write` queue it with that
    /// id; registers it as sent if `write` did, else gives it back with the id unused.
    ///
    /// `hold: false` keeps only the packet id's state, not the message: for a session that
    /// ends with its connection nothing is sent again, so nothing of a message is needed
    /// once it is written unless its acknowledgement must be reported (a command) or
    /// journaled. Letting it go here, while `write` has just read it, spares the fan-out
    /// a shared reference count touched again on another core at every acknowledgement.
    pub fn send_with(
        &mut self,
        mut out: Outbound,
        hold: bool,
        write: impl FnOnce(&Outbound, u16) -> bool,
    ) -> Result<u16, (Outbound, u16)> {
        let pkid = if out.pkid != 0 && !self.sent.contains_key(&out.pkid) {
            out.pkid
        } else {
            self.free_pkid()
        };
        if !write(&out, pkid) {
            return Err((out, pkid));
        }
        out.pkid = pkid;
        let state = match (out.qos, out.released) {
            (_, true) => State::Comp,
            (1, _) => State::Ack,
            _ => State::Rec,
        };
        self.order += 1;
        self.sent.insert(
            pkid,
            Sent {
                order: self.order,
                out: hold.then_some(out),
                state,
            },
        );
        Ok(pkid)
    }

    /// Room for `more` messages about to be sent: a burst taken at once grows the table
    /// once, not step by step with a rehash each time. Only what is sent: 10,000 devices
    /// handed a few commands each must not each hold a window's worth.
    pub fn reserve(&mut self, more: usize) {
        self.sent.reserve(more.min(self.slots()));
    }

    fn free_pkid(&mut self) -> u16 {
        // At most 65,535 can be in flight and the window is far smaller, so this ends.
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.sent.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    pub fn puback(&mut self, pkid: u16) -> AckResult {
        match self.sent.get(&pkid) {
            Some(Sent {
                state: State::Ack, ..
            }) => self.finish(pkid),
            _ => AckResult::Unknown,
        }
    }

    /// PUBREC with `reason`: below 0x80 the flow goes on with PUBREL; an error code ends it.
    pub fn pubrec(&mut self, pkid: u16, reason: u8) -> AckResult {
        match self.sent.get_mut(&pkid) {
            Some(sent) if matches!(sent.state, State::Rec | State::Comp) => {
                if reason >= 0x80 {
                    return self.finish(pkid);
                }
                // A PUBREC again (the client did not see our PUBREL): send it again.
                sent.state = State::Comp;
                if let Some(out) = &mut sent.out {
                    out.released = true;
                }
                AckResult::SendRel
            }
            _ => AckResult::Unknown,
        }
    }

    pub fn pubcomp(&mut self, pkid: u16) -> AckResult {
        match self.sent.get(&pkid) {
            Some(Sent {
                state: State::Comp, ..
            }) => self.finish(pkid),
            _ => AckResult::Unknown,
        }
    }

    fn finish(&mut self, pkid: u16) -> AckResult {
        let Some(sent) = self.sent.remove(&pkid) else {
            return AckResult::Unknown;
        };
        if self.sent.is_empty() {
            // Nothing owed: the table goes until the next burst. A device that took its
            // backlog and went quiet keeps no room for it (about 1 KiB each, measured with
            // 10,000 devices served a backlog of commands).
            self.sent = HashMap::default();
        }
        AckResult::Finished(sent.out)
    }

    /// Everything unfinished, in send order, for the session's next connection.
    pub fn into_unfinished(self) -> Vec<Outbound> {
        let mut sent: Vec<Sent> = self.sent.into_values().collect();
        sent.sort_by_key(|s| s.order);
        sent.into_iter().filter_map(|s| s.out).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::broker::{Message, Props};

    fn out(qos: u8, text: &str) -> Outbound {
        let m = Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::copy_from_slice(text.as_bytes()),
            qos,
            retain: false,
            publisher: None,
            expires_ms: None,
            props: Props::default(),
            command: None,
        });
        Outbound::new(m, qos, false, Vec::new())
    }

    #[test]
    fn qos1_and_qos2_flows_free_their_slots() {
        let mut f = Outflight::new(2);
        let a = f.send(out(1, "a"));
        let b = f.send(out(2, "b"));
        assert_eq!(f.slots(), 0);
        assert_ne!(a, b);
        assert!(
            matches!(f.puback(b), AckResult::Unknown),
            "PUBACK for a QoS 2 message"
        );
        assert!(matches!(f.puback(a), AckResult::Finished(_)));
        assert!(
            matches!(f.pubcomp(b), AckResult::Unknown),
            "PUBCOMP before PUBREC"
        );
        assert!(matches!(f.pubrec(b, 0), AckResult::SendRel));
        assert!(
            matches!(f.pubrec(b, 0), AckResult::SendRel),
            "a repeated PUBREC"
        );
        assert!(matches!(f.pubcomp(b), AckResult::Finished(_)));
        assert_eq!(f.slots(), 2);
        assert_eq!(f.sent.capacity(), 0, "nothing owed keeps no table");
        let c = f.send(out(2, "c"));
        assert!(
            matches!(f.pubrec(c, 0x80), AckResult::Finished(_)),
            "an error PUBREC ends it"
        );
    }

    #[test]
    fn unfinished_messages_go_back_in_order_with_their_packet_ids() {
        let mut f = Outflight::new(10);
        let ids: Vec<u16> = ["a", "b", "c"].iter().map(|t| f.send(out(2, t))).collect();
        assert!(matches!(f.pubrec(ids[1], 0), AckResult::SendRel));
        let back = f.into_unfinished();
        let texts: Vec<&[u8]> = back.iter().map(|o| &o.message.payload[..]).collect();
        assert_eq!(texts, [&b"a"[..], b"b", b"c"]);
        assert_eq!(back.iter().map(|o| o.pkid).collect::<Vec<_>>(), ids);
        assert!(back[1].released && !back[0].released);
        // The next connection reuses them [MQTT-4.4.0-1].
        let mut g = Outflight::new(10);
        for o in back {
            let pkid = o.pkid;
            assert_eq!(g.send(o), pkid);
        }
        assert!(
            matches!(g.pubcomp(ids[1]), AckResult::Finished(_)),
            "PUBREL was owed"
        );
    }

    /// A message not held is finished and counted like a held one, without the message;
    /// it does not go back to the session; a write that fails registers nothing.
    #[test]
    fn a_message_not_held_keeps_only_its_packet_id() {
        let mut f = Outflight::new(3);
        let mut seen = Vec::new();
        let a = f
            .send_with(out(1, "a"), false, |o, pkid| {
                seen.push((o.message.payload.clone(), pkid));
                true
            })
            .expect("written");
        assert_eq!(seen, [(Bytes::from_static(b"a"), a)], "written with its id");
        let b = f.send(out(2, "b"));
        let c = f
            .send_with(out(2, "c"), false, |_, _| true)
            .expect("written");
        let (refused, id) = f
            .send_with(out(1, "d"), false, |_, _| false)
            .expect_err("too large");
        assert_eq!((&refused.message.payload[..], refused.pkid), (&b"d"[..], 0));
        assert_eq!(f.slots(), 0, "a, b and c: d took no slot");
        assert!(![a, b, c].contains(&id), "d was offered a free id");
        assert!(
            matches!(f.puback(id), AckResult::Unknown),
            "d's id was not kept"
        );
        let d = f.send(refused);
        assert!(matches!(f.puback(d), AckResult::Finished(Some(_))));
        assert!(matches!(f.puback(a), AckResult::Finished(None)));
        assert!(matches!(f.puback(a), AckResult::Unknown), "finished once");
        assert!(matches!(f.pubrec(c, 0), AckResult::SendRel));
        let back = f.into_unfinished();
        let texts: Vec<&[u8]> = back.iter().map(|o| &o.message.payload[..]).collect();
        assert_eq!(texts, [&b"b"[..]], "only what was held goes back");
    }

    #[test]
    fn packet_ids_in_use_are_skipped_and_wrap() {
        let mut f = Outflight::new(10);
        f.next_pkid = u16::MAX;
        let a = f.send(out(1, "a"));
        let b = f.send(out(1, "b"));
        assert_eq!((a, b), (u16::MAX, 1));
        let mut resend = out(1, "c");
        resend.pkid = 1;
        assert_eq!(f.send(resend), 2, "id 1 is taken");
    }

    #[test]
    fn consecutive_packet_ids_spread_over_the_bits_the_table_probes() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<PkidHasher>::default();
        // hashbrown takes a bucket from the low bits and a 7-bit tag from the top ones: an
        // identity hash would give every id the same tag and make every probe compare keys.
        let tags: std::collections::HashSet<u64> =
            (1..=128u16).map(|id| build.hash_one(id) >> 57).collect();
        assert!(tags.len() > 64, "only {} distinct tags", tags.len());
        let buckets: std::collections::HashSet<u64> =
            (1..=128u16).map(|id| build.hash_one(id) & 127).collect();
        assert!(
            buckets.len() > 64,
            "only {} distinct buckets",
            buckets.len()
        );
    }
}
