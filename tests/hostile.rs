//! Hostile input against the running binary: while threads throw random bytes and mutated
//! MQTT 3.1.1 / 5 packets at the TCP port and random and mutated CoAP datagrams at the UDP
//! port, well-behaved clients (mosquitto_pub 3.1.1 and 5, a CoAP client) publish. The gateway
//! must stay up and healthy, and every message the good clients had acknowledged must be in
//! Kafka, exactly once.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use common::GatewayToml;
use rand::Rng;

const GOOD_MQTT: usize = 400;
const GOOD_COAP: usize = 150;

/// The real binary: the test checks that the process is still running after the attack,
/// and reads counters no other gateway moves.
fn start(topic: &str) -> common::Process {
    let config = GatewayToml::new()
        .id("hostile-gw")
        // The gateway's own default grace, as in the shipped config.
        .unset("gateway", "shutdown_grace")
        .mqtt("connect_timeout", "1s")
        .mqtt("max_packet_size", "64KiB")
        .route_keyed("good/#", topic, "{client_id}")
        .route("coap/good/#", topic);
    common::gateway(config).start_process()
}

/// Well-formed packets of a session, to be mutated: CONNECT (3.1.1 or 5), PUBLISH QoS 0/1/2,
/// SUBSCRIBE, PINGREQ, DISCONNECT.
fn valid_session(rng: &mut impl Rng, v5: bool) -> Vec<Vec<u8>> {
    let mut connect = Vec::new();
    common::mqtt_string(&mut connect, b"MQTT");
    connect.push(if v5 { 5 } else { 4 });
    connect.push(0x02);
    connect.extend_from_slice(&30u16.to_be_bytes());
    if v5 {
        // Properties: session expiry 0x11, receive maximum 0x21, a user property 0x26.
        let props = [0x11, 0, 0, 0, 10, 0x21, 0, 20, 0x26, 0, 1, b'k', 0, 1, b'v'];
        connect.push(props.len() as u8);
        connect.extend_from_slice(&props);
    }
    common::mqtt_string(
        &mut connect,
        format!("evil-{}", rng.random::<u16>()).as_bytes(),
    );
    let mut packets = vec![common::mqtt_frame(0x10, &connect)];
    for pkid in 1..4u16 {
        let mut body = Vec::new();
        common::mqtt_string(&mut body, b"bad/topic");
        let qos = (pkid % 3) as u8;
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if v5 {
            body.extend_from_slice(&[3, 0x01, 1, 0x23]);
        }
        body.extend_from_slice(b"payload of a hostile client");
        packets.push(common::mqtt_frame(0x30 | (qos << 1), &body));
    }
    let mut subscribe = 7u16.to_be_bytes().to_vec();
    if v5 {
        subscribe.push(0);
    }
    common::mqtt_string(&mut subscribe, b"a/#");
    subscribe.push(1);
    packets.push(common::mqtt_frame(0x82, &subscribe));
    packets.push(vec![0xC0, 0]);
    packets.push(vec![0xE0, 0]);
    packets
}

/// Flips, inserts, deletes or overwrites a few bytes, or truncates.
fn mutate(rng: &mut impl Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..4) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..5) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = rng.random(),
            2 => bytes.insert(at, rng.random()),
            3 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
}

/// One hostile TCP connection: random bytes, or a session with some packets mutated.
fn tcp_attack(rng: &mut impl Rng, addr: SocketAddr) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let chunks: Vec<Vec<u8>> = match rng.random_range(0..4) {
        0 => {
            let len = rng.random_range(1..3000);
            vec![(0..len).map(|_| rng.random()).collect()]
        }
        kind => {
            let mut session = valid_session(rng, kind == 2);
            for p in session.iter_mut() {
                if rng.random_bool(0.5) {
                    mutate(rng, p);
                }
            }
            session
        }
    };
    let mut sink = [0u8; 1024];
    for chunk in chunks {
        if stream.write_all(&chunk).is_err() {
            return;
        }
        let _ = stream.read(&mut sink);
    }
}

fn coap_post(mid: u16, path: &[&str], payload: &[u8]) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for segment in path {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.payload = payload.to_vec();
    p
}

