//! Framing: one MQTT packet at a time off a TCP stream, with the size limit applied to the
//! fixed header *before* the body is buffered (a codec that reserves whatever a peer declares
//! lets 5 bytes reserve 256 MiB), and buffered writes of the server's packets.
//!
//! Generic over the stream, so plaintext TCP and TLS share every line above the socket.

use bytes::{Buf, BytesMut};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use tokio_util::io::poll_read_buf;

use super::packet::{self, Outgoing, Version};

/// Bytes read at once, and the buffer of a busy connection, released when all is handled.
const READ_BUFFER: usize = 4096;

/// A read of at most this many bytes (an ack, a DISCONNECT, a publish or two) gets a buffer
/// of its size rounded up to a power of two, not READ_BUFFER: 10,000 devices sending their
/// DISCONNECT at once held 4 KiB each. A larger read means a busy connection, which reads
/// on into a whole READ_BUFFER without copying. Powers of two keep the sizes few, so freed
/// buffers are reused (every read's exact size had the allocator splitting and merging).
const SMALL_READ: usize = 512;

/// Write buffer when packets are queued after a flush released it: a turn's worth of acks
/// (128 PUBACKs are 512 bytes) or a few deliveries. Under 1,009 bytes because every busy
/// connection takes one per turn: glibc serves smaller requests from its per-thread cache,
/// while a larger one first consolidates the fast bins (with 2,048, `malloc_consolidate`
/// and its neighbours were 3-4 % of the gateway's CPU in `tools/bench-fanout`).
const WRITE_BUFFER: usize = 1000;

/// One complete packet, fixed header included, not yet decoded.
#[derive(Debug)]
pub struct Frame {
    raw: BytesMut,
    /// Bytes of the fixed header (2..=5); always `<= raw.len()`.
    header_len: usize,
}

impl Frame {
    pub fn byte1(&self) -> u8 {
        self.raw.first().copied().unwrap_or(0)
    }

    pub fn packet_type(&self) -> u8 {
        self.byte1() >> 4
    }

    pub fn flags(&self) -> u8 {
        self.byte1() & 0x0f
    }

    /// Variable header and payload.
    pub fn body(&self) -> &[u8] {
        self.raw.get(self.header_len..).unwrap_or(&[])
    }

    pub fn into_body(self) -> bytes::Bytes {
        let mut raw = self.raw;
        raw.advance(self.header_len.min(raw.len()));
        raw.freeze()
    }

    /// Frames bytes already in memory (tests, fuzzing): exactly one complete frame.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn parse(raw: BytesMut, limit: usize) -> Option<Frame> {
        match parse_header(&raw, limit) {
            Ok(Some((header_len, frame_len))) if frame_len == raw.len() => {
                Some(Frame { raw, header_len })
            }
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The fixed header declares a packet over the limit; nothing of it was buffered.
    #[error("packet of {declared} bytes is over the {limit}-byte limit")]
    TooLarge { declared: usize, limit: usize },
    /// The remaining length is not a valid variable byte integer.
    #[error("malformed remaining length")]
    BadLength,
    /// The peer closed the connection in the middle of a packet.
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Parses a fixed header at the start of `buf`: `Ok(None)` if more bytes are needed, else
/// the header's length and the whole frame's length, refused if over `limit`.
pub fn parse_header(buf: &[u8], limit: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let header_len = 2 + i;
            let frame_len = header_len + remaining;
            if frame_len > limit {
                return Err(FrameError::TooLarge {
                    declared: frame_len,
                    limit,
                });
            }
            return Ok(Some((header_len, frame_len)));
        }
    }
    Err(FrameError::BadLength)
}

