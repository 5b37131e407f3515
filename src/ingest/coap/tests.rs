//! Unit tests: framing checks, Block1 values, the assembler, the dedup cache, the outbox,
//! and the endpoint over a real UDP socket and a real log (no Kafka: records are read back
//! from the log). `tests/coap.rs` runs real clients against the binary and Kafka.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::block::{Assembler, Outcome, TransferKey};
use super::config::CoapConfig;
use super::dedup::{Dedup, Seen};
use super::message::{self, Block, code, opt};
use super::outbox::{Outbox, Outgoing};
use crate::auth::Auth;
use crate::auth::config::Anonymous;
use crate::buffer::{Log, LogConfig, LogReader, StoredRecord};
use crate::config::Problems;
use crate::ingest::Pipeline;
use crate::reload::Live;
use crate::route::{RouteConfig, Router};

const PATIENCE: Duration = Duration::from_secs(10);

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A request datagram: type, code, message id, token, options, payload.
fn request(
    kind: MessageType,
    method: RequestType,
    mid: u16,
    path: &str,
    options: &[(u16, Vec<u8>)],
    payload: &[u8],
) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![0xAB, (mid >> 8) as u8, mid as u8]);
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    for (n, v) in options {
        p.add_option(CoapOption::from(*n), v.clone());
    }
    p.payload = payload.to_vec();
    p.to_bytes_unlimited().expect("encode")
}

fn post(mid: u16, path: &str, payload: &[u8]) -> Vec<u8> {
    request(
        MessageType::Confirmable,
        RequestType::Post,
        mid,
        path,
        &[],
        payload,
    )
}

fn block1(num: u32, more: bool, szx: u8) -> (u16, Vec<u8>) {
    (opt::BLOCK1, Block { num, more, szx }.encode())
}

fn code_of(p: &Packet) -> u8 {
    u8::from(p.header.code)
}

fn option_uint(p: &Packet, number: u16) -> Option<u32> {
    message::first(p, number).and_then(message::uint)
}

// ---- framing -------------------------------------------------------------------------

#[test]
fn well_formed_datagrams_parse() {
    let p = message::parse(&post(7, "/t/dev/temp", b"21.5")).expect("parse");
    assert_eq!(p.header.message_id, 7);
    assert_eq!(p.payload, b"21.5");
    let ping = [0x40, 0x00, 0x12, 0x34];
    assert!(message::parse(&ping).is_ok());
}

#[test]
fn malformed_datagrams_are_refused_with_the_rfc_reaction() {
    // Under 4 bytes, or another version: silently ignored.
    assert_eq!(message::parse(&[0x40, 0x01]).unwrap_err().reset, None);
    assert_eq!(
        message::parse(&[0x80, 0x01, 0, 1]).unwrap_err().kind,
        "version"
    );
    // A CON with a token length over 8: Reset, with its message id.
    let e = message::parse(&[0x49, 0x02, 0x01, 0x02]).unwrap_err();
    assert_eq!(e.reset, Some(0x0102));
    // The token is longer than the datagram.
    assert!(message::parse(&[0x44, 0x02, 0, 1, 1]).is_err());
    // An Empty message with bytes after the header.
    let e = message::parse(&[0x40, 0x00, 0, 9, 0xFF]).unwrap_err();
    assert_eq!(e.kind, "empty_with_data");
    // A payload marker with no payload.
    let e = message::parse(&[0x40, 0x02, 0, 3, 0xFF]).unwrap_err();
    assert_eq!((e.kind, e.reset), ("empty_payload", Some(3)));
    // Option delta and length nibble 15 are reserved; option value beyond the end.
    assert!(message::parse(&[0x40, 0x02, 0, 3, 0xF1, 0]).is_err());
    assert!(message::parse(&[0x40, 0x02, 0, 3, 0x1F]).is_err());
    assert!(message::parse(&[0x40, 0x02, 0, 3, 0xB5, b'a']).is_err());
    // Extended length running past the end.
    assert!(message::parse(&[0x40, 0x02, 0, 3, 0xBE, 0x01]).is_err());
    // A NON that is malformed is ignored, not Reset.
    let e = message::parse(&[0x50, 0x02, 0, 3, 0xFF]).unwrap_err();
    assert_eq!(e.reset, None);
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz of the datagram path: every prefix and every one-byte
    // mutation of a valid request, plus random datagrams.
    let valid = request(
        MessageType::Confirmable,
        RequestType::Post,
        9,
        "/t/dev/a/b",
        &[block1(3, true, 2), (opt::NO_RESPONSE, vec![2])],
        b"payload",
    );
    for len in 0..=valid.len() {
        let _ = message::parse(&valid[..len]);
    }
    for i in 0..valid.len() {
        for b in [0x00, 0x0D, 0x0E, 0x0F, 0xD0, 0xE0, 0xF0, 0xFF] {
            let mut m = valid.clone();
            m[i] = b;
            let _ = message::parse(&m);
        }
    }
    let mut seed = 0x1234_5678_u64;
    for _ in 0..20_000 {
        let mut d = Vec::new();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 64) as usize;
        for j in 0..len {
            d.push((seed >> (j % 56)) as u8 ^ j as u8);
        }
        if len >= 1 {
            d[0] = 0x40 | (d[0] & 0x3F);
        }
        let _ = message::parse(&d);
    }
}

