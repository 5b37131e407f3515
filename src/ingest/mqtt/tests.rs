//! Unit tests: framing, version choice, the MQTT 5 decoder and DISCONNECT encoder, topic
//! checks, QoS 2 deduplication. None needs the log; `tests/mqtt.rs` runs the whole server.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::connection::{Connection, Frame, FrameError, parse_header};
use super::inflight::{Inflight, OnPublish};
use super::packet::{
    self, DecodeError, Limits, Outgoing, Packet, Refusal, Unsupported, Version, peek_version,
    valid_topic_name,
};
use super::v5;

const LIMITS: Limits = Limits {
    max_user_properties: 4,
};

/// Frames `byte1` + remaining length + `body` and reads it back through a real socket.
pub(super) async fn frame(byte1: u8, body: &[u8]) -> Frame {
    let mut raw = vec![byte1];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        raw.push(b);
        if len == 0 {
            break;
        }
    }
    raw.extend_from_slice(body);
    let (mut client, mut conn) = pair(1 << 20).await;
    client.write_all(&raw).await.expect("write");
    conn.read_frame().await.expect("frame").expect("not eof")
}

async fn pair(limit: usize) -> (TcpStream, Connection<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (client, Connection::new(server, limit))
}

pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    out.put_u16(s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

/// An MQTT 5 PUBLISH body: topic, packet id (QoS > 0), the given property bytes, payload.
pub(super) fn v5_publish_body(
    topic: &str,
    pkid: Option<u16>,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    if let Some(pkid) = pkid {
        body.put_u16(pkid);
    }
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    body
}

fn connect_body(name: &str, level: u8) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(level);
    body.push(0x02); // clean start
    body.put_u16(30);
    if level == 5 {
        body.push(0); // no properties
    }
    string(&mut body, "dev-1");
    body
}

