//! The MQTT listener: MQTT 3.1.1 and 5 on one TCP port, chosen per connection by the
//! CONNECT's protocol level.
//!
//! Read top to bottom: [`serve`] accepts sockets and spawns one task per connection →
//! `session.rs` runs the connection's state machine (CONNECT, keepalive, publishes, wills,
//! takeover), with `registry.rs` (client ids across connections), `inflight.rs` (QoS 1/2
//! packet ids) and `events.rs` (its log lines and counters) beside it → `connection.rs`
//! frames packets off the socket with the size limit applied to the fixed header →
//! `packet.rs` checks the fixed-header flags and hands each frame to our own decoder, `v4.rs`
//! for 3.1.1 and `v5.rs` for MQTT 5, both on `wire.rs`'s bounds-checked reader
//! (docs/ARCHITECTURE.md says why the gateway decodes both itself); `encode.rs` writes the
//! server's PUBLISH, SUBACK, UNSUBACK and PUBREL, rumqttc's codecs the other acks.
//!
//! The contract this module keeps: a QoS 1 PUBACK or QoS 2 PUBREC is sent only after the
//! record's append has resolved as durable ([`crate::ingest::Pipeline::submit`]). Bad input
//! closes only its own connection, with a reason code where MQTT 5 has one, and is counted
//! (`edgegate_mqtt_protocol_errors_total{kind}`) and logged at DEBUG.
//!
//! Reason codes the gateway sends (MQTT 5; 3.1.1 has CONNACK codes only and is otherwise just
//! closed; `packet.rs` lists what each decoder refuses):
//!
//! | situation | answer |
//! |---|---|
//! | `MQTT` with a level other than 4 or 5, or MQTT 3.1 (`MQIsdp`) | 3.1.1-format CONNACK 0x01 (as mosquitto) |
//! | client id too long (or empty without clean session on 3.1.1) | CONNACK 0x85 (3.1.1: 0x02) |
//! | `max_connections` reached | CONNACK 0x89 Server busy (3.1.1: 0x03) |
//! | enhanced authentication requested | CONNACK 0x8C |
//! | malformed packet / protocol violation / second CONNECT | DISCONNECT 0x81 / 0x82 (a CONNECT: CONNACK; 3.1.1: close, no CONNACK) |
//! | 3.1.1 CONNECT with a password but no user name [MQTT-3.1.2-22] | close, no CONNACK |
//! | PUBACK, PUBREC, PUBCOMP (no PUBLISH is sent to clients yet) | DISCONNECT 0x82 |
//! | packet over `max_packet_size` | DISCONNECT 0x95 |
//! | wildcard or invalid publish topic | DISCONNECT 0x90 |
//! | topic alias 0 or over the maximum | DISCONNECT 0x94 |
//! | more QoS 1/2 in flight than `receive_maximum` | DISCONNECT 0x93 |
//! | too many user properties | DISCONNECT 0x83 |
//! | keepalive × 1.5 without a packet | DISCONNECT 0x8D |
//! | same client id connected again | DISCONNECT 0x8E to the old connection |
//! | gateway shutting down | DISCONNECT 0x8B after pending acks |
//! | no route / log full / too large for the log / I/O error | PUBACK or PUBREC 0x90 / 0x97 / 0x83 / 0x80 (3.1.1: no ack, disconnect) |
//! | SUBSCRIBE, UNSUBSCRIBE | SUBACK 0x83 per filter (3.1.1: 0x80), UNSUBACK 0x11 |

pub mod config;
mod connection;
mod encode;
mod events;
mod inflight;
pub mod limit;
mod outflight;
mod packet;
mod registry;
mod session;
pub mod tls;
mod v4;
mod v5;
mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_packets;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, CertClaim};
use crate::broker::Broker;
use crate::ingest::{BindError, Pipeline};
use crate::reload::Live;
use config::MqttConfig;
use limit::Limiter;
use registry::Registry;
use session::{Counters, Shared};
use tokio_rustls::rustls::ServerConfig;

/// Connections over the limit that may be answered "busy" at once; beyond that they are
/// dropped unanswered, so a flood costs no more than this many tasks.
const REFUSING_AT_ONCE: usize = 32;