#[test]
fn block_values_round_trip() {
    for b in [
        Block {
            num: 0,
            more: true,
            szx: 2,
        },
        Block {
            num: 17,
            more: false,
            szx: 6,
        },
        Block {
            num: (1 << 20) - 1,
            more: true,
            szx: 0,
        },
    ] {
        assert_eq!(Block::decode(&b.encode()), Some(b));
    }
    assert_eq!(Block::decode(&[0x07]), None, "SZX 7 is reserved");
    assert_eq!(Block::decode(&[1, 2, 3, 4]), None);
    let b = Block {
        num: 8,
        more: true,
        szx: 3,
    };
    assert_eq!((b.size(), b.offset()), (128, 1024));
}

#[test]
fn no_response_masks() {
    assert!(message::suppresses(2, code::CHANGED));
    assert!(!message::suppresses(2, code::NOT_FOUND));
    assert!(message::suppresses(8 | 16, code::UNAVAILABLE));
    assert!(!message::suppresses(0, code::CHANGED));
}

// ---- assembler -----------------------------------------------------------------------

fn key(port: u16) -> TransferKey {
    TransferKey {
        peer: peer(port),
        uri: b"t/dev".to_vec(),
        request_tag: None,
    }
}

fn blk(num: u32, more: bool, szx: u8) -> Block {
    Block { num, more, szx }
}

#[test]
fn blocks_in_order_complete_once_and_a_repeated_final_block_is_recognised() {
    let now = Instant::now();
    let mut a = Assembler::new(4, 1000, 6, Duration::from_secs(60));
    let k = key(1);
    assert_eq!(
        a.offer(&k, blk(0, true, 0), &[1; 16], None, now),
        Outcome::Continue(blk(0, true, 0))
    );
    // A network duplicate of the last block is answered again, not appended.
    assert_eq!(
        a.offer(&k, blk(0, true, 0), &[1; 16], None, now),
        Outcome::Continue(blk(0, true, 0))
    );
    assert_eq!(
        a.offer(&k, blk(1, true, 0), &[2; 16], None, now),
        Outcome::Continue(blk(1, true, 0))
    );
    assert_eq!(
        a.offer(&k, blk(1, true, 0), &[2; 16], None, now),
        Outcome::Continue(blk(1, true, 0))
    );
    let done = a.offer(&k, blk(2, false, 0), &[3; 5], None, now);
    let mut want = vec![1; 16];
    want.extend([2; 16]);
    want.extend([3; 5]);
    assert_eq!(
        done,
        Outcome::Complete {
            body: want,
            block: blk(2, false, 0)
        }
    );
    // Before it is stored, a repeat is not confirmed; after, it is 2.04 again.
    assert_eq!(
        a.offer(&k, blk(2, false, 0), &[3; 5], None, now),
        Outcome::Incomplete
    );
    a.stored(k.clone(), blk(2, false, 0), now);
    assert_eq!(
        a.offer(&k, blk(2, false, 0), &[3; 5], None, now),
        Outcome::Repeat(blk(2, false, 0))
    );
    assert_eq!(a.len(), 0);
}

