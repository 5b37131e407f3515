//! Packets as the session sees them, whatever the protocol version, and the glue to the
//! codecs: client-to-server packets are decoded by our own decoders (`v4.rs` for 3.1.1,
//! `v5.rs` for MQTT 5, both on the reader of `wire.rs`); the server's PUBLISH, SUBACK,
//! UNSUBACK, PUBREL and DISCONNECT are encoded by hand (`encode.rs`, `v5.rs`), the other
//! acknowledgements and CONNACK by rumqttc's v4 and v5 codecs.
//!
//! Before any decoder sees a frame, [`decode`] checks the fixed-header flags of every packet
//! type and that packets which must be empty are.
//!
//! What the decoders refuse, and how (MQTT 5 closes with DISCONNECT, or CONNACK for a
//! CONNECT, carrying the reason code; 3.1.1 just closes, never with a CONNACK):
//!
//! | input | reason |
//! |---|---|
//! | a length crossing the packet's end, bytes after its end, bad fixed-header flags | 0x81 |
//! | string not UTF-8 [MQTT-1.5.3-1] or holding U+0000 [MQTT-1.5.3-2] | 0x81 |
//! | packet identifier 0 in PUBLISH (QoS > 0), SUBSCRIBE, UNSUBSCRIBE or an ack [MQTT-2.3.1-1] | 0x81 |
//! | CONNECT: reserved flag [MQTT-3.1.2-3], will QoS 3 or will QoS/retain without a will | 0x81 |
//! | 3.1.1 CONNECT: password without user name [MQTT-3.1.2-22] | close, no CONNACK |
//! | SUBSCRIBE: reserved option bits (5: [MQTT-3.8.3-5]; 3.1.1: also QoS 3, [MQTT-3.8.3-4], printed MQTT-3-8.3-4) | 0x81 |
//! | SUBSCRIBE (5): QoS 3, Retain Handling 3, No Local on a `$share/` filter ([MQTT-3.8.3-4] of 5) | 0x82 |
//! | SUBSCRIBE or UNSUBSCRIBE without a filter (5: [MQTT-3.8.3-2]; 3.1.1: [MQTT-3.8.3-3]; both [MQTT-3.10.3-2]) | 0x82 |
//! | an empty topic filter [MQTT-4.7.3-1] | 0x81 |
//! | property not allowed in the packet, unknown reason code | 0x81 |
//! | property twice, Subscription Identifier 0 or in a client's PUBLISH [MQTT-3.3.4-6] | 0x82 |
//! | Response Topic with a wildcard or empty [MQTT-3.3.2-14] | 0x82 |
//! | PUBLISH or will topic with a wildcard, or empty (3.1.1; will) | 0x90 |
//! | more user properties than `max_user_properties` | 0x83 |
//!
//! Topic filter syntax (wildcard placement, shared subscriptions) is not the decoders'
//! business: MQTT 5 refuses a bad filter alone, in its SUBACK (0x8F), so whoever answers the
//! SUBSCRIBE checks it.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as v4b;
use rumqttc::v5::mqttbytes as v5b;

use super::connection::Frame;
use super::{encode, v4, v5};

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// What a client sent.
#[derive(Debug)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    /// The client's ack of a QoS 1 PUBLISH the server sent. `reason` is MQTT 5's (checked
    /// against the codes PUBACK may carry; 3.1.1: 0x00).
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// The client's first ack of a QoS 2 PUBLISH the server sent; `reason` as in `PubAck`.
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    /// The client's last ack of a QoS 2 PUBLISH the server sent (its reason, 0x00 or 0x92,
    /// is checked and dropped: either way the packet id is free again).
    PubComp {
        pkid: u16,
    },
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    /// 3.1.1 DISCONNECTs carry reason 0x00.
    Disconnect {
        reason: u8,
    },
    /// MQTT 5 AUTH (decoded so it is validated; the gateway offers no enhanced auth).
    Auth,
    /// A packet only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP).
    Unexpected(&'static str),
}