/// The bound sockets: plaintext always, TLS when `[mqtt.tls] enabled`.
pub struct Listeners {
    plain: (TcpListener, SocketAddr),
    /// With the certificate set in force for its handshakes.
    tls: Option<(TcpListener, SocketAddr, Live<ServerConfig>)>,
}

impl Listeners {
    /// Binds `[mqtt] listen`, and `[mqtt.tls] listen` when `tls` (the certificate set the
    /// handshakes use) is given.
    pub async fn bind(
        config: &MqttConfig,
        tls: Option<Live<ServerConfig>>,
    ) -> Result<Listeners, BindError> {
        let plain = bind_tcp(&config.listen)
            .await
            .map_err(|source| BindError::Mqtt {
                addr: config.listen.clone(),
                source,
            })?;
        let tls = match tls {
            Some(server) => {
                let (listener, addr) =
                    bind_tcp(&config.tls.listen)
                        .await
                        .map_err(|source| BindError::MqttTls {
                            addr: config.tls.listen.clone(),
                            source,
                        })?;
                Some((listener, addr, server))
            }
            None => None,
        };
        Ok(Listeners { plain, tls })
    }

    /// One plaintext listener already bound.
    pub fn plain(listener: TcpListener) -> std::io::Result<Listeners> {
        let addr = listener.local_addr()?;
        Ok(Listeners {
            plain: (listener, addr),
            tls: None,
        })
    }

    /// The plaintext listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.plain.1
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, addr, _)| *addr)
    }
}

async fn bind_tcp(listen: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// What every accept loop shares: one connection cap, one flood limiter and one registry
/// across both listeners, so a client id taken over on one port is closed on the other.
#[derive(Clone)]
struct Accepting {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    /// TLS handshakes in progress; waited for in the connection's own task, never in the
    /// accept loop, so plaintext clients and established connections never wait on it.
    handshakes: Arc<Semaphore>,
    limiter: Arc<Limiter>,
    tracker: TaskTracker,
}

/// [`serve_listeners`] on one plaintext listener with the default `[auth]` (anonymous from
/// loopback, no rules).
pub async fn serve(
    listener: TcpListener,
    config: Arc<MqttConfig>,
    pipeline: Pipeline,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listeners = Listeners::plain(listener)?;
    let auth = Live::fixed(Auth::default());
    let broker = Broker::open(&pipeline.log().dir().join(BROKER_DIR), config.broker())?;
    serve_listeners(listeners, config, pipeline, auth, broker, shutdown).await
}

/// Where the broker keeps its state, inside `[buffer] dir`.
pub const BROKER_DIR: &str = "broker";

/// Accepts connections until `shutdown`, then stops accepting and waits for every connection
/// to finish its pending appends, send their acks and close. The caller bounds that wait with
/// its grace period.
pub async fn serve_listeners(
    listeners: Listeners,
    config: Arc<MqttConfig>,
    pipeline: Pipeline,
    auth: Live<Auth>,
    broker: Broker,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        pressure: pipeline.pressure(),
        config: config.clone(),
        pipeline,
        registry: Registry::default(),
        auth,
        broker,
        shutdown: shutdown.clone(),
        counters: Arc::new(Counters::new()),
    });
    let accepting = Accepting {
        shared,
        // Permits, not a counter: a permit is returned even if its task panics.
        connections: Arc::new(Semaphore::new(config.max_connections)),
        refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
        handshakes: Arc::new(Semaphore::new(config.tls.max_handshakes.max(1))),
        limiter: Limiter::new(
            config.connection_rate,
            config.connection_rate_per_address,
            config.max_connections_per_address,
        ),
        tracker: TaskTracker::new(),
    };
    let loops = TaskTracker::new();
    loops.spawn(accept_loop(listeners.plain.0, None, accepting.clone()));
    if let Some((listener, _, server)) = listeners.tls {
        loops.spawn(accept_loop(listener, Some(server), accepting.clone()));
    }
    loops.close();
    loops.wait().await;
    let tracker = accepting.tracker;
    tracker.close();
    let open = tracker.len();
    tracing::info!(
        open,
        "Stopped accepting MQTT connections; draining the open ones."
    );
    tracker.wait().await;
    tracing::info!("Closed every MQTT connection.");
    Ok(())
}

