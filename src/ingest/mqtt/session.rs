//! The per-connection state machine: CONNECT, then publishes until the connection ends.
//!
//! One task per connection owns its socket and its state; nothing is shared but the
//! [`Registry`] of client ids (`registry.rs`: takeover, and the QoS 2 state of persistent
//! sessions, so a PUBLISH resent after a reconnect is not stored twice; a persistent
//! session's QoS 2 ids are made durable with their records, and their releases before
//! PUBCOMP, through `ingest::receipts`, so that holds across a gateway crash too). The loop keeps
//! reading while earlier appends are pending, so many publishes of one connection share a
//! group commit, and sends each PUBACK/PUBREC only when its append has resolved as durable;
//! which packet ids are in flight is `inflight.rs`, and every event is logged and counted by
//! one function of `events.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::MqttConfig;
use super::connection::{Connection, Frame, FrameError};
use super::encode::{OutPublish, encode_publish_within};
use super::events::{
    acknowledged, connected, disconnected, frame_error, io_error, protocol_error, refused,
    subscribed, taken_over, timed_out, unsupported, will_stored,
};
use super::inflight::{Inflight, OnPublish};
use super::outflight::{AckResult, Outflight};
use super::packet::{
    self, ConnAckProps, Connect, DecodeError, Limits, Outgoing, Packet, Publish, Refusal,
    Unsupported, Version, Will,
};
use super::registry::Registry;
use crate::auth::{self, Auth, CertClaim, Claim, Failure, Identity};
use crate::broker::index::Options;
use crate::broker::mailbox::{Dropped, Outbound};
use crate::broker::{
    self, Attached, Broker, Message, OutcomeKind, Props, Request, SubscribeRefused,
};
use crate::buffer::Durable;
use crate::buffer::{AppendError, Pressure};
use crate::ingest::{Delivery, Inbound, Pipeline, Rejected, now_ms};
use crate::reload::Live;

/// Above the log's high watermark, how often a connection may read one frame.
const PRESSURE_READ_INTERVAL: Duration = Duration::from_millis(200);

/// Everything a connection task needs from the listener; each connection holds it behind one
/// `Arc` (inline it was 136 bytes of every connection's task and session).
pub struct Shared {
    pub config: Arc<MqttConfig>,
    pub pipeline: Pipeline,
    pub pressure: watch::Receiver<Pressure>,
    pub registry: Registry,
    /// Credentials and topic rights in force; each connection keeps the ones it connected with.
    pub auth: Live<Auth>,
    /// Subscriptions, retained messages and session queues, shared by every connection.
    pub broker: Broker,
    pub shutdown: CancellationToken,
    pub counters: Arc<Counters>,
}

/// Per-message counters as handles taken once for the listener: a lookup in the metrics
/// registry per message (its labels hashed, a lock taken) showed in the uplink's profile.
pub struct Counters {
    /// `edgegate_mqtt_messages_total` by QoS.
    received: [metrics::Counter; 3],
    /// `edgegate_local_delivered_total` by QoS.
    delivered: [metrics::Counter; 3],
    /// `edgegate_mqtt_acks_total`: PUBACK, PUBREC.
    acks: [metrics::Counter; 2],
}

impl Counters {
    /// Takes the handles; call it after the metrics recorder is installed.
    pub fn new() -> Counters {
        let label = |qos: u8| Delivery::Mqtt { qos }.label();
        Counters {
            received: [0, 1, 2]
                .map(|q| metrics::counter!("edgegate_mqtt_messages_total", "qos" => label(q))),
            delivered: [0, 1, 2]
                .map(|q| metrics::counter!("edgegate_local_delivered_total", "qos" => label(q))),
            acks: ["puback", "pubrec"].map(acknowledged),
        }
    }
}

/// An append in flight and what to do when it resolves.
struct Completion {
    qos: u8,
    pkid: u16,
    result: Result<u64, AppendError>,
    /// The message for local subscribers, when there are any or it is retained.
    message: Option<Arc<Message>>,
    /// Set on the second completion of a publish that a retained copy or a persistent
    /// session's copy had to be made durable for (the record itself was stored before);
    /// the ack waited for it. A failure was logged where it happened.
    persisted: Option<Result<(), String>>,
}

/// Messages from the broker written per turn of the loop, so a busy subscription does not
/// starve reading.
const DELIVER_BATCH: usize = 256;

/// Packets already in the read buffer handled in one turn before writing, at most: enough to
/// batch a read's worth of acks, few enough that one busy client does not hog its thread.
const BUFFERED_PER_TURN: usize = 64;

type Pending = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// Futures finished in the order they were pushed, with the queue made on first use: a
/// device that never publishes (or never uses QoS 2) keeps none. An empty `FuturesOrdered`
/// is two `Arc`s (~200 bytes): two per connection were 2 MB of 10,000 idle devices. Boxed:
/// inline it is 64 bytes of every session, used or not (a device that publishes without
/// QoS 2 keeps one box, 24 bytes more than inline, and saves the other's 56).
struct Ordered<F: Future>(Option<Box<FuturesOrdered<F>>>);

impl<F: Future> Ordered<F> {
    fn new() -> Ordered<F> {
        Ordered(None)
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|queue| queue.is_empty())
    }

    fn push_back(&mut self, future: F) {
        self.0
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(future);
    }

    /// The next output in order; `None` when empty. Cancel safe.
    fn next(&mut self) -> impl Future<Output = Option<F::Output>> + '_ {
        std::future::poll_fn(move |cx| match &mut self.0 {
            Some(queue) => queue.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        })
    }
}

/// A change of the receipt store being made durable.
type Durably = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// A packet id released, whether it was awaiting release, and whether its release was made
/// durable.
type Releasing = Pin<Box<dyn Future<Output = (u16, bool, Result<(), String>)> + Send>>;

/// Why a connection ended, and what that means for the client.
#[derive(Debug, Clone, Copy)]
struct End {
    /// MQTT 5 DISCONNECT reason to send, if any.
    reason: Option<u8>,
    /// Store the will (the client did not end the connection normally).
    will: bool,
    /// For the log line.
    why: &'static str,
}

impl End {
    const fn new(reason: Option<u8>, will: bool, why: &'static str) -> End {
        End { reason, will, why }
    }
    const CLIENT: End = End::new(None, false, "client disconnected");
    const CLIENT_WITH_WILL: End = End::new(None, true, "client disconnected with will");
    const PEER_CLOSED: End = End::new(None, true, "connection closed without DISCONNECT");
    const SHUTDOWN: End = End::new(Some(0x8b), false, "gateway shutting down");
    const TAKEN_OVER: End = End::new(Some(0x8e), true, "session taken over");
    const KEEPALIVE: End = End::new(Some(0x8d), true, "keepalive timeout");
}

/// Publishes refused for lack of rights before the connection is closed: a device that keeps
/// trying is misconfigured or hostile, and each refusal is a WARN line.
const MAX_DENIED: u32 = 10;

/// A connection's stream: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// Serves one accepted connection until it closes. `cert` is what a client certificate
/// verified during the TLS handshake says.
pub fn run<S: Stream>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cert: Option<CertClaim>,
) -> impl Future<Output = ()> + Send {
    // Each phase boxed (and bound by `let`: a temporary in an awaited expression keeps its
    // space even once moved), so the connection's future is the size of the phase it is in
    // (the session and its loop while it serves), not of every phase at once. The arguments
    // go into the first box here, not in an `async fn`: its future would keep their room
    // (168 bytes, over 1 KiB with a TLS stream) for the connection's life, moved or not.
    let admit = Box::pin(admit(stream, peer, shared, cert));
    async move {
        let Some(mut session) = admit.await else {
            return;
        };
        let end = session.serve().await;
        // Boxed: its goodbye, the sessions journal's sync and a will's append are not part
        // of the connection's future while it serves. The session stays where it is: moved
        // into the box it would be there twice while 10,000 devices leave at once.
        let finish = Box::pin(session.finish(end));
        finish.await;
    }
}

