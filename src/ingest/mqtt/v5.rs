//! Our own MQTT 5 decoder for the packets a client sends to a server, and the DISCONNECT
//! encoder.
//!
//! docs/ARCHITECTURE.md lists what rumqttc's v5 codec gets wrong (it rejects mosquitto's `e0 00`
//! DISCONNECT, drops the reason code of a reason-only DISCONNECT, cannot use AUTH) and what it
//! does not check: a property section may overrun into the payload, duplicate properties
//! silently overwrite each other, properties not allowed in a packet are accepted, strings may
//! carry U+0000, user properties are unbounded. Guarding all of that from outside means parsing
//! every variable header twice, so the gateway decodes the client-to-server packets here,
//! against the spec, and keeps rumqttc's v5 codec for the acknowledgements it encodes (see
//! `packet.rs`).
//!
//! Every read is bounds-checked (`wire.rs`); nothing here can panic on input. A property
//! section is split off by its declared length first, so a property can never read past it.

use bytes::{BufMut, Bytes, BytesMut};

use super::packet::{
    Connect, DecodeError, Limits, Packet, Publish, Secret, Subscribe, Subscription, Unsubscribe,
    Will, valid_topic_name,
};
use super::wire::Reader;

/// Property identifiers (MQTT 5, 2.2.2.2) the decoder knows.
mod id {
    pub const PAYLOAD_FORMAT: u8 = 1;
    pub const MESSAGE_EXPIRY: u8 = 2;
    pub const CONTENT_TYPE: u8 = 3;
    pub const RESPONSE_TOPIC: u8 = 8;
    pub const CORRELATION_DATA: u8 = 9;
    pub const SUBSCRIPTION_ID: u8 = 11;
    pub const SESSION_EXPIRY: u8 = 17;
    pub const AUTH_METHOD: u8 = 21;
    pub const AUTH_DATA: u8 = 22;
    pub const REQUEST_PROBLEM_INFO: u8 = 23;
    pub const WILL_DELAY: u8 = 24;
    pub const REQUEST_RESPONSE_INFO: u8 = 25;
    pub const REASON_STRING: u8 = 31;
    pub const RECEIVE_MAXIMUM: u8 = 33;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 34;
    pub const TOPIC_ALIAS: u8 = 35;
    pub const USER_PROPERTY: u8 = 38;
    pub const MAXIMUM_PACKET_SIZE: u8 = 39;
}

/// Which properties each client-to-server packet may carry (bit n = identifier n).
#[derive(Debug, Clone, Copy)]
struct Allowed(u64);

const fn allow(ids: &[u8]) -> Allowed {
    let mut bits = 0u64;
    let mut i = 0;
    while i < ids.len() {
        bits |= 1 << ids[i];
        i += 1;
    }
    Allowed(bits)
}

const CONNECT: Allowed = allow(&[
    id::SESSION_EXPIRY,
    id::AUTH_METHOD,
    id::AUTH_DATA,
    id::REQUEST_PROBLEM_INFO,
    id::REQUEST_RESPONSE_INFO,
    id::RECEIVE_MAXIMUM,
    id::TOPIC_ALIAS_MAXIMUM,
    id::USER_PROPERTY,
    id::MAXIMUM_PACKET_SIZE,
]);
const WILL: Allowed = allow(&[
    id::PAYLOAD_FORMAT,
    id::MESSAGE_EXPIRY,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::WILL_DELAY,
    id::USER_PROPERTY,
]);
/// The Subscription Identifier is a PUBLISH property, but only from server to client: it is
/// read here so [`publish`] can refuse it as the protocol error it is [MQTT-3.3.4-6].
const PUBLISH: Allowed = allow(&[
    id::PAYLOAD_FORMAT,
    id::MESSAGE_EXPIRY,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::SUBSCRIPTION_ID,
    id::TOPIC_ALIAS,
    id::USER_PROPERTY,
]);
const ACK: Allowed = allow(&[id::REASON_STRING, id::USER_PROPERTY]);
const SUBSCRIBE: Allowed = allow(&[id::SUBSCRIPTION_ID, id::USER_PROPERTY]);
const UNSUBSCRIBE: Allowed = allow(&[id::USER_PROPERTY]);
/// Server Reference is server-to-client only.
const DISCONNECT: Allowed = allow(&[id::SESSION_EXPIRY, id::REASON_STRING, id::USER_PROPERTY]);
const AUTH: Allowed = allow(&[
    id::AUTH_METHOD,
    id::AUTH_DATA,
    id::REASON_STRING,
    id::USER_PROPERTY,
]);

