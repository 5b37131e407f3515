//! Retained messages: one per topic, in memory for matching and on disk so they survive a
//! restart, a SIGKILL and a power cut.
//!
//! On disk they are a journal (`journal.rs`), `{buffer.dir}/broker/retained.journal`, whose
//! record bodies are:
//!
//! ```text
//! set:     1 u8 | message
//! clear:   2 u8 | topic str16
//! message: topic str16 | qos u8 | flags u8 | expires_ms i64 (0 = never)
//!          | [content_type str16] [response_topic str16] [correlation bytes16]
//!          | properties u16 × (name str16, value str16) | payload bytes32
//! flags:   bit 0 payload is UTF-8 | bit 1 content type | bit 2 response topic
//!          | bit 3 correlation data
//! ```
//!
//! [`Retained::start`] changes the map and sends the record under one lock, so the journal's
//! order is the map's; it resolves once the record is durable, so a retained publish is
//! acknowledged only then. Opening drops expired messages.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use super::journal::{self, Fields, Journal, put16, put32};
use super::{Message, Props, filter};

const MAGIC: &[u8; 8] = b"EGRETAIN";
const SET: u8 = 1;
const CLEAR: u8 = 2;

/// Why a retained message was not kept.
#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    #[error("{0} retained messages are stored already ([mqtt] max_retained_messages)")]
    Full(usize),
    #[error("cannot write the retained messages: {0}")]
    Io(String),
}

/// The retained messages, by topic.
#[derive(Clone)]
pub struct Retained {
    map: Arc<RwLock<BTreeMap<String, Arc<Message>>>>,
    journal: Journal,
    limit: usize,
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Retained {
    /// Opens (or creates) the journal in `dir` and starts its writer thread.
    pub fn open(dir: &Path, limit: usize, now_ms: i64) -> io::Result<Retained> {
        journal::create_private_dir(dir)?;
        let path = dir.join("retained.journal");
        let found = journal::read(&path, MAGIC, now_ms)?;
        let mut map = BTreeMap::new();
        for body in &found.bodies {
            match decode(body.clone()) {
                Some(Change::Set(m)) => {
                    map.insert(m.topic.to_string(), Arc::new(m));
                }
                Some(Change::Clear(topic)) => {
                    map.remove(&topic);
                }
                None => {
                    tracing::warn!(path = %path.display(), "Skipped a retained message that does not decode.");
                }
            }
        }
        map.retain(|_, m: &mut Arc<Message>| !m.expired(now_ms));
        let map = Arc::new(RwLock::new(map));
        let live = Arc::clone(&map);
        let snapshot: journal::Snapshot = Box::new(move || {
            let now = crate::ingest::now_ms();
            let map = live.read().unwrap_or_else(|p| p.into_inner());
            map.values()
                .filter(|m| !m.expired(now))
                .map(|m| journal::Live::Body(Bytes::from(encode_set(m))))
                .collect()
        });
        let journal = Journal::start(&path, MAGIC, &found, snapshot)?;
        Ok(Retained {
            map,
            journal,
            limit,
        })
    }

    /// Stores `message` as its topic's retained message (an empty payload clears it
    /// [MQTT-3.3.1-6]); resolves once the journal holds it durably.
    pub async fn set(&self, message: &Arc<Message>) -> Result<(), RetainError> {
        self.start(message)?.await
    }

    /// Takes `message` as its topic's retained message now (so changes keep the order of
    /// the calls) and returns what resolves once the journal holds it durably.
    pub fn start(
        &self,
        message: &Arc<Message>,
    ) -> Result<impl Future<Output = Result<(), RetainError>> + Send + use<>, RetainError> {
        let wait = {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            let body = if message.payload.is_empty() {
                map.remove(&*message.topic);
                encode_clear(&message.topic)
            } else {
                if !map.contains_key(&*message.topic) && map.len() >= self.limit {
                    return Err(RetainError::Full(self.limit));
                }
                map.insert(message.topic.to_string(), Arc::clone(message));
                encode_set(message)
            };
            // Sent under the map's lock, so the journal's order is the map's order.
            self.journal.append(&body)
        };
        Ok(async move { wait.await.map_err(RetainError::Io) })
    }

    /// The unexpired retained messages whose topics match `filter` (without share prefix).
    pub fn matching(&self, filter: &str, now_ms: i64) -> Vec<Arc<Message>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        // Topics under a literal first level sit together in the ordered map.
        let literal_prefix: String = filter
            .split('/')
            .take_while(|l| *l != "+" && *l != "#")
            .collect::<Vec<_>>()
            .join("/");
        let range = map.range::<str, _>((
            std::ops::Bound::Included(literal_prefix.as_str()),
            std::ops::Bound::Unbounded,
        ));
        range
            .take_while(|(topic, _)| topic.starts_with(&literal_prefix))
            .filter(|(topic, m)| filter::matches(filter, topic) && !m.expired(now_ms))
            .map(|(_, m)| Arc::clone(m))
            .collect()
    }

