//! Steady QoS 1 load from real clients (rumqttc, MQTT 3.1.1) that rides out faults: each
//! device publishes numbered messages at a steady pace and reconnects whenever its
//! connection fails (a gateway killed and restarted), so a test can drive the gateway through
//! outages and restarts and then check that everything acknowledged reached Kafka.
//!
//! Device `d` publishes payloads `dev<d>:<seq>` to `<prefix>/dev<d>/t`, `seq` counting from 0
//! across reconnects. What the gateway acknowledged (PUBACK) is recorded per device; a publish
//! in flight when a connection fails is abandoned (it may or may not be stored: QoS 1 allows
//! either) and the device goes on with the next number.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The load, running on a thread and runtime of its own.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u64>>>>,
}

/// Starts `devices` publishers against `addr`, each sending one message every `every` with
/// at most `window` unacknowledged.
pub fn steady_load(
    addr: SocketAddr,
    prefix: &str,
    devices: usize,
    every: Duration,
    window: usize,
) -> SteadyLoad {
    start(addr, prefix, devices, every, window, false)
}

/// [`steady_load`] with QoS 2 and persistent sessions (`clean_session = 0`, client ids
/// `persistent-dev<d>`): each device keeps its client state across reconnects, so rumqttc
/// re-sends what was in flight (the PUBLISH with DUP before a PUBREC, the PUBREL after one)
/// and no message is abandoned. A message counts as acknowledged at its PUBREC: from then on
/// the gateway owns it.
pub fn persistent_qos2_load(
    addr: SocketAddr,
    prefix: &str,
    devices: usize,
    every: Duration,
    window: usize,
) -> SteadyLoad {
    start(addr, prefix, devices, every, window, true)
}

fn start(
    addr: SocketAddr,
    prefix: &str,
    devices: usize,
    every: Duration,
    window: usize,
    persistent: bool,
) -> SteadyLoad {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let prefix = prefix.to_owned();
    let thread = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::Builder::new()
            .name("steady-load".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("the load's runtime");
                runtime.block_on(async move {
                    let tasks: Vec<_> = (0..devices)
                        .map(|d| {
                            let topic = format!("{prefix}/dev{d}/t");
                            let (stop, acked) = (stop.clone(), acked.clone());
                            if persistent {
                                tokio::spawn(persistent_device(
                                    addr, topic, d, every, window, stop, acked,
                                ))
                            } else {
                                tokio::spawn(device(addr, topic, d, every, window, stop, acked))
                            }
                        })
                        .collect();
                    let mut out = Vec::with_capacity(devices);
                    for task in tasks {
                        out.push(task.await.expect("a device task panicked"));
                    }
                    out
                })
            })
            .expect("spawn the load's thread")
    };
    SteadyLoad {
        stop,
        acked,
        thread: Some(thread),
    }
}