/// CONNECT, authentication and the session it gets: `None` if refused (answered and closed).
async fn admit<S: Stream>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cert: Option<CertClaim>,
) -> Option<Session<S>> {
    let mut conn = Connection::new(stream, shared.config.packet_limit());
    let Some((connect, version)) = handshake(&mut conn, peer, &shared).await else {
        goodbye(&mut conn, shared.config.connect_timeout.get()).await;
        return None;
    };
    let timeout = shared.config.connect_timeout.get();
    let auth = shared.auth.current();
    let claim = Claim {
        peer,
        client_id: &connect.client_id,
        username: connect.username.as_deref(),
        password: connect.password.as_ref().map(|p| p.0.as_ref()),
        cert: cert.as_ref(),
    };
    let authenticated = tokio::select! {
        r = tokio::time::timeout(timeout, auth.authenticate(&claim)) => match r {
            Ok(r) => r,
            Err(_) => Err(Failure::Credentials("timeout")),
        },
        _ = shared.shutdown.cancelled() => return None,
    };
    let identity = match authenticated {
        Ok(identity) => identity,
        Err(failure) => {
            auth::failed(peer, &claimed(&claim), failure.reason());
            let refusal = match failure {
                Failure::Credentials(_) => Refusal::BadCredentials,
                Failure::NotAuthorized(_) => Refusal::NotAuthorized,
            };
            refused(peer, &connect.client_id, refusal);
            conn.queue(version, &Outgoing::ConnAck(Err(refusal)));
            goodbye(&mut conn, timeout).await;
            return None;
        }
    };
    match Session::accept(conn, peer, shared, *connect, version, identity, auth) {
        Ok(mut session) => {
            if let Some(forgetting) = session.forgetting.take() {
                if let Err(e) = forgetting.await {
                    tracing::error!(client_id = %session.client_id, error = %e, "Cannot forget a previous session's QoS 2 state; refusing the connection.");
                    session
                        .finish(End::new(Some(0x80), false, "receipt store failed"))
                        .await;
                    return None;
                }
            }
            Some(session)
        }
        Err(mut refused) => {
            goodbye(&mut refused, timeout).await;
            None
        }
    }
}

/// The identity a client claimed, for a log line: never the password.
fn claimed(claim: &Claim<'_>) -> String {
    let mut out = format!("client_id={}", claim.client_id);
    if let Some(u) = claim.username {
        out.push_str(&format!(" username={u}"));
    }
    if let Some(cn) = claim.cert.and_then(|c| c.cn.as_deref()) {
        out.push_str(&format!(" cert_cn={cn}"));
    }
    out
}

fn identity_text(identity: &Identity) -> String {
    let mut out = format!("client_id={}", identity.client_id);
    if let Some(u) = &identity.username {
        out.push_str(&format!(" username={u}"));
    }
    if let Some(cn) = &identity.cert_cn {
        out.push_str(&format!(" cert_cn={cn}"));
    }
    out
}

/// Reads the CONNECT within the connect timeout and picks the codec. Answers and returns
/// `None` for anything that is not a usable CONNECT.
async fn handshake<S: Stream>(
    conn: &mut Connection<S>,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(Box<Connect>, Version)> {
    let timeout = shared.config.connect_timeout.get();
    let frame = tokio::select! {
        read = tokio::time::timeout(timeout, conn.read_frame()) => match read {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                frame_error(peer, None, &e);
                return None;
            }
            Err(_) => {
                timed_out(peer, None, "connect");
                return None;
            }
        },
        _ = shared.shutdown.cancelled() => return None,
    };
    let version = match packet::peek_version(&frame) {
        Ok(version) => version,
        Err(answer) => {
            unsupported(peer, &frame, answer);
            match answer {
                Unsupported::LegacyConnack => conn.queue_raw(packet::encode_legacy_refusal),
                Unsupported::Close => {}
            }
            return None;
        }
    };
    match decode(version, frame, shared) {
        Ok(Packet::Connect(connect)) => Some((connect, version)),
        Ok(_) => None,
        Err(e) => {
            protocol_error(peer, None, e);
            conn.queue(
                version,
                &Outgoing::ConnAck(Err(Refusal::Invalid(e.reason_code()))),
            );
            None
        }
    }
}

fn decode(version: Version, frame: Frame, shared: &Shared) -> Result<Packet, DecodeError> {
    let limits = Limits {
        max_user_properties: shared.config.max_user_properties,
    };
    packet::decode(version, frame, &limits)
}

/// The MQTT 5 properties of a publish or will that become Kafka headers.
struct Extra {
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    user_properties: Vec<(String, String)>,
}

/// One connected client.
struct Session<S> {
    conn: Connection<S>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    version: Version,
    client_id: String,
    /// Who the client proved to be; topic rights are checked against it.
    identity: Identity,
    /// The rules and credentials in force when it connected.
    auth: Arc<Auth>,
    /// Publishes refused for lack of rights so far.
    denied: u32,
    /// This connection's entry in the registry (a takeover replaces it).
    conn_id: u64,
    /// How long the registry keeps this session's QoS 2 state after the connection ends:
    /// `None` not at all (clean start), `Some(None)` until the next clean start.
    keep_session: Option<Option<Duration>>,
    /// Cancelled when another connection takes this client id over, or when the gateway
    /// shuts down (a child of its shutdown token).
    taken_over: CancellationToken,
    will: Option<Box<Will>>,
    /// 1.5 × the keepalive in force (never unlimited: the gateway caps it).
    keepalive: Duration,
    /// Appends not yet durable, QoS 0 included (their failures are counted).
    pending: Ordered<Pending>,
    /// QoS 1/2 packet-id state: what is being stored, what awaits PUBREL.
    inflight: Inflight,
    /// PUBRELs whose release is being made durable (`ingest::receipts`); each one's PUBCOMP
    /// goes when it is, in order.
    releasing: Ordered<Releasing>,
    /// A previous session's QoS 2 state being forgotten, and a new persistent session being
    /// journaled; the new session is served only once both are durable (`ingest::receipts`).
    forgetting: Option<Durably>,
    /// QoS 0 appends pending; capped like QoS 1/2 so a QoS 0 flood cannot queue without bound.
    pending_qos0: usize,
    /// MQTT 5 topic aliases set by the client; boxed on first use (most clients set none,
    /// and an empty map is 48 bytes of every connection).
    #[allow(clippy::box_collection)]
    aliases: Option<Box<HashMap<u16, String>>>,
    /// This connection's hold on its broker session (subscriptions, mailbox).
    attached: Attached,
    /// Messages sent to the client and not yet acknowledged.
    outflight: Outflight,
    /// The client's Maximum Packet Size: larger messages are not sent [MQTT-3.1.2-24].
    client_max_packet: Option<u32>,
    /// Acks freed slots this turn: the mailbox is taken from once, after the turn, not once
    /// per ack (a subscriber's acks come dozens to a read, and each take locks the mailbox
    /// its publishers are pushing to).
    refill: bool,
}

