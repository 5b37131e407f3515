//! `--downlink N`: the downlink at scale. N devices make persistent sessions subscribed to
//! their command topics and go away; `--commands` commands for them are produced to Kafka
//! while they are away; the gateway takes them all onto its disk; then every device comes
//! back and must get each of its commands exactly once, in order. Reports how fast the
//! gateway took the commands, how fast they reached the devices, and the gateway's RSS,
//! sampled throughout and with every device connected and idle (with `--gateway-pid`).
//!
//! The gateway needs a `[[downlink]]` for `--kafka-topic` with `mqtt_topic =
//! "devices/{key}/commands"` (the key is the device's client id), addressed by the header
//! `edgegate-gateway` = `--gateway-id`, and its admin listener at `--admin`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rumqttc::{Event, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::{gateway_rss_kib, proc_status_kib, split_addr};

/// What the downlink run needs from the command line.
pub struct Plan {
    pub mqtt: String,
    pub admin: String,
    pub kafka: String,
    pub topic: String,
    pub gateway_id: String,
    pub devices: usize,
    pub commands: usize,
    /// Connections being set up at once.
    pub connecting: usize,
    pub gateway_pid: Option<u32>,
    /// How long the gateway may take to hold every command, and the devices to get them.
    pub timeout: Duration,
}