#[test]
fn header_over_the_limit_is_refused_from_the_fixed_header_alone() {
    // 0x30, then 200 MB as a remaining length: five bytes in all.
    let declared = 200_000_000usize;
    let mut raw = vec![0x30];
    let mut len = declared;
    while len > 0 {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        raw.push(b);
    }
    assert_eq!(raw.len(), 5);
    match parse_header(&raw, 256 * 1024) {
        Err(FrameError::TooLarge { declared: d, .. }) => assert_eq!(d, declared + 5),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Incomplete headers ask for more; a fifth length byte is malformed.
    assert!(matches!(parse_header(&[0x30], 10), Ok(None)));
    assert!(matches!(parse_header(&[0x30, 0x80, 0x80], 10), Ok(None)));
    assert!(matches!(
        parse_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
        Err(FrameError::BadLength)
    ));
    // The limit covers the whole frame, fixed header included.
    assert!(matches!(parse_header(&[0x30, 8], 10), Ok(Some((2, 10)))));
    assert!(matches!(
        parse_header(&[0x30, 9], 10),
        Err(FrameError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn oversize_declaration_does_not_allocate() {
    let (mut client, mut conn) = pair(256 * 1024).await;
    let before = conn.read_capacity();
    // 5 bytes declaring ~200 MB, then a little of the body.
    client
        .write_all(&[0x30, 0x80, 0xd8, 0xaf, 0x5f, 0, 1, b'a'])
        .await
        .expect("write");
    let result = conn.read_frame().await;
    assert!(
        matches!(result, Err(FrameError::TooLarge { .. })),
        "{result:?}"
    );
    assert!(
        conn.read_capacity() <= before.max(4096),
        "the read buffer must not grow past one read: {}",
        conn.read_capacity()
    );
}

#[tokio::test]
async fn frames_split_across_reads_are_reassembled_and_eof_mid_frame_is_truncation() {
    let (mut client, mut conn) = pair(1024).await;
    client.write_all(&[0xc0]).await.expect("write");
    client.flush().await.expect("flush");
    let read = tokio::spawn(async move {
        let first = conn.read_frame().await.map(|f| f.map(|f| f.packet_type()));
        let second = conn.read_frame().await.map(|f| f.is_some());
        (first, second)
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    client
        .write_all(&[0x00, 0x30, 0x05, 0x00])
        .await
        .expect("write");
    drop(client);
    let (first, second) = read.await.expect("join");
    assert_eq!(first.expect("pingreq"), Some(12));
    assert!(matches!(second, Err(FrameError::Truncated)));
}

/// An idle connection holds no read or write buffer (thousands of sleepy devices each
/// holding 4 KiB of buffers they do not use was most of a connection's memory).
#[tokio::test]
async fn an_idle_connection_keeps_no_buffers() {
    let (mut client, mut conn) = pair(1024).await;
    assert_eq!((conn.read_capacity(), conn.write_capacity()), (0, 0));
    // A turn with nothing to deliver makes no room (nothing would flush it away).
    conn.reserve(0);
    assert_eq!(conn.write_capacity(), 0);
    client.write_all(&[0xc0, 0x00]).await.expect("write");
    let ping = conn.read_frame().await.expect("frame").expect("not eof");
    assert_eq!(ping.packet_type(), 12);
    // A read of two bytes took a buffer of about two bytes, not 4 KiB: 10,000 devices
    // sending their DISCONNECT at once held 40 MB of buffers for 2-byte packets.
    assert!(
        conn.read_capacity() < 64,
        "read buffer after a 2-byte read: {}",
        conn.read_capacity()
    );
    conn.queue(Version::V4, &Outgoing::PingResp);
    assert!(conn.write_capacity() > 0);
    conn.flush().await.expect("flush");
    assert_eq!(conn.write_capacity(), 0, "written: the write buffer goes");
    // A turn's deliveries are made room for at once, and go with the flush as well.
    conn.reserve(3000);
    assert!(conn.write_capacity() >= 3000);
    conn.flush().await.expect("flush");
    assert_eq!(conn.write_capacity(), 0);
    // Room made for a turn that queued nothing after all is let go without a write.
    conn.reserve(3000);
    conn.release_unused();
    assert_eq!(conn.write_capacity(), 0);
    // Waiting for the next packet with nothing pending: the read buffer goes too.
    let waited =
        tokio::time::timeout(std::time::Duration::from_millis(20), conn.read_frame()).await;
    assert!(waited.is_err(), "nothing was sent");
    assert_eq!(conn.read_capacity(), 0);
    // And comes back for the next packet.
    client.write_all(&[0xc0, 0x00]).await.expect("write");
    let ping = conn.read_frame().await.expect("frame").expect("not eof");
    assert_eq!(ping.packet_type(), 12);
}

#[tokio::test]
async fn buffered_frames_are_taken_without_reading_and_a_partial_one_waits() {
    let (mut client, mut conn) = pair(1024).await;
    // Three PUBACKs and the first byte of a fourth in one write, as a subscriber sends them.
    client
        .write_all(&[0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3, 0x40])
        .await
        .expect("write");
    client.flush().await.expect("flush");
    let first = conn.read_frame().await.expect("frame").expect("not eof");
    assert_eq!(first.body(), &[0, 1]);
    let mut ids = Vec::new();
    while let Some(frame) = conn.buffered_frame().expect("frames") {
        assert_eq!(frame.packet_type(), 4);
        ids.push(frame.body()[1]);
    }
    assert_eq!(ids, [2, 3], "every whole frame already read, in order");
    // The partial fourth is not taken until its bytes arrive, then it is read normally.
    assert!(conn.buffered_frame().expect("no error").is_none());
    client.write_all(&[2, 0, 4]).await.expect("write");
    let fourth = conn.read_frame().await.expect("frame").expect("not eof");
    assert_eq!(fourth.body(), &[0, 4]);
    // A bad length in the buffer is the same error either way.
    client
        .write_all(&[0x40, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .expect("write");
    client.flush().await.expect("flush");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut result = conn.buffered_frame();
    if matches!(result, Ok(None)) {
        result = conn.read_frame().await;
    }
    assert!(matches!(result, Err(FrameError::BadLength)), "{result:?}");
}

#[tokio::test]
async fn version_is_chosen_by_peeking_the_connect() {
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("MQTT", 4)).await),
        Ok(Version::V4)
    );
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("MQTT", 5)).await),
        Ok(Version::V5)
    );
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("MQIsdp", 3)).await),
        Err(Unsupported::LegacyConnack)
    );
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("MQTT", 3)).await),
        Err(Unsupported::LegacyConnack)
    );
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("MQTT", 6)).await),
        Err(Unsupported::LegacyConnack)
    );
    assert_eq!(
        peek_version(&frame(0x10, &connect_body("HTTP", 4)).await),
        Err(Unsupported::Close)
    );
    assert_eq!(
        peek_version(&frame(0x10, &[0, 9, b'M']).await),
        Err(Unsupported::Close)
    );
    // Not a CONNECT at all.
    assert_eq!(
        peek_version(&frame(0xc0, &[]).await),
        Err(Unsupported::Close)
    );
}

