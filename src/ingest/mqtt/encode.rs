//! Server-to-client packets written by hand: PUBLISH, SUBACK, UNSUBACK and PUBREL, both
//! versions. (CONNACK, PUBACK, PUBREC, PUBCOMP and PINGRESP go through rumqttc's codecs in
//! `packet.rs`; DISCONNECT is in `v5.rs`.)
//!
//! PUBLISH is the fan-out hot path: one message goes to every matching subscriber. So
//! [`OutPublish`] borrows the message's fields (nothing is copied per subscriber but into the
//! subscriber's write buffer), and [`encode_publish`] measures the whole packet first, then
//! reserves once and writes each field straight into the buffer, with no intermediate
//! allocation. What cannot be expressed (a field over 65,535 bytes, a packet over 256 MiB)
//! is refused before anything is written.

use bytes::{BufMut, BytesMut};

use super::packet::Version;
use super::wire::{MAX_VARINT, put_binary, put_varint, varint_len};

/// A PUBLISH from the server to one subscriber, borrowing the message it carries. The
/// subscriber's own fields (`dup`, `qos`, `retain`, `pkid`, `subscription_ids`,
/// `message_expiry`) are set per delivery; the rest point into the message shared by all.
///
/// The MQTT 5 fields are ignored for 3.1.1. Topic aliases are never sent, so `topic` is
/// always the full topic name.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutPublish<'a> {
    /// Must be false for QoS 0 [MQTT-3.3.1-2].
    pub dup: bool,
    /// 0..=2.
    pub qos: u8,
    pub retain: bool,
    /// A topic name (not empty, no wildcards): the broker's to ensure; only its length is
    /// checked here.
    pub topic: &'a str,
    /// 0 for QoS 0; not 0 for QoS 1 and 2.
    pub pkid: u16,
    pub payload: &'a [u8],
    /// MQTT 5: the identifiers of the subscriptions that matched (each 1..=268,435,455),
    /// one property each.
    pub subscription_ids: &'a [u32],
    /// MQTT 5: the seconds of life the message has left, if it expires.
    pub message_expiry: Option<u32>,
    /// MQTT 5 Payload Format Indicator, forwarded unaltered [MQTT-3.3.2-4].
    pub payload_format_utf8: bool,
    pub content_type: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    /// Forwarded unaltered, in order [MQTT-3.3.2-17] [MQTT-3.3.2-18].
    pub user_properties: &'a [(String, String)],
}

/// Why a server packet could not be encoded; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field over 65,535 bytes, or a packet over 268,435,455 bytes of
    /// remaining length.
    #[error("too large for an MQTT packet: {0}")]
    TooLarge(&'static str),
    /// Fields the protocol forbids together (QoS 3, a packet id on QoS 0, none on QoS 1 or
    /// 2, DUP on QoS 0, subscription identifier 0 or over the maximum).
    #[error("not a valid PUBLISH: {0}")]
    Invalid(&'static str),
    /// Larger than the client's Maximum Packet Size ([`encode_publish_within`]).
    #[error("larger than the client's maximum packet size")]
    OverClientMaximum,
}

/// Property identifiers of a server's PUBLISH (MQTT 5, 2.2.2.2).
mod id {
    pub const PAYLOAD_FORMAT: u8 = 1;
    pub const MESSAGE_EXPIRY: u8 = 2;
    pub const CONTENT_TYPE: u8 = 3;
    pub const RESPONSE_TOPIC: u8 = 8;
    pub const CORRELATION_DATA: u8 = 9;
    pub const SUBSCRIPTION_ID: u8 = 11;
    pub const USER_PROPERTY: u8 = 38;
}

/// The sizes [`encode_publish`] writes, measured before anything is written.
struct Layout {
    /// The remaining length (everything after the fixed header).
    remaining: usize,
    /// The property section's length (MQTT 5; 0 for 3.1.1, which has none).
    properties: usize,
}

/// A string or binary field: two bytes of length, then the bytes.
fn field(len: usize, what: &'static str) -> Result<usize, EncodeError> {
    if len > usize::from(u16::MAX) {
        return Err(EncodeError::TooLarge(what));
    }
    Ok(2 + len)
}

impl OutPublish<'_> {
    fn layout(&self, version: Version) -> Result<Layout, EncodeError> {
        if self.qos > 2 {
            return Err(EncodeError::Invalid("QoS 3"));
        }
        if (self.qos == 0) != (self.pkid == 0) {
            return Err(EncodeError::Invalid(
                "packet id not 0 exactly when QoS is 0",
            ));
        }
        if self.dup && self.qos == 0 {
            return Err(EncodeError::Invalid("DUP on QoS 0"));
        }
        let mut remaining = field(self.topic.len(), "topic")?;
        if self.qos > 0 {
            remaining += 2;
        }
        let mut properties = 0;
        if version == Version::V5 {
            for &sid in self.subscription_ids {
                if sid == 0 || sid > MAX_VARINT {
                    return Err(EncodeError::Invalid("subscription identifier out of range"));
                }
                properties += 1 + varint_len(sid as usize);
            }
            if self.message_expiry.is_some() {
                properties += 1 + 4;
            }
            if self.payload_format_utf8 {
                properties += 1 + 1;
            }
            if let Some(content_type) = self.content_type {
                properties += 1 + field(content_type.len(), "content type")?;
            }
            if let Some(topic) = self.response_topic {
                properties += 1 + field(topic.len(), "response topic")?;
            }
            if let Some(data) = self.correlation_data {
                properties += 1 + field(data.len(), "correlation data")?;
            }
            for (name, value) in self.user_properties {
                properties += 1
                    + field(name.len(), "user property name")?
                    + field(value.len(), "user property value")?;
            }
            // Checked before its own varint is measured (large user properties could push it
            // over the maximum on their own).
            if properties > MAX_VARINT as usize {
                return Err(EncodeError::TooLarge("properties"));
            }
            remaining += varint_len(properties) + properties;
        }
        remaining = remaining
            .checked_add(self.payload.len())
            .filter(|r| *r <= MAX_VARINT as usize)
            .ok_or(EncodeError::TooLarge("packet"))?;
        Ok(Layout {
            remaining,
            properties,
        })
    }

    /// The whole packet's length for `version`, fixed header included: what to compare with
    /// the client's Maximum Packet Size, since a larger packet must not be sent to it
    /// [MQTT-3.1.2-24] (it is discarded as if it had been sent, [MQTT-3.1.2-25]).
    pub fn packet_len(&self, version: Version) -> Result<usize, EncodeError> {
        let layout = self.layout(version)?;
        Ok(1 + varint_len(layout.remaining) + layout.remaining)
    }
}