/// The gateway's RSS, sampled every 50 ms until dropped.
struct Sampler {
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: Option<u32>) -> Sampler {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak = Arc::clone(&peak_kib);
        let task = tokio::spawn(async move {
            let Some(pid) = pid else { return };
            loop {
                if let Some(kib) = gateway_rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler { peak_kib, task }
    }

    /// The largest RSS seen since the last call, and starts a new phase.
    fn phase_peak(&self) -> u64 {
        self.peak_kib.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn run(plan: Plan) -> anyhow::Result<()> {
    if plan.devices == 0 || plan.commands == 0 {
        bail!("--downlink and --commands must be above 0");
    }
    let run = format!("{:08x}", rand::random::<u32>());
    let ids: Arc<Vec<String>> =
        Arc::new((0..plan.devices).map(|i| format!("dl-{run}-{i}")).collect());
    let sampler = Sampler::start(plan.gateway_pid);
    let rss_before = plan.gateway_pid.and_then(gateway_rss_kib);
    println!(
        "downlink: {} devices (persistent sessions, MQTT 3.1.1, QoS 1), {} commands, Kafka topic {}",
        plan.devices, plan.commands, plan.topic
    );

    // 1. Every device makes its session and subscribes, then goes away.
    let started = Instant::now();
    let (ok, _, _) = sessions(&plan, &ids, Phase::Subscribe).await?;
    println!(
        "sessions: {ok} of {} subscribed and disconnected in {:.2} s",
        plan.devices,
        started.elapsed().as_secs_f64()
    );
    if ok != plan.devices {
        bail!("only {ok} of {} devices could subscribe", plan.devices);
    }
    let peak_sessions = sampler.phase_peak();

    // 2. Commands for them, produced to Kafka while they are away: round robin over the
    //    devices, so each gets commands / devices in a known order.
    let started = Instant::now();
    produce(&plan, &ids)?;
    let produced = started.elapsed();
    println!(
        "produced: {} commands in {:.2} s ({:.0}/s, kcat-like producer, acks=all)",
        plan.commands,
        produced.as_secs_f64(),
        plan.commands as f64 / produced.as_secs_f64()
    );
    let held = wait_held(&plan, plan.commands).await?;
    let took = started.elapsed();
    println!(
        "held: the gateway holds {held} commands on disk {:.2} s after the first was produced = {:.0} commands/s taken",
        took.as_secs_f64(),
        plan.commands as f64 / took.as_secs_f64()
    );
    let peak_held = sampler.phase_peak();

    // 3. Every device comes back and takes its commands.
    let started = Instant::now();
    let (ok, got, done) = sessions(&plan, &ids, Phase::Receive).await?;
    let delivered = done.unwrap_or_else(Instant::now) - started;
    let peak_delivery = sampler.phase_peak();
    println!(
        "delivered: {got} of {} commands to {ok} reconnected devices in {:.2} s = {:.0} commands/s (first reconnect to last command, all devices connected meanwhile)",
        plan.commands,
        delivered.as_secs_f64(),
        got as f64 / delivered.as_secs_f64()
    );
    let remaining = wait_held(&plan, 0).await.unwrap_or(usize::MAX);
    if let Some(before) = rss_before {
        println!(
            "gateway RSS (sampled every 50 ms): {before} KiB at start; peak {peak_sessions} KiB while sessions were made, {peak_held} KiB while commands were taken and held, {peak_delivery} KiB while {} devices were connected and served",
            plan.devices
        );
    }
    if let Some(hwm) = plan
        .gateway_pid
        .and_then(|pid| proc_status_kib(pid, "VmHWM:"))
    {
        println!("gateway VmHWM: {hwm} KiB");
    }
    if got != plan.commands || ok != plan.devices || remaining != 0 {
        bail!(
            "not every command reached its device: {got} of {} delivered, {ok} of {} devices complete, {remaining} still held",
            plan.commands,
            plan.devices
        );
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connect, subscribe, disconnect.
    Subscribe,
    /// Reconnect, take every command, stay until all devices have theirs.
    Receive,
}

/// Commands device `i` gets: the round robin of [`produce`].
fn expected(plan: &Plan, i: usize) -> usize {
    plan.commands / plan.devices + usize::from(i < plan.commands % plan.devices)
}

/// Runs `phase` for every device; returns how many completed it, the commands received and
/// (in `Receive`) when the last device had all of its own.
async fn sessions(
    plan: &Plan,
    ids: &Arc<Vec<String>>,
    phase: Phase,
) -> anyhow::Result<(usize, usize, Option<Instant>)> {
    let (host, port) = split_addr(&plan.mqtt);
    let slots = Arc::new(Semaphore::new(plan.connecting.max(1)));
    let received = Arc::new(AtomicUsize::new(0));
    // Devices stay connected until every one has its commands: the gateway serves them all
    // at once, as after a site's power comes back.
    let all_done = Arc::new(tokio::sync::Barrier::new(ids.len()));
    // Then, before any leaves, the gateway's RSS with every device connected and idle.
    let measured = Arc::new(tokio::sync::Barrier::new(ids.len()));
    let gateway_pid = plan.gateway_pid;
    // When the last device had its commands: the delivery rate's end, before that pause.
    let done: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let errors: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let deadline = Instant::now() + plan.timeout;
    let mut tasks = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let (ids, host) = (Arc::clone(ids), host.clone());
        let done = Arc::clone(&done);
        let (received, all_done, measured, errors) = (
            Arc::clone(&received),
            Arc::clone(&all_done),
            Arc::clone(&measured),
            Arc::clone(&errors),
        );
        let want = expected(plan, i);
        tasks.push(tokio::spawn(async move {
            let id = &ids[i];
            let result = tokio::time::timeout_at(
                deadline.into(),
                device(id, &host, port, phase, want, permit, &received),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
            let ok = match &result {
                Ok(_) => true,
                Err(why) => {
                    *errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(why.clone())
                        .or_insert(0) += 1;
                    false
                }
            };
            if phase == Phase::Receive {
                // Every device, done or failed (bounded by the deadline), meets here.
                if all_done.wait().await.is_leader() {
                    *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    if let Some(pid) = gateway_pid {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Some(kib) = gateway_rss_kib(pid) {
                            println!(
                                "gateway RSS with all {} devices connected and idle: {kib} KiB",
                                ids.len()
                            );
                        }
                    }
                }
                measured.wait().await;
            }
            if let Ok(Some(client)) = result {
                let _ = client.disconnect().await;
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            ok += 1;
        }
    }
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner());
    if !errors.is_empty() {
        println!("device errors: {errors:?}");
    }
    let done = *done.lock().unwrap_or_else(|p| p.into_inner());
    Ok((ok, received.load(Ordering::Relaxed), done))
}

/// One device's part of `phase`. In `Receive`, returns its client still connected.
async fn device(
    id: &str,
    host: &str,
    port: u16,
    phase: Phase,
    want: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    received: &AtomicUsize,
) -> Result<Option<rumqttc::AsyncClient>, String> {
    let mut permit = Some(permit);
    let topic = format!("devices/{id}/commands");
    let mut options = rumqttc::MqttOptions::new(id, host, port);
    options.set_keep_alive(Duration::from_secs(300));
    options.set_clean_session(false);
    options.set_max_packet_size(1 << 16, 1 << 16);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let mut next = 0usize;
    loop {
        let event = match eventloop.poll().await {
            Ok(e) => e,
            // The gateway's connection rate closes a socket before CONNACK: try again.
            Err(_) if permit.is_some() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(format!("connection: {e}")),
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                drop(permit.take());
                match phase {
                    Phase::Subscribe => {
                        client
                            .subscribe(&topic, QoS::AtLeastOnce)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Phase::Receive => {
                        if !ack.session_present {
                            return Err("session not present".to_owned());
                        }
                        if want == 0 {
                            tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
                            return Ok(Some(client));
                        }
                    }
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    return Err("subscription refused".to_owned());
                }
                let _ = client.disconnect().await;
                // Wait for the DISCONNECT to be written, then go.
                while eventloop.poll().await.is_ok() {}
                return Ok(None);
            }
            Event::Incoming(Packet::Publish(p)) => {
                let text = std::str::from_utf8(&p.payload).map_err(|e| e.to_string())?;
                let seq: usize = text
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("foreign payload {text:?}"))?;
                if p.topic != topic {
                    return Err(format!("a command for {} reached {id}", p.topic));
                }
                if seq < next {
                    return Err("a command twice".to_owned());
                }
                if seq > next {
                    return Err("commands out of order or missing".to_owned());
                }
                next += 1;
                received.fetch_add(1, Ordering::Relaxed);
                if next == want {
                    // The connection stays up (PUBACKs written, pings answered) until the
                    // caller disconnects it.
                    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
                    return Ok(Some(client));
                }
            }
            _ => {}
        }
    }
}

/// Produces the commands: `dl-…-i/<k>` for device i, its k-th command, round robin.
fn produce(plan: &Plan, ids: &[String]) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &plan.kafka)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the Kafka producer")?;
    let mut sent_per_device = vec![0usize; ids.len()];
    for n in 0..plan.commands {
        let i = n % ids.len();
        let payload = format!("{}/{}", ids[i], sent_per_device[i]);
        sent_per_device[i] += 1;
        let headers = OwnedHeaders::new().insert(Header {
            key: "edgegate-gateway",
            value: Some(plan.gateway_id.as_bytes()),
        });
        let mut record = BaseRecord::to(&plan.topic)
            .key(ids[i].as_bytes())
            .payload(payload.as_bytes())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    if !matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ) {
                        bail!("cannot produce: {e}");
                    }
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("the producer did not flush")?;
    Ok(())
}

/// Waits until the gateway's `/readyz` says it holds `want` commands; returns what it holds.
async fn wait_held(plan: &Plan, want: usize) -> anyhow::Result<usize> {
    let deadline = Instant::now() + plan.timeout;
    let mut last = 0;
    while Instant::now() < deadline {
        if let Ok(body) = http_get(&plan.admin, "/readyz").await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                last = v["broker"]["commands_held"].as_u64().unwrap_or(0) as usize;
                if last == want {
                    return Ok(last);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the gateway holds {last} commands, not {want}, after {:?}",
        plan.timeout
    )
}

async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned()))
}