impl<S: Stream> Session<S> {
    /// Validates the CONNECT, takes over the client id, queues the CONNACK. A refused
    /// CONNECT gives the connection back with the refusal queued.
    fn accept(
        mut conn: Connection<S>,
        peer: SocketAddr,
        shared: Arc<Shared>,
        mut connect: Connect,
        version: Version,
        identity: Identity,
        auth: Arc<Auth>,
    ) -> Result<Session<S>, Connection<S>> {
        // The certificate identity may have replaced (or filled in) the client id.
        let replaced = identity.client_id != connect.client_id;
        connect.client_id = identity.client_id.clone();
        let config = &shared.config;
        let refusal = if connect.auth_method {
            Some(Refusal::AuthMethod)
        } else if connect.client_id.len() > config.max_client_id_len
            || (connect.client_id.is_empty() && version == Version::V4 && !connect.clean_start)
        {
            Some(Refusal::ClientId)
        } else {
            None
        };
        // A will is a publish too: it must be within the client's rights.
        let will_denied = connect
            .will
            .as_ref()
            .is_some_and(|w| !auth.may_publish(&identity, &w.topic));
        let refusal = refusal.or_else(|| {
            will_denied.then(|| {
                auth::failed(peer, &identity_text(&identity), "will_denied");
                Refusal::NotAuthorized
            })
        });
        if let Some(refusal) = refusal {
            refused(peer, &connect.client_id, refusal);
            conn.queue(version, &Outgoing::ConnAck(Err(refusal)));
            return Err(conn);
        }
        let assigned = connect.client_id.is_empty();
        let client_id = if assigned {
            format!("edgegate-{:016x}", rand::random::<u64>())
        } else {
            connect.client_id
        };
        let cap = config.keepalive_cap();
        let (keep_alive, server_keep_alive) = if connect.keep_alive == 0 || connect.keep_alive > cap
        {
            // 3.1.1 clients cannot be told; they are held to the cap all the same.
            (cap, (version == Version::V5).then_some(cap))
        } else {
            (connect.keep_alive, None)
        };
        // MQTT 5 keeps a session by its Session Expiry Interval alone: Clean Start only
        // discards the previous one first [MQTT-3.1.2-4], and the new one outlives the
        // connection if the interval is above 0 [MQTT-3.1.2-23]. 3.1.1 keeps it without
        // Clean Session, until a clean session.
        let keep_session = match (version, connect.clean_start, connect.session_expiry) {
            (Version::V4, true, _) | (Version::V5, _, 0) => None,
            // MQTT 5 0xFFFFFFFF: never expires.
            (Version::V4, false, _) | (Version::V5, _, u32::MAX) => Some(None),
            (Version::V5, _, secs) => Some(Some(Duration::from_secs(secs.into()))),
        };
        let registered = shared.registry.register(
            &client_id,
            connect.clean_start,
            keep_session.is_some(),
            &shared.shutdown,
        );
        let attached = shared
            .broker
            .attach(&client_id, connect.clean_start, keep_session);
        let session_present = registered.session_present || attached.session_present;
        let max_awaiting = usize::from(config.receive_maximum);
        // The durable QoS 2 state: a session resumed after a restart (the broker's journal
        // kept it, the registry did not) finds its ids awaiting PUBREL again; a new session
        // forgets the old one's.
        let mut forgetting = None;
        if let Some(receipts) = shared.pipeline.receipts() {
            if !session_present {
                // A new persistent session is in the broker's journal before anything is
                // acknowledged to it, or a crash could leave receipts of a session the
                // restarted gateway does not know, and the client's DUP would be stored again.
                let forget = receipts.forget(&client_id);
                let sync = keep_session
                    .is_some()
                    .then(|| shared.broker.sync_sessions());
                if forget.is_some() || sync.is_some() {
                    forgetting = Some(Box::pin(async move {
                        if let Some(forget) = forget {
                            forget.await?;
                        }
                        if let Some(sync) = sync {
                            sync.await?;
                        }
                        Ok(())
                    }) as Durably);
                }
            } else if !registered.session_present {
                let mut state = registered
                    .awaiting_rel
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                state.ids = receipts.awaiting(&client_id);
            }
        }
        conn.queue(
            version,
            &Outgoing::ConnAck(Ok(ConnAckProps {
                session_present,
                assigned_client_id: ((assigned || replaced) && version == Version::V5)
                    .then(|| client_id.clone()),
                server_keep_alive,
                receive_maximum: config.receive_maximum,
                topic_alias_maximum: config.topic_alias_maximum,
                max_packet_size: u32::try_from(config.packet_limit()).unwrap_or(u32::MAX),
                wildcard_subscriptions: true,
                shared_subscriptions: true,
                subscription_ids: true,
                retain_available: true,
            })),
        );
        connected(peer, &client_id, version, keep_alive);
        // The client's Receive Maximum (3.1.1: none), within the gateway's own.
        let outflight = Outflight::new(usize::from(
            connect.receive_maximum.min(config.receive_maximum),
        ));
        Ok(Session {
            conn,
            peer,
            shared,
            version,
            client_id,
            identity,
            auth,
            denied: 0,
            conn_id: registered.conn_id,
            taken_over: registered.taken_over,
            keep_session,
            will: connect.will.map(Box::new),
            keepalive: Duration::from_millis(u64::from(keep_alive) * 1500),
            pending: Ordered::new(),
            inflight: Inflight::new(registered.awaiting_rel, max_awaiting),
            releasing: Ordered::new(),
            forgetting,
            pending_qos0: 0,
            aliases: None,
            attached,
            outflight,
            client_max_packet: connect.maximum_packet_size,
            refill: false,
        })
    }

