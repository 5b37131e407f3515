//! The wire: one datagram checked and parsed into a message, and responses encoded.
//!
//! coap-lite's parser skips some of RFC 7252's format rules (version, a payload marker with
//! no payload, bytes after an Empty message), so [`parse`] checks the datagram's framing
//! first, the way a frame is checked for completeness before it is parsed, and hands only a
//! well-formed datagram to `Packet::from_bytes`. Its parse of hostile input was read for
//! panics: indexing is bounds-checked, option numbers and lengths use checked arithmetic, and
//! the token length is checked before it is used; the checks here make that belt and braces.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};

/// RFC 7252 response codes the gateway sends, as their wire byte (class << 5 | detail).
pub(super) mod code {
    pub const CHANGED: u8 = 0x44; // 2.04
    pub const CONTINUE: u8 = 0x5F; // 2.31
    pub const BAD_REQUEST: u8 = 0x80; // 4.00
    pub const UNAUTHORIZED: u8 = 0x81; // 4.01
    pub const BAD_OPTION: u8 = 0x82; // 4.02
    pub const NOT_FOUND: u8 = 0x84; // 4.04
    pub const METHOD_NOT_ALLOWED: u8 = 0x85; // 4.05
    pub const INCOMPLETE: u8 = 0x88; // 4.08
    pub const TOO_LARGE: u8 = 0x8D; // 4.13
    pub const INTERNAL_ERROR: u8 = 0xA0; // 5.00
    pub const UNAVAILABLE: u8 = 0xA3; // 5.03
    pub const PROXYING_NOT_SUPPORTED: u8 = 0xA5; // 5.05

    /// `2.04`-style label, a fixed small set (metrics label values).
    pub fn label(code: u8) -> &'static str {
        match code {
            CHANGED => "2.04",
            CONTINUE => "2.31",
            BAD_REQUEST => "4.00",
            UNAUTHORIZED => "4.01",
            BAD_OPTION => "4.02",
            NOT_FOUND => "4.04",
            METHOD_NOT_ALLOWED => "4.05",
            INCOMPLETE => "4.08",
            TOO_LARGE => "4.13",
            INTERNAL_ERROR => "5.00",
            UNAVAILABLE => "5.03",
            PROXYING_NOT_SUPPORTED => "5.05",
            _ => "other",
        }
    }
}

/// Option numbers the gateway reads (coap-lite names most of them, not Request-Tag).
pub(super) mod opt {
    pub const URI_HOST: u16 = 3;
    pub const URI_PORT: u16 = 7;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;
    pub const NO_RESPONSE: u16 = 258;
    pub const REQUEST_TAG: u16 = 292;

    /// Critical options (odd numbers) the gateway understands. Any other critical option in
    /// a request is answered 4.02 (RFC 7252 5.4.1). If-Match, If-None-Match and OSCORE are
    /// critical and deliberately absent: the telemetry resource cannot honour them.
    pub fn understood_critical(number: u16) -> bool {
        matches!(
            number,
            URI_HOST
                | URI_PORT
                | URI_PATH
                | URI_QUERY
                | ACCEPT
                | BLOCK2
                | BLOCK1
                | PROXY_URI
                | PROXY_SCHEME
        )
    }
}

/// Why a datagram was not a message, and whether RFC 7252 wants a Reset for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Malformed {
    /// Fixed label for metrics and logs.
    pub kind: &'static str,
    /// The message id to reject with a Reset: set for a confirmable message whose header
    /// could be read (RFC 7252 4.2); anything else is silently ignored (4.3).
    pub reset: Option<u16>,
}

/// Checks the datagram's framing (RFC 7252 section 3) and parses it.
pub(super) fn parse(buf: &[u8]) -> Result<Packet, Malformed> {
    check_format(buf)?;
    Packet::from_bytes(buf).map_err(|_| Malformed {
        kind: "format",
        reset: reset_for(buf),
    })
}

/// The message id to Reset, if the datagram is a readable CoAP 1 confirmable message.
fn reset_for(buf: &[u8]) -> Option<u16> {
    match buf {
        [first, _, hi, lo, ..] if first >> 6 == 1 && (first >> 4) & 3 == 0 => {
            Some(u16::from_be_bytes([*hi, *lo]))
        }
        _ => None,
    }
}