/// The properties the gateway or its broker uses; the others are checked and skipped.
#[derive(Debug, Default)]
struct Properties {
    payload_format_utf8: bool,
    message_expiry: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    subscription_id: Option<u32>,
    topic_alias: Option<u16>,
    will_delay: Option<u32>,
    auth_method: bool,
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
    user: Vec<(String, String)>,
}

/// Reads one property section: its length, then properties up to exactly that length.
fn properties(
    r: &mut Reader,
    allowed: Allowed,
    limits: &Limits,
) -> Result<Properties, DecodeError> {
    let len = r.varint()?;
    let len = usize::try_from(len).map_err(|_| DecodeError::Malformed("property length"))?;
    let mut section = Reader::new(r.take(len)?);
    let mut props = Properties::default();
    let mut seen = 0u64;
    while !section.is_empty() {
        // Identifiers are variable byte integers, but every defined one fits in one byte.
        let ident = section.varint()?;
        let ident = u8::try_from(ident)
            .ok()
            .filter(|i| *i < 64 && allowed.0 & (1 << i) != 0)
            .ok_or(DecodeError::Malformed(
                "property not allowed in this packet",
            ))?;
        // Only User Property may repeat in a client's packet: the one other repeatable
        // property, Subscription Identifier, repeats only in a server's PUBLISH (3.8.2.1.2).
        if ident != id::USER_PROPERTY {
            if seen & (1 << ident) != 0 {
                return Err(DecodeError::Protocol("property appears twice"));
            }
            seen |= 1 << ident;
        }
        match ident {
            id::PAYLOAD_FORMAT => props.payload_format_utf8 = boolean(&mut section)?,
            id::REQUEST_PROBLEM_INFO | id::REQUEST_RESPONSE_INFO => {
                boolean(&mut section)?;
            }
            id::SESSION_EXPIRY => props.session_expiry = Some(section.u32()?),
            id::MESSAGE_EXPIRY => props.message_expiry = Some(section.u32()?),
            id::WILL_DELAY => props.will_delay = Some(section.u32()?),
            id::MAXIMUM_PACKET_SIZE => match section.u32()? {
                0 => return Err(DecodeError::Protocol("maximum packet size of 0")),
                size => props.maximum_packet_size = Some(size),
            },
            id::RECEIVE_MAXIMUM => match section.u16()? {
                0 => return Err(DecodeError::Protocol("receive maximum of 0")),
                max => props.receive_maximum = Some(max),
            },
            id::TOPIC_ALIAS_MAXIMUM => {
                section.u16()?;
            }
            id::TOPIC_ALIAS => props.topic_alias = Some(section.u16()?),
            id::CONTENT_TYPE => props.content_type = Some(section.string()?),
            id::RESPONSE_TOPIC => {
                let topic = section.string()?;
                // A topic name: no wildcards [MQTT-3.3.2-14], not empty [MQTT-4.7.3-1].
                if !valid_topic_name(&topic) {
                    return Err(DecodeError::Protocol(
                        "response topic is not a valid topic name",
                    ));
                }
                props.response_topic = Some(topic);
            }
            id::REASON_STRING => {
                section.string()?;
            }
            id::AUTH_METHOD => {
                section.string()?;
                props.auth_method = true;
            }
            id::CORRELATION_DATA => props.correlation_data = Some(section.binary()?),
            id::AUTH_DATA => {
                section.binary()?;
            }
            // 1..=268,435,455; a variable byte integer cannot exceed the maximum (3.8.2.1.2).
            id::SUBSCRIPTION_ID => match section.varint()? {
                0 => return Err(DecodeError::Protocol("subscription identifier of 0")),
                sid => props.subscription_id = Some(sid),
            },
            id::USER_PROPERTY => {
                let name = section.string()?;
                let value = section.string()?;
                if props.user.len() >= limits.max_user_properties {
                    return Err(DecodeError::Limit("too many user properties"));
                }
                props.user.push((name, value));
            }
            _ => return Err(DecodeError::Malformed("unknown property")),
        }
    }
    Ok(props)
}