/// Random datagrams and mutated CON POSTs at the CoAP port.
fn udp_attack(rng: &mut impl Rng, socket: &UdpSocket, addr: SocketAddr) {
    let datagram = if rng.random_bool(0.3) {
        let len = rng.random_range(0..1500);
        (0..len).map(|_| rng.random()).collect()
    } else {
        let mut d = coap_post(rng.random(), &["t", "evil", "s"], b"hostile")
            .to_bytes()
            .expect("encode");
        mutate(rng, &mut d);
        d
    };
    let _ = socket.send_to(&datagram, addr);
}

/// Confirmable POSTs one at a time, retransmitted until the 2.04; returns the payloads
/// acknowledged.
fn good_coap(addr: SocketAddr) -> Vec<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut acked = Vec::new();
    let mut buf = [0u8; 1500];
    for i in 0..GOOD_COAP {
        let payload = format!("good-coap:{i:05}").into_bytes();
        let mid = i as u16 + 1;
        let request = coap_post(mid, &["t", "good", "s"], &payload)
            .to_bytes()
            .expect("encode");
        'tries: for _ in 0..6 {
            socket.send_to(&request, addr).expect("send");
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                let Ok(answer) = Packet::from_bytes(&buf[..n]) else {
                    continue;
                };
                if answer.header.message_id == mid
                    && answer.header.code
                        == MessageClass::Response(coap_lite::ResponseType::Changed)
                {
                    acked.push(payload.clone());
                    break 'tries;
                }
            }
        }
    }
    acked
}

/// `mosquitto_pub -q 1 -l`: exits 0 only once every line was acknowledged.
fn good_mqtt(addr: SocketAddr, client_id: &str, v5: bool) -> Vec<Vec<u8>> {
    let lines: Vec<String> = (0..GOOD_MQTT)
        .map(|i| format!("{client_id}:{i:05}"))
        .collect();
    let out = common::mosquitto_pub(addr)
        .id(client_id)
        .topic(&format!("good/{client_id}"))
        .qos(1)
        .v5(v5)
        .lines(&lines);
    assert!(
        out.status.success(),
        "{client_id}: mosquitto_pub failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    lines.into_iter().map(String::into_bytes).collect()
}

#[test]
fn random_and_mutated_packets_cost_the_good_clients_nothing() {
    let _kafka = common::shared();
    let topic = common::unique_topic("hostile");
    let mut gateway = start(&topic);
    let mqtt_addr = gateway.mqtt_addr();
    let coap_addr = gateway.coap_addr();

    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for t in 0..3 {
        let (stop, attacks) = (stop.clone(), attacks.clone());
        attackers.push(std::thread::spawn(move || {
            let mut rng = rand::rng();
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            while !stop.load(Ordering::Relaxed) {
                if t == 0 {
                    for _ in 0..20 {
                        udp_attack(&mut rng, &socket, coap_addr);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                } else {
                    tcp_attack(&mut rng, mqtt_addr);
                }
                attacks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The attack runs alone for a while first, then alongside the good clients.
    std::thread::sleep(Duration::from_secs(4));
    let goods = [
        std::thread::spawn(move || good_mqtt(mqtt_addr, "good-v4", false)),
        std::thread::spawn(move || good_mqtt(mqtt_addr, "good-v5", true)),
        std::thread::spawn(move || good_coap(coap_addr)),
    ];
    let mut acked: Vec<Vec<u8>> = Vec::new();
    for good in goods {
        acked.extend(good.join().expect("good client"));
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker");
    }
    assert_eq!(
        acked.len(),
        2 * GOOD_MQTT + GOOD_COAP,
        "every good message acknowledged"
    );
    assert!(
        gateway.is_running(),
        "the gateway is still running:\n{}",
        gateway.log_text()
    );
    let admin = gateway.admin_addr();
    assert_eq!(common::http_get(admin, "/healthz").0, 200);
    let (_, metrics) = common::http_get(admin, "/metrics");
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(sum("edgegate_coap_malformed_total") > 0.0, "{metrics}");
    assert!(sum("edgegate_mqtt_") > 0.0, "{metrics}");
    eprintln!(
        "hostile: {} attacks (TCP connections and bursts of 20 datagrams)",
        attacks.load(Ordering::Relaxed)
    );

    let records = common::consume_all_blocking(&topic, acked.len(), Duration::from_secs(90));
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for r in &records {
        *seen
            .entry(r.payload.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let missing: Vec<_> = acked.iter().filter(|p| !seen.contains_key(*p)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing",
        missing.len()
    );
    let twice = seen.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "stored once each");
    assert_eq!(records.len(), acked.len(), "nothing but the good messages");
    gateway.kill();
}
