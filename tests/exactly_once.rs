//! Exactly once across a gateway SIGKILL (issue 14): the real `edgegate` binary, a device
//! speaking raw MQTT 3.1.1 over a TCP socket (every packet written and checked by hand, so
//! the test controls DUP, packet ids and where the flow stops), the gateway killed with
//! SIGKILL in the middle of a QoS 2 flow and restarted on the same directory, and the
//! records read back from the shared Kafka broker one by one.
//!
//! Run with `tools/test --test exactly_once`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::GatewayToml;

fn config(topic: &str) -> GatewayToml {
    GatewayToml::new()
        .id("exactly-once-gw")
        .mqtt("connect_timeout", "2s")
        .route("#", topic)
}

/// A device on a raw socket.
struct Device {
    stream: TcpStream,
    /// MQTT 5 rather than 3.1.1.
    v5: bool,
}

impl Device {
    /// Connects with `clean_session` as given (false: a persistent session) and returns the
    /// device with CONNACK's session-present flag.
    fn connect(addr: SocketAddr, client_id: &str, clean_session: bool) -> (Device, bool) {
        Device::connect_as(addr, client_id, clean_session, None)
    }

    /// MQTT 5 when `expiry` is given: Clean Start as `clean_start`, that Session Expiry
    /// Interval.
    fn connect_as(
        addr: SocketAddr,
        client_id: &str,
        clean_session: bool,
        expiry: Option<u32>,
    ) -> (Device, bool) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let v5 = expiry.is_some();
        let mut device = Device { stream, v5 };
        let mut body = Vec::new();
        put_str(&mut body, "MQTT");
        body.push(if v5 { 5 } else { 4 });
        body.push(if clean_session { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes());
        if let Some(expiry) = expiry {
            // Properties: Session Expiry Interval (0x11).
            body.push(5);
            body.push(0x11);
            body.extend_from_slice(&expiry.to_be_bytes());
        }
        put_str(&mut body, client_id);
        device.send(0x10, &body);
        let (kind, body) = device.read();
        assert_eq!(kind, 0x20, "CONNACK");
        assert!(body.len() >= 2);
        assert_eq!(body[1], 0, "connection accepted");
        (device, body[0] & 1 == 1)
    }

    fn send(&mut self, first: u8, body: &[u8]) {
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        self.stream.write_all(&out).expect("write");
    }