/// Writes `publish` as `version` at the end of `out`. Returns the bytes written; on an error
/// nothing was written. (The gateway itself always has a client's maximum to respect.)
#[cfg(any(test, feature = "fuzz"))]
pub fn encode_publish(
    version: Version,
    publish: &OutPublish<'_>,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    encode_publish_within(version, publish, usize::MAX, out)
}

/// [`encode_publish`] for a client that takes packets of at most `max` bytes: a larger one
/// is refused with [`EncodeError::OverClientMaximum`] and nothing written [MQTT-3.1.2-24].
/// The packet is measured once, for the check and the writing both (the fan-out encodes one
/// per delivery).
pub fn encode_publish_within(
    version: Version,
    publish: &OutPublish<'_>,
    max: usize,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let layout = publish.layout(version)?;
    let total = 1 + varint_len(layout.remaining) + layout.remaining;
    if total > max {
        return Err(EncodeError::OverClientMaximum);
    }
    out.reserve(total);
    out.put_u8(0x30 | (u8::from(publish.dup) << 3) | (publish.qos << 1) | u8::from(publish.retain));
    put_varint(out, layout.remaining);
    put_binary(out, publish.topic.as_bytes());
    if publish.qos > 0 {
        out.put_u16(publish.pkid);
    }
    if version == Version::V5 {
        put_varint(out, layout.properties);
        for &sid in publish.subscription_ids {
            out.put_u8(id::SUBSCRIPTION_ID);
            put_varint(out, sid as usize);
        }
        if let Some(expiry) = publish.message_expiry {
            out.put_u8(id::MESSAGE_EXPIRY);
            out.put_u32(expiry);
        }
        if publish.payload_format_utf8 {
            out.put_u8(id::PAYLOAD_FORMAT);
            out.put_u8(1);
        }
        if let Some(content_type) = publish.content_type {
            out.put_u8(id::CONTENT_TYPE);
            put_binary(out, content_type.as_bytes());
        }
        if let Some(topic) = publish.response_topic {
            out.put_u8(id::RESPONSE_TOPIC);
            put_binary(out, topic.as_bytes());
        }
        if let Some(data) = publish.correlation_data {
            out.put_u8(id::CORRELATION_DATA);
            put_binary(out, data);
        }
        for (name, value) in publish.user_properties {
            out.put_u8(id::USER_PROPERTY);
            put_binary(out, name.as_bytes());
            put_binary(out, value.as_bytes());
        }
    }
    out.put_slice(publish.payload);
    Ok(total)
}

/// SUBACK (3.9): one code per filter, mapped to what the version can say (see
/// [`super::packet::Outgoing::SubAck`]). False, with nothing written, if the codes cannot fit
/// one packet.
pub(super) fn suback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) -> bool {
    let code = |c: u8| match (version, c) {
        (_, 0x00..=0x02) => c,
        (Version::V5, 0x80 | 0x83 | 0x87 | 0x8f | 0x91 | 0x97 | 0x9e | 0xa1 | 0xa2) => c,
        _ => 0x80,
    };
    ack_with_codes(0x90, version, pkid, codes, code, out)
}

/// UNSUBACK (3.11): MQTT 5 one code per filter; 3.1.1 just the packet id.
pub(super) fn unsuback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) -> bool {
    match version {
        Version::V4 => ack_with_codes(0xb0, version, pkid, &[], |c| c, out),
        Version::V5 => {
            let code = |c: u8| match c {
                0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8f | 0x91 => c,
                _ => 0x80,
            };
            ack_with_codes(0xb0, version, pkid, codes, code, out)
        }
    }
}

/// SUBACK and UNSUBACK: packet id, an empty property section (MQTT 5), the codes.
fn ack_with_codes(
    byte1: u8,
    version: Version,
    pkid: u16,
    codes: &[u8],
    code: impl Fn(u8) -> u8,
    out: &mut BytesMut,
) -> bool {
    let properties = usize::from(version == Version::V5);
    let remaining = 2 + properties + codes.len();
    if remaining > MAX_VARINT as usize {
        return false;
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(byte1);
    put_varint(out, remaining);
    out.put_u16(pkid);
    if version == Version::V5 {
        out.put_u8(0);
    }
    for &c in codes {
        out.put_u8(code(c));
    }
    true
}

/// PUBREL (3.6) from the server: MQTT 5 says 0x92 when the PUBREC's packet id was not in
/// flight; success is the short form (no reason code), as 3.1.1 always is.
pub(super) fn pubrel(version: Version, pkid: u16, found: bool, out: &mut BytesMut) -> bool {
    out.put_u8(0x62);
    if version == Version::V5 && !found {
        out.put_u8(3);
        out.put_u16(pkid);
        out.put_u8(0x92);
    } else {
        out.put_u8(2);
        out.put_u16(pkid);
    }
    true
}