    /// The connection's main loop. Returns why it ended; pending appends are finished and
    /// acknowledged before a server-side end (shutdown, takeover) returns.
    async fn serve(&mut self) -> End {
        let mailbox = Arc::clone(&self.attached.mailbox);
        // One waiter for the session's life, renewed when it fires, not one per turn.
        let notified = mailbox.notified();
        tokio::pin!(notified);
        // What waited for this session while its client was away goes out first.
        self.deliver();
        let mut draining: Option<End> = None;
        let window = self.keepalive;
        let keepalive = tokio::time::sleep(window);
        tokio::pin!(keepalive);
        let receive_maximum = usize::from(self.shared.config.receive_maximum);
        // While the gateway is not reading, the client's PINGREQs wait unread: the keepalive
        // clock restarts when reading resumes instead of punishing the client for our pause.
        let mut paused = false;
        // Above the high watermark the connection is throttled, not frozen: one read per
        // `PRESSURE_READ_INTERVAL`. Memory stays flat either way (each read is one frame that
        // goes to disk or is refused), and the log still reaches "full", so a device that
        // keeps publishing hears 0x97 rather than stalling forever while Kafka is away.
        // Made the first time the log is above it: a timer is 100 bytes of every connection.
        let started = Instant::now();
        let mut throttle: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut throttled_read = false;
        loop {
            if std::mem::take(&mut self.refill) {
                self.deliver();
            }
            if let Err(e) = self.flush().await {
                io_error(self.peer, &self.client_id, &e);
                return End::PEER_CLOSED;
            }
            if let Some(end) = draining {
                if self.pending.is_empty() {
                    return end;
                }
            }
            // The log's pressure is looked at each turn, never waited on: going above the
            // watermark matters at the next read, and coming back below it at the
            // throttle's next tick (a watch's `changed()` was 120 bytes of every
            // connection's future).
            let high = *self.shared.pressure.borrow() == Pressure::High;
            let slots_free = draining.is_none() && self.slots_free(receive_maximum);
            let can_read = slots_free && (!high || throttled_read);
            if high && throttle.is_none() {
                throttle = Some(Box::pin(tokio::time::sleep_until(
                    started + PRESSURE_READ_INTERVAL,
                )));
            }
            if paused && can_read {
                keepalive.as_mut().reset(Instant::now() + window);
            }
            paused = !can_read;
            tokio::select! {
                // Acknowledge first: a durable append frees a slot and unblocks the client.
                biased;
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(end) = self.complete(done) {
                        draining.get_or_insert(end);
                    }
                    // One group commit makes many appends durable at once: take every ack
                    // that is ready now so they leave in one write, not one syscall each.
                    // (Polling without a waker loses nothing: the next turn polls again.)
                    while let Some(Some(done)) = self.pending.next().now_or_never() {
                        if let Err(end) = self.complete(done) {
                            draining.get_or_insert(end);
                        }
                    }
                }
                Some((pkid, found, durable)) = self.releasing.next(), if !self.releasing.is_empty() => {
                    if let Err(e) = durable {
                        tracing::error!(client_id = %self.client_id, error = %e, "Cannot make a QoS 2 release durable; closing the connection.");
                        return End::new(Some(0x80), false, "receipt store failed");
                    }
                    self.conn.queue(self.version, &Outgoing::PubComp { pkid, found });
                }
                // Messages for the client: taken as its Receive Maximum allows, so a full
                // window leaves them queued in the mailbox (bounded) until acks free it.
                () = &mut notified, if draining.is_none() && self.outflight.slots() > 0 => {
                    notified.set(mailbox.notified());
                    self.deliver();
                }
                // The gateway shutting down cancels this too (a child token).
                _ = self.taken_over.cancelled(), if draining.is_none() => {
                    if self.shared.shutdown.is_cancelled() {
                        draining = Some(End::SHUTDOWN);
                    } else {
                        taken_over(self.peer, &self.client_id);
                        draining = Some(End::TAKEN_OVER);
                    }
                }
                () = std::future::poll_fn(|cx| match throttle.as_mut() {
                    Some(timer) => timer.as_mut().poll(cx),
                    None => std::task::Poll::Pending,
                }), if slots_free && high && !throttled_read => {
                    throttled_read = true;
                }
                read = self.conn.read_frame(), if can_read => {
                    keepalive.as_mut().reset(Instant::now() + window);
                    if throttled_read {
                        throttled_read = false;
                        if let Some(timer) = throttle.as_mut() {
                            timer.as_mut().reset(Instant::now() + PRESSURE_READ_INTERVAL);
                        }
                    }
                    let frame = match read {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return End::PEER_CLOSED,
                        Err(e) => return self.framing_failed(&e),
                    };
                    // On the client's side of an end, acks still pending are dropped: the
                    // client resends what it did not see acknowledged.
                    if let Err(end) = self.take(frame) {
                        return end;
                    }
                    // Whatever else that read brought is handled before the next write (a
                    // subscriber's PUBACKs come dozens at a time, and the messages they free
                    // should leave together). Not under pressure: there it is one read per
                    // interval, and the slots are checked again before each packet.
                    let mut more = BUFFERED_PER_TURN;
                    while more > 0 && !high && self.slots_free(receive_maximum) {
                        more -= 1;
                        let frame = match self.conn.buffered_frame() {
                            Ok(Some(frame)) => frame,
                            Ok(None) => break,
                            Err(e) => return self.framing_failed(&e),
                        };
                        if let Err(end) = self.take(frame) {
                            return end;
                        }
                    }
                }
                _ = &mut keepalive, if can_read => {
                    timed_out(self.peer, Some(&self.client_id), "keepalive");
                    return End::KEEPALIVE;
                }
            }
        }
    }

    /// Decodes and handles one frame; `Err` ends the connection.
    fn take(&mut self, frame: Frame) -> Result<(), End> {
        let packet = decode(self.version, frame, &self.shared).map_err(|e| {
            protocol_error(self.peer, Some(&self.client_id), e);
            End::new(Some(e.reason_code()), true, "protocol error")
        })?;
        self.handle(packet)
    }

    /// Whether another packet may be read: below the client's QoS 0 window and, for 3.1.1
    /// (which has no receive maximum), below the limit of appends in flight.
    fn slots_free(&self, receive_maximum: usize) -> bool {
        self.pending_qos0 < receive_maximum
            && (self.version == Version::V5 || self.inflight.storing() < receive_maximum)
    }

    fn framing_failed(&self, e: &FrameError) -> End {
        frame_error(self.peer, Some(&self.client_id), e);
        match e {
            FrameError::TooLarge { .. } => End::new(Some(0x95), true, "packet too large"),
            FrameError::BadLength => End::new(Some(0x81), true, "malformed packet"),
            FrameError::Truncated | FrameError::Io(_) => End::PEER_CLOSED,
        }
    }

    /// Handles one packet; `Err` ends the connection.
    fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => self.publish(publish),
            Packet::PubRel { pkid } => {
                let Ok(found) = self.inflight.release(pkid) else {
                    return Err(self.violation("PUBREL before PUBREC"));
                };
                // A persistent session's release is durable before PUBCOMP, or a new message
                // reusing the id after a crash would be taken for this one and dropped.
                let durable = found
                    .filter(|_| self.keep_session.is_some())
                    .zip(self.shared.pipeline.receipts())
                    .and_then(|(seq, receipts)| receipts.release(&self.client_id, pkid, seq));
                let found = found.is_some();
                match durable {
                    Some(durable) => {
                        self.releasing
                            .push_back(Box::pin(async move { (pkid, found, durable.await) }));
                    }
                    // PUBCOMPs leave in the order of their PUBRELs.
                    None if !self.releasing.is_empty() => {
                        self.releasing
                            .push_back(Box::pin(async move { (pkid, found, Ok(())) }));
                    }
                    None => {
                        self.conn
                            .queue(self.version, &Outgoing::PubComp { pkid, found });
                    }
                }
                Ok(())
            }
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for f in &subscribe.filters {
                    codes.push(self.subscribe(f, subscribe.id)?);
                }
                self.conn.queue(
                    self.version,
                    &Outgoing::SubAck {
                        pkid: subscribe.pkid,
                        codes,
                    },
                );
                // Retained messages the new subscriptions matched follow the SUBACK.
                self.deliver();
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                let codes = unsubscribe
                    .filters
                    .iter()
                    .map(|f| {
                        if self.shared.broker.unsubscribe(&self.attached, f) {
                            0x00
                        } else {
                            // No subscription existed (3.1.1 has no codes).
                            0x11
                        }
                    })
                    .collect();
                self.conn.queue(
                    self.version,
                    &Outgoing::UnsubAck {
                        pkid: unsubscribe.pkid,
                        codes,
                    },
                );
                Ok(())
            }
            Packet::PubAck { pkid, reason } => match self.outflight.puback(pkid) {
                AckResult::Finished(out) => {
                    let kind = if reason >= 0x80 {
                        tracing::debug!(peer = %self.peer, client_id = %self.client_id, reason, "A subscriber refused a message.");
                        OutcomeKind::Refused
                    } else {
                        OutcomeKind::Delivered
                    };
                    self.finished(out, kind);
                    Ok(())
                }
                _ => self.unknown_ack("PUBACK for no QoS 1 message in flight"),
            },
            Packet::PubRec { pkid, reason } => match self.outflight.pubrec(pkid, reason) {
                AckResult::SendRel => {
                    self.conn
                        .queue(self.version, &Outgoing::PubRel { pkid, found: true });
                    Ok(())
                }
                // An error PUBREC ends the flow: the device refused it.
                AckResult::Finished(out) => {
                    self.finished(out, OutcomeKind::Refused);
                    Ok(())
                }
                AckResult::Unknown => {
                    // MQTT 5 says so in a PUBREL; 3.1.1 has no way to and is closed.
                    if self.version == Version::V5 {
                        self.conn
                            .queue(self.version, &Outgoing::PubRel { pkid, found: false });
                        Ok(())
                    } else {
                        self.unknown_ack("PUBREC for no QoS 2 message in flight")
                    }
                }
            },
            Packet::PubComp { pkid } => match self.outflight.pubcomp(pkid) {
                AckResult::Finished(out) => {
                    self.finished(out, OutcomeKind::Delivered);
                    Ok(())
                }
                _ => self.unknown_ack("PUBCOMP for no PUBREL sent"),
            },
            Packet::PingReq => {
                self.conn.queue(self.version, &Outgoing::PingResp);
                Ok(())
            }
            Packet::Disconnect { reason: 0x04 } => Err(End::CLIENT_WITH_WILL),
            Packet::Disconnect { .. } => Err(End::CLIENT),
            Packet::Connect(_) => Err(self.violation("second CONNECT")),
            Packet::Auth => Err(self.violation("AUTH without enhanced authentication")),
            Packet::Unexpected(name) => Err(self.violation(name)),
        }
    }

    /// An ack for a packet id this connection has not sent (or not in that state). A
    /// resumed session's client may ack what an earlier connection sent, so MQTT 5 ignores
    /// it; 3.1.1 too, as mosquitto does. Logged at DEBUG as a protocol oddity.
    fn unknown_ack(&self, what: &'static str) -> Result<(), End> {
        tracing::debug!(peer = %self.peer, client_id = %self.client_id, what, "Ignored an acknowledgement for nothing in flight.");
        Ok(())
    }

    /// One filter of a SUBSCRIBE: its SUBACK code, or the end of the connection for a
    /// protocol error.
    fn subscribe(&mut self, f: &packet::Subscription, id: Option<u32>) -> Result<u8, End> {
        let Ok(parsed) = broker::filter::parse(&f.filter) else {
            subscribed(self.peer, &self.client_id, &f.filter, Err("invalid"));
            return Ok(0x8f);
        };
        if !self.auth.may_subscribe(&self.identity, parsed.filter) {
            auth::failed(
                self.peer,
                &format!("{} filter={}", identity_text(&self.identity), f.filter),
                "subscribe_denied",
            );
            subscribed(self.peer, &self.client_id, &f.filter, Err("denied"));
            return Ok(0x87);
        }
        let request = Request {
            filter: &f.filter,
            options: Options {
                qos: f.qos,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                id,
            },
            retain_handling: f.retain_handling,
        };
        match self.shared.broker.subscribe(&self.attached, &request) {
            Ok(granted) => {
                subscribed(self.peer, &self.client_id, &f.filter, Ok(granted));
                Ok(granted)
            }
            Err(SubscribeRefused::FilterInvalid) => {
                subscribed(self.peer, &self.client_id, &f.filter, Err("invalid"));
                Ok(0x8f)
            }
            Err(SubscribeRefused::Quota) => {
                subscribed(self.peer, &self.client_id, &f.filter, Err("quota"));
                Ok(SubscribeRefused::Quota.code())
            }
            Err(SubscribeRefused::SharedNoLocal) => {
                Err(self.violation("No Local on a shared subscription"))
            }
        }
    }

    /// A message the client finished: off the session's journal (a command's outcome
    /// reported) if it was held for that, and a slot is free for the end of the turn.
    fn finished(&mut self, out: Option<Outbound>, kind: OutcomeKind) {
        if let Some(out) = out {
            self.shared.broker.finished(&self.attached, &out, kind);
        }
        self.refill = true;
    }

    /// Writes what the session's mailbox holds, as far as the client's window allows.
    ///
    /// Again while every QoS 1/2 message taken was dropped as too large for the client and
    /// none is in flight: the last may have been the one message an idle connection reads
    /// back over the read-back budget, and no acknowledgement would come to call it back.
    /// Each round takes at least one message off the queue.
    fn deliver(&mut self) {
        while self.deliver_once() && self.outflight.is_idle() {}
    }

    /// One take from the mailbox, written; whether it took a QoS 1/2 message.
    fn deliver_once(&mut self) -> bool {
        let now = now_ms();
        let taken = self.attached.mailbox.take(
            self.outflight.slots(),
            DELIVER_BATCH,
            now,
            self.outflight.is_idle(),
        );
        if !taken.expired.is_empty() {
            self.shared
                .broker
                .count_dropped(Dropped::Expired, taken.expired.len() as u64);
            for out in &taken.expired {
                self.shared
                    .broker
                    .finished(&self.attached, out, OutcomeKind::Expired);
            }
        }
        // Counted once a turn: a shared counter per message was a contended atomic add
        // for every delivery of every subscriber.
        let mut delivered = [0u64; 3];
        let to_acknowledge = taken.ready.iter().filter(|o| o.qos > 0).count();
        self.outflight.reserve(to_acknowledge);
        let bytes = taken
            .ready
            .iter()
            .map(|o| publish_len_hint(self.version, o, now))
            .sum();
        self.conn.reserve(bytes);
        for out in taken.ready {
            if let Some(qos) = self.send(out, now) {
                delivered[usize::from(qos.min(2))] += 1;
            }
        }
        for (counter, n) in self.shared.counters.delivered.iter().zip(delivered) {
            if n > 0 {
                counter.increment(n);
            }
        }
        to_acknowledge > 0
    }

    /// Queues `out` for the client; the QoS it was delivered with, or `None` if it was not
    /// a delivery (a PUBREL owed) or was dropped as too large for the client.
    fn send(&mut self, out: Outbound, now: i64) -> Option<u8> {
        if out.released {
            let pkid = self.outflight.send(out);
            self.conn
                .queue(self.version, &Outgoing::PubRel { pkid, found: true });
            return None;
        }
        let qos = out.qos;
        let (version, conn) = (self.version, &mut self.conn);
        let max = self
            .client_max_packet
            .map_or(usize::MAX, |max| usize::try_from(max).unwrap_or(usize::MAX));
        // Measured and written in one step; a packet over the client's maximum is not
        // written [MQTT-3.1.2-24].
        let mut write = |out: &Outbound, pkid: u16| {
            let flags = (out.qos, out.retain, out.dup && out.qos > 0);
            let publish = out_publish(&out.message, flags, pkid, &out.subscription_ids, now);
            let mut written = false;
            conn.queue_raw(|buf| {
                written = encode_publish_within(version, &publish, max, buf).is_ok();
            });
            written
        };
        let refused = if qos == 0 {
            (!write(&out, 0)).then_some(out)
        } else {
            // Held after the write only where it is needed again: a persistent session
            // sends it again after a reconnect, a journaled one is finished by its id, a
            // command's outcome is reported.
            let hold =
                self.keep_session.is_some() || out.store_id != 0 || out.message.command.is_some();
            self.outflight
                .send_with(out, hold, write)
                .err()
                .map(|(out, _)| out)
        };
        let Some(out) = refused else {
            return Some(qos);
        };
        // Too large for this client: dropped as if sent [MQTT-3.1.2-25].
        self.shared
            .broker
            .finished(&self.attached, &out, OutcomeKind::Refused);
        self.shared.broker.count_dropped(Dropped::TooLarge, 1);
        None
    }

    fn violation(&self, what: &'static str) -> End {
        protocol_error(
            self.peer,
            Some(&self.client_id),
            DecodeError::Protocol(what),
        );
        End::new(Some(0x82), true, "protocol error")
    }

    fn publish(&mut self, mut publish: Publish) -> Result<(), End> {
        if self.version == Version::V5 {
            self.resolve_alias(&mut publish)?;
        }
        let (qos, pkid) = (publish.qos, publish.pkid);
        if !self.auth.may_publish(&self.identity, &publish.topic) {
            return self.deny(qos, pkid, &publish.topic);
        }
        // 3.1.1 has no receive maximum; its connection is simply not read at the limit.
        let limit = (self.version == Version::V5)
            .then_some(usize::from(self.shared.config.receive_maximum));
        match self.inflight.publish(qos, pkid, limit) {
            OnPublish::Store => {}
            OnPublish::Duplicate => return Ok(()),
            OnPublish::ResendPubRec => {
                self.conn
                    .queue(self.version, &Outgoing::PubRec { pkid, reason: 0 });
                return Ok(());
            }
            OnPublish::OverLimit => {
                protocol_error(
                    self.peer,
                    Some(&self.client_id),
                    DecodeError::Protocol("receive maximum exceeded"),
                );
                return Err(End::new(Some(0x93), true, "receive maximum exceeded"));
            }
        }
        self.shared.counters.received[usize::from(qos.min(2))].increment(1);
        // Built only when someone will use it: with no subscribers the uplink pays nothing.
        let message = (publish.retain || self.shared.broker.has_subscribers()).then(|| {
            Arc::new(Message {
                topic: Arc::from(publish.topic.as_str()),
                payload: publish.payload.clone(),
                qos,
                retain: publish.retain,
                publisher: Some(Arc::clone(&self.attached.client)),
                expires_ms: publish
                    .message_expiry
                    .map(|secs| now_ms() + i64::from(secs) * 1000),
                props: Props {
                    payload_format_utf8: publish.payload_format_utf8,
                    content_type: publish.content_type.clone(),
                    response_topic: publish.response_topic.clone(),
                    correlation_data: publish.correlation_data.clone(),
                    user_properties: publish.user_properties.clone(),
                },
                command: None,
            })
        });
        let inbound = self.inbound(
            publish.topic,
            publish.payload,
            qos,
            Extra {
                content_type: publish.content_type,
                response_topic: publish.response_topic,
                correlation_data: publish.correlation_data,
                user_properties: publish.user_properties,
            },
        );
        match self.submit(qos, pkid, inbound) {
            Ok(durable) => {
                if qos == 0 {
                    self.pending_qos0 += 1;
                }
                self.pending.push_back(Box::pin(async move {
                    Completion {
                        qos,
                        pkid,
                        result: durable.await,
                        message,
                        persisted: None,
                    }
                }));
                Ok(())
            }
            Err(rejected) => {
                self.inflight.stored(qos, pkid, None);
                self.reject(qos, pkid, &rejected)
            }
        }
    }

    /// Appends a message. A QoS 2 message of a persistent session carries a receipt
    /// (`ingest::receipts`), so its "stored, awaiting PUBREL" survives a crash with it: made
    /// under the session's QoS 2 lock, and without a receipt once a newer connection has
    /// started a new session for the client (this one is ending; see `Qos2::ended`).
    fn submit(&self, qos: u8, pkid: u16, inbound: Inbound) -> Result<Durable, Rejected> {
        let pipeline = &self.shared.pipeline;
        let receipts = pipeline
            .receipts()
            .filter(|_| qos == 2 && self.keep_session.is_some());
        let Some(receipts) = receipts else {
            return pipeline.submit(inbound);
        };
        let session = self.inflight.released();
        if session.ended {
            return pipeline.submit(inbound);
        }
        let durable = receipts.append_mqtt(&self.client_id, pkid, |receipt| {
            pipeline.submit_with_receipt(inbound, receipt)
        });
        drop(session);
        durable
    }

    /// A publish outside the client's rights: not stored. MQTT 5 hears 0x87 in its
    /// PUBACK/PUBREC (a QoS 0 publish, which has no ack, or too many refusals, end the
    /// connection with DISCONNECT 0x87); 3.1.1 cannot be told and is disconnected.
    fn deny(&mut self, qos: u8, pkid: u16, topic: &str) -> Result<(), End> {
        auth::failed(
            self.peer,
            &format!("{} topic={topic}", identity_text(&self.identity)),
            "topic_denied",
        );
        self.denied += 1;
        if self.version == Version::V4 {
            return Err(End::new(None, true, "publish not authorized"));
        }
        if qos == 0 || self.denied >= MAX_DENIED {
            return Err(End::new(Some(0x87), true, "publish not authorized"));
        }
        self.queue_refusal(qos, pkid, 0x87);
        Ok(())
    }

    /// Answers a refused QoS 1 or 2 publish (MQTT 5) with its reason code.
    fn queue_refusal(&mut self, qos: u8, pkid: u16, reason: u8) {
        let ack = if qos == 1 {
            Outgoing::PubAck { pkid, reason }
        } else {
            Outgoing::PubRec { pkid, reason }
        };
        self.conn.queue(self.version, &ack);
    }

    /// Applies MQTT 5 topic aliases (3.3.2.3.4) so `publish.topic` is the real topic.
    fn resolve_alias(&mut self, publish: &mut Publish) -> Result<(), End> {
        match publish.topic_alias {
            None if publish.topic.is_empty() => {
                Err(self.violation("empty topic without a topic alias"))
            }
            None => Ok(()),
            Some(alias) if alias == 0 || alias > self.shared.config.topic_alias_maximum => {
                protocol_error(
                    self.peer,
                    Some(&self.client_id),
                    DecodeError::Protocol("topic alias out of range"),
                );
                Err(End::new(Some(0x94), true, "topic alias invalid"))
            }
            Some(alias) if publish.topic.is_empty() => {
                match self.aliases.as_ref().and_then(|a| a.get(&alias)) {
                    Some(topic) => {
                        publish.topic = topic.clone();
                        Ok(())
                    }
                    None => Err(self.violation("unknown topic alias")),
                }
            }
            Some(alias) => {
                self.aliases
                    .get_or_insert_default()
                    .insert(alias, publish.topic.clone());
                Ok(())
            }
        }
    }

    fn inbound(&self, topic: String, payload: Bytes, qos: u8, extra: Extra) -> Inbound {
        inbound(self.client_id.clone(), topic, payload, qos, extra, false)
    }

    /// An append resolved: acknowledge it, or report why it was not stored.
    fn complete(&mut self, mut done: Completion) -> Result<(), End> {
        if done.persisted.is_some() {
            // The retained or persistent copies are durable (or refused, logged and
            // counted): the record was stored before, so the device hears success.
            return self.acknowledge(done.qos, done.pkid);
        }
        if done.result.is_ok() {
            if let Some(wait) = hand_to_broker(&self.shared.broker, done.message.take()) {
                if done.qos > 0 {
                    let (qos, pkid) = (done.qos, done.pkid);
                    self.pending.push_back(Box::pin(async move {
                        Completion {
                            qos,
                            pkid,
                            result: Ok(0),
                            message: None,
                            persisted: Some(wait.await),
                        }
                    }));
                    self.inflight
                        .stored(qos, pkid, done.result.as_ref().ok().copied());
                    return Ok(());
                }
            }
        }
        if done.qos == 0 {
            self.pending_qos0 = self.pending_qos0.saturating_sub(1);
            if let Err(e) = done.result {
                self.reject(0, 0, &Rejected::from(e))?;
            }
            return Ok(());
        }
        self.inflight
            .stored(done.qos, done.pkid, done.result.as_ref().ok().copied());
        match done.result {
            Ok(_seq) => self.acknowledge(done.qos, done.pkid),
            Err(e) => self.reject(done.qos, done.pkid, &Rejected::from(e)),
        }
    }

    fn acknowledge(&mut self, qos: u8, pkid: u16) -> Result<(), End> {
        let (ack, counter) = match qos {
            0 => return Ok(()),
            1 => (Outgoing::PubAck { pkid, reason: 0 }, 0),
            _ => (Outgoing::PubRec { pkid, reason: 0 }, 1),
        };
        self.conn.queue(self.version, &ack);
        self.shared.counters.acks[counter].increment(1);
        Ok(())
    }

    /// A publish was not stored. MQTT 5 hears why in its PUBACK/PUBREC; 3.1.1 has no way to
    /// say it, so it gets no ack and is disconnected (and will resend after reconnecting).
    fn reject(&mut self, qos: u8, pkid: u16, rejected: &Rejected) -> Result<(), End> {
        crate::ingest::refused(
            Delivery::Mqtt { qos },
            rejected,
            self.peer,
            Some(&self.client_id),
        );
        if matches!(rejected, Rejected::Closed) {
            return Err(End::SHUTDOWN);
        }
        if qos == 0 {
            return Ok(());
        }
        if self.version == Version::V4 {
            return Err(End::new(None, true, "publish rejected"));
        }
        let reason = match rejected {
            Rejected::Route(_) => 0x90,
            Rejected::Full => 0x97,
            Rejected::TooLarge(_) => 0x83,
            Rejected::Io(_) | Rejected::Closed => 0x80,
        };
        self.queue_refusal(qos, pkid, reason);
        Ok(())
    }

    /// Writes queued packets, bounded in time: a client that stops reading is dropped.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.conn.has_queued() {
            self.conn.release_unused();
            return Ok(());
        }
        match tokio::time::timeout(self.keepalive, self.conn.flush()).await {
            Ok(result) => result,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Says goodbye (MQTT 5 DISCONNECT with a reason), stores the will if the client did
    /// not end normally, and leaves the registry.
    async fn finish(&mut self, end: End) {
        if let Some(reason) = end.reason {
            self.conn
                .queue(self.version, &Outgoing::Disconnect { reason });
        }
        let limit = self.shared.config.connect_timeout.get();
        if self.keep_session.is_some() {
            // What the client acknowledged is on disk before it sees the connection close:
            // a crash after a clean goodbye does not send those messages again.
            let _ = tokio::time::timeout(limit, self.shared.broker.sync_sessions()).await;
        }
        goodbye(&mut self.conn, limit).await;
        // Appends still pending finish in the log regardless; wait for them (briefly) so a
        // persistent session remembers which QoS 2 messages are stored.
        let _ = tokio::time::timeout(limit, async {
            while let Some(mut done) = self.pending.next().await {
                if done.persisted.is_some() {
                    // The second completion of a publish whose record was taken before.
                    continue;
                }
                if done.result.is_ok() {
                    // Stored: local subscribers get it even though its ack will not go out.
                    drop(hand_to_broker(&self.shared.broker, done.message.take()));
                }
                self.inflight
                    .stored(done.qos, done.pkid, done.result.as_ref().ok().copied());
            }
        })
        .await;
        self.shared
            .registry
            .unregister(&self.client_id, self.conn_id, self.keep_session);
        let unfinished =
            std::mem::replace(&mut self.outflight, Outflight::new(1)).into_unfinished();
        self.shared
            .broker
            .detach(&self.attached, unfinished, self.keep_session);
        disconnected(self.peer, &self.client_id, end.why);
        if let (true, Some(will)) = (end.will, self.will.take()) {
            // Published after its delay, or when the session ends if sooner, unless the
            // client is back by then [MQTT-3.1.3-9].
            let session = match self.keep_session {
                None => Duration::ZERO,
                Some(None) => self.shared.config.max_session_expiry.get(),
                Some(Some(d)) => d,
            };
            let delay = Duration::from_secs(will.delay_interval.into()).min(session);
            let owner = WillOwner {
                shared: self.shared.clone(),
                peer: self.peer,
                client_id: self.client_id.clone(),
                publisher: Arc::clone(&self.attached.client),
                conn_id: self.conn_id,
            };
            if delay.is_zero() {
                store_will(owner, *will).await;
            } else {
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = owner.shared.shutdown.cancelled() => {}
                    }
                    if owner
                        .shared
                        .registry
                        .reconnected(&owner.client_id, owner.conn_id)
                    {
                        tracing::debug!(client_id = %owner.client_id, "The client came back within its will delay: no will.");
                        return;
                    }
                    store_will(owner, *will).await;
                });
            }
        }
    }
}