    /// Retained messages stored (expired ones included until the next compaction).
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn encode_clear(topic: &str) -> Vec<u8> {
    let mut body = vec![CLEAR];
    put16(&mut body, topic.as_bytes());
    body
}

fn encode_set(m: &Message) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + m.topic.len() + m.payload.len());
    body.push(SET);
    encode_message(&mut body, m);
    body
}

/// A message as journals keep it: topic str16 | qos u8 | flags u8 | expires_ms i64 (0 =
/// never) | [content_type str16] [response_topic str16] [correlation bytes16] | properties
/// u16 × (name str16, value str16) | payload bytes32.
pub(super) fn encode_message(body: &mut Vec<u8>, m: &Message) {
    let p = &m.props;
    put16(body, m.topic.as_bytes());
    body.push(m.qos);
    let flags = u8::from(p.payload_format_utf8)
        | u8::from(p.content_type.is_some()) << 1
        | u8::from(p.response_topic.is_some()) << 2
        | u8::from(p.correlation_data.is_some()) << 3;
    body.push(flags);
    body.extend_from_slice(&m.expires_ms.unwrap_or(0).to_le_bytes());
    if let Some(ct) = &p.content_type {
        put16(body, ct.as_bytes());
    }
    if let Some(rt) = &p.response_topic {
        put16(body, rt.as_bytes());
    }
    if let Some(cd) = &p.correlation_data {
        put16(body, cd);
    }
    let n = p.user_properties.len().min(usize::from(u16::MAX));
    body.extend_from_slice(&(n as u16).to_le_bytes());
    for (k, v) in p.user_properties.iter().take(n) {
        put16(body, k.as_bytes());
        put16(body, v.as_bytes());
    }
    put32(body, &m.payload);
}

/// Reads what [`encode_message`] wrote; `retain` is not part of it.
pub(super) fn decode_message(b: &mut Fields, retain: bool) -> Option<Message> {
    let topic = b.str16()?;
    let qos = b.u8().filter(|q| *q <= 2)?;
    let flags = b.u8()?;
    let expires = b.i64()?;
    let content_type = if flags & 2 != 0 {
        Some(b.str16()?)
    } else {
        None
    };
    let response_topic = if flags & 4 != 0 {
        Some(b.str16()?)
    } else {
        None
    };
    let correlation_data = if flags & 8 != 0 {
        Some(b.bytes16()?)
    } else {
        None
    };
    let n = b.u16()?;
    let mut user_properties = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        user_properties.push((b.str16()?, b.str16()?));
    }
    let payload = b.bytes32()?;
    Some(Message {
        topic: topic.into(),
        payload,
        qos,
        retain,
        publisher: None,
        expires_ms: (expires != 0).then_some(expires),
        props: Props {
            payload_format_utf8: flags & 1 != 0,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        },
        command: None,
    })
}

enum Change {
    Set(Message),
    Clear(String),
}

