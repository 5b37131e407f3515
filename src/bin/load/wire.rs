//! The subscribers' MQTT 3.1.1 client: just what a subscriber needs (CONNECT, SUBSCRIBE,
//! PUBLISH in at QoS 0/1/2 with its acknowledgements, PINGREQ, DISCONNECT), reading whole
//! socket buffers and writing one packet of acknowledgements per batch it takes.
//!
//! Why not rumqttc, which the publishers use: the fan-out bench runs the gateway, Kafka, the
//! publishers and ten subscribers taking 100,000 messages a second on two cores, and the
//! subscribers' client is measured as part of "the uplink keeps its rate": with rumqttc they
//! cost the load generator 1.0 to 2.5 µs of CPU per delivery (median 1.7 over 11 runs: a
//! `Publish` with its own topic `String` and payload, an event queue, a cancellation future
//! per message), up to a quarter of a core at 100,000 deliveries a second taken from the
//! uplink by the client, not the gateway; this client costs 0.4 to 1.5 µs (median 0.9, 14
//! runs alternating with those; README, "Figures"). The publishers' client is the same in
//! both halves of the bench, so it stays. Independent clients (rumqttc, paho, mosquitto's,
//! MQTT.js) check the gateway's protocol in the tests; this one is a measuring instrument.
//!
//! A frame is checked for completeness before it is parsed; anything malformed ends the
//! connection with an error naming it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest packet taken (rumqttc's limit in this tool, too).
pub const MAX_PACKET: usize = 1 << 20;
/// Keep alive asked for in CONNECT; a PINGREQ goes out after half of it without a write.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A plain or TLS connection.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `host:port`, over TLS when `--tls-ca` was given.
pub async fn dial(
    host: &str,
    port: u16,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
) -> io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect((host, port)).await?;
    // Acknowledgements are small and each batch should leave at once, as in most clients.
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(config) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(Box::new(stream))
        }
    }
}

/// A packet: `first` (type and flags), the remaining length, `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
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
    out
}

fn str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT with a clean session.
pub fn connect(client_id: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + client_id.len());
    str16(&mut body, "MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&(KEEP_ALIVE.as_secs() as u16).to_be_bytes());
    str16(&mut body, client_id);
    frame(0x10, &body)
}

/// SUBSCRIBE, packet identifier 1, every filter at `qos`.
pub fn subscribe(filters: &[String], qos: u8) -> Vec<u8> {
    let mut body = vec![0, 1];
    for f in filters {
        str16(&mut body, f);
        body.push(qos);
    }
    frame(0x82, &body)
}

/// PUBACK, PUBREC or PUBCOMP (by `first`) for `pkid`.
pub fn ack(out: &mut Vec<u8>, first: u8, pkid: u16) {
    out.push(first);
    out.push(2);
    out.extend_from_slice(&pkid.to_be_bytes());
}

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBCOMP: u8 = 0x70;
pub const PINGREQ: [u8; 2] = [0xc0, 0];
pub const DISCONNECT: [u8; 2] = [0xe0, 0];

/// One packet the subscriber acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        code: u8,
    },
    SubAck {
        codes: &'a [u8],
    },
    Publish {
        qos: u8,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    /// The second half of a QoS 2 delivery: answered with PUBCOMP.
    PubRel {
        pkid: u16,
    },
    /// PINGRESP and anything else a server may send that needs nothing from us.
    Other,
}

/// The whole packet at the front of `buf` and its length, `None` if more bytes must come
/// first.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, String> {
    let mut len = 0usize;
    let mut start = None;
    for i in 0..4 {
        let Some(b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            start = Some(2 + i);
            break;
        }
    }
    let start = start.ok_or("a remaining length longer than 4 bytes")?;
    if len > MAX_PACKET {
        return Err(format!("a packet of {len} bytes (at most {MAX_PACKET})"));
    }
    let Some(body) = buf.get(start..start + len) else {
        return Ok(None);
    };
    // A packet identifier or a topic's length: two bytes, big-endian.
    let be16 = |b: &[u8]| -> Result<u16, String> {
        b.get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("a packet of type {} cut short", buf[0] >> 4))
    };
    let packet = match buf[0] >> 4 {
        2 => Packet::ConnAck {
            code: *body.get(1).ok_or("a short CONNACK")?,
        },
        9 => {
            be16(body)?;
            Packet::SubAck { codes: &body[2..] }
        }
        3 => {
            let qos = (buf[0] >> 1) & 3;
            if qos == 3 {
                return Err("a PUBLISH with QoS 3".to_owned());
            }
            let topic_len = usize::from(be16(body)?);
            let topic = body
                .get(2..2 + topic_len)
                .ok_or("a PUBLISH shorter than its topic")?;
            let (pkid, rest) = if qos > 0 {
                let rest = &body[2 + topic_len..];
                (be16(rest)?, &rest[2..])
            } else {
                (0, &body[2 + topic_len..])
            };
            Packet::Publish {
                qos,
                pkid,
                topic,
                payload: rest,
            }
        }
        6 => Packet::PubRel { pkid: be16(body)? },
        _ => Packet::Other,
    };
    Ok(Some((packet, start + len)))
}

/// Bytes read and not yet taken.
pub struct Inbox {
    buf: Vec<u8>,
    /// Where the first byte not yet taken is.
    at: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            buf: Vec::with_capacity(64 * 1024),
            at: 0,
        }
    }
}