async fn accept_loop(listener: TcpListener, tls: Option<Live<ServerConfig>>, a: Accepting) {
    let transport = if tls.is_some() { "tls" } else { "tcp" };
    loop {
        let (socket, peer) = tokio::select! {
            // Stop accepting; connections see the same token and drain.
            _ = a.shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e);
                    // Usually out of file descriptors: give connections a moment to close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Before reading a byte: a flood is refused at the cost of one accept.
        let admitted = match a.limiter.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(over) => {
                flood_refused(peer, transport, over.reason());
                drop(socket);
                continue;
            }
        };
        // Acks are small and latency matters more than packing them.
        let _ = socket.set_nodelay(true);
        match a.connections.clone().try_acquire_owned() {
            // Each phase boxed, so the task is as large as the phase it is in, not as its
            // largest branch. Bound by `let` first: a temporary in an awaited expression
            // keeps its space in the task even once moved.
            Ok(permit) => match &tls {
                None => {
                    // Made before the task, so the socket and address go into the box and
                    // are not also kept in the task: 88 bytes where they were 200, which
                    // puts tokio's task (cache-line aligned) at 256 bytes instead of 384.
                    let serve = Box::pin(session::run(socket, peer, a.shared.clone(), None));
                    a.tracker
                        .spawn(connection(transport, permit, admitted, serve));
                }
                Some(tls) => {
                    let shared = a.shared.clone();
                    let tls = tls.clone();
                    let handshakes = a.handshakes.clone();
                    let serve = Box::pin(async move {
                        let handshake =
                            Box::pin(tls_handshake(socket, peer, &tls, &handshakes, &shared));
                        // The TLS stream (1 KiB) goes straight into the boxed session, never
                        // into a binding that lives across an await.
                        let serve = handshake.await.map(|(stream, cert)| {
                            Box::pin(session::run(stream, peer, shared, cert))
                        });
                        if let Some(serve) = serve {
                            serve.await;
                        }
                    });
                    a.tracker
                        .spawn(connection(transport, permit, admitted, serve));
                }
            },
            // TLS clients cannot be told "busy" without a handshake; they are just closed.
            Err(_) if tls.is_some() => flood_refused(peer, transport, "max_connections"),
            Err(_) => {
                if let Ok(permit) = a.refusing.clone().try_acquire_owned() {
                    let shared = a.shared.clone();
                    a.tracker.spawn(async move {
                        session::refuse_busy(socket, peer, shared).await;
                        drop(permit);
                        drop(admitted);
                    });
                }
            }
        }
    }
}

/// The TLS handshake, in the connection's own task: waits for a handshake slot and completes
/// the handshake within `handshake_timeout` of the accept. Returns the stream and what a
/// verified client certificate says (`Some(None)` would be a certificate that does not parse:
/// refused here).
async fn tls_handshake(
    socket: TcpStream,
    peer: SocketAddr,
    tls: &Live<ServerConfig>,
    handshakes: &Arc<Semaphore>,
    shared: &Shared,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<CertClaim>,
)> {
    let deadline = Instant::now() + shared.config.tls.handshake_timeout.get();
    let _slot = tokio::select! {
        slot = tokio::time::timeout_at(deadline, handshakes.clone().acquire_owned()) => match slot {
            Ok(Ok(slot)) => slot,
            _ => {
                handshake_failed(peer, "busy", None, false);
                return None;
            }
        },
        _ = shared.shutdown.cancelled() => return None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let (result, refused_subject) = tls::REFUSED_SUBJECT
        .scope(RefCell::new(None), async {
            let result = tokio::select! {
                r = tokio::time::timeout_at(deadline, acceptor.accept(socket)) => Some(r),
                _ = shared.shutdown.cancelled() => None,
            };
            let subject = tls::REFUSED_SUBJECT.with(|s| s.borrow_mut().take());
            (result, subject)
        })
        .await;
    let stream = match result? {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let (reason, is_auth) = tls::classify(&e);
            handshake_failed(peer, reason, refused_subject.as_deref(), is_auth);
            return None;
        }
        Err(_) => {
            handshake_failed(peer, "timeout", None, false);
            return None;
        }
    };
    let cert = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => None,
        Some(der) => match tls::cert_claim(der) {
            Some(claim) => Some(claim),
            None => {
                handshake_failed(peer, "certificate_invalid", None, true);
                return None;
            }
        },
    };
    metrics::counter!("edgegate_mqtt_tls_handshakes_total").increment(1);
    Some((stream, cert))
}

