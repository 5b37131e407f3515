//! The requests being stored and the answers owed for them: each [`Exchange`] waits in
//! `Server::storing`, in append order, until the log resolves its append; then it is answered
//! (piggybacked, or as a separate response once `separate_response_after` has passed), and its
//! slot (bounded per peer and in total) is held until the answer needs no retransmission.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;
use coap_lite::MessageType;
use tokio::time::Instant;

use super::block::TransferKey;
use super::events::{busy, separate_started};
use super::message::{self, Block, Reply, code, opt};
use super::outbox::Outgoing;
use super::request::{Refusal, rejection};
use super::server::Server;
use crate::buffer::{AppendError, Durable};
use crate::ingest::Rejected;

/// A request whose record is being stored.
pub(super) struct Exchange {
    pub(super) peer: SocketAddr,
    pub(super) mid: u16,
    pub(super) token: Vec<u8>,
    pub(super) confirmable: bool,
    /// RFC 7967 No-Response: the classes of answers not to send.
    pub(super) no_response: u32,
    /// The final block's Block1 value, echoed in the 2.04, and the transfer to mark stored.
    pub(super) block: Option<(Block, TransferKey)>,
    /// The empty ACK went out; the answer is a separate response.
    pub(super) separate: bool,
}

/// Resolves with the outcome of the oldest append in `storing` (which must not be empty);
/// the entry stays in the queue for [`Server::on_stored`] to take.
pub(super) async fn oldest(storing: &mut VecDeque<(u64, Durable)>) -> Result<u64, AppendError> {
    let (_, durable) = storing.front_mut().expect("polled only when not empty");
    durable.await
}

impl Server {
    /// The oldest append resolved with `result`: answers it, and every later one that has
    /// resolved as well.
    pub(super) async fn on_stored(&mut self, result: Result<u64, AppendError>) {
        let Some((id, _)) = self.storing.pop_front() else {
            return;
        };
        self.answer_stored(id, result).await;
        while let Some(result) = self.storing.front().and_then(|(_, d)| d.try_result()) {
            let Some((id, _)) = self.storing.pop_front() else {
                break;
            };
            self.answer_stored(id, result).await;
        }
    }

    pub(super) async fn answer_stored(&mut self, id: u64, result: Result<u64, AppendError>) {
        let Some(exchange) = self.exchanges.remove(&id) else {
            return;
        };
        let reply = match result {
            Ok(seq) => {
                self.hot.stored.increment(1);
                tracing::trace!(peer = %exchange.peer, seq, "Stored a CoAP request.");
                let mut options = Vec::new();
                if let Some((block, key)) = exchange.block.clone() {
                    self.blocks.stored(key, block, Instant::now());
                    options.push((opt::BLOCK1, block.encode()));
                }
                Refusal {
                    code: code::CHANGED,
                    options,
                    diagnostic: "",
                }
            }
            Err(e) => {
                let rejected = Rejected::from(e);
                rejection(&rejected, exchange.peer, exchange.confirmable, self.size1())
            }
        };
        self.finish(exchange, reply).await;
    }

    /// `separate_response_after` passed for the oldest exchanges still being stored.
    pub(super) async fn turn_separate(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.turning_separate.front() {
            if at > now {
                break;
            }
            self.turning_separate.pop_front();
            self.separate(id).await;
        }
    }

    /// Sends the empty ACK of a confirmable request still being stored: its answer will be a
    /// separate response. Nothing for an exchange already answered, or a NON.
    pub(super) async fn separate(&mut self, id: u64) {
        let Some(exchange) = self.exchanges.get_mut(&id) else {
            return;
        };
        if !exchange.confirmable || exchange.separate {
            return;
        }
        exchange.separate = true;
        let (peer, mid) = (exchange.peer, exchange.mid);
        let ack = Reply::empty(MessageType::Acknowledgement, mid)
            .encode()
            .map(Bytes::from)
            .unwrap_or_default();
        self.dedup.answer(&(peer, mid), ack.clone());
        separate_started();
        self.send(&ack, peer).await;
    }

    /// Sends the answer of a stored (or failed) exchange.
    pub(super) async fn finish(&mut self, exchange: Exchange, reply: Refusal) {
        let peer = exchange.peer;
        let quiet = message::suppresses(exchange.no_response, reply.code);
        let reply = self.with_max_age(reply);
        if exchange.separate {
            // Piggybacking is over: a CON of our own, same token, retransmitted until ACKed.
            // Its slot is held until then.
            let mid = self.mid();
            let datagram = Reply {
                kind: MessageType::Confirmable,
                code: reply.code,
                mid,
                token: exchange.token,
                options: reply.options,
                payload: reply.diagnostic,
            }
            .encode()
            .map(Bytes::from);
            self.hot.response(reply.code);
            let Some(datagram) = datagram else {
                return self.give_slot(peer);
            };
            if let Some(now) = self
                .outbox
                .push(peer, Outgoing { mid, datagram }, Instant::now())
            {
                self.send(&now, peer).await;
            }
            return;
        }
        self.give_slot(peer);
        let datagram = if exchange.confirmable {
            let answer = if quiet {
                Reply::empty(MessageType::Acknowledgement, exchange.mid)
            } else {
                self.hot.response(reply.code);
                Reply {
                    kind: MessageType::Acknowledgement,
                    code: reply.code,
                    mid: exchange.mid,
                    token: exchange.token,
                    options: reply.options,
                    payload: reply.diagnostic,
                }
            };
            answer.encode()
        } else if quiet {
            None
        } else {
            self.hot.response(reply.code);
            let mid = self.mid();
            Reply {
                kind: MessageType::NonConfirmable,
                code: reply.code,
                mid,
                token: exchange.token,
                options: reply.options,
                payload: reply.diagnostic,
            }
            .encode()
        };
        let datagram = datagram.map(Bytes::from).unwrap_or_default();
        self.dedup.answer(&(peer, exchange.mid), datagram.clone());
        if !datagram.is_empty() {
            self.send(&datagram, peer).await;
        }
    }

    pub(super) fn take_slot(&mut self, peer: SocketAddr) -> bool {
        let held = self.slots.get(&peer).copied().unwrap_or(0);
        if held >= self.config.max_exchanges_per_peer
            || self.slots_total >= self.config.max_exchanges
        {
            busy(peer, held >= self.config.max_exchanges_per_peer);
            return false;
        }
        self.slots.insert(peer, held + 1);
        self.slots_total += 1;
        true
    }

    pub(super) fn give_slot(&mut self, peer: SocketAddr) {
        if let Some(held) = self.slots.get_mut(&peer) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.slots.remove(&peer);
            }
            self.slots_total = self.slots_total.saturating_sub(1);
        }
    }
}
