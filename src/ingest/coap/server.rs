//! The endpoint: one task owns the socket and all message-layer state (dedup cache, Block1
//! assembler, separate responses, exchange slots), so nothing is locked and no task is
//! spawned per request. The loop never waits on the disk: stored requests wait in a queue
//! in append order, and since the log resolves appends in sequence order, only the oldest
//! one's [`Durable`] is polled; when it resolves, every later one that has resolved too is
//! answered in the same turn (a group commit answers its whole group at once). A second
//! queue, in the same order, holds the moments `separate_response_after` passes, when the
//! loop sends the empty ACK of a request still being stored.
//!
//! Datagrams are taken from the socket in bursts of up to [`BURST`] per wake-up, so a busy
//! socket costs one readiness check per burst rather than per datagram.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, Packet, RequestType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::block::{Assembler, Outcome, TransferKey};
use super::config::{CoapConfig, valid_segment};
use super::dedup::{Dedup, Key, Seen};
use super::message::{self, Block, Malformed, Reply, code, opt};
use super::outbox::{Outbox, Outgoing};
use crate::auth::Auth;
use crate::auth::config::Anonymous;
use crate::buffer::{AppendError, Durable, Pressure};
use crate::ingest::{Delivery, Inbound, Pipeline, Rejected, now_ms};
use crate::reload::Live;
use crate::route::RouteError;

/// Housekeeping period: dedup and block expiry.
const TICK: Duration = Duration::from_secs(1);

/// Datagrams taken from the socket per wake-up before the loop looks at its other work
/// (answers, retransmissions, timers) again.
const BURST: usize = 64;

/// A request whose record is being stored.
struct Exchange {
    peer: SocketAddr,
    mid: u16,
    token: Vec<u8>,
    confirmable: bool,
    /// RFC 7967 No-Response: the classes of answers not to send.
    no_response: u32,
    /// The final block's Block1 value, echoed in the 2.04, and the transfer to mark stored.
    block: Option<(Block, TransferKey)>,
    /// The empty ACK went out; the answer is a separate response.
    separate: bool,
}

pub(super) struct Server {
    socket: Arc<UdpSocket>,
    config: Arc<CoapConfig>,
    pipeline: Pipeline,
    pressure: watch::Receiver<Pressure>,
    dedup: Dedup,
    blocks: Assembler,
    outbox: Outbox,
    exchanges: HashMap<u64, Exchange>,
    next_exchange: u64,
    /// Exchanges whose append has not resolved, in append (= sequence) order.
    storing: VecDeque<(u64, Durable)>,
    /// When each exchange in `storing` turns separate, in the same order; entries of
    /// exchanges answered meanwhile are skipped when due.
    turning_separate: VecDeque<(Instant, u64)>,
    /// Exchange slots held per peer (stored requests not yet answered, separate responses
    /// not yet acknowledged); bounded per peer and in total.
    slots: HashMap<SocketAddr, usize>,
    slots_total: usize,
    next_mid: u16,
    closing: bool,
    hot: HotCounters,
    /// `[auth]`, for its anonymous policy: CoAP devices have no credentials, so every one is
    /// anonymous. Read per request, so a reload applies to the next one.
    auth: Live<Auth>,
}

/// Handles of the counters every request touches, registered once: `metrics::counter!`
/// looks its key up in the registry on every call.
struct HotCounters {
    datagrams: metrics::Counter,
    requests_con: metrics::Counter,
    requests_non: metrics::Counter,
    stored: metrics::Counter,
    changed: metrics::Counter,
}

impl HotCounters {
    fn new() -> HotCounters {
        HotCounters {
            datagrams: metrics::counter!("edgegate_coap_datagrams_total"),
            requests_con: metrics::counter!("edgegate_coap_requests_total", "type" => type_label(true)),
            requests_non: metrics::counter!("edgegate_coap_requests_total", "type" => type_label(false)),
            stored: metrics::counter!("edgegate_coap_stored_total"),
            changed: response_counter(code::CHANGED),
        }
    }

    /// Counts an answer by its code.
    fn response(&self, code: u8) {
        if code == code::CHANGED {
            self.changed.increment(1);
        } else {
            response_counter(code).increment(1);
        }
    }
}