/// Who a will belongs to, for publishing it after the connection is gone.
struct WillOwner {
    shared: Arc<Shared>,
    peer: SocketAddr,
    client_id: String,
    publisher: Arc<str>,
    conn_id: u64,
}

/// Stores a will in the log and hands it to local subscribers, as a broker would
/// [MQTT-3.1.2-8].
async fn store_will(owner: WillOwner, will: Will) {
    let qos = will.qos;
    let message = Arc::new(Message {
        topic: Arc::from(will.topic.as_str()),
        payload: will.payload.clone(),
        qos,
        retain: will.retain,
        publisher: Some(owner.publisher),
        expires_ms: will
            .message_expiry
            .map(|secs| now_ms() + i64::from(secs) * 1000),
        props: Props {
            payload_format_utf8: will.payload_format_utf8,
            content_type: will.content_type.clone(),
            response_topic: will.response_topic.clone(),
            correlation_data: will.correlation_data.clone(),
            user_properties: will.user_properties.clone(),
        },
        command: None,
    });
    let record = inbound(
        owner.client_id.clone(),
        will.topic,
        will.payload,
        will.qos,
        Extra {
            content_type: will.content_type,
            response_topic: will.response_topic,
            correlation_data: will.correlation_data,
            user_properties: will.user_properties,
        },
        true,
    );
    let result = match owner.shared.pipeline.submit(record) {
        Ok(durable) => durable.await.map_err(Rejected::from),
        Err(e) => Err(e),
    };
    if result.is_ok() {
        if let Some(wait) = hand_to_broker(&owner.shared.broker, Some(message)) {
            let _ = wait.await;
        }
    }
    will_stored(owner.peer, &owner.client_id, qos, result);
}