    /// The next packet: its first byte and its body.
    fn read(&mut self) -> (u8, Vec<u8>) {
        let mut first = [0u8; 1];
        self.stream.read_exact(&mut first).expect("read a packet");
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).expect("read a length");
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).expect("read a body");
        (first[0], body)
    }

    /// A QoS 2 PUBLISH, with DUP set when `dup`.
    fn publish_qos2(&mut self, topic: &str, pkid: u16, payload: &[u8], dup: bool) {
        let mut body = Vec::new();
        put_str(&mut body, topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        if self.v5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(payload);
        self.send(if dup { 0x3c } else { 0x34 }, &body);
    }

    /// Expects the ack `kind` (0x50 PUBREC, 0x70 PUBCOMP) for `pkid`, with reason 0x00
    /// Success if MQTT 5 says one.
    fn expect_ack(&mut self, kind: u8, pkid: u16) {
        let (got, body) = self.read();
        assert_eq!(got, kind);
        assert_eq!(body.get(..2), Some(&pkid.to_be_bytes()[..]), "packet id");
        assert_eq!(body.get(2).copied().unwrap_or(0), 0, "reason: success");
    }

    fn pubrel(&mut self, pkid: u16) {
        self.send(0x62, &pkid.to_be_bytes());
    }

    fn disconnect(mut self) {
        self.send(0xe0, &[]);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Payloads of the records in `topic`, in order, once `expected` have arrived (and a second
/// more for duplicates).
async fn payloads(topic: &str, expected: usize) -> Vec<String> {
    common::consume_all(topic, expected, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload.unwrap_or_default()).into_owned())
        .collect()
}

/// [MQTT-4.3.3-2] (3.1.1; MQTT 5: [MQTT-4.3.3-10], [MQTT-4.3.3-11]): until the receiver has
/// the PUBREL it answers a re-sent PUBLISH with PUBREC and does not store it again, and it
/// answers PUBREL with PUBCOMP; [MQTT-3.1.2-4]: a session with CleanSession 0 resumes from
/// its state, here across a SIGKILL of the gateway between PUBREC and PUBREL. Two devices:
/// one whose PUBREC arrived, one that never read it (the gateway was killed first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_qos2_resent_with_dup_after_a_sigkill_before_pubrel_is_stored_once() {
    let _kafka = common::shared();
    let topic = common::unique_topic("eo-qos2-dup");
    let mut gateway = common::gateway(config(&topic))
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();

    let (mut a, present) = Device::connect(addr, "eo-dev-a", false);
    assert!(!present, "a new session");
    a.publish_qos2("plant/a", 7, b"a-once", false);
    a.expect_ack(0x50, 7);
    // b never reads its PUBREC: whether its record was durable before the kill or not, it
    // must be in Kafka once.
    let (mut b, _) = Device::connect(addr, "eo-dev-b", false);
    b.publish_qos2("plant/b", 9, b"b-once", false);
    a.publish_qos2("plant/a", 8, b"a-second", false);
    a.expect_ack(0x50, 8);

    gateway.kill();
    gateway.restart();
    drop((a, b));

    for (client, topic_of, pkids, payload) in [
        (
            "eo-dev-a",
            "plant/a",
            &[7u16, 8][..],
            &[&b"a-once"[..], b"a-second"][..],
        ),
        ("eo-dev-b", "plant/b", &[9u16][..], &[&b"b-once"[..]][..]),
    ] {
        let (mut device, present) = Device::connect(addr, client, false);
        assert!(present, "{client}: the session outlived the SIGKILL");
        for (&pkid, payload) in pkids.iter().zip(payload) {
            device.publish_qos2(topic_of, pkid, payload, true);
            device.expect_ack(0x50, pkid);
            device.pubrel(pkid);
            device.expect_ack(0x70, pkid);
        }
        device.disconnect();
    }

    let mut got = payloads(&topic, 3).await;
    got.sort();
    assert_eq!(
        got,
        ["a-once", "a-second", "b-once"],
        "each message exactly once"
    );
    gateway.kill();
}

/// [MQTT-4.3.3-2] (3.1.1; MQTT 5: [MQTT-4.3.3-12]): once PUBCOMP is sent, a PUBLISH with that
/// packet id is a new message. The release is durable before PUBCOMP, so a SIGKILL right
/// after it does not make the gateway take the next message under the id for the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_qos2_id_released_before_a_sigkill_is_a_new_message_after_it() {
    let _kafka = common::shared();
    let topic = common::unique_topic("eo-qos2-reuse");
    let mut gateway = common::gateway(config(&topic))
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();

    let (mut device, _) = Device::connect(addr, "eo-dev-r", false);
    device.publish_qos2("plant/r", 3, b"first", false);
    device.expect_ack(0x50, 3);
    device.pubrel(3);
    device.expect_ack(0x70, 3);
    // Another id stays unreleased across the kill: it must still be recognised.
    device.publish_qos2("plant/r", 4, b"held", false);
    device.expect_ack(0x50, 4);

    gateway.kill();
    gateway.restart();
    drop(device);

    let (mut device, present) = Device::connect(addr, "eo-dev-r", false);
    assert!(present);
    device.publish_qos2("plant/r", 3, b"second", false);
    device.expect_ack(0x50, 3);
    device.pubrel(3);
    device.expect_ack(0x70, 3);
    device.publish_qos2("plant/r", 4, b"held", true);
    device.expect_ack(0x50, 4);
    device.pubrel(4);
    device.expect_ack(0x70, 4);
    device.disconnect();

    let mut got = payloads(&topic, 3).await;
    got.sort();
    assert_eq!(
        got,
        ["first", "held", "second"],
        "the new message under id 3 is stored"
    );
    gateway.kill();
}

