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
//!
//! Beside this loop: `request.rs` decides whether a request may be stored and what a refusal
//! answers, `exchange.rs` keeps the requests being stored until they are answered, and
//! `events.rs` logs and counts each event.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, Packet};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::block::{Assembler, Outcome};
use super::config::CoapConfig;
use super::dedup::{Dedup, Key, Seen};
use super::events::{
    HotCounters, block_transfer, duplicate, forgotten, receive_failed, reset_received,
    separate_unacknowledged,
};
use super::exchange::{Exchange, oldest};
use super::message::{self, Block, Malformed, Reply, code, opt};
use super::outbox::Outbox;
use super::request::{Accepted, Refusal, check, rejection, transfer_key};
use crate::auth::Auth;
use crate::buffer::{Durable, Pressure};
use crate::ingest::{Delivery, Inbound, Pipeline, now_ms};
use crate::reload::Live;

/// Housekeeping period: dedup and block expiry.
const TICK: Duration = Duration::from_secs(1);

/// Datagrams taken from the socket per wake-up before the loop looks at its other work
/// (answers, retransmissions, timers) again.
const BURST: usize = 64;

pub(super) struct Server {
    pub(super) socket: Arc<UdpSocket>,
    pub(super) config: Arc<CoapConfig>,
    pub(super) pipeline: Pipeline,
    pub(super) pressure: watch::Receiver<Pressure>,
    pub(super) dedup: Dedup,
    /// Confirmable requests stored before the gateway (re)started, by dedup key, with their
    /// receive times (`ingest::receipts`): a retransmission within `exchange_lifetime` is
    /// answered as stored, not stored again. Emptied as they age out.
    pub(super) recovered: HashMap<Key, i64>,
    pub(super) blocks: Assembler,
    pub(super) outbox: Outbox,
    pub(super) exchanges: HashMap<u64, Exchange>,
    pub(super) next_exchange: u64,
    /// Exchanges whose append has not resolved, in append (= sequence) order.
    pub(super) storing: VecDeque<(u64, Durable)>,
    /// When each exchange in `storing` turns separate, in the same order; entries of
    /// exchanges answered meanwhile are skipped when due.
    pub(super) turning_separate: VecDeque<(Instant, u64)>,
    /// Exchange slots held per peer (stored requests not yet answered, separate responses
    /// not yet acknowledged); bounded per peer and in total.
    pub(super) slots: HashMap<SocketAddr, usize>,
    pub(super) slots_total: usize,
    pub(super) next_mid: u16,
    pub(super) closing: bool,
    pub(super) hot: HotCounters,
    /// `[auth]`, for its anonymous policy: CoAP devices have no credentials, so every one is
    /// anonymous. Read per request, so a reload applies to the next one.
    pub(super) auth: Live<Auth>,
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
        recovered: pipeline
            .receipts()
            .map(|r| r.coap_stored())
            .unwrap_or_default(),
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
        if confirmable && self.recovered.remove(&key).is_some() {
            // Stored before a restart (its receipt says so): the answer it got, again. The
            // final block of an upload echoes its Block1 option, as when it was stored.
            duplicate(peer, "stored_before_restart");
            let options = message::first(&packet, opt::BLOCK1)
                .map(|block| vec![(opt::BLOCK1, block.to_vec())])
                .unwrap_or_default();
            let reply = Refusal {
                code: code::CHANGED,
                options,
                diagnostic: "",
            };
            return self.reply(&packet, peer, reply, true).await;
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
        // A confirmable request's dedup key rides in its record, so a retransmission after a
        // crash is recognised (`ingest::receipts`). A NON is not retransmitted by its sender.
        let received_ms = inbound.received_ms;
        let submitted = match self.pipeline.receipts().filter(|_| confirmable) {
            Some(receipts) => {
                let key = (peer, packet.header.message_id);
                receipts.append_coap(key, received_ms, |receipt| {
                    self.pipeline.submit_with_receipt(inbound, receipt)
                })
            }
            None => self.pipeline.submit(inbound),
        };
        let durable = match submitted {
            Ok(durable) => durable,
            Err(rejected) => {
                let reply = rejection(&rejected, peer, confirmable, self.size1());
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
        if !self.recovered.is_empty() {
            let before = now_ms() - self.config.exchange_lifetime.get().as_millis() as i64;
            self.recovered
                .retain(|_, received_ms| *received_ms >= before);
        }
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

    pub(super) async fn send(&self, datagram: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(datagram, peer).await {
            metrics::counter!("edgegate_coap_send_errors_total").increment(1);
            tracing::debug!(%peer, error = %e, "Could not send a CoAP datagram.");
        }
    }

    /// Every 5.03 says when to retry.
    pub(super) fn with_max_age(&self, mut reply: Refusal) -> Refusal {
        if reply.code == code::UNAVAILABLE {
            let secs = self.config.busy_max_age_secs();
            reply
                .options
                .push((opt::MAX_AGE, message::uint_bytes(secs)));
        }
        reply
    }

    pub(super) fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    pub(super) fn lifetime(&self, confirmable: bool) -> Duration {
        if confirmable {
            self.config.exchange_lifetime.get()
        } else {
            self.config.non_lifetime.get()
        }
    }

    pub(super) fn size1(&self) -> u32 {
        u32::try_from(self.config.max_body_size.get()).unwrap_or(u32::MAX)
    }
}