#[test]
fn a_gap_or_a_size_change_is_incomplete() {
    let now = Instant::now();
    let mut a = Assembler::new(4, 1000, 6, Duration::from_secs(60));
    let k = key(1);
    a.offer(&k, blk(0, true, 0), &[0; 16], None, now);
    assert_eq!(
        a.offer(&k, blk(2, true, 0), &[0; 16], None, now),
        Outcome::Incomplete
    );
    assert_eq!(a.len(), 0, "the transfer is dropped");
    // Its next block then finds nothing.
    assert_eq!(
        a.offer(&k, blk(3, false, 0), &[0; 3], None, now),
        Outcome::Incomplete
    );
    a.offer(&k, blk(0, true, 1), &[0; 32], None, now);
    assert_eq!(
        a.offer(&k, blk(2, true, 0), &[0; 16], None, now),
        Outcome::Incomplete,
        "same offset, other size"
    );
    // A block after nothing at all.
    assert_eq!(
        a.offer(&key(2), blk(5, true, 0), &[0; 16], None, now),
        Outcome::Incomplete
    );
}

#[test]
fn the_body_cap_and_announced_size_are_enforced() {
    let now = Instant::now();
    let mut a = Assembler::new(4, 40, 6, Duration::from_secs(60));
    let k = key(1);
    assert_eq!(
        a.offer(&k, blk(0, true, 0), &[0; 16], Some(41), now),
        Outcome::TooLarge
    );
    a.offer(&k, blk(0, true, 0), &[0; 16], None, now);
    a.offer(&k, blk(1, true, 0), &[0; 16], None, now);
    assert_eq!(
        a.offer(&k, blk(2, true, 0), &[0; 16], None, now),
        Outcome::TooLarge
    );
    assert_eq!(a.len(), 0);
    assert_eq!(
        a.offer(&k, blk(0, true, 0), &[0; 15], None, now),
        Outcome::BadBlock,
        "a non-final block must be whole"
    );
}

#[test]
fn a_smaller_server_block_size_continues_at_the_right_offset() {
    let now = Instant::now();
    // The server takes 32-byte blocks (szx 1); the client starts with 64 (szx 2).
    let mut a = Assembler::new(4, 1000, 1, Duration::from_secs(60));
    let k = key(1);
    assert_eq!(
        a.offer(&k, blk(0, true, 2), &[1; 64], None, now),
        Outcome::Continue(blk(0, true, 1))
    );
    // 64 bytes in: the next 32-byte block is number 2.
    assert_eq!(
        a.offer(&k, blk(2, true, 1), &[2; 32], None, now),
        Outcome::Continue(blk(2, true, 1))
    );
    match a.offer(&k, blk(3, false, 1), &[3; 1], None, now) {
        Outcome::Complete { body, .. } => assert_eq!(body.len(), 97),
        other => panic!("{other:?}"),
    }
}

#[test]
fn transfers_are_bounded_and_expire() {
    let now = Instant::now();
    let mut a = Assembler::new(2, 1000, 6, Duration::from_secs(5));
    a.offer(&key(1), blk(0, true, 0), &[0; 16], None, now);
    a.offer(&key(2), blk(0, true, 0), &[0; 16], None, now);
    assert_eq!(
        a.offer(&key(3), blk(0, true, 0), &[0; 16], None, now),
        Outcome::Busy
    );
    assert_eq!(a.expire(now + Duration::from_secs(6)), 2);
    assert_eq!(
        a.offer(&key(1), blk(1, true, 0), &[0; 16], None, now),
        Outcome::Incomplete
    );
}

// ---- dedup and outbox ----------------------------------------------------------------

#[test]
fn dedup_forgets_answered_entries_first_and_expires() {
    let now = Instant::now();
    let life = Duration::from_secs(10);
    let mut d = Dedup::new(2);
    d.insert((peer(1), 1), Seen::Pending, life, now);
    d.insert(
        (peer(1), 2),
        Seen::Answered(Bytes::from_static(b"a")),
        life,
        now,
    );
    // Full: the answered one goes, the pending one stays.
    assert_eq!(d.insert((peer(1), 3), Seen::Pending, life, now), 1);
    assert_eq!(d.get(&(peer(1), 1)), Some(&Seen::Pending));
    assert_eq!(d.get(&(peer(1), 2)), None);
    d.answer(&(peer(1), 1), Bytes::from_static(b"x"));
    d.answer(&(peer(1), 3), Bytes::new());
    d.expire(now + Duration::from_secs(11));
    assert_eq!(d.len(), 0);
}

