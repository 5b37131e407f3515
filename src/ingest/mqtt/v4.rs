//! Our own MQTT 3.1.1 decoder for the packets a client sends to a server.
//!
//! rumqttc's 3.1.1 codec, which decoded these before, does not check what a server must:
//! it accepts a CONNECT with the reserved flag set [MQTT-3.1.2-3], with a password but no
//! user name [MQTT-3.1.2-22] (which then reached authentication and was answered 0x04), or
//! with bytes after its payload; it lets U+0000 through in client ids, user names and will
//! topics [MQTT-1.5.3-2]; it reads the password, which is binary data (3.1.3.5), as a UTF-8
//! string; it accepts SUBSCRIBE options with reserved bits set [MQTT-3-8.3-4], empty topic
//! filters [MQTT-4.7.3-1] and acks with bytes after their packet id. Checking all of that
//! from outside means parsing every packet twice, so 3.1.1 is decoded here, on the same
//! bounds-checked reader as MQTT 5 (`wire.rs`).
//!
//! Every error closes the connection (3.1.1 has no reason codes; a CONNECT that fails here
//! gets no CONNACK). The error kinds only label the metrics and log lines.

use bytes::Bytes;

use super::connection::Frame;
use super::packet::{
    Connect, DecodeError, Packet, Publish, Secret, Subscribe, Subscription, Unsubscribe, Will,
    type_name, valid_topic_name,
};
use super::wire::Reader;

/// Decodes one complete 3.1.1 frame whose fixed-header flags were checked.
pub(crate) fn decode(frame: Frame) -> Result<Packet, DecodeError> {
    let byte1 = frame.byte1();
    let kind = frame.packet_type();
    let body = frame.into_body();
    match kind {
        1 => connect(body),
        3 => publish(byte1, body),
        4 => ack(body).map(|pkid| Packet::PubAck { pkid, reason: 0 }),
        5 => ack(body).map(|pkid| Packet::PubRec { pkid, reason: 0 }),
        6 => ack(body).map(|pkid| Packet::PubRel { pkid }),
        7 => ack(body).map(|pkid| Packet::PubComp { pkid }),
        8 => subscribe(body),
        10 => unsubscribe(body),
        // Their empty bodies were checked with the fixed header.
        12 => Ok(Packet::PingReq),
        14 => Ok(Packet::Disconnect { reason: 0 }),
        _ => Ok(Packet::Unexpected(type_name(kind))),
    }
}

/// CONNECT (3.1). The protocol name and level were checked when the version was chosen, but
/// are read again here so this function stands alone.
fn connect(body: Bytes) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    if r.binary()?.as_ref() != b"MQTT" || r.u8()? != 4 {
        return Err(DecodeError::Malformed("not an MQTT 3.1.1 CONNECT"));
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        // [MQTT-3.1.2-3]
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    // [MQTT-3.1.2-14]; without a will, QoS and retain are 0 [MQTT-3.1.2-11], -13, -15.
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::Malformed(
            "will QoS or retain without a valid will",
        ));
    }
    let has_username = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if has_password && !has_username {
        // [MQTT-3.1.2-22]; MQTT 5 allows it.
        return Err(DecodeError::Malformed("password without a user name"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;
    let will = if will_flag {
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
            delay_interval: 0,
            message_expiry: None,
            payload_format_utf8: false,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        })
    } else {
        None
    };
    let mut username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    // Binary data (3.1.3.5), not a string.
    let mut password = if has_password {
        Some(Secret(r.binary()?))
    } else {
        None
    };
    // As with rumqttc's codec before: an empty user name without a (non-empty) password
    // is no login, so a 3.1.1 device that sets the flag with nothing in it still connects
    // as it did (anonymously, where `[auth]` allows that).
    if username.as_deref() == Some("") && password.as_ref().is_none_or(|p| p.0.is_empty()) {
        username = None;
        password = None;
    }
    r.end(Packet::Connect(Box::new(Connect {
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        will,
        session_expiry: 0,
        receive_maximum: u16::MAX,
        maximum_packet_size: None,
        auth_method: false,
        username,
        password,
    })))
}

/// PUBLISH (3.3). The fixed-header flags (QoS, DUP) were checked by the caller.
fn publish(byte1: u8, body: Bytes) -> Result<Packet, DecodeError> {
    let qos = (byte1 >> 1) & 0x03;
    let mut r = Reader::new(body);
    let topic = r.string()?;
    if !valid_topic_name(&topic) {
        return Err(DecodeError::TopicInvalid(
            "PUBLISH topic is empty or has a wildcard",
        ));
    }
    let pkid = if qos > 0 { r.pkid()? } else { 0 };
    Ok(Packet::Publish(Publish {
        qos,
        retain: byte1 & 0x01 != 0,
        topic,
        pkid,
        payload: r.rest(),
        topic_alias: None,
        message_expiry: None,
        payload_format_utf8: false,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }))
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (3.4 to 3.7): a packet id and nothing else.
fn ack(body: Bytes) -> Result<u16, DecodeError> {
    let mut r = Reader::new(body);
    let pkid = r.pkid()?;
    r.end(pkid)
}

/// SUBSCRIBE (3.8). Filter syntax is left to whoever answers the SUBACK, as in MQTT 5.
fn subscribe(body: Bytes) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    // [MQTT-2.3.1-1]
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        // Not empty [MQTT-4.7.3-1], UTF-8 [MQTT-1.5.3-1] without U+0000 [MQTT-1.5.3-2].
        let filter = r.filter()?;
        let requested = r.u8()?;
        // Reserved bits, or QoS 3 [MQTT-3-8.3-4].
        if requested & 0xfc != 0 || requested == 3 {
            return Err(DecodeError::Malformed("requested QoS byte"));
        }
        filters.push(Subscription {
            filter,
            qos: requested,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        });
    }
    if filters.is_empty() {
        // [MQTT-3.8.3-3]
        return Err(DecodeError::Protocol("SUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Subscribe(Subscribe {
        pkid,
        id: None,
        user_properties: Vec::new(),
        filters,
    }))
}

/// UNSUBSCRIBE (3.10).
fn unsubscribe(body: Bytes) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    // [MQTT-2.3.1-1]
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.filter()?);
    }
    if filters.is_empty() {
        // [MQTT-3.10.3-2]
        return Err(DecodeError::Protocol("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Packet::Unsubscribe(Unsubscribe { pkid, filters }))
}
