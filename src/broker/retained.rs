//! Retained messages: one per topic, in memory for matching and on disk so they survive a
//! restart, a SIGKILL and a power cut.
//!
//! On disk they are a journal, `{buffer.dir}/broker/retained.journal`:
//!
//! ```text
//! header:  "EGRETAIN" | version u32 = 1 | 4 zero bytes
//! record:  len u32 | crc32c(body) u32 | body                      (little-endian)
//! body:    kind u8 (1 = set, 2 = clear) | topic str16
//!          set only: qos u8 | flags u8 | expires_ms i64 (0 = never)
//!                    [content_type str16] [response_topic str16] [correlation bytes16]
//!                    properties u16 × (name str16, value str16) | payload bytes32
//! flags:   bit 0 payload is UTF-8 | bit 1 content type | bit 2 response topic
//!          | bit 3 correlation data
//! ```
//!
//! One writer thread appends records in the order they were set and `fdatasync`s once per
//! batch (a group commit, as the log does); [`Retained::set`] resolves only after that, so a
//! retained publish is acknowledged only once its retained copy is durable too. When the
//! journal has grown to twice its live size it is rewritten from the live messages (to a
//! temporary file, fsync'd, renamed over, directory fsync'd). Opening reads the journal,
//! drops expired messages, and truncates a torn or corrupt tail (logged); a journal whose
//! header is unreadable is set aside, not deleted.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};

use bytes::{Buf, BufMut, Bytes};
use tokio::sync::oneshot;

use super::{Message, Props, filter};

const MAGIC: &[u8; 8] = b"EGRETAIN";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
const FRAME_LEN: usize = 8;
/// Compaction waits until the journal is at least this large, however much of it is dead.
const MIN_COMPACT_BYTES: u64 = 1 << 20;
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

struct Job {
    record: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The retained messages, by topic.
#[derive(Clone)]
pub struct Retained {
    map: Arc<RwLock<BTreeMap<String, Arc<Message>>>>,
    jobs: std_mpsc::Sender<Job>,
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
        std::fs::create_dir_all(dir)?;
        let path = dir.join("retained.journal");
        let (map, good_len) = load(&path, now_ms)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        if good_len == 0 {
            file.set_len(0)?;
            file.write_all(&header())?;
            file.sync_all()?;
            sync_dir(dir)?;
        } else {
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        let file_len = file.metadata()?.len();
        let map = Arc::new(RwLock::new(map));
        let (jobs, rx) = std_mpsc::channel();
        let writer = Writer {
            path,
            file,
            file_len,
            map: Arc::clone(&map),
        };
        std::thread::Builder::new()
            .name("edgegate-retained".into())
            .spawn(move || writer.run(rx))?;
        Ok(Retained { map, jobs, limit })
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
        let (done, result) = oneshot::channel();
        {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            let record = if message.payload.is_empty() {
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
            self.jobs
                .send(Job { record, done })
                .map_err(|_| RetainError::Io("the writer has stopped".into()))?;
        }
        Ok(async move {
            match result.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RetainError::Io(e)),
                Err(_) => Err(RetainError::Io("the writer has stopped".into())),
            }
        })
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

struct Writer {
    path: PathBuf,
    file: File,
    file_len: u64,
    map: Arc<RwLock<BTreeMap<String, Arc<Message>>>>,
}

impl Writer {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            batch.extend(jobs.try_iter());
            let result = self.commit(&batch).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, path = %self.path.display(), "Cannot write the retained messages.");
            }
            for job in batch {
                let _ = job.done.send(result.clone());
            }
        }
    }

    fn commit(&mut self, batch: &[Job]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(batch.iter().map(|j| j.record.len()).sum());
        for job in batch {
            buf.extend_from_slice(&job.record);
        }
        self.file.write_all(&buf)?;
        self.file_len += buf.len() as u64;
        // The map already holds every change of this batch (and maybe later ones, which
        // their own jobs will append again): a snapshot of it replaces the whole journal.
        let live = self.live();
        let live_len: u64 = live.iter().map(|r| r.len() as u64).sum::<u64>() + HEADER_LEN as u64;
        if self.file_len >= MIN_COMPACT_BYTES && self.file_len > 2 * live_len {
            return self.compact(&live);
        }
        self.file.sync_data()
    }

    fn live(&self) -> Vec<Vec<u8>> {
        let now = crate::ingest::now_ms();
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter(|m| !m.expired(now))
            .map(|m| encode_set(m))
            .collect()
    }

    fn compact(&mut self, live: &[Vec<u8>]) -> io::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let mut out = File::create(&tmp)?;
        let mut buf = header().to_vec();
        for r in live {
            buf.extend_from_slice(r);
        }
        out.write_all(&buf)?;
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.file_len = buf.len() as u64;
        tracing::debug!(
            bytes = self.file_len,
            messages = live.len(),
            "Rewrote the retained messages' journal."
        );
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + body.len());
    out.put_u32_le(body.len() as u32);
    out.put_u32_le(crc32c::crc32c(&body));
    out.extend_from_slice(&body);
    out
}

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    // Topics, properties and correlation data come from MQTT packets: at most 65,535 bytes.
    let len = s.len().min(usize::from(u16::MAX));
    out.put_u16_le(len as u16);
    out.extend_from_slice(&s[..len]);
}

fn encode_clear(topic: &str) -> Vec<u8> {
    let mut body = vec![CLEAR];
    put_str16(&mut body, topic.as_bytes());
    frame(body)
}

