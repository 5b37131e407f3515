//! Byte layout of segment headers, record frames and record bodies (see the module header
//! in `mod.rs` for the picture). Everything little-endian.

use bytes::Bytes;

use super::seal::{FLAG_SEALED, LogKeys, Unsealed, sealed_key_id};
use crate::record::{Record, Source};

/// First eight bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"EGLOGSEG";
pub(crate) const SEGMENT_VERSION: u16 = 1;
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;

/// `len: u32 | crc32c: u32 | seq: u64`, then `len` body bytes.
pub(crate) const FRAME_HEADER_LEN: usize = 16;

/// Commits end on multiples of this (see `Frame::Padding`).
pub(crate) const PAGE: u64 = 4096;

/// Version byte at the start of every body; bump it when the body layout changes.
pub(crate) const BODY_VERSION: u8 = 1;
const FLAG_SOURCE_MASK: u8 = 0x03;
/// The values of the source bits.
const SOURCE_MQTT: u8 = 1;
const SOURCE_COAP: u8 = 2;
const FLAG_KEY: u8 = 0x04;
const FLAG_HEADERS: u8 = 0x08;
/// A receipt follows the headers: what the listener needs to recognise a retransmission of
/// this message after a restart (`ingest::receipts`). Opaque to the log.
const FLAG_RECEIPT: u8 = 0x20;
/// Flag bits a version-1 reader understands; anything else means a newer writer.
const FLAG_KNOWN: u8 = FLAG_SOURCE_MASK | FLAG_KEY | FLAG_HEADERS | FLAG_RECEIPT;

/// Smallest possible body: version, flags, a one-byte time and three empty strings.
pub(crate) const MIN_BODY_LEN: usize = 6;