#[tokio::test]
async fn level_5_connect_decodes_with_the_v5_decoder_only() {
    let connect = packet::decode(
        Version::V5,
        frame(0x10, &connect_body("MQTT", 5)).await,
        &LIMITS,
    );
    match connect {
        Ok(Packet::Connect(c)) => {
            assert_eq!(c.client_id, "dev-1");
            assert!(c.clean_start);
            assert_eq!(c.keep_alive, 30);
        }
        other => panic!("{other:?}"),
    }
    let v4 = packet::decode(
        Version::V4,
        frame(0x10, &connect_body("MQTT", 4)).await,
        &LIMITS,
    );
    assert!(matches!(v4, Ok(Packet::Connect(_))), "{v4:?}");
    // Reserved flag set.
    let mut body = connect_body("MQTT", 5);
    body[7] |= 0x01;
    let bad = packet::decode(Version::V5, frame(0x10, &body).await, &LIMITS);
    assert!(matches!(bad, Err(DecodeError::Malformed(_))), "{bad:?}");
}

#[tokio::test]
async fn v5_disconnect_forms_parse() {
    let cases: [(&[u8], u8); 4] = [
        (&[], 0x00),                             // mosquitto's `e0 00`
        (&[0x04], 0x04),                         // reason only
        (&[0x8e, 0x00], 0x8e),                   // reason, empty properties
        (&[0x00, 0x05, 0x11, 0, 0, 0, 0], 0x00), // session expiry property
    ];
    for (body, reason) in cases {
        let got = packet::decode(Version::V5, frame(0xe0, body).await, &LIMITS);
        assert!(
            matches!(got, Ok(Packet::Disconnect { reason: r }) if r == reason),
            "{body:?}: {got:?}"
        );
    }
    // Server Reference is server-to-client only; a property overrunning its section.
    for body in [&[0x00, 0x03, 0x1c, 0, 0][..], &[0x00, 0x09, 0x11, 0, 0][..]] {
        let got = packet::decode(Version::V5, frame(0xe0, body).await, &LIMITS);
        assert!(
            matches!(got, Err(DecodeError::Malformed(_))),
            "{body:?}: {got:?}"
        );
    }
    // DISCONNECT flags must be 0; a 3.1.1 DISCONNECT has no body.
    let got = packet::decode(Version::V5, frame(0xe1, &[]).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))));
    let got = packet::decode(Version::V4, frame(0xe0, &[0]).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))));
}

#[test]
fn reason_only_disconnect_keeps_its_reason() {
    let mut out = BytesMut::new();
    v5::encode_disconnect(0x8e, &mut out);
    assert_eq!(&out[..], &[0xe0, 0x02, 0x8e, 0x00]);
    // A real client decoder reads the reason back.
    use rumqttc::v5::mqttbytes::v5 as client;
    match client::Packet::read(&mut out, None) {
        Ok(client::Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason_code,
                client::DisconnectReasonCode::SessionTakenOver
            )
        }
        other => panic!("{other:?}"),
    }
    let mut out = BytesMut::new();
    v5::encode_disconnect(0x00, &mut out);
    assert_eq!(&out[..], &[0xe0, 0x00]);
}