#[derive(Debug)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    /// Seconds; 0 means the client asks for no keepalive.
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// MQTT 5 Session Expiry Interval in seconds (0 when absent; unused by 3.1.1).
    pub session_expiry: u32,
    /// MQTT 5 Receive Maximum: QoS 1 and 2 publishes the client takes unacknowledged at once
    /// (65,535 when absent, and for 3.1.1, which has no such limit).
    pub receive_maximum: u16,
    /// MQTT 5 Maximum Packet Size: the server must not send the client a larger packet
    /// [MQTT-3.1.2-24]. `None`: no limit beyond the protocol's.
    pub maximum_packet_size: Option<u32>,
    /// MQTT 5 enhanced authentication was requested (the gateway does not offer it).
    pub auth_method: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// A password as sent: never shown by `Debug`, so no log line can carry it.
#[derive(Clone)]
pub struct Secret(pub Bytes);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A CONNECT's will message. The MQTT 5 properties are what the will properties said
/// (3.1.1: none).
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Seconds to wait after the connection ends before publishing the will (MQTT 5 Will
    /// Delay Interval; 0 when absent).
    pub delay_interval: u32,
    /// Seconds the message lives (MQTT 5 Message Expiry Interval); `None`: forever.
    pub message_expiry: Option<u32>,
    /// MQTT 5 Payload Format Indicator 1: the payload is UTF-8 (not checked here).
    pub payload_format_utf8: bool,
    pub content_type: Option<String>,
    /// A valid topic name [MQTT-3.3.2-14] (checked).
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// A client's PUBLISH.
#[derive(Debug)]
pub struct Publish {
    pub qos: u8,
    /// The RETAIN flag of the fixed header (3.3.1.3).
    pub retain: bool,
    /// Empty when an MQTT 5 client uses an established topic alias.
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    /// Seconds the message lives (MQTT 5 Message Expiry Interval); `None`: forever.
    pub message_expiry: Option<u32>,
    /// MQTT 5 Payload Format Indicator 1: the payload is UTF-8 (not checked here; the
    /// indicator is to be forwarded unaltered [MQTT-3.3.2-4]).
    pub payload_format_utf8: bool,
    pub content_type: Option<String>,
    /// A valid topic name [MQTT-3.3.2-14] (checked).
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// SUBSCRIBE (3.8), decoded and checked as a packet; each filter's syntax is not checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// MQTT 5 Subscription Identifier (1..=268,435,455; 0 is refused as a protocol error).
    pub id: Option<u32>,
    pub user_properties: Vec<(String, String)>,
    /// At least one.
    pub filters: Vec<Subscription>,
}

/// One topic filter of a SUBSCRIBE with its options (3.8.3.1). 3.1.1 has the QoS only; the
/// other options are then false, false, 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Not empty, valid UTF-8 without U+0000; wildcards and `$share/` not checked.
    pub filter: String,
    /// Maximum QoS, 0..=2.
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

/// UNSUBSCRIBE (3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    /// At least one; each not empty.
    pub filters: Vec<String>,
}

/// Why a frame was refused. Small and allocation-free: decode is a hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a well-formed packet (MQTT 5: 0x81).
    Malformed(&'static str),
    /// Well-formed but against the protocol's rules (MQTT 5: 0x82).
    Protocol(&'static str),
    /// A publish or will topic that is not a valid topic name (MQTT 5: 0x90).
    TopicInvalid(&'static str),
    /// Over one of the gateway's limits (MQTT 5: 0x83).
    Limit(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code for a DISCONNECT or CONNACK.
    pub fn reason_code(self) -> u8 {
        match self {
            DecodeError::Malformed(_) => 0x81,
            DecodeError::Protocol(_) => 0x82,
            DecodeError::TopicInvalid(_) => 0x90,
            DecodeError::Limit(_) => 0x83,
        }
    }

    /// The metrics label (`kind`).
    pub fn kind(self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol",
            DecodeError::TopicInvalid(_) => "invalid_topic",
            DecodeError::Limit(_) => "limit",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            DecodeError::Malformed(s)
            | DecodeError::Protocol(s)
            | DecodeError::TopicInvalid(s)
            | DecodeError::Limit(s) => s,
        }
    }
}

/// Per-connection decode limits from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_user_properties: usize,
}

/// How to answer a first CONNECT whose protocol the gateway does not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// MQTT 3.1 (`MQIsdp`, level 3) or `MQTT` with another level than 4 or 5: a
    /// 3.1.1-format CONNACK 0x01, the one answer every version's client can read (an
    /// MQTT 5-format 0x84 would be garbage to anything older, and a newer client is unknown).
    LegacyConnack,
    /// Not MQTT at all: close without a word.
    Close,
}

