//! The data types of MQTT's wire format (3.1.1 and 5, section 1.5), shared by both decoders
//! (`v4.rs`, `v5.rs`) and the hand-written encoders (`encode.rs`): a bounds-checked reader
//! over one frame's body, and the writers of variable byte integers and length-prefixed
//! fields.
//!
//! Every read is bounds-checked; nothing here can panic on input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::packet::DecodeError;

/// The largest value a variable byte integer holds (1.5.5): the largest remaining length,
/// and the largest Subscription Identifier.
pub(crate) const MAX_VARINT: u32 = 268_435_455;

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

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u32())
    }

    /// A variable byte integer (1.5.5): at most four bytes.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
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

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
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

    /// A UTF-8 string (1.5.3 in 3.1.1, 1.5.4 in 5): well-formed [MQTT-1.5.3-1] /
    /// [MQTT-1.5.4-1] and without U+0000 [MQTT-1.5.3-2] / [MQTT-1.5.4-2]. (Surrogates cannot
    /// occur in well-formed UTF-8, so Rust's check covers them.)
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        utf8(raw)
    }

    /// A packet identifier where one is required: never 0 [MQTT-2.3.1-1] (5: [MQTT-2.2.1-3]).
    pub(crate) fn pkid(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::Malformed("packet identifier 0")),
            pkid => Ok(pkid),
        }
    }

    /// A topic filter of SUBSCRIBE or UNSUBSCRIBE: a string at least one character long
    /// [MQTT-4.7.3-1]. Its syntax (wildcard placement, `$share/`) is checked per filter by
    /// whoever answers the SUBACK, since MQTT 5 refuses a bad filter alone (0x8F).
    pub(crate) fn filter(&mut self) -> Result<String, DecodeError> {
        let filter = self.string()?;
        if filter.is_empty() {
            return Err(DecodeError::Malformed("empty topic filter"));
        }
        Ok(filter)
    }

    /// Everything left (a PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// The end of a packet: nothing may follow.
    pub(crate) fn end<T>(&self, packet: T) -> Result<T, DecodeError> {
        if self.is_empty() {
            Ok(packet)
        } else {
            Err(DecodeError::Malformed("bytes after the end of the packet"))
        }
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

/// Bytes a variable byte integer of `value` takes (`value` at most [`MAX_VARINT`]).
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a variable byte integer; `value` must be at most [`MAX_VARINT`] (callers check
/// lengths before writing anything).
pub(crate) fn put_varint(out: &mut BytesMut, value: usize) {
    let mut value = value;
    loop {
        // Truncation intended: the low seven bits.
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Writes a two-byte length and the bytes; `bytes` must be at most 65,535 long (callers
/// check lengths before writing anything).
pub(crate) fn put_binary(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    out.put_slice(bytes);
}