#[test]
fn every_connack_encodes_without_panicking() {
    let refusals = [
        Refusal::ClientId,
        Refusal::Busy,
        Refusal::AuthMethod,
        Refusal::Invalid(0x81),
        Refusal::Invalid(0x82),
        Refusal::Invalid(0x83),
        Refusal::Invalid(0x84),
        Refusal::Invalid(0x90),
        Refusal::Invalid(0x95),
        Refusal::Invalid(0x01),
        Refusal::Invalid(0x03),
    ];
    for refusal in refusals {
        for version in [Version::V4, Version::V5] {
            let mut out = BytesMut::new();
            let sent = packet::encode(version, &Outgoing::ConnAck(Err(refusal)), &mut out);
            assert_eq!(sent, !out.is_empty());
        }
    }
    let mut out = BytesMut::new();
    packet::encode_legacy_refusal(&mut out);
    assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x01]);
}

#[test]
fn topic_names() {
    assert!(valid_topic_name("plant/north/pump7"));
    assert!(valid_topic_name("/"));
    assert!(!valid_topic_name(""));
    assert!(!valid_topic_name("a/+/b"));
    assert!(!valid_topic_name("a/#"));
    assert!(!valid_topic_name("a\0b"));
}

#[tokio::test]
async fn publish_topics_are_checked_in_both_versions() {
    for topic in ["a/+/b", "a/#"] {
        let v5 = packet::decode(
            Version::V5,
            frame(0x32, &v5_publish_body(topic, Some(1), &[], b"x")).await,
            &LIMITS,
        );
        assert!(
            matches!(v5, Err(DecodeError::TopicInvalid(_))),
            "{topic}: {v5:?}"
        );
        let mut v4_body = Vec::new();
        string(&mut v4_body, topic);
        v4_body.extend_from_slice(&[0, 1, b'x']);
        let v4 = packet::decode(Version::V4, frame(0x32, &v4_body).await, &LIMITS);
        assert!(
            matches!(v4, Err(DecodeError::TopicInvalid(_))),
            "{topic}: {v4:?}"
        );
    }
    // Empty: invalid in 3.1.1; in MQTT 5 left to the session (topic aliases).
    let v4 = packet::decode(Version::V4, frame(0x30, &[0, 0, b'x']).await, &LIMITS);
    assert!(matches!(v4, Err(DecodeError::TopicInvalid(_))), "{v4:?}");
    let v5 = packet::decode(
        Version::V5,
        frame(0x30, &v5_publish_body("", None, &[], b"x")).await,
        &LIMITS,
    );
    assert!(matches!(v5, Ok(Packet::Publish(_))), "{v5:?}");
    // Invalid UTF-8 and U+0000.
    let v5 = packet::decode(
        Version::V5,
        frame(0x30, &[0, 2, 0xc3, 0x28, 0]).await,
        &LIMITS,
    );
    assert!(matches!(v5, Err(DecodeError::Malformed(_))), "{v5:?}");
    let v5 = packet::decode(
        Version::V5,
        frame(0x30, &v5_publish_body("a\0", None, &[], b"")).await,
        &LIMITS,
    );
    assert!(matches!(v5, Err(DecodeError::Malformed(_))), "{v5:?}");
}

