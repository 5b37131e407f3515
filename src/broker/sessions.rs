//! Persistent sessions on disk: their subscriptions and the QoS 1/2 messages queued for them,
//! so both survive a restart, a SIGKILL and a power cut.
//!
//! A journal (`journal.rs`), `{buffer.dir}/broker/sessions.journal`, with these record
//! bodies (strings and the message as in `retained.rs`):
//!
//! ```text
//! session:  1 | client str16 | expiry interval ms u64     (created, or its expiry changed)
//! gone:     2 | client str16                              (ended: clean start, expiry, evicted)
//! sub:      3 | client str16 | filter str16 | qos u8 | flags u8 | id u32 (0: none)
//! unsub:    4 | client str16 | filter str16
//! queued:   5 | client str16 | id u64 | qos u8 | retain u8 | n u16 × sub id u32 | message
//!           | command u8 (0: none; 2: topic str16 | partition i32 | offset i64
//!             | key? | correlation? | status topic?, each `?` a u8 flag then bytes16
//!             | sent ms i64; 1: the same without sent ms, as written before it existed)
//! mark:     7 | topic str16 | partition i32 | offset i64     (a command handled: the
//!                                                             downlink's position)
//! done:     6 | client str16 | id u64                     (acknowledged, expired or dropped)
//! flags:    bit 0 No Local | bit 1 Retain As Published
//! ```
//!
//! A message queued for a persistent session is journaled before its publisher is
//! acknowledged (the publisher's ack waits for the same group commit as the retained store's);
//! its `done` record is written without waiting: a crash before it only sends the message
//! again, with DUP. After a restart a session counts as disconnected at the restart, so it
//! lives its whole expiry interval from then.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::index::Options;
use super::journal::{Fields, put16};
use super::mailbox::Outbound;
use super::retained::{decode_message, encode_message};
use super::{Command, Message};

pub const MAGIC: &[u8; 8] = b"EGSESSNS";
const SESSION: u8 = 1;
const GONE: u8 = 2;
const SUB: u8 = 3;
const UNSUB: u8 = 4;
const QUEUED: u8 = 5;
const DONE: u8 = 6;
const MARK: u8 = 7;

pub fn session(client: &str, interval_ms: u64) -> Vec<u8> {
    let mut b = vec![SESSION];
    put16(&mut b, client.as_bytes());
    b.extend_from_slice(&interval_ms.to_le_bytes());
    b
}

pub fn gone(client: &str) -> Vec<u8> {
    let mut b = vec![GONE];
    put16(&mut b, client.as_bytes());
    b
}

pub fn sub(client: &str, filter: &str, o: &Options) -> Vec<u8> {
    let mut b = vec![SUB];
    put16(&mut b, client.as_bytes());
    put16(&mut b, filter.as_bytes());
    b.push(o.qos);
    b.push(u8::from(o.no_local) | u8::from(o.retain_as_published) << 1);
    b.extend_from_slice(&o.id.unwrap_or(0).to_le_bytes());
    b
}

pub fn unsub(client: &str, filter: &str) -> Vec<u8> {
    let mut b = vec![UNSUB];
    put16(&mut b, client.as_bytes());
    put16(&mut b, filter.as_bytes());
    b
}