/// Chooses the codec from the CONNECT's protocol name and level, before either codec reads
/// it: rumqttc's v4 decoder would accept a level-5 CONNECT and return garbage.
pub fn peek_version(frame: &Frame) -> Result<Version, Unsupported> {
    if frame.packet_type() != 1 {
        return Err(Unsupported::Close);
    }
    let body = frame.body();
    let name_len = match body.get(..2) {
        Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
        None => return Err(Unsupported::Close),
    };
    let name = body.get(2..2 + name_len).ok_or(Unsupported::Close)?;
    let level = *body.get(2 + name_len).ok_or(Unsupported::Close)?;
    match (name, level) {
        (b"MQTT", 4) => Ok(Version::V4),
        (b"MQTT", 5) => Ok(Version::V5),
        (b"MQTT", _) | (b"MQIsdp", 3) => Err(Unsupported::LegacyConnack),
        _ => Err(Unsupported::Close),
    }
}

/// Checks the fixed-header flags (2.1.3) and the packets that must be empty.
fn check_fixed_header(version: Version, frame: &Frame) -> Result<(), DecodeError> {
    let flags = frame.flags();
    let ok = match frame.packet_type() {
        3 => {
            let qos = (flags >> 1) & 0x03;
            // QoS 3 is malformed; DUP must be 0 for QoS 0 (3.3.1.1).
            qos != 3 && !(qos == 0 && flags & 0x08 != 0)
        }
        6 | 8 | 10 => flags == 0x02,
        0 => false,
        15 if version == Version::V4 => false,
        _ => flags == 0,
    };
    if !ok {
        return Err(DecodeError::Malformed("fixed-header flags"));
    }
    let must_be_empty = match frame.packet_type() {
        12 => true,
        14 => version == Version::V4,
        _ => false,
    };
    if must_be_empty && !frame.body().is_empty() {
        return Err(DecodeError::Malformed("packet must have no body"));
    }
    Ok(())
}

/// Decodes one complete frame.
pub fn decode(version: Version, frame: Frame, limits: &Limits) -> Result<Packet, DecodeError> {
    check_fixed_header(version, &frame)?;
    match version {
        Version::V4 => v4::decode(frame),
        Version::V5 => decode_v5(frame, limits),
    }
}

fn decode_v5(frame: Frame, limits: &Limits) -> Result<Packet, DecodeError> {
    let byte1 = frame.byte1();
    let kind = frame.packet_type();
    let body = frame.into_body();
    match kind {
        1 => v5::connect(body, limits),
        3 => v5::publish(byte1, body, limits),
        4 => v5::puback(body, limits),
        5 => v5::pubrec(body, limits),
        6 => v5::pubrel(body, limits),
        7 => v5::pubcomp(body, limits),
        8 => v5::subscribe(body, limits),
        10 => v5::unsubscribe(body, limits),
        12 => Ok(Packet::PingReq),
        14 => v5::disconnect(body, limits),
        15 => v5::auth(body, limits),
        _ => Ok(Packet::Unexpected(type_name(kind))),
    }
}

/// The name of a packet type a client never sends.
pub(super) fn type_name(kind: u8) -> &'static str {
    match kind {
        2 => "CONNACK",
        9 => "SUBACK",
        11 => "UNSUBACK",
        13 => "PINGRESP",
        _ => "reserved packet type",
    }
}

/// A topic name a PUBLISH may carry (4.7): not empty, no wildcards. UTF-8 validity and the
/// 65,535-byte limit are guaranteed by decoding it as a length-prefixed string.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// The CONNACK answer, with the MQTT 5 properties the gateway advertises.
#[derive(Debug, Clone, Default)]
pub struct ConnAckProps {
    /// A persistent session was found (its QoS 2 state carries over).
    pub session_present: bool,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    pub max_packet_size: u32,
    /// What the server offers to subscribers (MQTT 5 Wildcard Subscription Available,
    /// Shared Subscription Available, Subscription Identifiers Available, Retain Available).
    /// Each is sent explicitly, 1 or 0, though an absent property means "available": a client
    /// reading the CONNACK sees what is offered.
    pub wildcard_subscriptions: bool,
    pub shared_subscriptions: bool,
    pub subscription_ids: bool,
    pub retain_available: bool,
}