fn handshake_failed(peer: SocketAddr, reason: &'static str, subject: Option<&str>, auth: bool) {
    metrics::counter!("edgegate_mqtt_tls_handshake_failures_total", "reason" => reason)
        .increment(1);
    if auth {
        crate::auth::failed(peer, &format!("cert_cn={}", subject.unwrap_or("-")), reason);
    } else {
        tracing::debug!(%peer, reason, "TLS handshake failed.");
    }
}

fn flood_refused(peer: SocketAddr, transport: &'static str, reason: &'static str) {
    metrics::counter!("edgegate_mqtt_connections_refused_total", "reason" => reason).increment(1);
    tracing::debug!(%peer, transport, reason, "Refused a connection before reading it.");
}

/// A connection's task: counted from open to close, holding its places (the connection
/// limit's and its address's) until it ends. `serve` comes boxed, so the task keeps a pointer
/// to it. An `async` block, not an `async fn`: that would copy its arguments into the task a
/// second time (152 bytes, not 88, and tokio's cache-line-aligned task 384 bytes, not 256).
#[allow(clippy::manual_async_fn)]
fn connection<F: Future<Output = ()>>(
    transport: &'static str,
    permit: tokio::sync::OwnedSemaphorePermit,
    admitted: limit::Admitted,
    serve: std::pin::Pin<Box<F>>,
) -> impl Future<Output = ()> {
    async move {
        connection_opened(transport);
        serve.await;
        connection_closed(transport);
        drop(permit);
        drop(admitted);
    }
}

fn connection_opened(transport: &'static str) {
    metrics::counter!("edgegate_mqtt_connections_total").increment(1);
    metrics::gauge!("edgegate_mqtt_connections").increment(1.0);
    if transport == "tls" {
        metrics::gauge!("edgegate_mqtt_tls_connections").increment(1.0);
    }
}

fn connection_closed(transport: &'static str) {
    metrics::gauge!("edgegate_mqtt_connections").decrement(1.0);
    if transport == "tls" {
        metrics::gauge!("edgegate_mqtt_tls_connections").decrement(1.0);
    }
}

fn accept_failed(e: &std::io::Error) {
    metrics::counter!("edgegate_mqtt_accept_errors_total").increment(1);
    tracing::warn!(error = %e, "Could not accept an MQTT connection.");
}

/// HELP text of the MQTT listener's metrics (the accept loops' above, the sessions' in
/// `session.rs`).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "edgegate_mqtt_connections_total",
        "MQTT connections accepted."
    );
    describe_gauge!("edgegate_mqtt_connections", "MQTT connections open now.");
    describe_gauge!(
        "edgegate_mqtt_tls_connections",
        "MQTT connections over TLS open now."
    );
    describe_counter!(
        "edgegate_mqtt_connections_refused_total",
        "MQTT connections or CONNECTs refused, by reason (limits, floods, authentication, protocol)."
    );
    describe_counter!(
        "edgegate_mqtt_accept_errors_total",
        "Failed accepts on an MQTT listener (usually out of file descriptors)."
    );
    describe_counter!(
        "edgegate_mqtt_tls_handshakes_total",
        "MQTT TLS handshakes completed."
    );
    describe_counter!(
        "edgegate_mqtt_tls_handshake_failures_total",
        "MQTT TLS handshakes that failed or timed out, by reason."
    );
    events::describe();
}