#[tokio::test]
async fn v5_publish_properties_are_checked() {
    let decode = |props: Vec<u8>| async move {
        packet::decode(
            Version::V5,
            frame(0x32, &v5_publish_body("t", Some(7), &props, b"payload")).await,
            &LIMITS,
        )
    };
    // Content type and user properties come through, in order.
    let mut props = vec![0x03];
    string(&mut props, "application/json");
    for (k, v) in [("b", "1"), ("a", "2")] {
        props.push(0x26);
        string(&mut props, k);
        string(&mut props, v);
    }
    match decode(props).await {
        Ok(Packet::Publish(p)) => {
            assert_eq!(p.content_type.as_deref(), Some("application/json"));
            assert_eq!(
                p.user_properties,
                vec![("b".into(), "1".into()), ("a".into(), "2".into())]
            );
            assert_eq!(p.payload, Bytes::from_static(b"payload"));
            assert_eq!((p.qos, p.pkid), (1, 7));
        }
        other => panic!("{other:?}"),
    }
    // Duplicate content type: protocol error.
    let mut props = vec![0x03];
    string(&mut props, "a");
    props.push(0x03);
    string(&mut props, "b");
    assert!(matches!(decode(props).await, Err(DecodeError::Protocol(_))));
    // Session expiry is not a PUBLISH property.
    assert!(matches!(
        decode(vec![0x11, 0, 0, 0, 1]).await,
        Err(DecodeError::Malformed(_))
    ));
    // A subscription identifier is, but only from the server [MQTT-3.3.4-6].
    assert!(matches!(
        decode(vec![0x0b, 1]).await,
        Err(DecodeError::Protocol(_))
    ));
    // Too many user properties.
    let mut props = Vec::new();
    for _ in 0..5 {
        props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
    }
    assert!(matches!(decode(props).await, Err(DecodeError::Limit(_))));
    // A string running past the property section.
    assert!(matches!(
        decode(vec![0x03, 0, 9]).await,
        Err(DecodeError::Malformed(_))
    ));
    // Payload format indicator must be 0 or 1.
    assert!(matches!(
        decode(vec![0x01, 2]).await,
        Err(DecodeError::Protocol(_))
    ));
    // Topic alias comes through for the session.
    match decode(vec![0x23, 0, 3]).await {
        Ok(Packet::Publish(p)) => assert_eq!(p.topic_alias, Some(3)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn fixed_header_flags_are_checked() {
    // PUBREL, SUBSCRIBE, UNSUBSCRIBE need flags 0b0010.
    for version in [Version::V4, Version::V5] {
        let got = packet::decode(version, frame(0x60, &[0, 1]).await, &LIMITS);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
        let got = packet::decode(version, frame(0x62, &[0, 1]).await, &LIMITS);
        assert!(matches!(got, Ok(Packet::PubRel { pkid: 1 })), "{got:?}");
        // QoS 3, and DUP on QoS 0.
        let got = packet::decode(version, frame(0x36, &[0, 1, b't', 0, 1, 0]).await, &LIMITS);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
        let got = packet::decode(version, frame(0x38, &[0, 1, b't', 0]).await, &LIMITS);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
        // PINGREQ with a body.
        let got = packet::decode(version, frame(0xc0, &[0]).await, &LIMITS);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
        // Packet type 0 is reserved.
        let got = packet::decode(version, frame(0x00, &[]).await, &LIMITS);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
    }
    // A complete 3.1.1 frame whose topic length points past its end is malformed.
    let got = packet::decode(Version::V4, frame(0x32, &[0, 9, b't']).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
}

#[tokio::test]
async fn subscribe_and_auth_decode() {
    let mut body = vec![0, 5, 0];
    string(&mut body, "a/#");
    body.push(0x01);
    string(&mut body, "b");
    body.push(0x02);
    let got = packet::decode(Version::V5, frame(0x82, &body).await, &LIMITS);
    assert!(
        matches!(&got, Ok(Packet::Subscribe(s)) if s.pkid == 5 && s.filters.len() == 2),
        "{got:?}"
    );
    // Reserved option bits.
    let mut body = vec![0, 5, 0];
    string(&mut body, "a");
    body.push(0xc0);
    let got = packet::decode(Version::V5, frame(0x82, &body).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))), "{got:?}");
    // AUTH: empty, and with a method; a bad reason code.
    assert!(matches!(
        packet::decode(Version::V5, frame(0xf0, &[]).await, &LIMITS),
        Ok(Packet::Auth)
    ));
    let mut body = vec![0x18, 0];
    let mut props = vec![0x15];
    string(&mut props, "SCRAM");
    body[1] = props.len() as u8;
    body.extend_from_slice(&props);
    assert!(matches!(
        packet::decode(Version::V5, frame(0xf0, &body).await, &LIMITS),
        Ok(Packet::Auth)
    ));
    let got = packet::decode(Version::V5, frame(0xf0, &[0x77, 0]).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))));
    // AUTH does not exist in 3.1.1.
    let got = packet::decode(Version::V4, frame(0xf0, &[]).await, &LIMITS);
    assert!(matches!(got, Err(DecodeError::Malformed(_))));
}