pub(super) async fn run(
    socket: UdpSocket,
    config: Arc<CoapConfig>,
    auth: Live<Auth>,
    pipeline: Pipeline,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut server = Server {
        socket: socket.clone(),
        pressure: pipeline.pressure(),
        dedup: Dedup::new(config.dedup_capacity),
        blocks: Assembler::new(
            config.max_block_transfers,
            config.body_limit(),
            config.max_szx(),
            config.block_timeout.get(),
        ),
        outbox: Outbox::new(config.ack_timeout.get(), config.max_retransmit),
        exchanges: HashMap::new(),
        next_exchange: 0,
        storing: VecDeque::new(),
        turning_separate: VecDeque::new(),
        slots: HashMap::new(),
        slots_total: 0,
        next_mid: rand::random(),
        hot: HotCounters::new(),
        auth,
        closing: false,
        config,
        pipeline,
    };
    // One byte more than the limit, to tell "exactly at the limit" from "over it".
    let mut buf = vec![0u8; server.config.datagram_limit() + 1];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retransmit_at = server.outbox.next_deadline();
        let separate_at = server.turning_separate.front().map(|(at, _)| *at);
        tokio::select! {
            // Answers first: they free slots and must not wait behind a flood of requests.
            biased;
            result = oldest(&mut server.storing), if !server.storing.is_empty() => {
                server.on_stored(result).await;
            }
            _ = sleep_until(separate_at) => server.turn_separate().await,
            ready = socket.readable() => match ready {
                Ok(()) => server.receive_burst(&socket, &mut buf).await,
                Err(e) => receive_failed(&e),
            },
            _ = sleep_until(retransmit_at) => server.retransmit().await,
            _ = tick.tick() => server.housekeeping(),
            // Stop taking requests; the exchanges in progress are finished below.
            _ = shutdown.cancelled(), if !server.closing => {
                server.closing = true;
                tracing::info!(exchanges = server.exchanges.len(), "Stopped taking CoAP requests; finishing the ones being stored.");
            }
        }
        if server.closing && server.exchanges.is_empty() {
            break;
        }
    }
    for (peer, datagram) in server.outbox.drain_unsent() {
        server.send(&datagram, peer).await;
    }
    tracing::info!("Answered every CoAP request that was being stored.");
    Ok(())
}