/// For the cargo-fuzz target `mqtt_stream`: `bytes` as a client's TCP stream, cut into frames
/// as the connection cuts them (size limit on the fixed header); the first frame chooses the
/// protocol as a CONNECT does, and every frame is decoded as both 3.1.1 and 5 (so both
/// decoders see everything: CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, the acks), with the
/// reason codes and topic checks the session applies. What decodes is answered as a server
/// would, through the hand-written encoders: a PUBLISH is encoded back and must decode to the
/// same message, a SUBSCRIBE gets a SUBACK granting what it asked, an UNSUBSCRIBE an UNSUBACK,
/// a PUBREC a PUBREL. Returns the frames decoded. Panics only if the encoder and the decoder
/// disagree. Built for the fuzz crate (feature `fuzz`, which it turns on) and for the tests,
/// which run it on the corpus, mutated.
#[cfg(any(test, feature = "fuzz"))]
pub fn fuzz_stream(bytes: &[u8]) -> usize {
    use bytes::BytesMut;
    use packet::{Limits, Outgoing, Packet, Version};
    let limits = Limits {
        max_user_properties: 32,
    };
    let limit = 256 << 10;
    let (mut at, mut decoded) = (0, 0);
    let mut first = true;
    while let Ok(Some((_, frame_len))) = connection::parse_header(&bytes[at..], limit) {
        let Some(raw) = bytes.get(at..at + frame_len) else {
            break;
        };
        at += frame_len;
        let frame = || connection::Frame::parse(BytesMut::from(raw), limit);
        if first {
            first = false;
            if let Some(f) = frame() {
                let _ = packet::peek_version(&f);
            }
        }
        for version in [Version::V4, Version::V5] {
            let Some(f) = frame() else { continue };
            let mut out = BytesMut::new();
            match packet::decode(version, f, &limits) {
                Ok(Packet::Publish(p)) => {
                    decoded += 1;
                    let _ = packet::valid_topic_name(&p.topic);
                    publish_round_trip(version, &p, &limits);
                }
                Ok(Packet::Subscribe(s)) => {
                    decoded += 1;
                    let codes = s.filters.iter().map(|f| f.qos).collect();
                    let _ = packet::encode(
                        version,
                        &Outgoing::SubAck {
                            pkid: s.pkid,
                            codes,
                        },
                        &mut out,
                    );
                }
                Ok(Packet::Unsubscribe(u)) => {
                    decoded += 1;
                    let codes = vec![0x00; u.filters.len()];
                    let _ = packet::encode(
                        version,
                        &Outgoing::UnsubAck {
                            pkid: u.pkid,
                            codes,
                        },
                        &mut out,
                    );
                }
                Ok(Packet::PubRec { pkid, reason }) => {
                    decoded += 1;
                    let found = reason < 0x80;
                    let _ = packet::encode(version, &Outgoing::PubRel { pkid, found }, &mut out);
                }
                Ok(_) => decoded += 1,
                Err(e) => {
                    let _ = (e.reason_code(), e.kind(), e.detail());
                }
            }
        }
    }
    decoded
}

/// A client's PUBLISH sent back as the server would send it (without the topic alias, which
/// the server never sends) decodes to the same message.
#[cfg(any(test, feature = "fuzz"))]
fn publish_round_trip(version: packet::Version, p: &packet::Publish, limits: &packet::Limits) {
    use bytes::BytesMut;
    let out_publish = encode::OutPublish {
        dup: false,
        qos: p.qos,
        retain: p.retain,
        topic: &p.topic,
        pkid: p.pkid,
        payload: &p.payload,
        subscription_ids: &[],
        message_expiry: p.message_expiry,
        payload_format_utf8: p.payload_format_utf8,
        content_type: p.content_type.as_deref(),
        response_topic: p.response_topic.as_deref(),
        correlation_data: p.correlation_data.as_deref(),
        user_properties: &p.user_properties,
    };
    let mut out = BytesMut::new();
    let written = encode::encode_publish(version, &out_publish, &mut out);
    assert_eq!(written, Ok(out.len()), "encodes what it decoded");
    assert_eq!(out_publish.packet_len(version), Ok(out.len()));
    let frame = connection::Frame::parse(out, usize::MAX).expect("one whole frame");
    match packet::decode(version, frame, limits) {
        Ok(packet::Packet::Publish(q)) => {
            assert_eq!((q.qos, q.retain, q.pkid), (p.qos, p.retain, p.pkid));
            assert_eq!((&q.topic, &q.payload), (&p.topic, &p.payload));
            assert_eq!(q.topic_alias, None);
            assert_eq!(
                (q.message_expiry, q.payload_format_utf8),
                (p.message_expiry, p.payload_format_utf8)
            );
            assert_eq!(
                (&q.content_type, &q.response_topic, &q.correlation_data),
                (&p.content_type, &p.response_topic, &p.correlation_data)
            );
            assert_eq!(q.user_properties, p.user_properties);
        }
        other => panic!("re-decoding our own PUBLISH: {other:?}"),
    }
}