/// A Byte property that must be 0 or 1 (Payload Format Indicator, Request Problem
/// Information, Request Response Information).
fn boolean(section: &mut Reader) -> Result<bool, DecodeError> {
    match section.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Protocol(
            "a boolean property is neither 0 nor 1",
        )),
    }
}

/// The CONNECT of an MQTT 5 client (3.1). The protocol name and level were checked when the
/// version was chosen, but are read again here so this function stands alone.
pub(crate) fn connect(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    if r.binary()?.as_ref() != b"MQTT" || r.u8()? != 5 {
        return Err(DecodeError::Malformed("not an MQTT 5 CONNECT"));
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::Malformed(
            "will QoS or retain without a valid will",
        ));
    }
    let keep_alive = r.u16()?;
    let props = properties(&mut r, CONNECT, limits)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let will_props = properties(&mut r, WILL, limits)?;
        let topic = r.string()?;
        if !valid_topic_name(&topic) {
            return Err(DecodeError::TopicInvalid(
                "will topic is not a valid topic name",
            ));
        }
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval: will_props.will_delay.unwrap_or(0),
            message_expiry: will_props.message_expiry,
            payload_format_utf8: will_props.payload_format_utf8,
            content_type: will_props.content_type,
            response_topic: will_props.response_topic,
            correlation_data: will_props.correlation_data,
            user_properties: will_props.user,
        })
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(Secret(r.binary()?))
    } else {
        None
    };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("bytes after the end of CONNECT"));
    }
    Ok(Packet::Connect(Box::new(Connect {
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        will,
        session_expiry: props.session_expiry.unwrap_or(0),
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
        maximum_packet_size: props.maximum_packet_size,
        auth_method: props.auth_method,
        username,
        password,
    })))
}

/// PUBLISH (3.3). The fixed-header flags were checked by the caller. An empty topic is
/// returned as is: it is valid only with a topic alias, which the session resolves.
pub(crate) fn publish(byte1: u8, body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let qos = (byte1 >> 1) & 0x03;
    let mut r = Reader::new(body);
    let topic = r.string()?;
    if topic.contains(['+', '#']) {
        return Err(DecodeError::TopicInvalid("wildcard in a PUBLISH topic"));
    }
    let pkid = if qos > 0 { r.pkid()? } else { 0 };
    let props = properties(&mut r, PUBLISH, limits)?;
    if props.subscription_id.is_some() {
        return Err(DecodeError::Protocol(
            "subscription identifier in a client's PUBLISH",
        ));
    }
    Ok(Packet::Publish(Publish {
        qos,
        retain: byte1 & 0x01 != 0,
        topic,
        pkid,
        payload: r.rest(),
        topic_alias: props.topic_alias,
        message_expiry: props.message_expiry,
        payload_format_utf8: props.payload_format_utf8,
        content_type: props.content_type,
        response_topic: props.response_topic,
        correlation_data: props.correlation_data,
        user_properties: props.user,
    }))
}

/// Reason codes a PUBACK or PUBREC may carry (3.4.2.1, 3.5.2.1).
fn publish_ack_reason(reason: u8) -> bool {
    matches!(
        reason,
        0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
    )
}

/// Reason codes a PUBREL or PUBCOMP may carry (3.6.2.1, 3.7.2.1).
fn release_reason(reason: u8) -> bool {
    matches!(reason, 0x00 | 0x92)
}

/// The body every acknowledgement shares (3.4 to 3.7): packet id, then an optional reason
/// code (0x00 when absent) and optional properties, which are checked and dropped.
fn ack(
    body: Bytes,
    limits: &Limits,
    valid: fn(u8) -> bool,
    what: &'static str,
) -> Result<(u16, u8), DecodeError> {
    let mut r = Reader::new(body);
    let pkid = r.pkid()?;
    let mut reason = 0x00;
    if !r.is_empty() {
        reason = r.u8()?;
        if !valid(reason) {
            return Err(DecodeError::Malformed(what));
        }
        if !r.is_empty() {
            properties(&mut r, ACK, limits)?;
        }
    }
    r.end((pkid, reason))
}

