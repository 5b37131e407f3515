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
//! Every read is bounds-checked; nothing here can panic on input. A property section is
//! split off by its declared length first, so a property can never read past it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::packet::{
    Connect, DecodeError, Limits, Packet, Publish, Secret, Will, valid_topic_name,
};

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
/// A client must not send a Subscription Identifier in PUBLISH (3.3.4), so it is absent.
const PUBLISH: Allowed = allow(&[
    id::PAYLOAD_FORMAT,
    id::MESSAGE_EXPIRY,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
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

/// The properties the gateway uses; the others are checked and skipped.
#[derive(Debug, Default)]
struct Properties {
    content_type: Option<String>,
    topic_alias: Option<u16>,
    auth_method: bool,
    session_expiry: Option<u32>,
    user: Vec<(String, String)>,
}

/// A bounds-checked cursor over one frame's body.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u32())
    }

    /// A variable byte integer (1.5.5): at most four bytes.
    fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than four bytes",
        ))
    }

    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed(
                "length crosses the end of the packet",
            ));
        }
        Ok(self.buf.split_to(n))
    }

    /// Binary data: a two-byte length, then the bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 string (1.5.4): well-formed and without U+0000. (Surrogates cannot occur in
    /// well-formed UTF-8, so Rust's check covers them.)
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        utf8(raw)
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

fn utf8(raw: Bytes) -> Result<String, DecodeError> {
    let text =
        std::str::from_utf8(&raw).map_err(|_| DecodeError::Malformed("string is not UTF-8"))?;
    if text.contains('\0') {
        return Err(DecodeError::Malformed("string contains U+0000"));
    }
    Ok(text.to_owned())
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
        if ident != id::USER_PROPERTY && ident != id::SUBSCRIPTION_ID {
            if seen & (1 << ident) != 0 {
                return Err(DecodeError::Protocol("property appears twice"));
            }
            seen |= 1 << ident;
        }
        match ident {
            id::PAYLOAD_FORMAT | id::REQUEST_PROBLEM_INFO | id::REQUEST_RESPONSE_INFO => {
                if section.u8()? > 1 {
                    return Err(DecodeError::Protocol(
                        "a boolean property is neither 0 nor 1",
                    ));
                }
            }
            id::SESSION_EXPIRY => props.session_expiry = Some(section.u32()?),
            id::MESSAGE_EXPIRY | id::WILL_DELAY => {
                section.u32()?;
            }
            id::MAXIMUM_PACKET_SIZE => {
                if section.u32()? == 0 {
                    return Err(DecodeError::Protocol("maximum packet size of 0"));
                }
            }
            id::RECEIVE_MAXIMUM => {
                if section.u16()? == 0 {
                    return Err(DecodeError::Protocol("receive maximum of 0"));
                }
            }
            id::TOPIC_ALIAS_MAXIMUM => {
                section.u16()?;
            }
            id::TOPIC_ALIAS => props.topic_alias = Some(section.u16()?),
            id::CONTENT_TYPE => props.content_type = Some(section.string()?),
            id::RESPONSE_TOPIC => {
                let topic = section.string()?;
                if !valid_topic_name(&topic) {
                    return Err(DecodeError::Protocol(
                        "response topic is not a valid topic name",
                    ));
                }
            }
            id::REASON_STRING => {
                section.string()?;
            }
            id::AUTH_METHOD => {
                section.string()?;
                props.auth_method = true;
            }
            id::CORRELATION_DATA | id::AUTH_DATA => {
                section.binary()?;
            }
            id::SUBSCRIPTION_ID => {
                if section.varint()? == 0 {
                    return Err(DecodeError::Protocol("subscription identifier of 0"));
                }
            }
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
            content_type: will_props.content_type,
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
    let pkid = if qos > 0 { r.u16()? } else { 0 };
    if qos > 0 && pkid == 0 {
        return Err(DecodeError::Malformed("packet identifier 0"));
    }
    let props = properties(&mut r, PUBLISH, limits)?;
    Ok(Packet::Publish(Publish {
        qos,
        topic,
        pkid,
        payload: r.rest(),
        topic_alias: props.topic_alias,
        content_type: props.content_type,
        user_properties: props.user,
    }))
}

/// PUBREL (3.6): packet id, then an optional reason code and optional properties.
pub(crate) fn pubrel(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(&mut r)?;
    if !r.is_empty() {
        let reason = r.u8()?;
        if reason != 0x00 && reason != 0x92 {
            return Err(DecodeError::Malformed("PUBREL reason code"));
        }
        if !r.is_empty() {
            properties(&mut r, ACK, limits)?;
        }
    }
    end(&r, Packet::PubRel { pkid })
}

/// SUBSCRIBE (3.8): validated so the SUBACK carries one code per filter.
pub(crate) fn subscribe(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(&mut r)?;
    properties(&mut r, SUBSCRIBE, limits)?;
    let mut filters = 0;
    while !r.is_empty() {
        r.string()?;
        let options = r.u8()?;
        if options & 0xc0 != 0 || options & 0x03 == 3 || (options >> 4) & 0x03 == 3 {
            return Err(DecodeError::Malformed("subscription options"));
        }
        filters += 1;
    }
    if filters == 0 {
        return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Subscribe { pkid, filters })
}

/// UNSUBSCRIBE (3.10).
pub(crate) fn unsubscribe(body: Bytes, limits: &Limits) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = nonzero_pkid(&mut r)?;
    properties(&mut r, UNSUBSCRIBE, limits)?;
    let mut filters = 0;
    while !r.is_empty() {
        r.string()?;
        filters += 1;
    }
    if filters == 0 {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Unsubscribe { pkid, filters })
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
    end(&r, Packet::Disconnect { reason })
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
    end(&r, Packet::Auth)
}

fn nonzero_pkid(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Malformed("packet identifier 0")),
        pkid => Ok(pkid),
    }
}

fn end(r: &Reader, packet: Packet) -> Result<Packet, DecodeError> {
    if r.is_empty() {
        Ok(packet)
    } else {
        Err(DecodeError::Malformed("bytes after the end of the packet"))
    }
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