impl Inbox {
    /// What is read and not yet taken.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// `n` bytes of [`Inbox::pending`] are taken.
    pub fn consume(&mut self, n: usize) {
        self.at += n;
    }

    /// Reads once; `Ok(0)`: the server closed the connection.
    pub async fn fill(&mut self, io: &mut (impl AsyncRead + Unpin + ?Sized)) -> io::Result<usize> {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(self.buf.len().max(64 * 1024));
        }
        io.read_buf(&mut self.buf).await
    }
}

/// Writes `bytes` whole.
pub async fn send(io: &mut (impl AsyncWrite + Unpin + ?Sized), bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4;

    use super::*;

    /// rumqttc's encoder writes what this parser reads (an independent check of the framing,
    /// the QoS bits and where the packet identifier sits), and an incomplete packet is
    /// waited for, never misread.
    #[test]
    fn reads_what_rumqttc_writes() {
        let mut wire = BytesMut::new();
        let mut long = v4::Publish::new(
            "load/7/telemetry",
            rumqttc::QoS::AtLeastOnce,
            vec![b'x'; 300],
        );
        long.pkid = 513;
        long.write(&mut wire).unwrap();
        v4::Publish::new("a", rumqttc::QoS::AtMostOnce, b"zero".to_vec())
            .write(&mut wire)
            .unwrap();
        let mut two = v4::Publish::new("b/c", rumqttc::QoS::ExactlyOnce, b"two".to_vec());
        two.pkid = 9;
        two.write(&mut wire).unwrap();
        v4::PubRel::new(9).write(&mut wire).unwrap();
        v4::SubAck::new(
            1,
            vec![
                v4::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        )
        .write(&mut wire)
        .unwrap();

        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((packet, n)) = parse(&wire[at..]).unwrap() {
            for cut in 0..n {
                assert_eq!(
                    parse(&wire[at..at + cut]).unwrap(),
                    None,
                    "a packet cut at {cut}"
                );
            }
            seen.push(packet);
            at += n;
        }
        assert_eq!(at, wire.len(), "every byte taken");
        let x300 = [b'x'; 300];
        assert_eq!(
            seen,
            [
                Packet::Publish {
                    qos: 1,
                    pkid: 513,
                    topic: b"load/7/telemetry",
                    payload: &x300,
                },
                Packet::Publish {
                    qos: 0,
                    pkid: 0,
                    topic: b"a",
                    payload: b"zero",
                },
                Packet::Publish {
                    qos: 2,
                    pkid: 9,
                    topic: b"b/c",
                    payload: b"two",
                },
                Packet::PubRel { pkid: 9 },
                Packet::SubAck { codes: &[1, 128] },
            ]
        );
    }

    /// What this client writes, rumqttc's decoder reads as meant.
    #[test]
    fn writes_what_rumqttc_reads() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&connect("sub-run-3"));
        wire.extend_from_slice(&subscribe(
            &["load/#".to_owned(), "load/+/telemetry".to_owned()],
            2,
        ));
        let mut acks = Vec::new();
        ack(&mut acks, PUBACK, 513);
        ack(&mut acks, PUBREC, 9);
        ack(&mut acks, PUBCOMP, 9);
        wire.extend_from_slice(&acks);
        wire.extend_from_slice(&PINGREQ);
        wire.extend_from_slice(&DISCONNECT);

        let mut next = || v4::Packet::read(&mut wire, MAX_PACKET).unwrap();
        match next() {
            v4::Packet::Connect(c) => {
                assert_eq!(c.client_id, "sub-run-3");
                assert!(c.clean_session);
                assert_eq!(u64::from(c.keep_alive), KEEP_ALIVE.as_secs());
            }
            other => panic!("not a CONNECT: {other:?}"),
        }
        match next() {
            v4::Packet::Subscribe(s) => {
                assert_eq!(s.pkid, 1);
                let filters: Vec<_> = s.filters.iter().map(|f| (f.path.as_str(), f.qos)).collect();
                assert_eq!(
                    filters,
                    [
                        ("load/#", rumqttc::QoS::ExactlyOnce),
                        ("load/+/telemetry", rumqttc::QoS::ExactlyOnce)
                    ]
                );
            }
            other => panic!("not a SUBSCRIBE: {other:?}"),
        }
        assert_eq!(next(), v4::Packet::PubAck(v4::PubAck::new(513)));
        assert_eq!(next(), v4::Packet::PubRec(v4::PubRec::new(9)));
        assert_eq!(next(), v4::Packet::PubComp(v4::PubComp::new(9)));
        assert_eq!(next(), v4::Packet::PingReq);
        assert_eq!(next(), v4::Packet::Disconnect);
        assert!(wire.is_empty());
    }

    #[test]
    fn malformed_packets_are_errors() {
        // A remaining length of five bytes, a packet over the limit, a PUBLISH shorter than
        // its topic, QoS 3.
        assert!(parse(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(parse(&[0x30, 0x80, 0x80, 0xc1, 0x00]).is_err());
        assert_eq!(
            parse(&[0x30, 0x80, 0x80, 0xc0, 0x00]).unwrap(),
            None,
            "the limit itself is taken"
        );
        assert!(parse(&[0x30, 0x03, 0x00, 0x05, b'a']).is_err());
        assert!(parse(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]).is_err());
    }
}