/// Why a CONNECT is refused, independent of the version that expresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 3.1.1 0x02, MQTT 5 0x85.
    ClientId,
    /// Too many connections: 3.1.1 0x03, MQTT 5 0x89 (Server busy).
    Busy,
    /// MQTT 5 only: enhanced authentication is not offered (0x8C).
    AuthMethod,
    /// MQTT 5 only: a CONNECT that failed to decode; the reason code of the error.
    Invalid(u8),
    /// Bad username or password: 3.1.1 0x04, MQTT 5 0x86.
    BadCredentials,
    /// Not authorized: 3.1.1 0x05, MQTT 5 0x87.
    NotAuthorized,
}

/// What the server sends.
#[derive(Debug, Clone)]
pub enum Outgoing {
    ConnAck(Result<ConnAckProps, Refusal>),
    /// MQTT 5 reason code (0x00 = success); 3.1.1 ignores it.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubComp {
        pkid: u16,
        found: bool,
    },
    /// The server's answer to a client's PUBREC for a QoS 2 PUBLISH the server sent;
    /// `found: false` is MQTT 5's 0x92 (no such packet id in flight; 3.1.1 cannot say it).
    PubRel {
        pkid: u16,
        found: bool,
    },
    /// One reason code per filter, in the SUBSCRIBE's order: MQTT 5's as given (0x00..=0x02
    /// the QoS granted, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2; any other is
    /// sent as 0x80); 3.1.1 sends 0x00..=0x02 as given and anything else as 0x80 (Failure).
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    /// One reason code per filter, in the UNSUBSCRIBE's order: MQTT 5's as given (0x00,
    /// 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91; any other is sent as 0x80); 3.1.1 has no codes.
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// MQTT 5 only; a 3.1.1 connection is just closed.
    Disconnect {
        reason: u8,
    },
}

/// Encodes `packet` for `version` into `out`. Returns false, with nothing written, for packets
/// the version cannot express (a DISCONNECT or an MQTT 5-only refusal on 3.1.1; the caller
/// just closes then) and for a SUBACK or UNSUBACK too large for any packet.
pub fn encode(version: Version, packet: &Outgoing, out: &mut BytesMut) -> bool {
    match version {
        Version::V4 => encode_v4(packet, out),
        Version::V5 => encode_v5(packet, out),
    }
}

fn encode_v4(packet: &Outgoing, out: &mut BytesMut) -> bool {
    // Every write below is of a packet far smaller than the 256 MiB the codec can refuse.
    let written = match packet {
        Outgoing::ConnAck(answer) => {
            let code = match answer {
                Ok(props) => {
                    return v4b::ConnAck::new(
                        v4b::ConnectReturnCode::Success,
                        props.session_present,
                    )
                    .write(out)
                    .is_ok();
                }
                Err(Refusal::ClientId) => v4b::ConnectReturnCode::BadClientId,
                Err(Refusal::Busy) => v4b::ConnectReturnCode::ServiceUnavailable,
                Err(Refusal::BadCredentials) => v4b::ConnectReturnCode::BadUserNamePassword,
                Err(Refusal::NotAuthorized) => v4b::ConnectReturnCode::NotAuthorized,
                Err(Refusal::AuthMethod | Refusal::Invalid(_)) => return false,
            };
            v4b::ConnAck::new(code, false).write(out)
        }
        Outgoing::PubAck { pkid, .. } => v4b::PubAck::new(*pkid).write(out),
        Outgoing::PubRec { pkid, .. } => v4b::PubRec::new(*pkid).write(out),
        Outgoing::PubComp { pkid, .. } => v4b::PubComp::new(*pkid).write(out),
        Outgoing::PubRel { pkid, found } => return encode::pubrel(Version::V4, *pkid, *found, out),
        Outgoing::SubAck { pkid, codes } => return encode::suback(Version::V4, *pkid, codes, out),
        Outgoing::UnsubAck { pkid, codes } => {
            return encode::unsuback(Version::V4, *pkid, codes, out);
        }
        Outgoing::PingResp => v4b::PingResp.write(out),
        Outgoing::Disconnect { .. } => return false,
    };
    written.is_ok()
}