/// A client's connection (TCP or TLS over TCP): frames in, encoded packets out. Reads and
/// writes never overlap (the session flushes between reads), so one stream serves both.
pub struct Connection<S> {
    stream: S,
    /// Bytes read but not yet framed; never grows past one frame plus one read.
    read_buf: BytesMut,
    /// Encoded packets waiting for [`Connection::flush`], so many acks share one write.
    write_buf: BytesMut,
    /// Largest frame accepted, fixed header included.
    limit: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, limit: usize) -> Connection<S> {
        Connection {
            stream,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            limit,
        }
    }

    /// Reads one complete frame. `Ok(None)` is a clean end of stream between packets.
    ///
    /// Cancel safe: bytes read stay in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some((header_len, frame_len)) = parse_header(&self.read_buf, self.limit)? {
                if self.read_buf.len() >= frame_len {
                    let raw = self.read_buf.split_to(frame_len);
                    return Ok(Some(Frame { raw, header_len }));
                }
                // Room for exactly this frame, now known to be within the limit.
                self.read_buf.reserve(frame_len - self.read_buf.len());
            }
            if self.fill().await? == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Reads what the socket has. With nothing buffered the read goes to the stack first,
    /// so a connection waiting for its next packet holds no buffer; the bytes are copied
    /// into a fresh one (of about their size, see [`SMALL_READ`]) once they are there.
    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| {
            if self.read_buf.capacity() > 0 {
                // A busy connection reads into the buffer it has, and lets it go only when
                // the socket has nothing more for now.
                if self.read_buf.capacity() == self.read_buf.len() {
                    self.read_buf.reserve(READ_BUFFER);
                }
                let read = poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf);
                if read.is_pending() && self.read_buf.is_empty() {
                    self.read_buf = BytesMut::new();
                }
                return read;
            }
            // Uninitialised: nothing to zero on each wakeup.
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_BUFFER];
            let mut read = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut self.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let got = read.filled();
                    // Nothing (the end of the stream) takes no buffer.
                    if !got.is_empty() {
                        let room = if got.len() > SMALL_READ {
                            READ_BUFFER
                        } else {
                            got.len().next_power_of_two()
                        };
                        self.read_buf.reserve(room);
                        self.read_buf.extend_from_slice(got);
                    }
                    Poll::Ready(Ok(got.len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// The next frame if it is already whole in the read buffer; never reads. Lets the
    /// session handle every packet one read brought (a subscriber's PUBACKs arrive dozens
    /// at a time) before it writes, so what they free leaves in one write, not one each.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match parse_header(&self.read_buf, self.limit)? {
            Some((header_len, frame_len)) if self.read_buf.len() >= frame_len => {
                let raw = self.read_buf.split_to(frame_len);
                Ok(Some(Frame { raw, header_len }))
            }
            _ => Ok(None),
        }
    }

    /// Queues a packet; see [`packet::encode`] for when nothing is queued.
    pub fn queue(&mut self, version: Version, packet: &Outgoing) -> bool {
        self.ready_to_write();
        packet::encode(version, packet, &mut self.write_buf)
    }

    /// The write buffer, dropped after each flush, comes back with room for a turn's worth
    /// of acks rather than growing from nothing a few bytes at a time.
    fn ready_to_write(&mut self) {
        if self.write_buf.capacity() == 0 {
            self.write_buf.reserve(WRITE_BUFFER);
        }
    }

    /// Makes room for `more` bytes about to be queued (a turn's deliveries), so the buffer
    /// is sized once rather than grown: a turn of ten 100-byte deliveries outgrew the
    /// 1,000 bytes a flush leaves and was copied into a buffer twice that size every turn.
    /// Nothing to queue takes no buffer: an idle session's turns find its mailbox empty, and
    /// a buffer made for them would never be flushed away (10,000 waiting devices held
    /// 12 MB of them in `tools/bench-downlink`).
    pub fn reserve(&mut self, more: usize) {
        if more == 0 {
            return;
        }
        if self.write_buf.capacity() == 0 {
            self.write_buf.reserve(more.max(WRITE_BUFFER));
        } else {
            self.write_buf.reserve(more);
        }
    }

    /// Queues bytes encoded elsewhere (refusals sent before a version is known).
    pub fn queue_raw(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        self.ready_to_write();
        encode(&mut self.write_buf);
    }

    /// Lets go of room made for packets that were not queued after all (a turn whose every
    /// message was too large for the client).
    pub fn release_unused(&mut self) {
        if self.write_buf.is_empty() && self.write_buf.capacity() > 0 {
            self.write_buf = BytesMut::new();
        }
    }

    pub fn has_queued(&self) -> bool {
        !self.write_buf.is_empty()
    }

    /// Writes everything queued. Cancel safe: what was not written stays queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.write_buf.has_remaining() {
            if self.stream.write_buf(&mut self.write_buf).await? == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
        }
        // All written: the buffer goes until the next packet (an idle connection keeps none).
        self.write_buf = BytesMut::new();
        self.stream.flush().await
    }

    /// Flushes, then sends FIN so the client reads everything before the close.
    pub async fn close(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.stream.shutdown().await
    }

    /// After the server's last packet: reads and discards what the client still sends, for
    /// at most `wait` and 1 MiB. Closing a socket with unread input sends a reset, and a reset
    /// can make the client drop our DISCONNECT (say, 0x95 after an oversize publish) unread.
    pub async fn linger(&mut self, wait: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        // On the heap: an array here would be part of every connection's future.
        let mut scratch = vec![0u8; 2048];
        let mut budget = 1usize << 20;
        while budget > 0 {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
                _ => break,
            }
        }
    }

    /// Bytes the read buffer can hold without growing (for tests of the size limit).
    #[cfg(test)]
    pub fn read_capacity(&self) -> usize {
        self.read_buf.capacity()
    }

    #[cfg(test)]
    pub fn write_capacity(&self) -> usize {
        self.write_buf.capacity()
    }
}