#[test]
fn qos2_retransmission_is_not_stored_twice() {
    let mut inflight = Inflight::default();
    assert_eq!(inflight.publish(2, 9, Some(10)), OnPublish::Store);
    // DUP while the first append is pending: not stored, no ack yet.
    assert_eq!(inflight.publish(2, 9, Some(10)), OnPublish::Duplicate);
    inflight.stored(2, 9, Some(40));
    // DUP after PUBREC: PUBREC again, not stored.
    assert_eq!(inflight.publish(2, 9, Some(10)), OnPublish::ResendPubRec);
    assert_eq!(inflight.release(9), Ok(Some(40)));
    // PUBREL again: PUBCOMP "not found"; the id is free for a new message.
    assert_eq!(inflight.release(9), Ok(None));
    assert_eq!(inflight.publish(2, 9, Some(10)), OnPublish::Store);
    // PUBREL before PUBREC is a protocol error.
    assert_eq!(inflight.release(9), Err(()));
    // A failed append frees the id without waiting for PUBREL.
    inflight.stored(2, 9, None);
    assert_eq!(inflight.release(9), Ok(None));
}

#[test]
fn receive_maximum_counts_qos2_until_pubrel() {
    let mut inflight = Inflight::default();
    assert_eq!(inflight.publish(1, 1, Some(2)), OnPublish::Store);
    assert_eq!(inflight.publish(2, 2, Some(2)), OnPublish::Store);
    assert_eq!(inflight.publish(1, 3, Some(2)), OnPublish::OverLimit);
    assert_eq!(inflight.publish(0, 0, Some(2)), OnPublish::Store);
    inflight.stored(1, 1, Some(1));
    inflight.stored(2, 2, Some(2));
    assert_eq!(inflight.storing(), 0);
    // The QoS 2 message still counts until its PUBREL.
    assert_eq!(inflight.publish(1, 4, Some(2)), OnPublish::Store);
    assert_eq!(inflight.publish(1, 5, Some(2)), OnPublish::OverLimit);
    assert_eq!(inflight.release(2), Ok(Some(2)));
    assert_eq!(inflight.publish(1, 5, Some(2)), OnPublish::Store);
    // 3.1.1: no limit enforced here (the connection is not read instead).
    assert_eq!(inflight.publish(1, 6, None), OnPublish::Store);
}

#[test]
fn qos2_ids_awaiting_release_are_bounded_without_a_receive_maximum() {
    // 3.1.1 has no receive maximum: a client that never sends PUBREL is stopped at the
    // gateway's own, or its session's state would grow to every packet id.
    let mut inflight = Inflight::new(Default::default(), 2);
    for pkid in 1..=2 {
        assert_eq!(inflight.publish(2, pkid, None), OnPublish::Store);
        inflight.stored(2, pkid, Some(u64::from(pkid)));
    }
    assert_eq!(inflight.publish(2, 3, None), OnPublish::OverLimit);
    // QoS 1 is not held after its PUBACK, and a DUP of a held id is still answered.
    assert_eq!(inflight.publish(1, 4, None), OnPublish::Store);
    assert_eq!(inflight.publish(2, 1, None), OnPublish::ResendPubRec);
    assert_eq!(inflight.release(1), Ok(Some(1)));
    assert_eq!(inflight.publish(2, 3, None), OnPublish::Store);
}

/// Every connected client keeps its connection's future on the heap for as long as it is
/// connected: 10,000 devices held 14.5 MB of them at the downlink bench's peak (heaptrack),
/// when the future was 1,464 bytes (plaintext) and 3,832 (TLS). It kept the arguments'
/// room after moving them into the CONNECT phase, and a watch's `changed()` and two empty
/// queues inline. Generous bounds, not exact sizes: the layout is the compiler's.
#[test]
fn a_connections_future_keeps_no_room_it_does_not_use() {
    fn output_size<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    let plain = output_size(super::session::run::<TcpStream>);
    assert!(plain <= 1_150, "plaintext connection future: {plain} bytes");
    let tls = output_size(super::session::run::<tokio_rustls::server::TlsStream<TcpStream>>);
    assert!(tls <= 2_400, "TLS connection future: {tls} bytes");
}

pub(super) mod robustness {
    //! Decoding never panics, whatever the bytes (the fuzz target of a later issue goes
    //! further; this keeps the property in every `cargo test`).

    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::super::connection::parse_header;
    use super::super::packet::{self, Limits, Version};
    use super::frame_from_raw;

