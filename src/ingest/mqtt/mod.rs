//! The MQTT listener: MQTT 3.1.1 and 5 on one TCP port, chosen per connection by the
//! CONNECT's protocol level.
//!
//! Read top to bottom: [`serve`] accepts sockets and spawns one task per connection →
//! `session.rs` runs the connection's state machine (CONNECT, keepalive, publishes, wills,
//! takeover) → `connection.rs` frames packets off the socket with the size limit applied to
//! the fixed header → `packet.rs` checks the fixed-header flags and hands each frame to a
//! codec: rumqttc's v4 codec for 3.1.1, `v5.rs` for MQTT 5 (DESIGN.md says why the gateway
//! decodes MQTT 5 itself).
//!
//! The contract this module keeps: a QoS 1 PUBACK or QoS 2 PUBREC is sent only after the
//! record's append has resolved as durable ([`crate::ingest::Pipeline::submit`]). Bad input
//! closes only its own connection, with a reason code where MQTT 5 has one, and is counted
//! (`edgegate_mqtt_protocol_errors_total{kind}`) and logged at DEBUG.
//!
//! Reason codes the gateway sends (MQTT 5; 3.1.1 has CONNACK codes only and is otherwise just
//! closed):
//!
//! | situation | answer |
//! |---|---|
//! | `MQTT` with a level other than 4 or 5, or MQTT 3.1 (`MQIsdp`) | 3.1.1-format CONNACK 0x01 (as mosquitto) |
//! | client id too long (or empty without clean session on 3.1.1) | CONNACK 0x85 (3.1.1: 0x02) |
//! | `max_connections` reached | CONNACK 0x89 Server busy (3.1.1: 0x03) |
//! | enhanced authentication requested | CONNACK 0x8C |
//! | malformed packet / protocol violation / second CONNECT | DISCONNECT 0x81 / 0x82 |
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
mod packet;
mod session;
mod v5;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ingest::Pipeline;
use config::MqttConfig;
use session::{Registry, Shared};

/// Connections over the limit that may be answered "busy" at once; beyond that they are
/// dropped unanswered, so a flood costs no more than this many tasks.
const REFUSING_AT_ONCE: usize = 32;

/// Accepts connections on `listener` until `shutdown`, then stops accepting and waits for
/// every connection to finish its pending appends, send their acks and close. The caller
/// bounds that wait with its grace period.
pub async fn serve(
    listener: TcpListener,
    config: Arc<MqttConfig>,
    pipeline: Pipeline,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared = Shared {
        pressure: pipeline.pressure(),
        config: config.clone(),
        pipeline,
        registry: Registry::default(),
        shutdown: shutdown.clone(),
    };
    // Permits, not a counter: a permit is returned even if its task panics.
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let tracker = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            // Stop accepting; connections see the same token and drain.
            _ = shutdown.cancelled() => break,
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
        // Acks are small and latency matters more than packing them.
        let _ = socket.set_nodelay(true);
        match connections.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    connection_opened();
                    session::run(socket, peer, shared).await;
                    connection_closed();
                    drop(permit);
                });
            }
            Err(_) => {
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let shared = shared.clone();
                    tracker.spawn(async move {
                        session::refuse_busy(socket, peer, shared).await;
                        drop(permit);
                    });
                }
            }
        }
    }
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

fn connection_opened() {
    metrics::counter!("edgegate_mqtt_connections_total").increment(1);
    metrics::gauge!("edgegate_mqtt_connections").increment(1.0);
}

fn connection_closed() {
    metrics::gauge!("edgegate_mqtt_connections").decrement(1.0);
}

fn accept_failed(e: &std::io::Error) {
    metrics::counter!("edgegate_mqtt_accept_errors_total").increment(1);
    tracing::warn!(error = %e, "Could not accept an MQTT connection.");
}

/// For the cargo-fuzz target `mqtt_stream`: `bytes` as a client's TCP stream, cut into frames
/// as the connection cuts them (size limit on the fixed header); the first frame chooses the
/// protocol as a CONNECT does, and every frame is decoded as both 3.1.1 and 5 (so both
/// decoders see everything), with the reason codes and topic checks the session applies.
/// Returns the frames decoded. Never panics; not an API.
#[doc(hidden)]
pub fn fuzz_stream(bytes: &[u8]) -> usize {
    use bytes::BytesMut;
    use packet::{Limits, Packet, Version};
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
            match packet::decode(version, f, &limits) {
                Ok(Packet::Publish(p)) => {
                    decoded += 1;
                    let _ = packet::valid_topic_name(&p.topic);
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