#[test]
fn outbox_keeps_one_response_outstanding_per_peer_and_backs_off() {
    let now = Instant::now();
    let mut o = Outbox::new(Duration::from_secs(2), 2);
    let out = |mid| Outgoing {
        mid,
        datagram: Bytes::from(vec![mid as u8]),
    };
    assert!(o.push(peer(1), out(1), now).is_some());
    assert!(o.push(peer(1), out(2), now).is_none(), "NSTART = 1");
    assert!(o.push(peer(2), out(3), now).is_some(), "per peer");
    // An ACK for a message id we are not waiting for changes nothing.
    assert_eq!(o.answer(peer(1), 9, now), (false, None));
    let (matched, next) = o.answer(peer(1), 1, now);
    assert!(matched);
    assert_eq!(next.as_deref(), Some(&[2u8][..]));
    // Peer 2's response: retransmitted twice (2-3 s, then doubled), then given up.
    let mut at = now;
    let mut sent = 0;
    let mut gave_up = 0;
    for _ in 0..10 {
        at += Duration::from_secs(13);
        let (send, gone) = o.due(at);
        sent += send.iter().filter(|(p, _)| *p == peer(2)).count();
        gave_up += gone.iter().filter(|p| **p == peer(2)).count();
    }
    assert_eq!((sent, gave_up), (2, 1));
}

// ---- the endpoint over a real socket and log -----------------------------------------

struct Harness {
    addr: SocketAddr,
    client: UdpSocket,
    reader: LogReader,
    log: Log,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(config: CoapConfig, tune: impl FnOnce(&mut LogConfig)) -> Harness {
    start_on(config, tune, None).await
}

/// `start`, on a disk whose every fsync takes `slow_sync` longer when given.
async fn start_on(
    config: CoapConfig,
    tune: impl FnOnce(&mut LogConfig),
    slow_sync: Option<Duration>,
) -> Harness {
    start_as(config, tune, slow_sync, Anonymous::Loopback).await
}

/// `start_on` with the `[auth] anonymous` policy given.
async fn start_as(
    config: CoapConfig,
    tune: impl FnOnce(&mut LogConfig),
    slow_sync: Option<Duration>,
    anonymous: Anonymous,
) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log_config = LogConfig::new(dir.path().join("log"));
    log_config.commit_delay = Duration::from_millis(1);
    tune(&mut log_config);
    let (log, _) = tokio::task::spawn_blocking(move || match slow_sync {
        Some(delay) => Log::open_slow(log_config, delay),
        None => Log::open(log_config),
    })
    .await
    .expect("join")
    .expect("open the log");
    let mut problems = Problems::default();
    let routes = [RouteConfig {
        filter: "coap/+device/#".into(),
        topic: "telemetry".into(),
        key: Some("{device}".into()),
        ..Default::default()
    }];
    let router = Router::new(&routes, None, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(super::serve(
        socket,
        Arc::new(config),
        Live::fixed(Auth::with_anonymous(anonymous)),
        Pipeline::new(log.clone(), router),
        shutdown.clone(),
    ));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    Harness {
        addr,
        client,
        reader: log.reader().expect("reader"),
        log,
        shutdown,
        served,
        _dir: dir,
    }
}

impl Harness {
    async fn send(&self, datagram: &[u8]) {
        self.client
            .send_to(datagram, self.addr)
            .await
            .expect("send");
    }

    async fn recv(&self) -> Packet {
        let mut buf = vec![0; 2048];
        let (n, _) = tokio::time::timeout(PATIENCE, self.client.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .expect("recv");
        Packet::from_bytes(&buf[..n]).expect("a valid answer")
    }

    async fn silent(&self, wait: Duration) -> bool {
        let mut buf = vec![0; 2048];
        tokio::time::timeout(wait, self.client.recv_from(&mut buf))
            .await
            .is_err()
    }

    async fn exchange(&self, datagram: &[u8]) -> Packet {
        self.send(datagram).await;
        self.recv().await
    }

    async fn records(&mut self, n: usize) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch =
                tokio::time::timeout(PATIENCE, self.reader.read_batch(n - out.len(), 1 << 30))
                    .await
                    .expect("records in time")
                    .expect("read");
            out.extend(batch);
        }
        out
    }

    fn appended(&self) -> u64 {
        self.log.stats().next_seq
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.served)
            .await
            .expect("serve drains in time")
            .expect("join")
            .expect("serve");
    }
}

