//! CoAP end to end, black box: the whole gateway on its config file, real CoAP clients
//! (libcoap's `coap-client-notls`, aiocoap, and raw datagrams for what no client sends on
//! purpose), a real Kafka broker (the shared fixture). Records are read back from Kafka and
//! checked one by one: key, headers, payload, exactly once. The gateway runs in process; the
//! bad-input test runs the real `edgegate` binary, for its log lines and its own counters.
//!
//! Run with `tools/test --test coap`. The benchmark is `#[ignore]`d:
//! `cargo test --release --test coap -- --ignored --nocapture coap_con_throughput`.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use common::{Consumed, GatewayToml};

const GATEWAY_ID: &str = "coap-gw";

/// The config of every test here: the test broker unless a test says otherwise.
fn config() -> GatewayToml {
    GatewayToml::new().id(GATEWAY_ID)
}

/// `coap://<addr><path>`.
fn uri(coap: SocketAddr, path: &str) -> String {
    format!("coap://{coap}{path}")
}

/// One route: every CoAP device into `topic`, keyed by device id.
fn route(topic: &str) -> GatewayToml {
    config().route_keyed("coap/+device/#", topic, "{device}")
}

/// `coap-client-notls` with `args`; its output (responses and errors) as one string.
fn libcoap(args: &[&str]) -> (bool, String) {
    let out = Command::new("coap-client-notls")
        .args(["-B", "30"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run coap-client-notls (Debian libcoap3-bin)");
    (out.status.success(), text(&out))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a Python script using aiocoap; each line of its stdout is returned.
fn aiocoap(script: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 (pip install aiocoap)");
    assert!(
        out.status.success(),
        "aiocoap script failed:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Posts each (uri, type, payload-file) and prints `<code> <file>` per request, or
/// `error <file>` when the request failed (timeout, reset).
const AIOCOAP_POST: &str = r#"
import asyncio, sys
import aiocoap
from aiocoap import Context, Message, POST

async def main():
    ctx = await Context.create_client_context()
    args = sys.argv[1:]
    for uri, kind, path in zip(args[0::3], args[1::3], args[2::3]):
        payload = open(path, "rb").read()
        tuning = aiocoap.Reliable if kind == "CON" else aiocoap.Unreliable
        msg = Message(code=POST, uri=uri, payload=payload, content_format=42,
                      transport_tuning=tuning)
        try:
            resp = await asyncio.wait_for(ctx.request(msg).response, 120)
            print(resp.code.dotted, path, flush=True)
        except Exception as e:
            print("error", path, type(e).__name__, flush=True)
    await ctx.shutdown()

asyncio.run(main())
"#;

/// A raw CoAP client on a std socket, for what real clients do not send.
struct Raw {
    socket: UdpSocket,
    server: SocketAddr,
}

impl Raw {
    fn new(server: SocketAddr) -> Raw {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        Raw { socket, server }
    }

    fn send(&self, datagram: &[u8]) {
        self.socket.send_to(datagram, self.server).expect("send");
    }

    fn try_recv(&self, wait: Duration) -> Option<Packet> {
        self.socket.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 2048];
        let (n, _) = self.socket.recv_from(&mut buf).ok()?;
        Some(Packet::from_bytes(&buf[..n]).expect("a well-formed answer"))
    }

    fn recv(&self) -> Packet {
        self.try_recv(Duration::from_secs(10))
            .expect("an answer within 10 s")
    }

    fn exchange(&self, datagram: &[u8]) -> Packet {
        self.send(datagram);
        self.recv()
    }
}

/// A request datagram.
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
    p.set_token(mid.to_be_bytes().to_vec());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    for (n, v) in options {
        p.add_option(CoapOption::from(*n), v.clone());
    }
    p.payload = payload.to_vec();
    p.to_bytes_unlimited().expect("encode")
}

fn con_post(mid: u16, path: &str, options: &[(u16, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
    request(
        MessageType::Confirmable,
        RequestType::Post,
        mid,
        path,
        options,
        payload,
    )
}

const BLOCK1: u16 = 27;
const SIZE1: u16 = 60;
const MAX_AGE: u16 = 14;

fn block1(num: u32, more: bool, szx: u8) -> (u16, Vec<u8>) {
    let v = (num << 4) | (u32::from(more) << 3) | u32::from(szx);
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    (BLOCK1, bytes[skip..].to_vec())
}

fn code(p: &Packet) -> String {
    p.header.code.to_string()
}

fn uint_option(p: &Packet, number: u16) -> Option<u32> {
    p.get_first_option(CoapOption::from(number))
        .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write payload file");
    path
}

/// A payload nobody else sends: `<tag>-<n>` padded to `len` bytes.
fn payload(tag: &str, n: usize, len: usize) -> Vec<u8> {
    let mut p = format!("{tag}-{n}-").into_bytes();
    while p.len() < len {
        p.push(b'a' + (p.len() % 26) as u8);
    }
    p
}

fn by_payload(records: &[Consumed]) -> HashMap<Vec<u8>, Vec<&Consumed>> {
    let mut map: HashMap<Vec<u8>, Vec<&Consumed>> = HashMap::new();
    for r in records {
        map.entry(r.payload.clone().unwrap_or_default())
            .or_default()
            .push(r);
    }
    map
}

fn header<'a>(r: &'a Consumed, name: &str) -> &'a str {
    r.header(name)
        .map(|v| std::str::from_utf8(v).expect("UTF-8 header"))
        .unwrap_or_else(|| panic!("no header {name} in {r:?}"))
}

#[test]
fn libcoap_and_aiocoap_uploads_reach_kafka_exactly_once_with_their_headers() {
    let _kafka = common::shared();
    let topic = common::unique_topic("coap-clients");
    let gw = common::gateway(route(&topic)).start();
    let files = tempfile::tempdir().expect("tempdir");

    // libcoap: CON and NON, small and block-wise (64-byte blocks, a 4 KiB file).
    let small_con = payload("libcoap-con", 0, 20);
    let small_non = payload("libcoap-non", 0, 20);
    let big_con = payload("libcoap-block", 0, 4096);
    let big_non = payload("libcoap-block-non", 0, 3000);
    let big_con_file = write_file(files.path(), "big-con", &big_con);
    let big_non_file = write_file(files.path(), "big-non", &big_non);
    let uri_temp = uri(gw.coap_addr(), "/t/pump7/temp");
    let uri_file = uri(gw.coap_addr(), "/t/pump7/file");
    let cases: Vec<Vec<&str>> = vec![
        vec!["-m", "post", "-t", "50", "-e"],
        vec!["-m", "post", "-N", "-e"],
        vec!["-m", "put", "-b", "64", "-f"],
        vec!["-m", "post", "-N", "-b", "64", "-f"],
    ];
    let small_con_s = String::from_utf8(small_con.clone()).expect("ascii");
    let small_non_s = String::from_utf8(small_non.clone()).expect("ascii");
    let args: [(&str, &str); 4] = [
        (&small_con_s, &uri_temp),
        (&small_non_s, &uri_temp),
        (big_con_file.to_str().expect("path"), &uri_file),
        (big_non_file.to_str().expect("path"), &uri_file),
    ];
    for (mut case, (value, uri)) in cases.into_iter().zip(args) {
        case.push(value);
        case.push(uri);
        let (ok, out) = libcoap(&case);
        assert!(ok, "coap-client {case:?}: {out}");
        assert!(
            !out.contains("4.") && !out.contains("5."),
            "coap-client {case:?}: {out}"
        );
    }

    // aiocoap: CON and NON small, and 5000 bytes (it switches to Block1 by itself).
    let ai = [
        ("CON", payload("aiocoap-con", 0, 30)),
        ("NON", payload("aiocoap-non", 0, 30)),
        ("CON", payload("aiocoap-block", 0, 5000)),
    ];
    let mut ai_args = Vec::new();
    for (i, (kind, body)) in ai.iter().enumerate() {
        let path = write_file(files.path(), &format!("ai-{i}"), body);
        ai_args.push(uri(gw.coap_addr(), "/t/sensor-9/env/air"));
        ai_args.push((*kind).to_owned());
        ai_args.push(path.to_str().expect("path").to_owned());
    }
    let ai_refs: Vec<&str> = ai_args.iter().map(String::as_str).collect();
    for line in aiocoap(AIOCOAP_POST, &ai_refs) {
        assert!(line.starts_with("2.04 "), "aiocoap: {line}");
    }

    let records = common::consume_all_blocking(&topic, 7, Duration::from_secs(60));
    let map = by_payload(&records);
    assert_eq!(
        records.len(),
        7,
        "{:#?}",
        map.keys().map(|k| k.len()).collect::<Vec<_>>()
    );
    let expect = [
        (
            &small_con,
            "pump7",
            "/t/pump7/temp",
            "CON",
            "POST",
            Some("50"),
        ),
        (&small_non, "pump7", "/t/pump7/temp", "NON", "POST", None),
        (&big_con, "pump7", "/t/pump7/file", "CON", "PUT", None),
        (&big_non, "pump7", "/t/pump7/file", "NON", "POST", None),
        (
            &ai[0].1,
            "sensor-9",
            "/t/sensor-9/env/air",
            "CON",
            "POST",
            Some("42"),
        ),
        (
            &ai[1].1,
            "sensor-9",
            "/t/sensor-9/env/air",
            "NON",
            "POST",
            Some("42"),
        ),
        (
            &ai[2].1,
            "sensor-9",
            "/t/sensor-9/env/air",
            "CON",
            "POST",
            Some("42"),
        ),
    ];
    for (body, device, path, kind, method, format) in expect {
        let found = map
            .get(body.as_slice())
            .unwrap_or_else(|| panic!("{path} {kind} {} bytes not in Kafka", body.len()));
        assert_eq!(found.len(), 1, "{path} {kind} stored {} times", found.len());
        let r = found[0];
        assert_eq!(r.key.as_deref(), Some(device.as_bytes()));
        assert_eq!(header(r, "edgegate-source"), "coap");
        assert_eq!(header(r, "edgegate-device"), device);
        assert_eq!(header(r, "coap-uri-path"), path);
        assert_eq!(header(r, "coap-type"), kind);
        assert_eq!(header(r, "coap-method"), method);
        assert_eq!(
            r.header("coap-content-format")
                .map(|v| std::str::from_utf8(v).expect("utf8")),
            format
        );
        assert!(header(r, "edgegate-record-id").starts_with(&format!("{GATEWAY_ID}:")));
        assert_eq!(
            header(r, "edgegate-origin"),
            format!("coap{}", path.trim_start_matches("/t"))
        );
    }
}

/// Forwards datagrams between a client and the gateway, dropping and duplicating some in
/// both directions (a deterministic pattern, so a failure reproduces).
struct LossyProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl LossyProxy {
    fn start(server: SocketAddr, drop_every: u64, duplicate_every: u64) -> LossyProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = front.local_addr().expect("addr");
        front
            .set_read_timeout(Some(Duration::from_millis(5)))
            .expect("timeout");
        back.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut n = 0u64;
            let (mut dropped, mut duplicated) = (0, 0);
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let mut forward = |len: usize, to: &UdpSocket, dest: SocketAddr, buf: &[u8]| {
                    n += 1;
                    if n % drop_every == 0 {
                        dropped += 1;
                        return;
                    }
                    let _ = to.send_to(&buf[..len], dest);
                    if n % duplicate_every == 0 {
                        duplicated += 1;
                        let _ = to.send_to(&buf[..len], dest);
                    }
                };
                if let Ok((len, from)) = front.recv_from(&mut buf) {
                    client = Some(from);
                    forward(len, &back, server, &buf);
                }
                if let (Ok((len, _)), Some(c)) = (back.recv_from(&mut buf), client) {
                    forward(len, &front, c, &buf);
                }
            }
            (dropped, duplicated)
        });
        LossyProxy {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("proxy thread"))
            .unwrap_or_default()
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn over_a_lossy_link_every_acknowledged_upload_is_in_kafka_exactly_once() {
    let _kafka = common::shared();
    let topic = common::unique_topic("coap-lossy");
    let gw = common::gateway(route(&topic)).start();
    // Every 4th datagram lost, every 5th duplicated, both ways.
    let proxy = LossyProxy::start(gw.coap_addr(), 4, 5);
    let files = tempfile::tempdir().expect("tempdir");
    let mut args = Vec::new();
    let mut sent = HashMap::new();
    for i in 0..20 {
        // Small ones, and every fifth block-wise (aiocoap uses Block1 above 1024 bytes).
        let body = payload("lossy", i, if i % 5 == 4 { 3000 } else { 40 });
        let path = write_file(files.path(), &format!("p{i}"), &body);
        let path = path.to_str().expect("path").to_owned();
        args.push(format!("coap://{}/t/lossy-dev/s", proxy.addr));
        args.push("CON".to_owned());
        args.push(path.clone());
        sent.insert(path, body);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = aiocoap(AIOCOAP_POST, &refs);
    let (dropped, duplicated) = proxy.finish();
    assert!(dropped > 0 && duplicated > 0);
    let acked: Vec<&Vec<u8>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("2.04 "))
        .map(|path| &sent[path])
        .collect();
    assert!(
        acked.len() >= 10,
        "too few uploads got through a 25% loss: {lines:#?}"
    );
    let records = common::consume_all_blocking(&topic, acked.len(), Duration::from_secs(60));
    let map = by_payload(&records);
    for body in &acked {
        let n = map.get(body.as_slice()).map_or(0, Vec::len);
        assert_eq!(n, 1, "an acknowledged upload is in Kafka {n} times");
    }
    for (body, copies) in &map {
        assert_eq!(copies.len(), 1, "{} bytes stored twice", body.len());
    }
    eprintln!(
        "lossy link: {} of 20 acknowledged, {} stored, {dropped} datagrams dropped, {duplicated} duplicated",
        acked.len(),
        records.len()
    );
}

#[test]
fn a_slow_append_is_answered_with_an_empty_ack_then_a_separate_204() {
    let _kafka = common::shared();
    let topic = common::unique_topic("coap-separate");
    // "0ms": every confirmable request is answered separately.
    let gw = common::gateway(
        route(&topic)
            .coap("separate_response_after", "0ms")
            .coap("ack_timeout", "300ms"),
    )
    .start();
    let raw = Raw::new(gw.coap_addr());
    let first = payload("separate-raw", 0, 10);
    let empty = raw.exchange(&con_post(77, "/t/slow/x", &[], &first));
    assert_eq!(empty.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(empty.header.code, MessageClass::Empty);
    let separate = raw.recv();
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&separate), "2.04");
    assert_eq!(separate.get_token(), &77u16.to_be_bytes());
    // Unacknowledged, it is retransmitted with the same message id; an ACK ends that.
    let again = raw.recv();
    assert_eq!(again.header.message_id, separate.header.message_id);
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = separate.header.message_id;
    raw.send(&ack.to_bytes().expect("encode"));
    while raw.try_recv(Duration::from_millis(800)).is_some() {}

    // libcoap handles the separate response like any other.
    let second = payload("separate-libcoap", 0, 10);
    let (ok, out) = libcoap(&[
        "-m",
        "post",
        "-e",
        std::str::from_utf8(&second).expect("ascii"),
        &uri(gw.coap_addr(), "/t/slow/y"),
    ]);
    assert!(ok && !out.contains("4.") && !out.contains("5."), "{out}");

    let records = common::consume_all_blocking(&topic, 2, Duration::from_secs(60));
    let map = by_payload(&records);
    assert_eq!(records.len(), 2);
    assert_eq!(map[&first].len(), 1);
    assert_eq!(map[&second].len(), 1);
}