/// Resolves with the outcome of the oldest append in `storing` (which must not be empty);
/// the entry stays in the queue for [`Server::on_stored`] to take.
async fn oldest(storing: &mut VecDeque<(u64, Durable)>) -> Result<u64, AppendError> {
    let (_, durable) = storing.front_mut().expect("polled only when not empty");
    durable.await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Server {
    /// Takes up to [`BURST`] datagrams the socket holds, without waiting for more.
    async fn receive_burst(&mut self, socket: &UdpSocket, buf: &mut [u8]) {
        for _ in 0..BURST {
            match socket.try_recv_from(buf) {
                Ok((len, peer)) => self.on_datagram(&buf[..len.min(buf.len())], peer).await,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => return receive_failed(&e),
            }
        }
    }

    async fn on_datagram(&mut self, datagram: &[u8], peer: SocketAddr) {
        self.hot.datagrams.increment(1);
        if datagram.len() > self.config.datagram_limit() {
            return self.oversized(datagram, peer).await;
        }
        let packet = match message::parse(datagram) {
            Ok(packet) => packet,
            Err(malformed) => return self.malformed(malformed, peer).await,
        };
        let mid = packet.header.message_id;
        match (packet.header.get_type(), packet.header.code) {
            (MessageType::Acknowledgement | MessageType::Reset, _) => {
                let reset = packet.header.get_type() == MessageType::Reset;
                self.on_answer(peer, mid, reset).await;
            }
            (MessageType::Confirmable, MessageClass::Empty) => self.ping(peer, mid).await,
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {
                self.on_request(packet, peer).await;
            }
            // An unknown method code (class 0): 4.05, like any method the resource lacks.
            (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
                if c >> 5 == 0 =>
            {
                self.on_request(packet, peer).await;
            }
            // A response or reserved code sent to a server: reject a CON, ignore a NON.
            (kind, _) => {
                let reset = (kind == MessageType::Confirmable).then_some(mid);
                self.malformed(
                    Malformed {
                        kind: "not_a_request",
                        reset,
                    },
                    peer,
                )
                .await;
            }
        }
    }

    async fn on_request(&mut self, packet: Packet, peer: SocketAddr) {
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        if confirmable {
            self.hot.requests_con.increment(1);
        } else {
            self.hot.requests_non.increment(1);
        }
        let key: Key = (peer, packet.header.message_id);
        match self.dedup.get(&key) {
            Some(Seen::Pending) => return duplicate(peer, "pending"),
            Some(Seen::Answered(datagram)) => {
                let datagram = datagram.clone();
                duplicate(peer, "answered");
                if !datagram.is_empty() {
                    self.send(&datagram, peer).await;
                }
                return;
            }
            None => {}
        }
        match self.check(&packet, peer) {
            Err(reply) => self.reply(&packet, peer, reply, false).await,
            Ok(accepted) => self.accept(packet, peer, accepted).await,
        }
    }

    /// Everything that can refuse a request before its body is known.
    fn check(&self, packet: &Packet, peer: SocketAddr) -> Result<Accepted, Refusal> {
        let high = *self.pressure.borrow() == Pressure::High;
        let anonymous = self.auth.borrow().anonymous();
        check(&self.config, anonymous, packet, peer, self.closing, high)
    }

    /// A request that can complete a record (unless block-wise or its final block) takes its
    /// exchange slot first, so a full house refuses it before an assembled body would be
    /// thrown away.
    async fn accept(&mut self, packet: Packet, peer: SocketAddr, accepted: Accepted) {
        let completes = accepted.block.is_none_or(|b| !b.more);
        if completes && !self.take_slot(peer) {
            let reply = Refusal::busy("too many requests in progress");
            return self.reply(&packet, peer, reply, false).await;
        }
        if !self.store(packet, peer, accepted).await && completes {
            self.give_slot(peer);
        }
    }

    /// Assembles and submits; true when an exchange now awaits its append (and holds the
    /// slot taken in `accept`).
    async fn store(&mut self, packet: Packet, peer: SocketAddr, accepted: Accepted) -> bool {
        let now = Instant::now();
        let (body, block) = match accepted.block {
            None => {
                if packet.payload.len() > self.config.body_limit() {
                    let reply = Refusal::too_large(self.size1(), None);
                    self.reply(&packet, peer, reply, false).await;
                    return false;
                }
                (packet.payload.clone(), None)
            }
            Some(block) => {
                let key = transfer_key(&packet, peer);
                let size1 = message::first(&packet, opt::SIZE1).and_then(message::uint);
                match self.blocks.offer(&key, block, &packet.payload, size1, now) {
                    Outcome::Continue(echo) => {
                        let reply = Refusal {
                            code: code::CONTINUE,
                            options: vec![(opt::BLOCK1, echo.encode())],
                            diagnostic: "",
                        };
                        self.reply(&packet, peer, reply, true).await;
                        return false;
                    }
                    Outcome::Repeat(echo) => {
                        duplicate(peer, "final_block");
                        let reply = Refusal {
                            code: code::CHANGED,
                            options: vec![(opt::BLOCK1, echo.encode())],
                            diagnostic: "",
                        };
                        self.reply(&packet, peer, reply, true).await;
                        return false;
                    }
                    Outcome::Complete { body, block } => {
                        block_transfer("completed");
                        (body, Some((block, key)))
                    }
                    Outcome::Incomplete => {
                        block_transfer("incomplete");
                        let reply = Refusal::new(code::INCOMPLETE, "blocks out of order");
                        self.reply(&packet, peer, reply, false).await;
                        return false;
                    }
                    Outcome::TooLarge => {
                        block_transfer("too_large");
                        let reply = Refusal::too_large(self.size1(), None);
                        self.reply(&packet, peer, reply, false).await;
                        return false;
                    }
                    Outcome::BadBlock => {
                        block_transfer("bad_block");
                        let reply = Refusal::new(code::BAD_REQUEST, "block of the wrong size");
                        self.reply(&packet, peer, reply, false).await;
                        return false;
                    }
                    Outcome::Busy => {
                        block_transfer("busy");
                        let reply = Refusal::busy("too many block-wise uploads");
                        self.reply(&packet, peer, reply, false).await;
                        return false;
                    }
                }
            }
        };
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let mut headers = Vec::with_capacity(4);
        if let Some(cf) = accepted.content_format {
            headers.push(("coap-content-format".into(), Bytes::from(cf.to_string())));
        }
        headers.push(("coap-uri-path".into(), Bytes::from(accepted.uri_path)));
        let kind = if confirmable { "CON" } else { "NON" };
        headers.push(("coap-type".into(), Bytes::from_static(kind.as_bytes())));
        headers.push((
            "coap-method".into(),
            Bytes::from_static(accepted.method.as_bytes()),
        ));
        let inbound = Inbound {
            delivery: Delivery::Coap { confirmable },
            device: accepted.device,
            topic: accepted.topic,
            payload: Bytes::from(body),
            headers,
            received_ms: now_ms(),
        };
        let durable = match self.pipeline.submit(inbound) {
            Ok(durable) => durable,
            Err(rejected) => {
                let reply = rejection(&rejected, peer, confirmable, self);
                self.reply(&packet, peer, reply, false).await;
                return false;
            }
        };
        let id = self.next_exchange;
        self.next_exchange += 1;
        let lifetime = self.lifetime(confirmable);
        let key = (peer, packet.header.message_id);
        let evicted = self.dedup.insert(key, Seen::Pending, lifetime, now);
        forgotten(evicted);
        self.exchanges.insert(
            id,
            Exchange {
                peer,
                mid: packet.header.message_id,
                token: packet.get_token().to_vec(),
                confirmable,
                no_response: message::no_response(&packet),
                block,
                separate: false,
            },
        );
        self.storing.push_back((id, durable));
        let after = self.config.separate_response_after.get();
        if after.is_zero() {
            self.separate(id).await;
        } else {
            // Answers come in the same order, so the front is mostly answered already:
            // dropping those keeps this queue about as long as `storing`.
            while let Some((_, front)) = self.turning_separate.front() {
                if self.exchanges.contains_key(front) {
                    break;
                }
                self.turning_separate.pop_front();
            }
            self.turning_separate.push_back((now + after, id));
        }
        true
    }

    /// The oldest append resolved with `result`: answers it, and every later one that has
    /// resolved as well.
    async fn on_stored(&mut self, result: Result<u64, AppendError>) {
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

    async fn answer_stored(&mut self, id: u64, result: Result<u64, AppendError>) {
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
                rejection(&rejected, exchange.peer, exchange.confirmable, self)
            }
        };
        self.finish(exchange, reply).await;
    }

    /// `separate_response_after` passed for the oldest exchanges still being stored.
    async fn turn_separate(&mut self) {
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
    async fn separate(&mut self, id: u64) {
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
    async fn finish(&mut self, exchange: Exchange, reply: Refusal) {
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

    /// Answers a request at once: piggybacked on the ACK of a CON, as a NON to a NON.
    /// `remember` caches the answer for retransmissions (2.31, a repeated final 2.04);
    /// refusals are not cached: a retransmission is simply judged again, and nothing of it
    /// was stored.
    async fn reply(&mut self, packet: &Packet, peer: SocketAddr, reply: Refusal, remember: bool) {
        let confirmable = packet.header.get_type() == MessageType::Confirmable;
        let mid = packet.header.message_id;
        let suppressed = message::suppresses(message::no_response(packet), reply.code);
        let reply = self.with_max_age(reply);
        let answer = if confirmable {
            if suppressed {
                Some(Reply::empty(MessageType::Acknowledgement, mid))
            } else {
                Some(Reply {
                    kind: MessageType::Acknowledgement,
                    code: reply.code,
                    mid,
                    token: packet.get_token().to_vec(),
                    options: reply.options,
                    payload: reply.diagnostic,
                })
            }
        } else if suppressed {
            None
        } else {
            Some(Reply {
                kind: MessageType::NonConfirmable,
                code: reply.code,
                mid: self.mid(),
                token: packet.get_token().to_vec(),
                options: reply.options,
                payload: reply.diagnostic,
            })
        };
        if !suppressed {
            self.hot.response(reply.code);
        }
        let datagram = answer
            .and_then(|a| a.encode())
            .map(Bytes::from)
            .unwrap_or_default();
        if remember {
            let lifetime = self.lifetime(confirmable);
            let evicted = self.dedup.insert(
                (peer, mid),
                Seen::Answered(datagram.clone()),
                lifetime,
                Instant::now(),
            );
            forgotten(evicted);
        }
        if !datagram.is_empty() {
            self.send(&datagram, peer).await;
        }
    }

    async fn on_answer(&mut self, peer: SocketAddr, mid: u16, reset: bool) {
        let (matched, next) = self.outbox.answer(peer, mid, Instant::now());
        if !matched {
            if reset {
                reset_received(peer, false);
            }
            return;
        }
        if reset {
            reset_received(peer, true);
        }
        self.give_slot(peer);
        if let Some(datagram) = next {
            self.send(&datagram, peer).await;
        }
    }

    async fn retransmit(&mut self) {
        let (send, gave_up) = self.outbox.due(Instant::now());
        for peer in gave_up {
            separate_unacknowledged(peer);
            self.give_slot(peer);
        }
        for (peer, datagram) in send {
            metrics::counter!("edgegate_coap_retransmissions_total").increment(1);
            self.send(&datagram, peer).await;
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        self.dedup.expire(now);
        let expired = self.blocks.expire(now);
        if expired > 0 {
            metrics::counter!("edgegate_coap_block_transfers_total", "outcome" => "expired")
                .increment(expired as u64);
            tracing::debug!(expired, "Dropped block-wise uploads that stopped sending.");
        }
        metrics::gauge!("edgegate_coap_exchanges").set(self.slots_total as f64);
        metrics::gauge!("edgegate_coap_dedup_entries").set(self.dedup.len() as f64);
        metrics::gauge!("edgegate_coap_block_transfers").set(self.blocks.len() as f64);
        metrics::gauge!("edgegate_coap_separate_pending").set(self.outbox.len() as f64);
    }

    async fn ping(&mut self, peer: SocketAddr, mid: u16) {
        metrics::counter!("edgegate_coap_pings_total").increment(1);
        tracing::trace!(%peer, "Answered a CoAP ping.");
        if let Some(rst) = Reply::empty(MessageType::Reset, mid).encode() {
            self.send(&rst, peer).await;
        }
    }

    /// A datagram bigger than `max_datagram_size`: 4.13 with the block size and body size the
    /// gateway takes (RFC 7959 2.9.3), if its header says it is a request; else ignored.
    async fn oversized(&mut self, datagram: &[u8], peer: SocketAddr) {
        metrics::counter!("edgegate_coap_malformed_total", "kind" => "too_large").increment(1);
        tracing::debug!(%peer, limit = self.config.datagram_limit(), "Refused a CoAP datagram over max_datagram_size.");
        let [first, code_byte, hi, lo, rest @ ..] = datagram else {
            return;
        };
        let tkl = usize::from(first & 0x0F);
        let kind = (first >> 4) & 3;
        if first >> 6 != 1 || tkl > 8 || rest.len() < tkl || !(1..=31).contains(code_byte) {
            return;
        }
        let token = rest[..tkl].to_vec();
        let mid = u16::from_be_bytes([*hi, *lo]);
        let hint = Block {
            num: 0,
            more: false,
            szx: self.config.max_szx(),
        };
        let reply = Refusal::too_large(self.size1(), Some(hint));
        let answer = match kind {
            0 => Reply {
                kind: MessageType::Acknowledgement,
                code: reply.code,
                mid,
                token,
                options: reply.options,
                payload: reply.diagnostic,
            },
            1 => Reply {
                kind: MessageType::NonConfirmable,
                code: reply.code,
                mid: self.mid(),
                token,
                options: reply.options,
                payload: reply.diagnostic,
            },
            _ => return,
        };
        self.hot.response(reply.code);
        if let Some(datagram) = answer.encode() {
            self.send(&datagram, peer).await;
        }
    }

    /// Counts and logs a datagram that is not a CoAP request, and Resets it if the RFC says
    /// so.
    async fn malformed(&mut self, malformed: Malformed, peer: SocketAddr) {
        metrics::counter!("edgegate_coap_malformed_total", "kind" => malformed.kind).increment(1);
        tracing::debug!(%peer, kind = malformed.kind, reset = malformed.reset.is_some(), "Ignored a datagram that is not a well-formed CoAP request.");
        if let Some(rst) = malformed
            .reset
            .and_then(|mid| Reply::empty(MessageType::Reset, mid).encode())
        {
            self.send(&rst, peer).await;
        }
    }

    async fn send(&self, datagram: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(datagram, peer).await {
            metrics::counter!("edgegate_coap_send_errors_total").increment(1);
            tracing::debug!(%peer, error = %e, "Could not send a CoAP datagram.");
        }
    }

    fn take_slot(&mut self, peer: SocketAddr) -> bool {
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

    fn give_slot(&mut self, peer: SocketAddr) {
        if let Some(held) = self.slots.get_mut(&peer) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.slots.remove(&peer);
            }
            self.slots_total = self.slots_total.saturating_sub(1);
        }
    }

    /// Every 5.03 says when to retry.
    fn with_max_age(&self, mut reply: Refusal) -> Refusal {
        if reply.code == code::UNAVAILABLE {
            let secs = self.config.busy_max_age_secs();
            reply
                .options
                .push((opt::MAX_AGE, message::uint_bytes(secs)));
        }
        reply
    }

    fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn lifetime(&self, confirmable: bool) -> Duration {
        if confirmable {
            self.config.exchange_lifetime.get()
        } else {
            self.config.non_lifetime.get()
        }
    }

    fn size1(&self) -> u32 {
        u32::try_from(self.config.max_body_size.get()).unwrap_or(u32::MAX)
    }
}

/// Everything that can refuse a request before its body is known: options, path, method,
/// Block1, the log's pressure. A free function so the fuzz entry runs exactly this.
fn check(
    config: &CoapConfig,
    anonymous: Anonymous,
    packet: &Packet,
    peer: SocketAddr,
    closing: bool,
    high: bool,
) -> Result<Accepted, Refusal> {
    if closing {
        return Err(Refusal::busy("shutting down"));
    }
    if !anonymous.admits(peer.ip()) {
        let device = packet
            .get_option(coap_lite::CoapOption::UriPath)
            .and_then(|l| l.iter().nth(1))
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .unwrap_or_default();
        crate::auth::failed(peer, &device, "anonymous");
        return Err(Refusal::new(
            code::UNAUTHORIZED,
            "anonymous devices are not accepted from this address",
        ));
    }
    if let Some((&number, _)) = packet
        .options()
        .find(|(n, _)| **n % 2 == 1 && !opt::understood_critical(**n))
    {
        tracing::debug!(%peer, option = number, "Refused a CoAP request with an unknown critical option.");
        return Err(Refusal::new(code::BAD_OPTION, "unknown critical option"));
    }
    if message::first(packet, opt::PROXY_URI).is_some()
        || message::first(packet, opt::PROXY_SCHEME).is_some()
    {
        return Err(Refusal::new(code::PROXYING_NOT_SUPPORTED, "not a proxy"));
    }
    let segments: Vec<&[u8]> = packet
        .get_option(coap_lite::CoapOption::UriPath)
        .map(|l| l.iter().map(Vec::as_slice).collect())
        .unwrap_or_default();
    let Some((resource, rest)) = segments.split_first() else {
        return Err(Refusal::new(code::NOT_FOUND, "no such resource"));
    };
    if *resource != config.resource.as_bytes() || rest.is_empty() {
        return Err(Refusal::new(code::NOT_FOUND, "no such resource"));
    }
    let mut levels = Vec::with_capacity(rest.len());
    for segment in rest {
        match std::str::from_utf8(segment) {
            Ok(s) if valid_segment(s) => levels.push(s),
            _ => {
                return Err(Refusal::new(
                    code::BAD_REQUEST,
                    "path segments must be UTF-8 without / + # or control characters",
                ));
            }
        }
    }
    let device = levels[0];
    if device.len() > config.max_device_len {
        return Err(Refusal::new(code::BAD_REQUEST, "device id too long"));
    }
    let method = match packet.header.code {
        MessageClass::Request(RequestType::Post) => "POST",
        MessageClass::Request(RequestType::Put) => "PUT",
        _ => {
            return Err(Refusal::new(
                code::METHOD_NOT_ALLOWED,
                "POST or PUT telemetry",
            ));
        }
    };
    let block = match message::first(packet, opt::BLOCK1) {
        None => None,
        Some(value) => Some(
            Block::decode(value)
                .ok_or_else(|| Refusal::new(code::BAD_OPTION, "bad Block1 value"))?,
        ),
    };
    if high {
        return Err(Refusal::busy("the log is nearly full"));
    }
    let content_format = match message::first(packet, opt::CONTENT_FORMAT) {
        None => None,
        Some(value) => Some(
            message::uint(value)
                .filter(|v| *v <= 0xFFFF)
                .ok_or_else(|| Refusal::new(code::BAD_REQUEST, "bad Content-Format value"))?,
        ),
    };
    let topic = format!("{}/{}", config.topic_prefix, levels.join("/"));
    let uri_path = format!("/{}", {
        let mut all = vec![config.resource.as_str()];
        all.extend(&levels);
        all.join("/")
    });
    Ok(Accepted {
        device: device.to_owned(),
        topic,
        uri_path,
        method,
        content_format,
        block,
    })
}

/// What `check` learned about an acceptable request.
struct Accepted {
    device: String,
    topic: String,
    uri_path: String,
    method: &'static str,
    content_format: Option<u32>,
    block: Option<Block>,
}

/// An answer before it is framed as ACK, NON or CON.
struct Refusal {
    code: u8,
    options: Vec<(u16, Vec<u8>)>,
    diagnostic: &'static str,
}

impl Refusal {
    fn new(code: u8, diagnostic: &'static str) -> Refusal {
        Refusal {
            code,
            options: Vec::new(),
            diagnostic,
        }
    }

    fn busy(diagnostic: &'static str) -> Refusal {
        Refusal::new(code::UNAVAILABLE, diagnostic)
    }

    fn too_large(size1: u32, block_hint: Option<Block>) -> Refusal {
        let mut options = vec![(opt::SIZE1, message::uint_bytes(size1))];
        if let Some(hint) = block_hint {
            options.push((opt::BLOCK1, hint.encode()));
        }
        Refusal {
            code: code::TOO_LARGE,
            options,
            diagnostic: "request too large",
        }
    }
}

/// Maps a refusal of the pipeline to a CoAP answer; logs and counts it.
fn rejection(rejected: &Rejected, peer: SocketAddr, confirmable: bool, server: &Server) -> Refusal {
    crate::ingest::refused(Delivery::Coap { confirmable }, rejected, peer, None);
    match rejected {
        // The topic the path names leads nowhere: for the device, no such resource.
        Rejected::Route(RouteError::NoRoute(_)) => Refusal::new(code::NOT_FOUND, "no route"),
        // The device or stream name cannot make a Kafka topic: the request is at fault.
        Rejected::Route(RouteError::InvalidKafkaTopic { .. }) => {
            Refusal::new(code::BAD_REQUEST, "path makes an invalid Kafka topic")
        }
        Rejected::Full => Refusal::busy("the log is full"),
        Rejected::Closed => Refusal::busy("shutting down"),
        Rejected::TooLarge(_) => Refusal::too_large(server.size1(), None),
        Rejected::Io(_) => Refusal::new(code::INTERNAL_ERROR, "could not store"),
    }
}

fn transfer_key(packet: &Packet, peer: SocketAddr) -> TransferKey {
    let mut uri = Vec::new();
    for number in [opt::URI_PATH, opt::URI_QUERY] {
        for value in packet
            .get_option(coap_lite::CoapOption::from(number))
            .into_iter()
            .flatten()
        {
            uri.push(number as u8);
            uri.extend_from_slice(&(value.len() as u32).to_be_bytes());
            uri.extend_from_slice(value);
        }
    }
    TransferKey {
        peer,
        uri,
        request_tag: message::first(packet, opt::REQUEST_TAG).map(<[u8]>::to_vec),
    }
}

fn type_label(confirmable: bool) -> &'static str {
    if confirmable { "con" } else { "non" }
}

fn response_counter(code: u8) -> metrics::Counter {
    metrics::counter!("edgegate_coap_responses_total", "code" => code::label(code))
}

fn duplicate(peer: SocketAddr, state: &'static str) {
    metrics::counter!("edgegate_coap_duplicates_total", "state" => state).increment(1);
    tracing::trace!(%peer, state, "Answered a retransmitted CoAP request from the cache.");
}

fn forgotten(evicted: usize) {
    if evicted > 0 {
        metrics::counter!("edgegate_coap_dedup_evictions_total").increment(evicted as u64);
        tracing::debug!(
            evicted,
            "Forgot the oldest CoAP exchanges: the dedup cache is full."
        );
    }
}

fn block_transfer(outcome: &'static str) {
    metrics::counter!("edgegate_coap_block_transfers_total", "outcome" => outcome).increment(1);
    tracing::debug!(outcome, "A block-wise upload ended.");
}

fn separate_started() {
    metrics::counter!("edgegate_coap_separate_responses_total").increment(1);
    tracing::trace!("Sent an empty ACK; the answer follows as a separate response.");
}

fn separate_unacknowledged(peer: SocketAddr) {
    metrics::counter!("edgegate_coap_separate_unacknowledged_total").increment(1);
    tracing::debug!(%peer, "Gave up retransmitting a separate CoAP response; the record is stored.");
}

fn reset_received(peer: SocketAddr, matched: bool) {
    metrics::counter!("edgegate_coap_resets_total", "matched" => if matched { "yes" } else { "no" })
        .increment(1);
    tracing::debug!(%peer, matched, "A device reset a CoAP message of ours.");
}

fn busy(peer: SocketAddr, per_peer: bool) {
    let limit = if per_peer { "peer" } else { "total" };
    metrics::counter!("edgegate_coap_busy_total", "limit" => limit).increment(1);
    tracing::debug!(%peer, limit, "Refused a CoAP request: too many exchanges in progress.");
}

fn receive_failed(e: &std::io::Error) {
    metrics::counter!("edgegate_coap_receive_errors_total").increment(1);
    tracing::debug!(error = %e, "Could not receive a CoAP datagram.");
}

/// The datagram → request path of [`Server::on_datagram`] without a socket or a log, for the
/// fuzz target: framing and parse, classification by type and code, [`check`], the Block1
/// transfer key, and the encoding of the answer sent at once (a Reset, a refusal, or the 2.04
/// an accepted request would get). Returns that answer, `None` when nothing would be sent.
/// Oversized datagrams are out of scope: the receive buffer never holds one.
///
/// # Panics
///
/// When an answer does not parse back: the gateway must never send what it would refuse.
pub(super) fn classify(config: &CoapConfig, datagram: &[u8]) -> Option<Vec<u8>> {
    let peer = SocketAddr::from(([127, 0, 0, 1], 5683));
    let reset = |mid| Reply::empty(MessageType::Reset, mid).encode();
    let packet = match message::parse(datagram) {
        Ok(packet) => packet,
        Err(malformed) => return malformed.reset.and_then(reset),
    };
    let mid = packet.header.message_id;
    match (packet.header.get_type(), packet.header.code) {
        (MessageType::Acknowledgement | MessageType::Reset, _) => return None,
        (MessageType::Confirmable, MessageClass::Empty) => return reset(mid),
        (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Request(_)) => {}
        (MessageType::Confirmable | MessageType::NonConfirmable, MessageClass::Reserved(c))
            if c >> 5 == 0 => {}
        (kind, _) => {
            return (kind == MessageType::Confirmable)
                .then_some(mid)
                .and_then(reset);
        }
    }
    let (code, options, diagnostic) =
        match check(config, Anonymous::Always, &packet, peer, false, false) {
            Err(refusal) => (refusal.code, refusal.options, refusal.diagnostic),
            Ok(accepted) => {
                if accepted.block.is_some() {
                    let _ = transfer_key(&packet, peer);
                }
                let options = accepted
                    .block
                    .map(|b| vec![(opt::BLOCK1, b.encode())])
                    .unwrap_or_default();
                (code::CHANGED, options, "")
            }
        };
    if message::suppresses(message::no_response(&packet), code) {
        return None;
    }
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    let answer = Reply {
        kind: if confirmable {
            MessageType::Acknowledgement
        } else {
            MessageType::NonConfirmable
        },
        code,
        mid,
        token: packet.get_token().to_vec(),
        options,
        payload: diagnostic,
    }
    .encode()?;
    assert!(
        message::parse(&answer).is_ok(),
        "the answer to {datagram:02x?} does not parse: {answer:02x?}"
    );
    Some(answer)
}

/// HELP text of the CoAP endpoint's metrics.
pub(super) fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "edgegate_coap_datagrams_total",
        "UDP datagrams received on the CoAP port."
    );
    describe_counter!(
        "edgegate_coap_requests_total",
        "CoAP requests received, by type (con, non)."
    );
    describe_counter!(
        "edgegate_coap_responses_total",
        "CoAP answers sent, by response code."
    );
    describe_counter!(
        "edgegate_coap_malformed_total",
        "Datagrams that are not well-formed CoAP requests, by kind."
    );
    describe_counter!(
        "edgegate_coap_duplicates_total",
        "Retransmitted requests answered from the dedup cache, by state."
    );
    describe_counter!(
        "edgegate_coap_pings_total",
        "CoAP pings (empty CON) answered with a Reset."
    );
    describe_counter!(
        "edgegate_coap_resets_total",
        "Resets received from devices, by whether they matched a message of ours."
    );
    describe_counter!(
        "edgegate_coap_stored_total",
        "CoAP requests stored durably."
    );
    describe_counter!(
        "edgegate_coap_busy_total",
        "CoAP requests answered 5.03 for too many exchanges, by limit (peer, total)."
    );
    describe_counter!(
        "edgegate_coap_separate_responses_total",
        "Empty ACKs sent because the append was slow; the answer follows separately."
    );
    describe_counter!(
        "edgegate_coap_retransmissions_total",
        "Retransmissions of separate responses."
    );
    describe_counter!(
        "edgegate_coap_separate_unacknowledged_total",
        "Separate responses never acknowledged (the record is stored)."
    );
    describe_counter!(
        "edgegate_coap_block_transfers_total",
        "Block-wise uploads ended, by outcome."
    );
    describe_counter!(
        "edgegate_coap_dedup_evictions_total",
        "Exchanges forgotten early because the dedup cache was full."
    );
    describe_counter!(
        "edgegate_coap_send_errors_total",
        "CoAP datagrams that could not be sent."
    );
    describe_counter!(
        "edgegate_coap_receive_errors_total",
        "Failed receives on the CoAP socket."
    );
    describe_gauge!(
        "edgegate_coap_exchanges",
        "CoAP exchanges being stored or awaiting the ACK of their separate response."
    );
    describe_gauge!(
        "edgegate_coap_dedup_entries",
        "Exchanges remembered for deduplication."
    );
    describe_gauge!(
        "edgegate_coap_block_transfers",
        "Block-wise uploads being assembled."
    );
    describe_gauge!(
        "edgegate_coap_separate_pending",
        "Separate responses awaiting their ACK."
    );
}