#[tokio::test]
async fn a_con_post_is_acknowledged_once_durable_and_stored_once() {
    let mut h = start(CoapConfig::default(), |_| {}).await;
    let datagram = request(
        MessageType::Confirmable,
        RequestType::Post,
        100,
        "/t/pump7/temp",
        &[(opt::CONTENT_FORMAT, vec![50])],
        b"{\"t\":21.5}",
    );
    let ack = h.exchange(&datagram).await;
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.message_id, 100);
    assert_eq!(code_of(&ack), code::CHANGED);
    assert_eq!(ack.get_token(), &[0xAB, 0, 100]);
    // The retransmission gets the same answer and stores nothing.
    let again = h.exchange(&datagram).await;
    assert_eq!(again, ack);
    let records = h.records(1).await;
    let r = &records[0].record;
    assert_eq!(r.device, "pump7");
    assert_eq!(r.origin, "coap/pump7/temp");
    assert_eq!(r.kafka_topic, "telemetry");
    assert_eq!(r.key.as_deref(), Some(&b"pump7"[..]));
    assert_eq!(&r.payload[..], b"{\"t\":21.5}");
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("coap-content-format").as_deref(), Some("50"));
    assert_eq!(header("coap-uri-path").as_deref(), Some("/t/pump7/temp"));
    assert_eq!(header("coap-type").as_deref(), Some("CON"));
    assert_eq!(header("coap-method").as_deref(), Some("POST"));
    assert_eq!(h.appended(), 1);
    h.stop().await;
}

#[tokio::test]
async fn non_requests_get_non_answers_or_none_with_no_response() {
    let mut h = start(CoapConfig::default(), |_| {}).await;
    let non = request(
        MessageType::NonConfirmable,
        RequestType::Put,
        5,
        "/t/dev",
        &[],
        b"x",
    );
    let answer = h.exchange(&non).await;
    assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code_of(&answer), code::CHANGED);
    assert_eq!(answer.get_token(), &[0xAB, 0, 5]);
    // A duplicate NON is not stored again.
    h.send(&non).await;
    let quiet = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        6,
        "/t/dev",
        &[(opt::NO_RESPONSE, vec![2])],
        b"y",
    );
    h.send(&quiet).await;
    let records = h.records(2).await;
    assert_eq!(&records[0].record.payload[..], b"x");
    assert_eq!(&records[1].record.payload[..], b"y");
    assert_eq!(records[0].record.origin, "coap/dev");
    // The duplicate's cached answer may arrive; nothing for the quiet one.
    let mut buf = [0; 256];
    let mut answers = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), h.client.recv_from(&mut buf)).await
    {
        answers += 1;
    }
    assert!(answers <= 1, "{answers} answers");
    assert_eq!(h.appended(), 2);
    h.stop().await;
}