fn decode(body: Bytes) -> Option<Change> {
    let mut b = Fields(body);
    match b.u8()? {
        CLEAR => {
            let topic = b.str16()?;
            b.is_empty().then_some(Change::Clear(topic))
        }
        SET => {
            let m = decode_message(&mut b, true)?;
            b.is_empty().then_some(Change::Set(m))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            retain: true,
            publisher: None,
            expires_ms: None,
            props: Props {
                payload_format_utf8: true,
                content_type: Some("text/plain".into()),
                response_topic: Some("r/t".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into())],
            },
            command: None,
        })
    }

    #[tokio::test]
    async fn retained_messages_survive_a_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Retained::open(dir.path(), 100, 0).expect("open");
        r.set(&message("a/b", "one")).await.expect("set");
        r.set(&message("a/c", "two")).await.expect("set");
        r.set(&message("a/b", "three")).await.expect("set");
        r.set(&message("x", "gone")).await.expect("set");
        r.set(&message("x", "")).await.expect("clear");
        drop(r);
        // A record cut short by a power cut.
        let path = dir.path().join("retained.journal");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        let torn = encode_set(&message("torn", "t"));
        let mut partial = (torn.len() as u32).to_le_bytes().to_vec();
        partial.extend_from_slice(&[0, 0, 0, 0]);
        partial.extend_from_slice(&torn[..5]);
        std::io::Write::write_all(&mut f, &partial).expect("write");
        drop(f);

        let r = Retained::open(dir.path(), 100, 0).expect("reopen");
        let got = r.matching("#", 0);
        let topics: Vec<(&str, &[u8])> = got.iter().map(|m| (&*m.topic, &m.payload[..])).collect();
        assert_eq!(topics, vec![("a/b", &b"three"[..]), ("a/c", &b"two"[..])]);
        assert_eq!(
            got[0].props.correlation_data.as_deref(),
            Some(&b"\x00\x01"[..])
        );
        assert_eq!(got[0].props.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(got[0].props.response_topic.as_deref(), Some("r/t"));
        assert!(got[0].props.payload_format_utf8);
        // The torn record was cut: a new one appends after the good prefix.
        r.set(&message("z", "after")).await.expect("set");
        drop(r);
        let r = Retained::open(dir.path(), 100, 0).expect("reopen");
        assert_eq!(r.len(), 3);
    }

    #[tokio::test]
    async fn matching_uses_filters_and_skips_expired_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Retained::open(dir.path(), 100, 0).expect("open");
        for t in ["a/b", "a/b/c", "ab", "b/b", "$SYS/x"] {
            r.set(&message(t, "p")).await.expect("set");
        }
        let mut expiring = (*message("a/old", "p")).clone();
        expiring.expires_ms = Some(1_000);
        r.set(&Arc::new(expiring)).await.expect("set");
        let topics = |f: &str, now: i64| -> Vec<String> {
            r.matching(f, now)
                .iter()
                .map(|m| m.topic.to_string())
                .collect()
        };
        assert_eq!(topics("a/+", 0), vec!["a/b", "a/old"]);
        assert_eq!(topics("a/+", 2_000), vec!["a/b"]);
        assert_eq!(topics("a/#", 2_000), vec!["a/b", "a/b/c"]);
        assert_eq!(topics("+/b", 0), vec!["a/b", "b/b"]);
        assert_eq!(topics("#", 2_000), vec!["a/b", "a/b/c", "ab", "b/b"]);
        assert_eq!(topics("$SYS/#", 0), vec!["$SYS/x"]);
    }

    #[tokio::test]
    async fn the_limit_refuses_new_topics_but_not_updates_or_clears() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Retained::open(dir.path(), 2, 0).expect("open");
        r.set(&message("a", "1")).await.expect("set");
        r.set(&message("b", "1")).await.expect("set");
        assert!(matches!(
            r.set(&message("c", "1")).await,
            Err(RetainError::Full(2))
        ));
        r.set(&message("a", "2")).await.expect("update");
        r.set(&message("a", "")).await.expect("clear");
        r.set(&message("c", "1")).await.expect("room again");
    }

    #[tokio::test]
    async fn the_journal_is_rewritten_when_mostly_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Retained::open(dir.path(), 100, 0).expect("open");
        let big = "x".repeat(64 * 1024);
        for _ in 0..40 {
            r.set(&message("same/topic", &big)).await.expect("set");
        }
        let len = std::fs::metadata(dir.path().join("retained.journal"))
            .expect("stat")
            .len();
        assert!(
            len < 2 * journal::MIN_COMPACT_BYTES,
            "not compacted: {len} bytes"
        );
        drop(r);
        let r = Retained::open(dir.path(), 100, 0).expect("reopen");
        assert_eq!(r.matching("same/topic", 0)[0].payload.len(), big.len());
    }

    #[test]
    fn an_unreadable_header_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("retained.journal"), b"garbage garbage").expect("write");
        let r = Retained::open(dir.path(), 100, 0).expect("open");
        assert!(r.is_empty());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n.contains("unreadable")), "{names:?}");
    }
}