/// The PUBLISH that sends `message` with these `(qos, retain, dup)` flags.
fn out_publish<'a>(
    message: &'a Message,
    (qos, retain, dup): (u8, bool, bool),
    pkid: u16,
    subscription_ids: &'a [u32],
    now: i64,
) -> OutPublish<'a> {
    let p = &message.props;
    OutPublish {
        dup,
        qos,
        retain,
        topic: &message.topic,
        pkid,
        payload: &message.payload,
        subscription_ids,
        message_expiry: message.remaining_expiry(now),
        payload_format_utf8: p.payload_format_utf8,
        content_type: p.content_type.as_deref(),
        response_topic: p.response_topic.as_deref(),
        correlation_data: p.correlation_data.as_deref(),
        user_properties: &p.user_properties,
    }
}

/// What `out`'s PUBLISH takes on the wire, by the encoder's own layout, to size a turn's
/// write buffer once (0 for a packet too large to encode: `send` drops it).
fn publish_len_hint(version: Version, out: &Outbound, now: i64) -> usize {
    let flags = (out.qos, out.retain, out.dup && out.qos > 0);
    let pkid = u16::from(out.qos > 0);
    out_publish(&out.message, flags, pkid, &out.subscription_ids, now)
        .packet_len(version)
        .unwrap_or(0)
}