/// A clean session drops the QoS 2 state of the one before it ([MQTT-3.1.2-6] in 3.1.1:
/// CleanSession 1 discards any previous session), across a SIGKILL too: after a clean
/// connect, the same packet id from the next persistent session is a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_a_clean_session_forgets_the_unreleased_ids_of_the_previous_one() {
    let _kafka = common::shared();
    let topic = common::unique_topic("eo-qos2-clean");
    let mut gateway = common::gateway(config(&topic))
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();

    let (mut device, _) = Device::connect(addr, "eo-dev-c", false);
    device.publish_qos2("plant/c", 5, b"old-session", false);
    device.expect_ack(0x50, 5);
    drop(device);
    let (device, present) = Device::connect(addr, "eo-dev-c", true);
    assert!(!present);
    device.disconnect();
    let (device, present) = Device::connect(addr, "eo-dev-c", false);
    assert!(!present);
    device.disconnect();

    gateway.kill();
    gateway.restart();

    let (mut device, present) = Device::connect(addr, "eo-dev-c", false);
    assert!(present);
    device.publish_qos2("plant/c", 5, b"new-session", false);
    device.expect_ack(0x50, 5);
    device.pubrel(5);
    device.expect_ack(0x70, 5);
    device.disconnect();

    let mut got = payloads(&topic, 2).await;
    got.sort();
    assert_eq!(got, ["new-session", "old-session"]);
    gateway.kill();
}

/// RFC 7252 4.5: a confirmable request retransmitted within EXCHANGE_LIFETIME is answered
/// again and not processed twice, here across a SIGKILL of the gateway: the identical
/// datagram, from the same socket, gets the same 2.04 and the record is in Kafka once. A
/// second request (a new message id) after the restart is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_con_retransmitted_after_a_sigkill_is_answered_again_and_stored_once() {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

    let _kafka = common::shared();
    let topic = common::unique_topic("eo-coap");
    let mut gateway = common::gateway(config(&topic))
        .pin_addresses()
        .start_process();
    let coap = gateway.coap_addr();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let con = |mid: u16, payload: &[u8]| {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(vec![0xee, (mid >> 8) as u8, mid as u8]);
        for segment in ["t", "pump9", "temp"] {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        p.payload = payload.to_vec();
        p.to_bytes().expect("encode")
    };
    let exchange = |datagram: &[u8]| {
        socket.send_to(datagram, coap).expect("send");
        let mut buf = [0u8; 1500];
        let (n, _) = socket.recv_from(&mut buf).expect("an answer within 10 s");
        Packet::from_bytes(&buf[..n]).expect("a well-formed answer")
    };
    let check = |answer: &Packet, mid: u16| {
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(answer.header.message_id, mid);
        assert_eq!(
            answer.header.code,
            MessageClass::Response(ResponseType::Changed)
        );
        assert_eq!(answer.get_token(), &[0xee, (mid >> 8) as u8, mid as u8][..]);
    };

    let first = con(0x4242, b"coap-once");
    check(&exchange(&first), 0x4242);
    gateway.kill();
    gateway.restart();
    assert_eq!(
        gateway.coap_addr(),
        coap,
        "restarted where the device sends"
    );
    check(&exchange(&first), 0x4242);
    check(&exchange(&con(0x4243, b"coap-next")), 0x4243);

    let mut got = payloads(&topic, 2).await;
    got.sort();
    assert_eq!(
        got,
        ["coap-next", "coap-once"],
        "the retransmission was not stored"
    );
    gateway.kill();
}

/// MQTT 5 [MQTT-4.3.3-10]: until the PUBREL the receiver answers a re-sent PUBLISH with
/// PUBREC and does not cause a duplicate; [MQTT-4.3.3-11]: PUBREL is answered PUBCOMP;
/// [MQTT-3.1.2-23]: a session with a Session Expiry Interval above 0 outlives the network
/// connection, here a SIGKILL of the gateway between PUBREC and PUBREL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_qos2_resent_with_dup_after_a_sigkill_before_pubrel_is_stored_once() {
    let _kafka = common::shared();
    let topic = common::unique_topic("eo-qos2-v5");
    let mut gateway = common::gateway(config(&topic))
        .pin_addresses()
        .start_process();
    let addr = gateway.mqtt_addr();

    let (mut device, present) = Device::connect_as(addr, "eo-dev-5", true, Some(3600));
    assert!(!present);
    device.publish_qos2("plant/5", 11, b"v5-once", false);
    device.expect_ack(0x50, 11);

    gateway.kill();
    gateway.restart();
    drop(device);

    let (mut device, present) = Device::connect_as(addr, "eo-dev-5", false, Some(3600));
    assert!(present, "the session outlived the SIGKILL");
    device.publish_qos2("plant/5", 11, b"v5-once", true);
    device.expect_ack(0x50, 11);
    device.pubrel(11);
    device.expect_ack(0x70, 11);
    device.disconnect();

    let got = payloads(&topic, 1).await;
    assert_eq!(got, ["v5-once"], "stored once");
    gateway.kill();
}