fn check_format(buf: &[u8]) -> Result<(), Malformed> {
    let bad = |kind| Malformed {
        kind,
        reset: reset_for(buf),
    };
    let [first, code, ..] = buf else {
        return Err(Malformed {
            kind: "short",
            reset: None,
        });
    };
    if buf.len() < 4 {
        return Err(Malformed {
            kind: "short",
            reset: None,
        });
    }
    if first >> 6 != 1 {
        // Unknown version numbers MUST be silently ignored.
        return Err(Malformed {
            kind: "version",
            reset: None,
        });
    }
    let tkl = usize::from(first & 0x0F);
    if tkl > 8 {
        return Err(bad("token_length"));
    }
    if *code == 0 {
        // An Empty message is the 4-byte header and nothing else.
        return if buf.len() == 4 && tkl == 0 {
            Ok(())
        } else {
            Err(bad("empty_with_data"))
        };
    }
    let mut idx = 4 + tkl;
    if idx > buf.len() {
        return Err(bad("token_length"));
    }
    let mut number: u32 = 0;
    while let Some(&byte) = buf.get(idx) {
        if byte == 0xFF {
            // A payload marker followed by a zero-length payload is a format error.
            return if idx + 1 < buf.len() {
                Ok(())
            } else {
                Err(bad("empty_payload"))
            };
        }
        idx += 1;
        let (delta, next) = extended(byte >> 4, buf, idx).ok_or(bad("option"))?;
        idx = next;
        let (length, next) = extended(byte & 0x0F, buf, idx).ok_or(bad("option"))?;
        idx = next;
        number += delta;
        if number > u32::from(u16::MAX) {
            return Err(bad("option"));
        }
        idx = idx
            .checked_add(length as usize)
            .filter(|&end| end <= buf.len())
            .ok_or(bad("option"))?;
    }
    Ok(())
}

/// An option delta or length nibble with its extended bytes: (value, next index).
fn extended(nibble: u8, buf: &[u8], idx: usize) -> Option<(u32, usize)> {
    match nibble {
        0..=12 => Some((u32::from(nibble), idx)),
        13 => buf.get(idx).map(|&b| (u32::from(b) + 13, idx + 1)),
        14 => {
            let hi = *buf.get(idx)?;
            let lo = *buf.get(idx + 1)?;
            Some((u32::from(u16::from_be_bytes([hi, lo])) + 269, idx + 2))
        }
        _ => None,
    }
}

/// Decodes an unsigned option value (RFC 7252 3.2: big-endian, leading zeros allowed).
pub(super) fn uint(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(value.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

/// Encodes an unsigned option value in the fewest bytes.
pub(super) fn uint_bytes(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    bytes[skip..].to_vec()
}

/// The value of a Block1 or Block2 option (RFC 7959 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Block {
    pub num: u32,
    pub more: bool,
    /// Size exponent: the block is 2^(szx + 4) bytes.
    pub szx: u8,
}

impl Block {
    /// None for a value over 3 bytes or SZX 7 (reserved; BERT is for CoAP over TCP).
    pub fn decode(value: &[u8]) -> Option<Block> {
        if value.len() > 3 {
            return None;
        }
        let v = uint(value)?;
        let szx = (v & 0x7) as u8;
        if szx == 7 {
            return None;
        }
        Some(Block {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx,
        })
    }

    pub fn encode(self) -> Vec<u8> {
        uint_bytes((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }

    pub fn size(self) -> usize {
        1 << (usize::from(self.szx) + 4)
    }

    /// Where this block starts in the body.
    pub fn offset(self) -> u64 {
        u64::from(self.num) << (u32::from(self.szx) + 4)
    }
}

/// The first value of an option, raw.
pub(super) fn first(packet: &Packet, number: u16) -> Option<&[u8]> {
    packet
        .get_first_option(CoapOption::from(number))
        .map(Vec::as_slice)
}

/// RFC 7967 No-Response value of a request (0: send every answer).
pub(super) fn no_response(packet: &Packet) -> u32 {
    first(packet, opt::NO_RESPONSE).and_then(uint).unwrap_or(0)
}

/// Whether a No-Response value asks to suppress an answer of `code`'s class.
pub(super) fn suppresses(no_response: u32, code: u8) -> bool {
    let bit = match code >> 5 {
        2 => 0x02,
        4 => 0x08,
        5 => 0x10,
        _ => 0,
    };
    no_response & bit != 0
}

/// A response (or an empty ACK/RST) to encode.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub kind: MessageType,
    /// 0 for an empty message.
    pub code: u8,
    pub mid: u16,
    pub token: Vec<u8>,
    /// (number, value), any order.
    pub options: Vec<(u16, Vec<u8>)>,
    /// Short fixed diagnostic text for errors; never echoes the request (no amplification).
    pub payload: &'static str,
}

impl Reply {
    pub fn empty(kind: MessageType, mid: u16) -> Reply {
        Reply {
            kind,
            code: 0,
            mid,
            token: Vec::new(),
            options: Vec::new(),
            payload: "",
        }
    }

    /// The encoded datagram. Tokens are at most 8 bytes (checked on receive), so coap-lite's
    /// token-length assertion cannot fire.
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut packet = Packet::new();
        packet.header.set_version(1);
        packet.header.set_type(self.kind);
        packet.header.code = MessageClass::from(self.code);
        packet.header.message_id = self.mid;
        if self.token.len() > 8 {
            return None;
        }
        packet.set_token(self.token.clone());
        for (number, value) in &self.options {
            packet.add_option(CoapOption::from(*number), value.clone());
        }
        if self.code != 0 {
            packet.payload = self.payload.as_bytes().to_vec();
        }
        packet.to_bytes_unlimited().ok()
    }
}