/// A header name only the gateway may write.
fn reserved_header(name: &str) -> bool {
    name.get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("edgegate-"))
}

/// The record a publish or will becomes, with its MQTT properties as Kafka headers.
fn inbound(
    device: String,
    topic: String,
    payload: Bytes,
    qos: u8,
    extra: Extra,
    will: bool,
) -> Inbound {
    let mut headers = Vec::with_capacity(4 + extra.user_properties.len() + usize::from(will));
    let delivery = Delivery::Mqtt { qos };
    headers.push((
        "mqtt-qos".to_owned(),
        Bytes::from_static(delivery.label().as_bytes()),
    ));
    if let Some(content_type) = extra.content_type {
        headers.push(("content-type".to_owned(), Bytes::from(content_type)));
    }
    // Request/response: a reply to a command reaches Kafka with what the cloud sent.
    if let Some(topic) = extra.response_topic {
        headers.push(("mqtt-response-topic".to_owned(), Bytes::from(topic)));
    }
    if let Some(data) = extra.correlation_data {
        headers.push(("mqtt-correlation-data".to_owned(), data));
    }
    // Header names beginning `edgegate-` are the gateway's (the record id consumers dedupe
    // by, the device time, the format error): a device's user property must not pass for
    // one of them, so such properties are left out.
    headers.extend(
        extra
            .user_properties
            .into_iter()
            .filter(|(k, _)| !reserved_header(k))
            .map(|(k, v)| (k, Bytes::from(v))),
    );
    if will {
        headers.push(("edgegate-will".to_owned(), Bytes::from_static(b"true")));
    }
    Inbound {
        delivery,
        device,
        topic,
        payload,
        headers,
        received_ms: now_ms(),
    }
}