/// The legacy 3.1.1 CONNACK (`20 02 00 01`) for MQTT 3.1 and unknown 3.x levels. Written by
/// hand: rumqttc's v5 enum has these codes but hits `unreachable!` encoding them.
pub fn encode_legacy_refusal(out: &mut BytesMut) {
    out.extend_from_slice(&[0x20, 0x02, 0x00, 0x01]);
}

fn encode_v5(packet: &Outgoing, out: &mut BytesMut) -> bool {
    use v5b::v5 as p;
    let result = match packet {
        Outgoing::ConnAck(Ok(props)) => p::ConnAck {
            session_present: props.session_present,
            code: p::ConnectReturnCode::Success,
            properties: Some(p::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: (props.receive_maximum != u16::MAX).then_some(props.receive_maximum),
                max_qos: None,
                retain_available: Some(u8::from(props.retain_available)),
                max_packet_size: Some(props.max_packet_size),
                assigned_client_identifier: props.assigned_client_id.clone(),
                topic_alias_max: Some(props.topic_alias_maximum),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(u8::from(props.wildcard_subscriptions)),
                subscription_identifiers_available: Some(u8::from(props.subscription_ids)),
                shared_subscription_available: Some(u8::from(props.shared_subscriptions)),
                server_keep_alive: props.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }
        .write(out),
        Outgoing::ConnAck(Err(refusal)) => p::ConnAck {
            session_present: false,
            code: connack_code(*refusal),
            properties: None,
        }
        .write(out),
        Outgoing::PubAck { pkid, reason } => p::PubAck {
            pkid: *pkid,
            reason: puback_reason(*reason),
            properties: None,
        }
        .write(out),
        Outgoing::PubRec { pkid, reason } => p::PubRec {
            pkid: *pkid,
            reason: pubrec_reason(*reason),
            properties: None,
        }
        .write(out),
        Outgoing::PubComp { pkid, found } => p::PubComp {
            pkid: *pkid,
            reason: if *found {
                p::PubCompReason::Success
            } else {
                p::PubCompReason::PacketIdentifierNotFound
            },
            properties: None,
        }
        .write(out),
        Outgoing::PubRel { pkid, found } => return encode::pubrel(Version::V5, *pkid, *found, out),
        Outgoing::SubAck { pkid, codes } => return encode::suback(Version::V5, *pkid, codes, out),
        Outgoing::UnsubAck { pkid, codes } => {
            return encode::unsuback(Version::V5, *pkid, codes, out);
        }
        Outgoing::PingResp => p::PingResp::write(out),
        Outgoing::Disconnect { reason } => {
            v5::encode_disconnect(*reason, out);
            Ok(0)
        }
    };
    // The codec only fails on packets over 256 MiB, which none of these comes close to; had
    // it failed, nothing would have been written and the client would time out waiting.
    result.is_ok()
}

/// MQTT 5 CONNACK codes only: the 3.1.1 variants of rumqttc's enum are never built here.
fn connack_code(refusal: Refusal) -> v5b::v5::ConnectReturnCode {
    use v5b::v5::ConnectReturnCode as C;
    match refusal {
        Refusal::ClientId => C::ClientIdentifierNotValid,
        Refusal::Busy => C::ServerBusy,
        Refusal::AuthMethod => C::BadAuthenticationMethod,
        Refusal::BadCredentials => C::BadUserNamePassword,
        Refusal::NotAuthorized => C::NotAuthorized,
        Refusal::Invalid(0x81) => C::MalformedPacket,
        Refusal::Invalid(0x82) => C::ProtocolError,
        Refusal::Invalid(0x84) => C::UnsupportedProtocolVersion,
        Refusal::Invalid(0x90) => C::TopicNameInvalid,
        Refusal::Invalid(0x95) => C::PacketTooLarge,
        Refusal::Invalid(0x83) => C::ImplementationSpecificError,
        Refusal::Invalid(_) => C::UnspecifiedError,
    }
}

fn puback_reason(code: u8) -> v5b::v5::PubAckReason {
    use v5b::v5::PubAckReason as R;
    match code {
        0x00 => R::Success,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> v5b::v5::PubRecReason {
    use v5b::v5::PubRecReason as R;
    match code {
        0x00 => R::Success,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        _ => R::UnspecifiedError,
    }
}