#[tokio::test]
async fn a_slow_append_gets_an_empty_ack_then_a_separate_response_until_acked() {
    let config = CoapConfig {
        separate_response_after: crate::config::Duration::from_millis(0),
        ack_timeout: crate::config::Duration::from_millis(200),
        ..CoapConfig::default()
    };
    let mut h = start(config, |_| {}).await;
    let datagram = post(42, "/t/dev/s", b"slow");
    let empty = h.exchange(&datagram).await;
    assert_eq!(empty.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(empty.header.code, MessageClass::Empty);
    assert_eq!(empty.header.message_id, 42);
    let separate = h.recv().await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(code_of(&separate), code::CHANGED);
    assert_eq!(separate.get_token(), &[0xAB, 0, 42]);
    // Not acknowledged: it comes again, same message id.
    let again = h.recv().await;
    assert_eq!(again.header.message_id, separate.header.message_id);
    // A retransmitted request meanwhile gets the empty ACK again, and is not stored again.
    h.send(&datagram).await;
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = separate.header.message_id;
    h.send(&ack.to_bytes().expect("encode")).await;
    // Drain whatever was in flight, then nothing more.
    while !h.silent(Duration::from_millis(700)).await {}
    assert_eq!(h.records(1).await.len(), 1);
    assert_eq!(h.appended(), 1);
    h.stop().await;
}

/// On a disk slower than `separate_response_after`, every request in flight gets its empty
/// ACK when that time passes (not when the disk finishes), then its 2.04 as a separate CON
/// once durable; each is stored once.
#[tokio::test]
async fn on_a_slow_disk_each_request_gets_an_empty_ack_in_time_then_a_separate_204() {
    let config = CoapConfig {
        separate_response_after: crate::config::Duration::from_millis(50),
        ..CoapConfig::default()
    };
    let mut h = start_on(config, |_| {}, Some(Duration::from_millis(400))).await;
    let mids = [7u16, 8, 9];
    for mid in mids {
        h.send(&post(mid, "/t/dev/s", &mid.to_be_bytes())).await;
    }
    let mut empty = Vec::new();
    for _ in mids {
        let ack = h.recv().await;
        assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(ack.header.code, MessageClass::Empty, "{ack:?}");
        empty.push(ack.header.message_id);
    }
    empty.sort_unstable();
    assert_eq!(empty, mids);
    let mut tokens = Vec::new();
    for _ in mids {
        let separate = h.recv().await;
        assert_eq!(separate.header.get_type(), MessageType::Confirmable);
        assert_eq!(code_of(&separate), code::CHANGED);
        tokens.push(separate.get_token().to_vec());
        let mut ack = Packet::new();
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Empty;
        ack.header.message_id = separate.header.message_id;
        h.send(&ack.to_bytes().expect("encode")).await;
    }
    tokens.sort_unstable();
    let expected: Vec<Vec<u8>> = mids.iter().map(|m| vec![0xAB, 0, *m as u8]).collect();
    assert_eq!(tokens, expected);
    assert!(h.silent(Duration::from_millis(700)).await);
    assert_eq!(h.records(3).await.len(), 3);
    assert_eq!(h.appended(), 3);
    h.stop().await;
}

/// CoAP devices carry no credentials: under `[auth] anonymous = "never"` every request is
/// refused 4.01 and nothing is stored; under the default "loopback" a loopback peer is served
/// (every other test here).
#[tokio::test]
async fn without_anonymous_access_requests_are_unauthorized_and_not_stored() {
    let h = start_as(CoapConfig::default(), |_| {}, None, Anonymous::Never).await;
    let answer = h.exchange(&post(5, "/t/dev/s", b"x")).await;
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code_of(&answer), code::UNAUTHORIZED);
    assert_eq!(h.appended(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_reset_cancels_the_separate_response() {
    let config = CoapConfig {
        separate_response_after: crate::config::Duration::from_millis(0),
        ack_timeout: crate::config::Duration::from_millis(200),
        ..CoapConfig::default()
    };
    let h = start(config, |_| {}).await;
    h.send(&post(1, "/t/dev", b"a")).await;
    let _empty = h.recv().await;
    let separate = h.recv().await;
    assert_eq!(code_of(&separate), code::CHANGED);
    let mut rst = Packet::new();
    rst.header.set_type(MessageType::Reset);
    rst.header.code = MessageClass::Empty;
    rst.header.message_id = separate.header.message_id;
    h.send(&rst.to_bytes().expect("encode")).await;
    while !h.silent(Duration::from_millis(700)).await {}
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_get_their_codes_and_store_nothing() {
    let config = CoapConfig {
        max_body_size: crate::config::ByteSize(100),
        ..CoapConfig::default()
    };
    let h = start(config, |_| {}).await;
    // Ping.
    let rst = h.exchange(&[0x40, 0x00, 0x33, 0x44]).await;
    assert_eq!(rst.header.get_type(), MessageType::Reset);
    assert_eq!(rst.header.message_id, 0x3344);
    // Garbage CON with a readable header: Reset. Garbage NON: nothing.
    let rst = h.exchange(&[0x40, 0x02, 0x00, 0x09, 0xFF]).await;
    assert_eq!(rst.header.get_type(), MessageType::Reset);
    h.send(&[0x50, 0x02, 0x00, 0x0A, 0xFF]).await;
    h.send(b"\x00\x01").await;
    assert!(h.silent(Duration::from_millis(200)).await);
    let cases: Vec<(Vec<u8>, u8)> = vec![
        (
            request(
                MessageType::Confirmable,
                RequestType::Post,
                1,
                "/t/dev",
                &[(2049, vec![1])],
                b"x",
            ),
            code::BAD_OPTION,
        ),
        (
            request(
                MessageType::Confirmable,
                RequestType::Get,
                2,
                "/t/dev",
                &[],
                b"",
            ),
            code::METHOD_NOT_ALLOWED,
        ),
        (post(3, "/other/dev", b"x"), code::NOT_FOUND),
        (post(4, "/t", b"x"), code::NOT_FOUND),
        (post(5, "/t/de+v", b"x"), code::BAD_REQUEST),
        (post(6, "/t/dev", &[0; 101]), code::TOO_LARGE),
        (
            request(
                MessageType::Confirmable,
                RequestType::Post,
                7,
                "/t/dev",
                &[block1(1, true, 0)],
                &[0; 16],
            ),
            code::INCOMPLETE,
        ),
        (
            request(
                MessageType::Confirmable,
                RequestType::Post,
                8,
                "/t/dev",
                &[(opt::PROXY_URI, b"coap://x/".to_vec())],
                b"x",
            ),
            code::PROXYING_NOT_SUPPORTED,
        ),
    ];
    for (datagram, want) in cases {
        let answer = h.exchange(&datagram).await;
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(code::label(code_of(&answer)), code::label(want));
        if want == code::TOO_LARGE {
            assert_eq!(option_uint(&answer, opt::SIZE1), Some(100));
        }
    }
    // A datagram over the limit: 4.13 with Size1 and the block size to use.
    let answer = h.exchange(&post(9, "/t/dev", &[0; 2000])).await;
    assert_eq!(code_of(&answer), code::TOO_LARGE);
    assert!(message::first(&answer, opt::BLOCK1).is_some());
    // An unknown path still gets 4.04 when no route matches the topic.
    assert_eq!(h.appended(), 0);
    h.stop().await;
}

#[tokio::test]
async fn blockwise_upload_is_stored_once_even_if_its_final_block_is_repeated() {
    let mut h = start(CoapConfig::default(), |_| {}).await;
    let body: Vec<u8> = (0..200u8).collect();
    let chunks: Vec<&[u8]> = body.chunks(64).collect();
    let mut last = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let more = i + 1 < chunks.len();
        let datagram = request(
            MessageType::Confirmable,
            RequestType::Post,
            200 + i as u16,
            "/t/dev/file",
            &[block1(i as u32, more, 2)],
            chunk,
        );
        let answer = h.exchange(&datagram).await;
        let want = if more { code::CONTINUE } else { code::CHANGED };
        assert_eq!(code::label(code_of(&answer)), code::label(want));
        assert_eq!(
            message::first(&answer, opt::BLOCK1).and_then(Block::decode),
            Some(Block {
                num: i as u32,
                more,
                szx: 2
            })
        );
        last = datagram;
    }
    // The same final block again, and as a new message (new message id).
    assert_eq!(code_of(&h.exchange(&last).await), code::CHANGED);
    let mut fresh = Packet::from_bytes(&last).expect("parse");
    fresh.header.message_id = 999;
    let answer = h.exchange(&fresh.to_bytes().expect("encode")).await;
    assert_eq!(code_of(&answer), code::CHANGED);
    let records = h.records(1).await;
    assert_eq!(&records[0].record.payload[..], &body[..]);
    assert_eq!(h.appended(), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_full_log_answers_503_with_max_age_and_others_are_unaffected_after() {
    let config = CoapConfig {
        busy_max_age: crate::config::Duration::from_secs(7),
        ..CoapConfig::default()
    };
    let h = start(config, |c| {
        c.segment_bytes = 64 << 10;
        c.max_bytes = 128 << 10;
    })
    .await;
    let mut busy = None;
    for mid in 0..400u16 {
        let answer = h.exchange(&post(mid, "/t/dev", &[7; 1000])).await;
        if code_of(&answer) == code::UNAVAILABLE {
            busy = Some(answer);
            break;
        }
        assert_eq!(code_of(&answer), code::CHANGED);
    }
    let busy = busy.expect("the log filled up");
    assert_eq!(option_uint(&busy, opt::MAX_AGE), Some(7));
    h.stop().await;
}

#[tokio::test]
async fn no_route_is_not_found() {
    let h = start(CoapConfig::default(), |_| {}).await;
    let config = CoapConfig {
        topic_prefix: "other".into(),
        ..CoapConfig::default()
    };
    let other = start(config, |_| {}).await;
    let answer = other.exchange(&post(1, "/t/dev", b"x")).await;
    assert_eq!(code_of(&answer), code::NOT_FOUND);
    assert_eq!(other.appended(), 0);
    other.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn shutdown_answers_what_is_being_stored_then_returns() {
    let config = CoapConfig {
        max_exchanges_per_peer: 32,
        ..CoapConfig::default()
    };
    let h = start(config, |_| {}).await;
    for mid in 0..20u16 {
        h.send(&post(mid, "/t/dev", b"x")).await;
    }
    // Taken (appended, maybe not yet durable): from here on they are in progress.
    let deadline = Instant::now() + PATIENCE;
    while h.appended() < 20 {
        assert!(Instant::now() < deadline, "requests taken in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.shutdown.cancel();
    let mut answered = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(
        Duration::from_millis(500),
        h.client.recv_from(&mut [0; 256]),
    )
    .await
    {
        answered += 1;
    }
    assert_eq!(answered, 20, "every request is answered (2.04 or 5.03)");
    tokio::time::timeout(PATIENCE, h.served)
        .await
        .expect("returns")
        .expect("join")
        .expect("serve");
}

#[tokio::test]
async fn a_flood_from_one_peer_is_refused_beyond_its_share_and_others_are_served() {
    let config = CoapConfig {
        max_exchanges_per_peer: 4,
        separate_response_after: crate::config::Duration::from_millis(0),
        ..CoapConfig::default()
    };
    let h = start(config, |_| {}).await;
    // Separate responses hold their slot until ACKed, and this flooder never ACKs.
    for mid in 0..10u16 {
        h.send(&post(mid, "/t/flood", b"x")).await;
    }
    let mut busy = 0;
    while let Ok(Ok((n, _))) = tokio::time::timeout(
        Duration::from_millis(300),
        h.client.recv_from(&mut [0; 256]),
    )
    .await
    {
        assert!(n >= 4);
        busy += 1;
    }
    assert!(busy >= 10, "every request was answered somehow ({busy})");
    assert_eq!(h.appended(), 4, "only the peer's share was stored");
    // Another peer is served.
    let other = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    other
        .send_to(&post(1, "/t/other", b"y"), h.addr)
        .await
        .expect("send");
    let mut buf = [0; 256];
    let (n, _) = tokio::time::timeout(PATIENCE, other.recv_from(&mut buf))
        .await
        .expect("answered")
        .expect("recv");
    let empty = Packet::from_bytes(&buf[..n]).expect("parse");
    assert_eq!(empty.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(h.appended(), 5);
    h.stop().await;
}

#[tokio::test]
async fn an_unknown_method_code_is_method_not_allowed() {
    let h = start(CoapConfig::default(), |_| {}).await;
    let mut datagram = post(3, "/t/dev", b"x");
    datagram[1] = 0x08; // 0.08: no such method
    let answer = h.exchange(&datagram).await;
    assert_eq!(code_of(&answer), code::METHOD_NOT_ALLOWED);
    assert_eq!(h.appended(), 0);
    h.stop().await;
}

mod fuzz {
    use proptest::prelude::*;

    use super::super::message::{self, Block};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// The datagram path's parsing never panics, and what it accepts re-encodes.
        #[test]
        fn parse_never_panics(datagram in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(packet) = message::parse(&datagram) {
                prop_assert!(packet.get_token().len() <= 8);
                let _ = packet.to_bytes_unlimited();
            }
        }

        #[test]
        fn coap_shaped_datagrams_never_panic(
            header in proptest::collection::vec(any::<u8>(), 4..5),
            rest in proptest::collection::vec(prop_oneof![Just(0xFFu8), 0x0Du8..0x0F, any::<u8>()], 0..64),
        ) {
            let mut datagram = header;
            datagram[0] = 0x40 | (datagram[0] & 0x3F);
            datagram.extend(rest);
            let _ = message::parse(&datagram);
        }

        #[test]
        fn block_values_decode_or_refuse(value in proptest::collection::vec(any::<u8>(), 0..5)) {
            if let Some(b) = Block::decode(&value) {
                prop_assert_eq!(Block::decode(&b.encode()), Some(b));
            }
        }
    }
}

/// The fuzz entry's path answers the committed seeds as the server would: a piggybacked 2.04 with
/// the token for a good CON POST, a Reset for a ping, 4.05 for GET, 4.02 for an unknown
/// critical option, nothing for a NON whose No-Response declines it, nothing for garbage.
#[test]
fn fuzz_entry_answers_the_seeds_like_the_server() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/coap_datagram");
    let answer = |name: &str| {
        let datagram = std::fs::read(seeds.join(name)).expect("seed");
        super::request::classify(&CoapConfig::default(), &datagram)
            .map(|a| Packet::from_bytes(&a).expect("answer parses"))
    };
    let ok = answer("con_post").expect("an answer");
    assert_eq!(ok.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(u8::from(ok.header.code), code::CHANGED);
    assert_eq!(ok.get_token(), &[1, 2]);
    assert_eq!(ok.header.message_id, 0x1234);
    let ping = answer("ping").expect("a Reset");
    assert_eq!(ping.header.get_type(), MessageType::Reset);
    assert_eq!(
        u8::from(answer("con_get").expect("4.05").header.code),
        code::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        u8::from(answer("unknown_critical").expect("4.02").header.code),
        code::BAD_OPTION
    );
    assert!(answer("non_no_response").is_none());
    let block = answer("con_block1_first").expect("an answer");
    assert!(message::first(&block, opt::BLOCK1).is_some());
    assert!(super::request::classify(&CoapConfig::default(), b"\x40").is_none());
}