/// A stored message goes to local subscribers, in the order appends resolve (publish
/// order); a retained one is also taken as its topic's retained message. What it returns
/// resolves once the copies that must survive a crash (retained, persistent sessions') are
/// durable: the publisher's ack waits for that.
fn hand_to_broker(
    broker: &Broker,
    message: Option<Arc<Message>>,
) -> Option<impl Future<Output = Result<(), String>> + Send + use<>> {
    let message = message?;
    let queued = broker.publish(&message).durable;
    let retained = if message.retain {
        broker.start_retain(&message).ok()
    } else {
        None
    };
    if queued.is_none() && retained.is_none() {
        return None;
    }
    Some(async move {
        if let Some(queued) = queued {
            queued.await?;
        }
        if let Some(retained) = retained {
            retained.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// How long a closing connection's input is drained after our last packet.
const LINGER: Duration = Duration::from_millis(500);

/// Sends what is queued (a refusal, a DISCONNECT), closes our side, and drains the client's
/// input briefly so the close does not turn into a reset that hides our reason code.
async fn goodbye<S: Stream>(conn: &mut Connection<S>, timeout: Duration) {
    let said_something = conn.has_queued();
    if tokio::time::timeout(timeout, conn.close()).await.is_ok() && said_something {
        conn.linger(LINGER).await;
    }
}

/// Refuses a connection over `max_connections`: answers its CONNECT with "busy" in its own
/// protocol (3.1.1 0x03, MQTT 5 0x89) and closes.
pub async fn refuse_busy(socket: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let mut conn = Connection::new(socket, shared.config.packet_limit());
    // Short: the client is not owed our patience, and each of these holds a socket.
    let timeout = shared
        .config
        .connect_timeout
        .get()
        .min(Duration::from_secs(2));
    let Ok(Ok(Some(frame))) = tokio::time::timeout(timeout, conn.read_frame()).await else {
        return;
    };
    let Ok(version) = packet::peek_version(&frame) else {
        return;
    };
    refused(peer, "", Refusal::Busy);
    conn.queue(version, &Outgoing::ConnAck(Err(Refusal::Busy)));
    goodbye(&mut conn, timeout).await;
}

#[cfg(test)]
mod reserved_tests {
    use super::*;

    #[test]
    fn user_properties_cannot_pass_for_the_gateways_headers() {
        assert!(reserved_header("edgegate-record-id"));
        assert!(reserved_header("EdgeGate-Device-Ms"));
        assert!(!reserved_header("edgegate"));
        assert!(!reserved_header("unit"));
        assert!(!reserved_header("é"));
        let extra = Extra {
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![
                ("unit".into(), "C".into()),
                ("edgegate-device-ms".into(), "0".into()),
                ("edgegate-record-id".into(), "forged:1".into()),
                ("edgegate-format-error".into(), "forged".into()),
            ],
        };
        let record = inbound("dev".into(), "t".into(), Bytes::new(), 1, extra, false);
        let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["mqtt-qos", "unit"]);
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;
    use crate::broker::Props;
    use crate::ingest::mqtt::encode::encode_publish;

    fn outbound(topic: &str, payload: usize, qos: u8, props: Props, ids: Vec<u32>) -> Outbound {
        let message = Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from(vec![7u8; payload]),
            qos,
            retain: false,
            publisher: None,
            expires_ms: Some(now_ms() + 3_600_000),
            props,
            command: None,
        });
        Outbound::new(message, qos, false, ids)
    }

    /// The hint sizes a turn's buffer: it must cover what is encoded (or the buffer grows
    /// after all) without reserving much more, for both versions and every property.
    #[test]
    fn the_write_hint_covers_the_encoded_publish_closely() {
        let full = Props {
            payload_format_utf8: true,
            content_type: Some("application/json".into()),
            response_topic: Some("plant/1/replies".into()),
            correlation_data: Some(Bytes::from_static(b"req-42")),
            user_properties: vec![("unit".into(), "C".into()), ("k".into(), "v".repeat(300))],
        };
        let cases = [
            outbound("a/b", 0, 0, Props::default(), vec![]),
            outbound("load/3/telemetry", 100, 1, Props::default(), vec![]),
            outbound("t", 200_000, 2, Props::default(), vec![]),
            outbound("x/y/z", 100, 1, full, vec![1, 300, 268_435_455]),
        ];
        for version in [Version::V4, Version::V5] {
            for out in &cases {
                let publish = out_publish(
                    &out.message,
                    (out.qos, false, false),
                    u16::from(out.qos > 0),
                    &out.subscription_ids,
                    now_ms(),
                );
                let mut buf = bytes::BytesMut::new();
                let len = encode_publish(version, &publish, &mut buf).unwrap();
                let hint = publish_len_hint(version, out, now_ms());
                assert!(
                    hint >= len,
                    "{version:?} {}: hint {hint} < {len}",
                    out.message.topic
                );
                let slack = if version == Version::V5 { 16 } else { 5 };
                assert!(
                    hint <= len + slack,
                    "{version:?} {}: hint {hint} for {len}",
                    out.message.topic
                );
            }
        }
    }
}