/// The segment header: which sequence number the segment starts at and when it was created
/// (the file name repeats `first_seq`, so a damaged header costs nothing but the time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub first_seq: u64,
    pub created_ms: i64,
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = header_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` if the magic, version or checksum is wrong.
    pub(crate) fn decode(b: &[u8]) -> Option<SegmentHeader> {
        if b.len() < SEGMENT_HEADER_LEN || b[0..8] != SEGMENT_MAGIC {
            return None;
        }
        if u16::from_le_bytes([b[8], b[9]]) != SEGMENT_VERSION {
            return None;
        }
        if u32::from_le_bytes(b[12..16].try_into().ok()?) != header_crc(b) {
            return None;
        }
        Some(SegmentHeader {
            first_seq: u64::from_le_bytes(b[16..24].try_into().ok()?),
            created_ms: i64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }
}

fn header_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..12]), &b[16..32])
}

/// Body length of `record` with `receipt` (empty: none) once encoded.
pub(crate) fn body_len(record: &Record, receipt: &[u8]) -> usize {
    let mut n = 2 + varint_len(zigzag(record.received_ms));
    if !receipt.is_empty() {
        n += varint_len(receipt.len() as u64) + receipt.len();
    }
    for s in [&record.device, &record.origin, &record.kafka_topic] {
        n += varint_len(s.len() as u64) + s.len();
    }
    if let Some(key) = &record.key {
        n += varint_len(key.len() as u64) + key.len();
    }
    if !record.headers.is_empty() {
        n += varint_len(record.headers.len() as u64);
        for (name, value) in &record.headers {
            n += varint_len(name.len() as u64) + name.len();
            n += varint_len(value.len() as u64) + value.len();
        }
    }
    n + record.payload.len()
}

/// Appends one whole frame for `record` and `receipt` (whose body is `body_len` bytes) to
/// `out`.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    seq: u64,
    record: &Record,
    receipt: &[u8],
    body_len: usize,
) {
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    put_body(out, record, receipt);
    debug_assert_eq!(out.len() - start, FRAME_HEADER_LEN + body_len);
    let crc = frame_crc(&out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends one whole frame holding `body`, already encoded (a sealed body).
pub(crate) fn encode_frame_of(out: &mut Vec<u8>, seq: u64, body: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(body);
    let crc = frame_crc(&out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The body of `record` and `receipt` alone, as `encode_frame` writes it.
pub(crate) fn encode_body(record: &Record, receipt: &[u8], body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body_len);
    put_body(&mut out, record, receipt);
    out
}

fn put_body(out: &mut Vec<u8>, record: &Record, receipt: &[u8]) {
    let mut flags = match record.source {
        Source::Mqtt => SOURCE_MQTT,
        Source::Coap => SOURCE_COAP,
    };
    if record.key.is_some() {
        flags |= FLAG_KEY;
    }
    if !record.headers.is_empty() {
        flags |= FLAG_HEADERS;
    }
    if !receipt.is_empty() {
        flags |= FLAG_RECEIPT;
    }
    out.push(BODY_VERSION);
    out.push(flags);
    put_varint(out, zigzag(record.received_ms));
    for s in [&record.device, &record.origin, &record.kafka_topic] {
        put_bytes(out, s.as_bytes());
    }
    if let Some(key) = &record.key {
        put_bytes(out, key);
    }
    if !record.headers.is_empty() {
        put_varint(out, record.headers.len() as u64);
        for (name, value) in &record.headers {
            put_bytes(out, name.as_bytes());
            put_bytes(out, value);
        }
    }
    if !receipt.is_empty() {
        put_bytes(out, receipt);
    }
    out.extend_from_slice(&record.payload);
}

/// Covers the length, the sequence number and the body: a flipped length is caught too.
fn frame_crc(frame: &[u8]) -> u32 {
    let c = crc32c::crc32c(&frame[0..4]);
    crc32c::crc32c_append(c, &frame[8..])
}

/// What the bytes at a position hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole, checksummed frame of `len` bytes (header included).
    Valid { seq: u64, len: usize },
    /// The buffer ends before the frame does (a torn tail, or read more).
    Incomplete { needed: usize },
    /// Zeros from a zero length field up to the next `PAGE` boundary of the file: the
    /// commit thread pads large commits so the next commit starts on a fresh page instead
    /// of rewriting the partly filled one (see `writer::PAD_MIN_COMMIT`).
    Padding { len: usize },
    /// Not a frame: bad length or checksum.
    Invalid,
}

/// Checks the frame at the start of `buf`; `max_body` bounds a plausible length.
pub(crate) fn check_frame(buf: &[u8], max_body: usize) -> Frame {
    if buf.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete {
            needed: FRAME_HEADER_LEN,
        };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(MIN_BODY_LEN..=max_body).contains(&len) {
        return Frame::Invalid;
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Frame::Incomplete { needed: total };
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc != frame_crc(&buf[..total]) {
        return Frame::Invalid;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[8..16]);
    Frame::Valid {
        seq: u64::from_le_bytes(seq),
        len: total,
    }
}

/// Decodes a checksummed body, opening it first if it is sealed. `Corrupt` means a body
/// this version cannot read (a newer writer or damage the checksum missed): the caller counts
/// it as corrupt. `UnknownKey` means a sealed body whose key is not configured: the record is
/// fine, and must wait for its key.
pub(crate) fn decode_body(body: &Bytes, keys: Option<&LogKeys>) -> Result<Record, Unsealed> {
    decode_with_receipt(body, keys).map(|(record, _)| record)
}

/// [`decode_body`], with the record's receipt if it carries one.
pub(crate) fn decode_with_receipt(
    body: &Bytes,
    keys: Option<&LogKeys>,
) -> Result<(Record, Option<Bytes>), Unsealed> {
    if body.get(1).is_some_and(|flags| flags & FLAG_SEALED != 0) {
        let Some(keys) = keys else {
            return Err(sealed_key_id(body).map_or(Unsealed::Corrupt, Unsealed::UnknownKey));
        };
        let plain = keys.open(body)?;
        // A sealed body holds a plain one, never another sealed one.
        if plain.get(1).is_some_and(|flags| flags & FLAG_SEALED != 0) {
            return Err(Unsealed::Corrupt);
        }
        return decode_plain(&plain).ok_or(Unsealed::Corrupt);
    }
    decode_plain(body).ok_or(Unsealed::Corrupt)
}

fn decode_plain(body: &Bytes) -> Option<(Record, Option<Bytes>)> {
    let mut r = Cursor { buf: body, pos: 0 };
    if r.u8()? != BODY_VERSION {
        return None;
    }
    let flags = r.u8()?;
    if flags & !FLAG_KNOWN != 0 {
        return None;
    }
    let source = match flags & FLAG_SOURCE_MASK {
        SOURCE_MQTT => Source::Mqtt,
        SOURCE_COAP => Source::Coap,
        _ => return None,
    };
    let received_ms = unzigzag(r.varint()?);
    let device = r.string()?;
    let origin = r.string()?;
    let kafka_topic = r.string()?;
    let key = if flags & FLAG_KEY != 0 {
        Some(r.bytes()?)
    } else {
        None
    };
    let mut headers = Vec::new();
    if flags & FLAG_HEADERS != 0 {
        let n = r.varint()?;
        for _ in 0..n {
            let name = r.string()?;
            let value = r.bytes()?;
            headers.push((name, value));
        }
    }
    let receipt = if flags & FLAG_RECEIPT != 0 {
        Some(r.bytes()?)
    } else {
        None
    };
    let payload = body.slice(r.pos..);
    let record = Record {
        source,
        received_ms,
        device,
        origin,
        kafka_topic,
        key,
        headers,
        payload,
    };
    Some((record, receipt))
}

struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let n = usize::try_from(self.varint()?).ok()?;
        let end = self.pos.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Some(b)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            source: Source::Coap,
            received_ms: 1_764_000_000_123,
            device: "dev-1".into(),
            origin: "/sensors/t".into(),
            kafka_topic: "telemetry".into(),
            key: Some(Bytes::from_static(b"k")),
            headers: vec![("qos".into(), Bytes::from_static(b"1"))],
            payload: Bytes::from(vec![7u8; 300]),
        }
    }

    #[test]
    fn frame_round_trip() {
        for rec in [
            sample(),
            Record {
                key: None,
                headers: vec![],
                received_ms: -5,
                source: Source::Mqtt,
                ..sample()
            },
        ] {
            let mut out = Vec::new();
            let n = body_len(&rec, &[]);
            encode_frame(&mut out, 42, &rec, &[], n);
            assert_eq!(out.len(), FRAME_HEADER_LEN + n);
            assert_eq!(
                check_frame(&out, 1 << 20),
                Frame::Valid {
                    seq: 42,
                    len: out.len()
                }
            );
            let body = Bytes::from(out).slice(FRAME_HEADER_LEN..);
            assert_eq!(decode_body(&body, None).ok(), Some(rec));
        }
    }

    #[test]
    fn a_receipt_rides_in_the_body_and_readers_skip_it() {
        for rec in [
            sample(),
            Record {
                key: None,
                headers: vec![],
                ..sample()
            },
        ] {
            let receipt = b"\x01client-7\x00\x2a";
            let mut out = Vec::new();
            let n = body_len(&rec, receipt);
            encode_frame(&mut out, 9, &rec, receipt, n);
            assert_eq!(out.len(), FRAME_HEADER_LEN + n);
            let body = Bytes::from(out).slice(FRAME_HEADER_LEN..);
            assert_eq!(body[1] & FLAG_RECEIPT, FLAG_RECEIPT);
            // The forwarder's decode sees the record alone, payload untouched.
            assert_eq!(decode_body(&body, None).ok(), Some(rec.clone()));
            let (back, got) = decode_with_receipt(&body, None).expect("decodes");
            assert_eq!(back, rec);
            assert_eq!(got.as_deref(), Some(&receipt[..]));
        }
    }

    #[test]
    fn a_body_written_before_receipts_existed_still_reads() {
        // Bytes as the previous build wrote them (flags 0x0e: CoAP, key, headers).
        let rec = sample();
        let mut out = Vec::new();
        encode_frame(&mut out, 3, &rec, &[], body_len(&rec, &[]));
        let body = Bytes::from(out).slice(FRAME_HEADER_LEN..);
        assert_eq!(body[1], 0x0e);
        let (back, receipt) = decode_with_receipt(&body, None).expect("decodes");
        assert_eq!((back, receipt), (rec, None));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut out = Vec::new();
        let rec = sample();
        encode_frame(&mut out, 1, &rec, &[], body_len(&rec, &[]));
        for i in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(!matches!(
                check_frame(&bad, 1 << 20),
                Frame::Valid { seq: 1, .. }
            ));
        }
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            let b = Bytes::from(out);
            assert_eq!(Cursor { buf: &b, pos: 0 }.varint(), Some(v));
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn segment_header_round_trip() {
        let h = SegmentHeader {
            first_seq: 9,
            created_ms: 123,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Some(h));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), None);
    }
}