fn encode_set(m: &Message) -> Vec<u8> {
    let p = &m.props;
    let mut body = Vec::with_capacity(32 + m.topic.len() + m.payload.len());
    body.push(SET);
    put_str16(&mut body, m.topic.as_bytes());
    body.push(m.qos);
    let flags = u8::from(p.payload_format_utf8)
        | u8::from(p.content_type.is_some()) << 1
        | u8::from(p.response_topic.is_some()) << 2
        | u8::from(p.correlation_data.is_some()) << 3;
    body.push(flags);
    body.put_i64_le(m.expires_ms.unwrap_or(0));
    if let Some(ct) = &p.content_type {
        put_str16(&mut body, ct.as_bytes());
    }
    if let Some(rt) = &p.response_topic {
        put_str16(&mut body, rt.as_bytes());
    }
    if let Some(cd) = &p.correlation_data {
        put_str16(&mut body, cd);
    }
    let n = p.user_properties.len().min(usize::from(u16::MAX));
    body.put_u16_le(n as u16);
    for (k, v) in p.user_properties.iter().take(n) {
        put_str16(&mut body, k.as_bytes());
        put_str16(&mut body, v.as_bytes());
    }
    body.put_u32_le(m.payload.len() as u32);
    body.extend_from_slice(&m.payload);
    frame(body)
}

/// A record that does not decode: the journal ends before it.
#[derive(Debug)]
struct Bad;

struct Body(Bytes);

impl Body {
    fn u8(&mut self) -> Result<u8, Bad> {
        (self.0.remaining() >= 1)
            .then(|| self.0.get_u8())
            .ok_or(Bad)
    }
    fn bytes16(&mut self) -> Result<Bytes, Bad> {
        if self.0.remaining() < 2 {
            return Err(Bad);
        }
        let n = usize::from(self.0.get_u16_le());
        (self.0.remaining() >= n)
            .then(|| self.0.split_to(n))
            .ok_or(Bad)
    }
    fn str16(&mut self) -> Result<String, Bad> {
        String::from_utf8(self.bytes16()?.to_vec()).map_err(|_| Bad)
    }
}

enum Change {
    Set(Message),
    Clear(String),
}

fn decode(body: Bytes) -> Result<Change, Bad> {
    let mut b = Body(body);
    let kind = b.u8()?;
    let topic = b.str16()?;
    if kind == CLEAR {
        return if b.0.is_empty() {
            Ok(Change::Clear(topic))
        } else {
            Err(Bad)
        };
    }
    if kind != SET {
        return Err(Bad);
    }
    let qos = b.u8()?;
    let flags = b.u8()?;
    if b.0.remaining() < 8 || qos > 2 {
        return Err(Bad);
    }
    let expires = b.0.get_i64_le();
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
    if b.0.remaining() < 2 {
        return Err(Bad);
    }
    let n = b.0.get_u16_le();
    let mut user_properties = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        user_properties.push((b.str16()?, b.str16()?));
    }
    if b.0.remaining() < 4 {
        return Err(Bad);
    }
    let len = b.0.get_u32_le() as usize;
    if b.0.remaining() != len {
        return Err(Bad);
    }
    Ok(Change::Set(Message {
        topic: topic.into(),
        payload: b.0,
        qos,
        retain: true,
        publisher: None,
        expires_ms: (expires != 0).then_some(expires),
        props: Props {
            payload_format_utf8: flags & 1 != 0,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        },
    }))
}

/// Reads the journal: the live messages, and the length of its good prefix (0: none, start
/// a new journal).
fn load(path: &Path, now_ms: i64) -> io::Result<(BTreeMap<String, Arc<Message>>, u64)> {
    let mut map = BTreeMap::new();
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((map, 0)),
        Err(e) => return Err(e),
    }
    if data.is_empty() {
        return Ok((map, 0));
    }
    if data.len() < HEADER_LEN || &data[..8] != MAGIC || data[8..12] != VERSION.to_le_bytes() {
        let aside = path.with_extension(format!("journal.unreadable-{now_ms}"));
        std::fs::rename(path, &aside)?;
        tracing::warn!(path = %aside.display(), "The retained messages' journal has an unknown header; set it aside and started a new one.");
        return Ok((map, 0));
    }
    let data = Bytes::from(data);
    let mut at = HEADER_LEN;
    let mut bad = None;
    while at < data.len() {
        if data.len() - at < FRAME_LEN {
            bad = Some("torn record header");
            break;
        }
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let start = at + FRAME_LEN;
        if data.len() - start < len {
            bad = Some("torn record");
            break;
        }
        let body = data.slice(start..start + len);
        if crc32c::crc32c(&body) != crc {
            bad = Some("checksum mismatch");
            break;
        }
        match decode(body) {
            Ok(Change::Set(m)) => {
                map.insert(m.topic.to_string(), Arc::new(m));
            }
            Ok(Change::Clear(topic)) => {
                map.remove(&topic);
            }
            Err(Bad) => {
                bad = Some("undecodable record");
                break;
            }
        }
        at = start + len;
    }
    if let Some(why) = bad {
        tracing::warn!(path = %path.display(), offset = at, why, "The retained messages' journal ends in a damaged record; it is cut there.");
    }
    map.retain(|_, m: &mut Arc<Message>| !m.expired(now_ms));
    Ok((map, at as u64))
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
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&encode_set(&message("torn", "t"))[..10])
            .expect("write");
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
        assert!(len < 2 * MIN_COMPACT_BYTES, "not compacted: {len} bytes");
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
