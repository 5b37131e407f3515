//! The Block1 assembler (RFC 7959): block-wise uploads put back together, strictly.
//!
//! coap-lite's block-wise helper is not used for uploads (docs/ARCHITECTURE.md says why). Here:
//!
//! - a transfer is keyed by the peer, the request URI (path and query) and the Request-Tag
//!   (RFC 9175; an absent tag is a value of its own). Not by token: RFC 7959 2.4 lets each
//!   block travel with a new token, and libcoap does so;
//! - blocks are accepted in order only, by byte offset (NUM × size), so a server-chosen
//!   smaller size (2.3) works. A block at any other offset ends the transfer with 4.08,
//!   except a repeat of the last accepted block (a network duplicate), answered 2.31 again;
//! - a change of block size after the first block ends the transfer with 4.08;
//! - a body that would exceed `max_body` ends it with 4.13 (the caller adds Size1), as does
//!   a Size1 in the first block announcing more;
//! - a transfer idle for `timeout` is dropped; its next block then gets 4.08;
//! - only a completed body leaves the assembler, once. After the record is stored the
//!   caller marks the transfer done, and a retransmitted final block is answered 2.04
//!   again without a second record.
//!
//! Memory: at most `max_transfers` partial bodies of at most `max_body` bytes each.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::message::Block;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct TransferKey {
    pub peer: SocketAddr,
    /// Uri-Path and Uri-Query values, each length-prefixed so segments cannot run together.
    pub uri: Vec<u8>,
    pub request_tag: Option<Vec<u8>>,
}

/// What the caller answers to one block.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// 2.31 Continue with this Block1 value.
    Continue(Block),
    /// The body is complete: store it, then answer 2.04 with this Block1 value.
    Complete { body: Vec<u8>, block: Block },
    /// The final block of a transfer already stored: 2.04 with this Block1, no new record.
    Repeat(Block),
    /// 4.08 Request Entity Incomplete.
    Incomplete,
    /// 4.13 Request Entity Too Large (with Size1).
    TooLarge,
    /// Too many transfers at once: 5.03.
    Busy,
    /// A non-final block that is not exactly one block long: 4.00.
    BadBlock,
}

struct Transfer {
    body: Vec<u8>,
    /// Block size exponent agreed for the rest of the transfer.
    szx: u8,
    /// The last block accepted, to recognise a duplicate of it.
    last: Block,
    touched: Instant,
}

pub(super) struct Assembler {
    transfers: HashMap<TransferKey, Transfer>,
    /// Completed, stored transfers: their final block, to recognise a retransmission.
    done: HashMap<TransferKey, (Block, Instant)>,
    done_order: VecDeque<TransferKey>,
    max_transfers: usize,
    max_body: usize,
    max_szx: u8,
    timeout: Duration,
}

impl Assembler {
    pub fn new(max_transfers: usize, max_body: usize, max_szx: u8, timeout: Duration) -> Self {
        Assembler {
            transfers: HashMap::new(),
            done: HashMap::new(),
            done_order: VecDeque::new(),
            max_transfers,
            max_body,
            max_szx: max_szx.min(6),
            timeout,
        }
    }

    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    /// Takes one block. `size1` is the total size the client announced, if any.
    pub fn offer(
        &mut self,
        key: &TransferKey,
        block: Block,
        payload: &[u8],
        size1: Option<u32>,
        now: Instant,
    ) -> Outcome {
        if block.num == 0 {
            return self.start(key, block, payload, size1, now);
        }
        let Some(transfer) = self.transfers.get_mut(key) else {
            return match self.done.get(key) {
                Some((last, _)) if *last == block => Outcome::Repeat(block),
                _ => Outcome::Incomplete,
            };
        };
        if transfer.last == block {
            // The same block again under a new message id (a duplicate from the network).
            return Outcome::Continue(Block {
                szx: transfer.szx,
                ..block
            });
        }
        let outcome = if block.szx != transfer.szx || block.offset() != transfer.body.len() as u64 {
            Outcome::Incomplete
        } else if block.more && payload.len() != block.size() {
            Outcome::BadBlock
        } else if transfer.body.len() + payload.len() > self.max_body {
            Outcome::TooLarge
        } else {
            transfer.body.extend_from_slice(payload);
            transfer.last = block;
            transfer.touched = now;
            if block.more {
                return Outcome::Continue(block);
            }
            let body = std::mem::take(&mut transfer.body);
            Outcome::Complete { body, block }
        };
        self.transfers.remove(key);
        outcome
    }

    fn start(
        &mut self,
        key: &TransferKey,
        block: Block,
        payload: &[u8],
        size1: Option<u32>,
        now: Instant,
    ) -> Outcome {
        // Block 0 always starts afresh (a client restarting its upload).
        self.transfers.remove(key);
        let announced = size1.map_or(0, |s| s as usize);
        if payload.len() > self.max_body || announced > self.max_body {
            return Outcome::TooLarge;
        }
        if !block.more {
            return Outcome::Complete {
                body: payload.to_vec(),
                block,
            };
        }
        if payload.len() != block.size() {
            return Outcome::BadBlock;
        }
        if self.transfers.len() >= self.max_transfers {
            return Outcome::Busy;
        }
        // A client starting with bigger blocks than we take is told our size (RFC 7959 2.3);
        // the data it sent is kept, and it continues at the matching offset.
        let szx = block.szx.min(self.max_szx);
        let reply = Block {
            num: 0,
            more: true,
            szx,
        };
        self.transfers.insert(
            key.clone(),
            Transfer {
                body: payload.to_vec(),
                szx,
                last: Block { szx, ..block },
                touched: now,
            },
        );
        Outcome::Continue(reply)
    }

    /// Marks a completed transfer as stored, so a retransmitted final block gets 2.04 again.
    pub fn stored(&mut self, key: TransferKey, last: Block, now: Instant) {
        while self.done.len() >= self.max_transfers.max(16) * 4 {
            match self.done_order.pop_front() {
                Some(old) => {
                    self.done.remove(&old);
                }
                None => break,
            }
        }
        if self.done.insert(key.clone(), (last, now)).is_none() {
            self.done_order.push_back(key);
        }
    }

    /// Drops idle transfers; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let timeout = self.timeout;
        let before = self.transfers.len();
        self.transfers
            .retain(|_, t| now.saturating_duration_since(t.touched) < timeout);
        while let Some(key) = self.done_order.front() {
            match self.done.get(key) {
                Some((_, at)) if now.saturating_duration_since(*at) < timeout => break,
                _ => {
                    if let Some(key) = self.done_order.pop_front() {
                        self.done.remove(&key);
                    }
                }
            }
        }
        before - self.transfers.len()
    }
}