/// PUBACK (3.4): the client acknowledges a QoS 1 PUBLISH of the server's.
pub(crate) fn puback(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let (pkid, reason) = ack(body, limits, publish_ack_reason, "PUBACK reason code")?;
    Ok(Packet::PubAck { pkid, reason })
}

/// PUBREC (3.5): the client received a QoS 2 PUBLISH of the server's.
pub(crate) fn pubrec(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let (pkid, reason) = ack(body, limits, publish_ack_reason, "PUBREC reason code")?;
    Ok(Packet::PubRec { pkid, reason })
}

/// PUBREL (3.6).
pub(crate) fn pubrel(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let (pkid, _) = ack(body, limits, release_reason, "PUBREL reason code")?;
    Ok(Packet::PubRel { pkid })
}

/// PUBCOMP (3.7): the client completes a QoS 2 PUBLISH of the server's.
pub(crate) fn pubcomp(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let (pkid, _) = ack(body, limits, release_reason, "PUBCOMP reason code")?;
    Ok(Packet::PubComp { pkid })
}

/// SUBSCRIBE (3.8), with each filter's options. Filter syntax is left to whoever answers.
pub(crate) fn subscribe(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = r.pkid()?;
    let props = properties(&mut r, SUBSCRIBE, limits)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.filter()?;
        let options = r.u8()?;
        if options & 0xc0 != 0 {
            return Err(DecodeError::Malformed("reserved subscription option bits"));
        }
        let qos = options & 0x03;
        if qos == 3 {
            return Err(DecodeError::Protocol("subscription maximum QoS 3"));
        }
        let retain_handling = (options >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol("retain handling 3"));
        }
        let no_local = options & 0x04 != 0;
        // A connection-level error, unlike the filter's syntax [MQTT-3.8.3-4].
        if no_local && filter.starts_with("$share/") {
            return Err(DecodeError::Protocol("no local on a shared subscription"));
        }
        filters.push(Subscription {
            filter,
            qos,
            no_local,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Subscribe(Subscribe {
        pkid,
        id: props.subscription_id,
        user_properties: props.user,
        filters,
    }))
}

/// UNSUBSCRIBE (3.10).
pub(crate) fn unsubscribe(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = r.pkid()?;
    properties(&mut r, UNSUBSCRIBE, limits)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.filter()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Unsubscribe(Unsubscribe { pkid, filters }))
}

/// DISCONNECT (3.14). A remaining length of 0 (`e0 00`, what mosquitto sends) means reason
/// 0x00 and no properties; a remaining length of 1 means a reason code and no properties.
pub(crate) fn disconnect(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok(Packet::Disconnect { reason: 0x00 });
    }
    let reason = r.u8()?;
    if !r.is_empty() {
        properties(&mut r, DISCONNECT, limits)?;
    }
    r.end(Packet::Disconnect { reason })
}

/// AUTH (3.15): like DISCONNECT, an empty body means reason 0x00 (success).
pub(crate) fn auth(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    if r.is_empty() {
        return Ok(Packet::Auth);
    }
    let reason = r.u8()?;
    if !matches!(reason, 0x00 | 0x18 | 0x19) {
        return Err(DecodeError::Malformed("AUTH reason code"));
    }
    if !r.is_empty() {
        properties(&mut r, AUTH, limits)?;
    }
    r.end(Packet::Auth)
}

/// Encodes a server DISCONNECT. Reason 0x00 is the two-byte `e0 00`; any other reason is sent
/// with an explicit empty property section (`e0 02 rc 00`), which every client decoder we
/// tested accepts (rumqttc's own encoder wrongly drops the reason code here).
pub(crate) fn encode_disconnect(reason: u8, out: &mut BytesMut) {
    if reason == 0x00 {
        out.put_slice(&[0xe0, 0x00]);
    } else {
        out.put_slice(&[0xe0, 0x02, reason, 0x00]);
    }
}