    const LIMITS: Limits = Limits {
        max_user_properties: 8,
    };

    /// The `mqtt_stream` fuzz corpus: whole client streams of both versions.
    pub(in super::super) const CORPUS: [&[u8]; 7] = [
        include_bytes!("../../../fuzz/corpus/mqtt_stream/big-length"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v311-legacy"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v4-session"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v4-subscribe"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v5-auth"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v5-session"),
        include_bytes!("../../../fuzz/corpus/mqtt_stream/v5-subscribe"),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_frames_decode_or_fail_cleanly(byte1 in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            for version in [Version::V4, Version::V5] {
                let _ = packet::decode(version, frame_from_raw(byte1, &body), &LIMITS);
            }
            let _ = packet::peek_version(&frame_from_raw(byte1, &body));
        }

        #[test]
        fn mutated_valid_packets_decode_or_fail_cleanly(
            which in 0usize..8,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let samples: [(u8, &[u8]); 8] = [
                // MQTT 5 CONNECT with a will and user properties.
                (0x10, &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x0e, 0, 30, 5, 0x26, 0, 1, b'k', 0, 0,
                    0, 1, b'c', 3, 0x03, 0, 0, 0, 1, b't', 0, 1, b'w']),
                // MQTT 5 PUBLISH QoS 1 with content type and topic alias.
                (0x32, &[0, 3, b'a', b'/', b'b', 0, 9, 8, 0x03, 0, 2, b'j', b's', 0x23, 0, 1, b'x']),
                // MQTT 5 SUBSCRIBE.
                (0x82, &[0, 1, 2, 0x0b, 1, 0, 1, b'#', 1]),
                // 3.1.1 CONNECT with a will, user name and password.
                (0x10, &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xee, 0, 30, 0, 1, b'c', 0, 1, b't',
                    0, 1, b'w', 0, 1, b'u', 0, 1, b'p']),
                // 3.1.1 SUBSCRIBE, two filters.
                (0x82, &[0, 1, 0, 3, b'a', b'/', b'+', 1, 0, 1, b'#', 2]),
                // MQTT 5 UNSUBSCRIBE with a user property.
                (0xa2, &[0, 2, 5, 0x26, 0, 0, 0, 0, 0, 1, b'a']),
                // MQTT 5 PUBREC with a reason and a reason string.
                (0x50, &[0, 3, 0x10, 4, 0x1f, 0, 1, b'r']),
                // MQTT 5 DISCONNECT with a reason string.
                (0xe0, &[0x04, 4, 0x1f, 0, 1, b'r']),
            ];
            let (byte1, body) = samples[which];
            let mut body = body.to_vec();
            for (at, xor) in flips {
                let len = body.len();
                body[at % len] ^= xor;
            }
            body.truncate(cut % (body.len() + 1));
            for version in [Version::V4, Version::V5] {
                let _ = packet::decode(version, frame_from_raw(byte1, &body), &LIMITS);
            }
        }

        /// The fuzz target's entry point, on the corpus mutated: both decoders, the answers
        /// the hand-written encoders give, and the PUBLISH round trip it asserts.
        #[test]
        fn fuzz_stream_survives_the_mutated_corpus(
            which in 0usize..CORPUS.len(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in any::<usize>(),
        ) {
            let mut bytes = CORPUS[which].to_vec();
            for (at, xor) in flips {
                let len = bytes.len();
                bytes[at % len] ^= xor;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = super::super::fuzz_stream(&bytes);
        }

        #[test]
        fn arbitrary_headers_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..8), limit in any::<usize>()) {
            let buf = BytesMut::from(&bytes[..]);
            if let Ok(Some((header, frame))) = parse_header(&buf, limit) {
                prop_assert!(header <= 5 && header <= frame && frame <= limit);
            }
        }
    }
}

/// Builds a [`Frame`] without a socket, for property tests.
fn frame_from_raw(byte1: u8, body: &[u8]) -> Frame {
    let mut raw = BytesMut::new();
    raw.put_u8(byte1);
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        raw.put_u8(b);
        if len == 0 {
            break;
        }
    }
    raw.extend_from_slice(body);
    Frame::parse(raw, usize::MAX).expect("a well-framed test packet")
}