/// Needs no broker: the log fills because nothing drains it (Kafka unreachable), and until
/// then every upload is acknowledged.
#[test]
fn a_full_log_answers_503_with_max_age_and_kafka_down_alone_refuses_nothing() {
    let gw = common::gateway(
        config()
            .kafka_unreachable()
            .coap("busy_max_age", "9s")
            .buffer_sizes("64KiB", "128KiB")
            .route("#", "nowhere"),
    )
    .start();
    let raw = Raw::new(gw.coap_addr());
    let mut acked = 0;
    let mut busy = None;
    for mid in 0..1000u16 {
        let answer = raw.exchange(&con_post(mid, "/t/dev", &[], &[b'x'; 900]));
        match code(&answer).as_str() {
            "2.04" => acked += 1,
            "5.03" => {
                busy = Some(answer);
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let busy = busy.expect("the log filled up");
    assert!(
        acked > 50,
        "only {acked} acknowledged before the log was full"
    );
    assert_eq!(uint_option(&busy, MAX_AGE), Some(9));
    // NON gets a NON 5.03 too.
    let non = raw.exchange(&request(
        MessageType::NonConfirmable,
        RequestType::Post,
        5000,
        "/t/dev",
        &[],
        b"x",
    ));
    assert_eq!(non.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(code(&non), "5.03");
}

#[test]
fn bad_input_gets_its_codes_while_good_clients_are_served_and_nothing_is_stored_twice() {
    let _kafka = common::shared();
    let topic = common::unique_topic("coap-bad");
    // The binary: its log and its counters are this test's alone.
    let gw = common::gateway(route(&topic).coap("max_body_size", "2KiB"))
        .rust_log("info,edgegate::ingest::coap=debug")
        .start_process();
    let raw = Raw::new(gw.coap_addr());

    // Garbage: a Reset for a CON whose header is readable; silence otherwise.
    let rst = raw.exchange(&[0x40, 0x02, 0x12, 0x34, 0xF0]);
    assert_eq!(rst.header.get_type(), MessageType::Reset);
    assert_eq!(rst.header.message_id, 0x1234);
    for garbage in [
        &b"\xff\xff"[..],
        b"\x50\x02\x00\x01\xff",
        b"hello world",
        &[0u8; 40],
    ] {
        raw.send(garbage);
    }
    assert!(raw.try_recv(Duration::from_millis(300)).is_none());
    // Ping.
    let rst = raw.exchange(&[0x40, 0x00, 0x00, 0x07]);
    assert_eq!(rst.header.get_type(), MessageType::Reset);

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (con_post(1, "/t/dev", &[(2049, vec![1])], b"x"), "4.02"),
        (
            request(
                MessageType::Confirmable,
                RequestType::Delete,
                2,
                "/t/dev",
                &[],
                b"",
            ),
            "4.05",
        ),
        (con_post(3, "/nothing/here", &[], b"x"), "4.04"),
        // Over max_datagram_size (1280): 4.13 with Size1 and the Block1 size to use.
        (con_post(4, "/t/dev", &[], &[0; 1300]), "4.13"),
        // Block 0 then block 2: a gap.
        (
            con_post(5, "/t/gap", &[block1(0, true, 2)], &[0; 64]),
            "2.31",
        ),
        (
            con_post(6, "/t/gap", &[block1(2, true, 2)], &[0; 64]),
            "4.08",
        ),
        // An upload growing past max_body_size (2 KiB) in 1 KiB blocks.
        (
            con_post(7, "/t/big", &[block1(0, true, 6)], &[0; 1024]),
            "2.31",
        ),
        (
            con_post(8, "/t/big", &[block1(1, true, 6)], &[0; 1024]),
            "2.31",
        ),
        (
            con_post(9, "/t/big", &[block1(2, false, 6)], &[0; 10]),
            "4.13",
        ),
    ];
    for (datagram, want) in cases {
        let answer = raw.exchange(&datagram);
        assert_eq!(code(&answer), want, "{answer:?}");
        if want == "4.13" {
            assert_eq!(uint_option(&answer, SIZE1), Some(2048));
        }
    }

    // A block-wise upload whose final block is sent three times: once more as a
    // retransmission (same message id) and once as a new message.
    let body = payload("final-block", 0, 150);
    let blocks: Vec<&[u8]> = body.chunks(64).collect();
    let mut last = Vec::new();
    for (i, chunk) in blocks.iter().enumerate() {
        let more = i + 1 < blocks.len();
        let datagram = con_post(
            100 + i as u16,
            "/t/blocky",
            &[block1(i as u32, more, 2)],
            chunk,
        );
        let answer = raw.exchange(&datagram);
        assert_eq!(code(&answer), if more { "2.31" } else { "2.04" });
        last = datagram;
    }
    assert_eq!(code(&raw.exchange(&last)), "2.04");
    let mut renumbered = Packet::from_bytes(&last).expect("parse");
    renumbered.header.message_id = 999;
    assert_eq!(
        code(&raw.exchange(&renumbered.to_bytes().expect("encode"))),
        "2.04"
    );

    // A flood from one peer: more requests at once than it may have in progress. Every one
    // is answered (2.04 or 5.03), each 2.04'd one stored once.
    let flood = Raw::new(gw.coap_addr());
    let mut flooded = HashMap::new();
    for i in 0..64u16 {
        let body = payload("flood", usize::from(i), 20);
        flood.send(&con_post(2000 + i, "/t/flood", &[], &body));
        flooded.insert(2000 + i, body);
    }
    let mut flood_acked = Vec::new();
    while let Some(answer) = flood.try_recv(Duration::from_millis(1500)) {
        if code(&answer) == "2.04" {
            flood_acked.push(flooded[&answer.header.message_id].clone());
        } else {
            assert_eq!(code(&answer), "5.03");
        }
    }
    assert!(!flood_acked.is_empty());

    // Meanwhile a good client is served.
    let good = payload("good", 0, 12);
    let (ok, out) = libcoap(&[
        "-m",
        "post",
        "-e",
        std::str::from_utf8(&good).expect("ascii"),
        &uri(gw.coap_addr(), "/t/good"),
    ]);
    assert!(ok && !out.contains("4.") && !out.contains("5."), "{out}");

    let expected = 2 + flood_acked.len();
    let records = common::consume_all_blocking(&topic, expected, Duration::from_secs(60));
    let map = by_payload(&records);
    assert_eq!(records.len(), expected, "records: {}", records.len());
    assert_eq!(map[&good].len(), 1);
    assert_eq!(map[&body].len(), 1, "the final block made one record");
    for b in &flood_acked {
        assert_eq!(map[b].len(), 1);
    }
    assert!(
        gw.log_text().contains("CoAP"),
        "the gateway logged the refusals"
    );

    // The counters saw the same: every record stored once, the garbage, the 2.04s.
    let (status, metrics) = common::http_get(gw.admin_addr(), "/metrics");
    assert_eq!(status, 200);
    let value = |series: &str| common::metric(&metrics, series).unwrap_or(0.0);
    assert_eq!(
        value("edgegate_coap_stored_total"),
        expected as f64,
        "{metrics}"
    );
    // 8 refused or continued, 5 final-block sends, 64 flooded, 1 good (+ libcoap's own).
    assert!(
        value("edgegate_coap_requests_total{type=\"con\"}") >= 78.0,
        "{metrics}"
    );
    assert!(
        value("edgegate_coap_responses_total{code=\"2.04\"}") >= expected as f64,
        "{metrics}"
    );
    assert!(
        value("edgegate_coap_responses_total{code=\"4.02\"}") >= 1.0,
        "{metrics}"
    );
    let malformed: f64 = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("edgegate_coap_malformed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        malformed >= 5.0,
        "the garbage datagrams were counted: {metrics}"
    );
    assert!(value("edgegate_coap_datagrams_total") >= 80.0);
}

#[test]
fn with_kafka_down_uploads_are_acknowledged_and_arrive_when_it_returns() {
    let kafka = common::exclusive();
    let topic = common::unique_topic("coap-outage");
    common::create_topic(&topic, 1);
    let gw = common::gateway(route(&topic)).start();
    kafka.stop_broker();
    let mut bodies = Vec::new();
    for i in 0..5 {
        let body = payload("outage", i, 16);
        let (ok, out) = libcoap(&[
            "-m",
            "post",
            "-e",
            std::str::from_utf8(&body).expect("ascii"),
            &uri(gw.coap_addr(), "/t/outage"),
        ]);
        assert!(ok && !out.contains("4.") && !out.contains("5."), "{out}");
        bodies.push(body);
    }
    kafka.start_broker();
    let records = common::consume_all_blocking(&topic, 5, Duration::from_secs(90));
    let map = by_payload(&records);
    for body in &bodies {
        assert_eq!(map.get(body).map_or(0, Vec::len), 1);
    }
}

/// Prints CON requests/s acknowledged (each after its fsync) from many concurrent raw
/// clients, each with one request outstanding (NSTART = 1), against the CoAP listener on a
/// real log (no Kafka: the figure is the ingest path). Not a timed assertion.
#[test]
#[ignore = "benchmark: prints figures"]
fn coap_con_throughput() {
    use edgegate::buffer::{Log, LogConfig};
    use edgegate::config::Problems;
    use edgegate::ingest::Pipeline;
    use edgegate::ingest::coap::config::CoapConfig;
    use edgegate::route::{RouteConfig, Router};

    let clients: usize = std::env::var("COAP_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seconds: u64 = 10;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _) = Log::open(LogConfig::new(dir.path().join("log"))).expect("log");
        let mut problems = Problems::default();
        let routes = [RouteConfig {
            filter: "coap/#".into(),
            topic: "bench".into(),
            key: None,
            ..Default::default()
        }];
        let pipeline = Pipeline::new(log.clone(), Router::new(&routes, None, &mut problems));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let config = CoapConfig {
            max_exchanges: 65_536,
            dedup_capacity: 65_536,
            ..CoapConfig::default()
        };
        let served = tokio::spawn(edgegate::ingest::coap::serve(
            socket,
            Arc::new(config),
            edgegate::auth::Auth::with_anonymous(edgegate::auth::config::Anonymous::Always).into(),
            pipeline,
            shutdown.clone(),
        ));
        // The reader acknowledges everything, as a forwarder would, so the log does not fill.
        let mut reader = log.reader().expect("reader");
        let drain = tokio::spawn(async move {
            while let Ok(batch) = reader.read_batch(10_000, 64 << 20).await {
                if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
                    reader.ack_range(first.seq, last.seq + 1);
                }
            }
        });
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for c in 0..clients {
            tasks.push(tokio::spawn(async move {
                let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                socket.connect(addr).await.expect("connect");
                let mut latencies = Vec::new();
                let mut mid = (c as u16).wrapping_mul(977);
                let mut buf = [0u8; 512];
                let body = [b'x'; 64];
                let path = format!("/t/dev-{c}");
                while tokio::time::Instant::now() < end {
                    mid = mid.wrapping_add(1);
                    let datagram = con_post(mid, &path, &[], &body);
                    let start = Instant::now();
                    socket.send(&datagram).await.expect("send");
                    loop {
                        match tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
                            .await
                        {
                            Ok(Ok(n)) if n >= 4 && u16::from_be_bytes([buf[2], buf[3]]) == mid => {
                                if buf[1] == 0x44 {
                                    latencies.push(start.elapsed());
                                }
                                break;
                            }
                            Ok(_) => continue,
                            Err(_) => break,
                        }
                    }
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client"));
        }
        all.sort();
        let n = all.len();
        let pct = |p: f64| {
            all.get(((n as f64) * p) as usize)
                .copied()
                .unwrap_or_default()
        };
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS"))
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        println!(
            "coap CON bench: {clients} clients x 1 outstanding, 64-byte payloads, fsync log: \
             {n} acknowledged in {seconds}s = {:.0} req/s; latency p50 {:?} p99 {:?}; {rss}",
            n as f64 / seconds as f64,
            pct(0.5),
            pct(0.99)
        );
        shutdown.cancel();
        let _ = served.await;
        drain.abort();
    });
}