pub fn queued(client: &str, id: u64, out: &Outbound) -> Vec<u8> {
    let m = &out.message;
    // Sized to fit (the journal holds this very buffer until its writer has written it):
    // the fixed fields, the strings, and the command's.
    let command = m.command.as_ref().map_or(0, |c| {
        40 + c.topic.len()
            + c.key.as_ref().map_or(0, Bytes::len)
            + c.correlation.as_ref().map_or(0, Bytes::len)
            + c.status_topic.as_ref().map_or(0, |t| t.len())
    });
    let props = &m.props;
    let strings = client.len()
        + m.topic.len()
        + m.payload.len()
        + props.content_type.as_ref().map_or(0, |t| t.len() + 2)
        + props.response_topic.as_ref().map_or(0, |t| t.len() + 2)
        + props.correlation_data.as_ref().map_or(0, |c| c.len() + 2)
        + props
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>();
    let mut b = Vec::with_capacity(48 + 4 * out.subscription_ids.len() + strings + command);
    b.push(QUEUED);
    put16(&mut b, client.as_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.push(out.qos);
    b.push(u8::from(out.retain));
    let n = out.subscription_ids.len().min(usize::from(u16::MAX));
    b.extend_from_slice(&(n as u16).to_le_bytes());
    for sid in out.subscription_ids.iter().take(n) {
        b.extend_from_slice(&sid.to_le_bytes());
    }
    encode_message(&mut b, m);
    match &m.command {
        None => b.push(0),
        Some(c) => {
            b.push(2);
            put16(&mut b, c.topic.as_bytes());
            b.extend_from_slice(&c.partition.to_le_bytes());
            b.extend_from_slice(&c.offset.to_le_bytes());
            for field in [
                c.key.as_deref(),
                c.correlation.as_deref(),
                c.status_topic.as_deref().map(str::as_bytes),
            ] {
                match field {
                    None => b.push(0),
                    Some(bytes) => {
                        b.push(1);
                        put16(&mut b, bytes);
                    }
                }
            }
            b.extend_from_slice(&c.sent_ms.to_le_bytes());
        }
    }
    b
}

/// The downlink handled the record at `offset` of `topic`/`partition` (delivered to nobody,
/// expired, or queued: whatever it became, it is not to be taken again).
pub fn mark(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut b = vec![MARK];
    put16(&mut b, topic.as_bytes());
    b.extend_from_slice(&partition.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

fn decode_command(f: &mut Fields) -> Option<Option<Arc<Command>>> {
    let tag = f.u8()?;
    if tag == 0 {
        return Some(None);
    }
    let topic = f.str16()?;
    let partition = f.u32()? as i32;
    let offset = f.i64()?;
    let mut opt = || -> Option<Option<Bytes>> {
        match f.u8()? {
            0 => Some(None),
            _ => Some(Some(f.bytes16()?)),
        }
    };
    let key = opt()?;
    let correlation = opt()?;
    let status_topic = match opt()? {
        Some(b) => Some(Arc::from(std::str::from_utf8(&b).ok()?)),
        None => None,
    };
    // A journal from before the timestamp was kept: its commands count as sent at restart.
    let sent_ms = if tag == 1 {
        crate::ingest::now_ms()
    } else {
        f.i64()?
    };
    Some(Some(Arc::new(Command {
        topic,
        partition,
        offset,
        key,
        correlation,
        status_topic,
        sent_ms,
    })))
}

/// What [`queued`] wrote after the client: the message as its session's queue sends it.
fn decode_queued(f: &mut Fields) -> Option<Outbound> {
    let id = f.u64()?;
    let qos = f.u8().filter(|q| (1..=2).contains(q))?;
    let retain = f.u8()? != 0;
    let n = f.u16()?;
    let mut ids = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        ids.push(f.u32()?);
    }
    let mut message: Message = decode_message(f, retain)?;
    message.command = decode_command(f)?;
    let mut out = Outbound::new(Arc::new(message), qos, retain, ids);
    out.store_id = id;
    Some(out)
}

/// Decodes a whole [`queued`] record (one a queue kept in its journaled form).
pub fn unqueue(body: Bytes) -> Option<Outbound> {
    let mut f = Fields(body);
    if f.u8()? != QUEUED {
        return None;
    }
    f.str16()?;
    let out = decode_queued(&mut f)?;
    f.is_empty().then_some(out)
}

/// A queued message as the journal holds it (where its record is in the file), with what
/// its queue needs to know of it without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// Where the record's body is in the journal file, and its length.
    pub offset: u64,
    pub len: u32,
    /// What it costs its queue ([`Message::cost`]).
    pub cost: usize,
    /// A downlink command's Kafka timestamp (`None`: not a command).
    pub command_ms: Option<i64>,
}

pub fn done(client: &str, id: u64) -> Vec<u8> {
    let mut b = vec![DONE];
    put16(&mut b, client.as_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b
}

/// One persistent session as the journal left it.
#[derive(Debug, Default)]
pub struct Restored {
    pub interval_ms: u64,
    pub subscriptions: HashMap<String, Options>,
    /// By id, which is queue order.
    pub queue: BTreeMap<u64, Kept>,
}

/// The downlink's position: per Kafka topic and partition, the last offset handled.
pub type Marks = HashMap<(String, i32), i64>;

/// What the journal holds at its end.
#[derive(Debug, Default)]
pub struct Replayed {
    pub sessions: HashMap<String, Restored>,
    /// The highest message id used.
    pub max_id: u64,
    pub marks: Marks,
    /// Records that did not decode (skipped).
    pub bad: usize,
}

/// Replays the journal's records in order; `offsets[i]` is where `bodies[i]` is in the file.
pub fn replay(bodies: &[Bytes], offsets: &[u64]) -> Replayed {
    let mut r = Replayed::default();
    for (body, offset) in bodies.iter().zip(offsets) {
        if apply(&mut r, body.clone(), *offset).is_none() {
            r.bad += 1;
        }
    }
    r
}

fn advance(marks: &mut Marks, topic: &str, partition: i32, offset: i64) {
    let at = marks.entry((topic.to_owned(), partition)).or_insert(offset);
    *at = (*at).max(offset);
}

fn apply(r: &mut Replayed, body: Bytes, offset: u64) -> Option<()> {
    let len = u32::try_from(body.len()).ok()?;
    let mut f = Fields(body);
    let kind = f.u8()?;
    if kind == MARK {
        let topic = f.str16()?;
        let partition = f.u32()? as i32;
        let offset = f.i64()?;
        advance(&mut r.marks, &topic, partition, offset);
        return f.is_empty().then_some(());
    }
    let (sessions, max_id) = (&mut r.sessions, &mut r.max_id);
    let client = f.str16()?;
    match kind {
        SESSION => {
            let interval_ms = f.u64()?;
            sessions.entry(client).or_default().interval_ms = interval_ms;
        }
        GONE => {
            sessions.remove(&client);
        }
        SUB => {
            let filter = f.str16()?;
            let qos = f.u8().filter(|q| *q <= 2)?;
            let flags = f.u8()?;
            let id = f.u32()?;
            if let Some(s) = sessions.get_mut(&client) {
                s.subscriptions.insert(
                    filter,
                    Options {
                        qos,
                        no_local: flags & 1 != 0,
                        retain_as_published: flags & 2 != 0,
                        id: (id != 0).then_some(id),
                    },
                );
            }
        }
        UNSUB => {
            let filter = f.str16()?;
            if let Some(s) = sessions.get_mut(&client) {
                s.subscriptions.remove(&filter);
            }
        }
        QUEUED => {
            let out = decode_queued(&mut f)?;
            if let Some(c) = &out.message.command {
                advance(&mut r.marks, &c.topic, c.partition, c.offset);
            }
            *max_id = (*max_id).max(out.store_id);
            if let Some(s) = sessions.get_mut(&client) {
                // Its place only: the queue reads it back when its client takes it.
                s.queue.insert(
                    out.store_id,
                    Kept {
                        offset,
                        len,
                        cost: out.message.cost(),
                        command_ms: out.message.command.as_ref().map(|c| c.sent_ms),
                    },
                );
            }
        }
        DONE => {
            let id = f.u64()?;
            if let Some(s) = sessions.get_mut(&client) {
                s.queue.remove(&id);
            }
        }
        _ => return None,
    }
    f.is_empty().then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Props;

    #[test]
    fn a_queued_record_is_built_without_growing() {
        let props = Props {
            correlation_data: Some(Bytes::from_static(b"corr-123")),
            user_properties: vec![("k".into(), "v".repeat(40))],
            ..Props::default()
        };
        let m = Arc::new(Message {
            topic: "devices/pump-7/commands".into(),
            payload: Bytes::from(vec![b'x'; 300]),
            qos: 1,
            retain: false,
            publisher: None,
            expires_ms: Some(5),
            props,
            command: Some(Arc::new(Command {
                topic: "iot.commands".repeat(4),
                partition: 3,
                offset: 99,
                key: Some(Bytes::from_static(b"pump-7")),
                correlation: Some(Bytes::from(vec![1; 64])),
                status_topic: Some("iot.command-status".into()),
                sent_ms: 7,
            })),
        });
        let b = queued("client-1", 9, &Outbound::new(m, 1, false, vec![1, 2]));
        // The journal holds this buffer as it is until written: spare room would be held too.
        assert!(
            b.capacity() >= b.len() && b.capacity() <= b.len() + 64,
            "{} bytes in {}",
            b.len(),
            b.capacity()
        );
        let back = unqueue(Bytes::from(b)).expect("decodes");
        assert_eq!(back.message.command.as_ref().map(|c| c.offset), Some(99));
    }

    #[test]
    fn records_replay_to_the_last_state() {
        let opts = Options {
            qos: 1,
            no_local: true,
            retain_as_published: false,
            id: Some(5),
        };
        let m = Arc::new(Message {
            topic: "cmd/x".into(),
            payload: Bytes::from_static(b"go"),
            qos: 1,
            retain: false,
            publisher: None,
            expires_ms: Some(123),
            props: Props::default(),
            command: None,
        });
        let out = Outbound::new(m, 1, false, vec![5]);
        let bodies: Vec<Bytes> = [
            session("a", 1000),
            sub("a", "cmd/#", &opts),
            sub("a", "x", &opts),
            unsub("a", "x"),
            queued("a", 1, &out),
            queued("a", 2, &out),
            done("a", 1),
            session("b", 5),
            gone("b"),
            queued("b", 3, &out),
            b"\x09garbage".to_vec(),
        ]
        .into_iter()
        .map(Bytes::from)
        .collect();
        let offsets: Vec<u64> = (0..bodies.len() as u64).map(|i| 100 * i).collect();
        let Replayed {
            sessions,
            max_id,
            bad,
            marks,
        } = replay(&bodies, &offsets);
        assert!(marks.is_empty());
        assert_eq!(bad, 1);
        assert_eq!(max_id, 3);
        assert_eq!(sessions.len(), 1);
        let a = &sessions["a"];
        assert_eq!(a.interval_ms, 1000);
        assert_eq!(a.subscriptions.len(), 1);
        assert_eq!(a.subscriptions["cmd/#"], opts);
        assert_eq!(a.queue.keys().copied().collect::<Vec<_>>(), [2]);
        let kept = &a.queue[&2];
        // The sixth record.
        assert_eq!(kept.offset, 500);
        assert_eq!(kept.len as usize, bodies[5].len());
        assert_eq!(bodies[5], queued("a", 2, &out));
        assert_eq!((kept.cost, kept.command_ms), (out.message.cost(), None));
        let q = unqueue(bodies[5].clone()).expect("decodes");
        assert_eq!(q.subscription_ids, [5]);
        assert_eq!(q.store_id, 2);
        assert_eq!(q.message.expires_ms, Some(123));
        assert_eq!(&q.message.payload[..], b"go");
    }
}