impl SteadyLoad {
    /// Messages acknowledged so far, over all devices.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops publishing (waiting up to a few seconds for the acknowledgements in flight) and
    /// returns the sequence numbers acknowledged, per device, in the order they were.
    pub fn stop(mut self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("the load's thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for SteadyLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The payload of device `d`'s message `seq`.
pub fn payload(d: usize, seq: u64) -> String {
    format!("dev{d}:{seq}")
}

/// Parses a payload back into `(device, seq)`.
pub fn parse_payload(payload: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (d, seq) = text.strip_prefix("dev")?.split_once(':')?;
    Some((d.parse().ok()?, seq.parse().ok()?))
}

/// One device: connect, publish at its pace within its window, record the PUBACKs; on any
/// connection error start over with a new connection and the next number.
async fn device(
    addr: SocketAddr,
    topic: String,
    d: usize,
    every: Duration,
    window: usize,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicU64>,
) -> Vec<u64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut acked = Vec::new();
    let mut next: u64 = 0;
    let mut connection = 0;
    'connections: while !stop.load(Ordering::Relaxed) {
        connection += 1;
        let mut options =
            MqttOptions::new(format!("faults-dev{d}"), addr.ip().to_string(), addr.port());
        options
            .set_inflight(u16::try_from(window).unwrap_or(u16::MAX))
            .set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, window * 2);
        // Publishes handed to the client, not yet seen going out; then packet id -> seq.
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut pending: HashMap<u16, u64> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping_since: Option<tokio::time::Instant> = None;
        // The tick competes with the event loop's poll only once connected (see
        // `persistent_device`).
        let mut connected = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                let since = *stopping_since.get_or_insert_with(tokio::time::Instant::now);
                if (queued.is_empty() && pending.is_empty())
                    || since.elapsed() > Duration::from_secs(5)
                {
                    let _ = client.try_disconnect();
                    break 'connections;
                }
            }
            tokio::select! {
                _ = tick.tick(), if connected && stopping_since.is_none() && queued.len() + pending.len() < window => {
                    if client
                        .try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload(d, next))
                        .is_ok()
                    {
                        queued.push_back(next);
                        next += 1;
                    }
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = queued.pop_front() {
                            pending.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = pending.remove(&ack.pkid) {
                            acked.push(seq);
                            acked_total.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The gateway went away (or refused us): what was in flight is
                        // abandoned; try again shortly with a new connection.
                        if connection % 50 == 0 {
                            eprintln!("load: device {d} reconnecting (attempt {connection})");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'connections;
                    }
                },
            }
        }
    }
    acked
}

/// One QoS 2 device with a persistent session: one rumqttc client for its whole life, so a
/// failed connection is reconnected by polling again and what was in flight is re-sent by
/// rumqttc (PUBLISH with DUP, or PUBREL) under the same packet ids.
async fn persistent_device(
    addr: SocketAddr,
    topic: String,
    d: usize,
    every: Duration,
    window: usize,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicU64>,
) -> Vec<u64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(
        format!("persistent-dev{d}"),
        addr.ip().to_string(),
        addr.port(),
    );
    options
        .set_inflight(u16::try_from(window).unwrap_or(u16::MAX))
        .set_keep_alive(Duration::from_secs(10))
        .set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, window * 2);
    let mut acked = Vec::new();
    let mut next: u64 = 0;
    // Handed to the client, not yet seen going out; then packet id -> seq until PUBREC.
    let mut queued: VecDeque<u64> = VecDeque::new();
    let mut pending: HashMap<u16, u64> = HashMap::new();
    // PUBREC'd, waiting for PUBCOMP (they still take a place in the window).
    let mut releasing = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping_since: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    // The tick competes with the poll only once connected: rumqttc's poll is not cancel-safe
    // while it connects. Dropped then, its CONNECT may reach the gateway after the one the
    // next poll sends on a new connection, and take the session over from it.
    let mut connected = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            let since = *stopping_since.get_or_insert_with(tokio::time::Instant::now);
            if (queued.is_empty() && pending.is_empty() && releasing == 0)
                || since.elapsed() > Duration::from_secs(10)
            {
                let _ = client.try_disconnect();
                break;
            }
        }
        tokio::select! {
            _ = tick.tick(), if connected && stopping_since.is_none() && queued.len() + pending.len() + releasing < window => {
                if client
                    .try_publish(topic.as_str(), QoS::ExactlyOnce, false, payload(d, next))
                    .is_ok()
                {
                    queued.push_back(next);
                    next += 1;
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    // A re-send after a reconnect goes out under its packet id again.
                    if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(pkid) {
                        if let Some(seq) = queued.pop_front() {
                            slot.insert(seq);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubRec(rec))) => {
                    if let Some(seq) = pending.remove(&rec.pkid) {
                        acked.push(seq);
                        acked_total.fetch_add(1, Ordering::Relaxed);
                        releasing += 1;
                    }
                }
                Ok(Event::Incoming(Packet::PubComp(_))) => releasing = releasing.saturating_sub(1),
                Ok(_) => {}
                Err(_) => {
                    connected = false;
                    failures += 1;
                    if failures % 50 == 0 {
                        eprintln!("load: device {d} reconnecting (failure {failures})");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    acked
}
