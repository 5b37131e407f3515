//! `edgegate-load`: an MQTT and CoAP load generator for the gateway.
//!
//! Opens N connections (rumqttc, MQTT 3.1.1 or 5), publishes a fixed number of messages or
//! for a fixed time with an in-flight window per connection, and reports acknowledged
//! messages per second and acknowledgement latency (PUBACK for QoS 1, PUBREC for QoS 2: the
//! moment the gateway says the message is durable). With `--verify` it then reads the Kafka
//! topic back and checks that every acknowledged message arrived, reporting the end-to-end
//! rate (first publish to last record readable in Kafka).
//!
//! With `--coap ADDR` it simulates CoAP devices instead (see [`coap`]): each connection is a
//! device with its own UDP socket sending confirmable POSTs to `/t/dev<connection>`, with a
//! window of `--inflight` outstanding requests; "acknowledged" is the 2.04 Changed, piggybacked
//! or separate. The counting, latency percentiles, verification and report are shared.
//!
//! With `--subscribers N` the gateway's local broker is measured too (see [`subscribe`]): N
//! MQTT 3.1.1 subscribers (on the tool's own lean client, [`wire`], so that what they cost
//! the shared CPU is small beside the gateway's) on `--filter`s that may overlap have their
//! SUBACK before the first publish; the report adds deliveries per second (all subscribers,
//! first publish to last delivery) beside the publish rate, and checks that each subscriber
//! got every acknowledged message its filters match, once, in its publisher's order.
//!
//! Each payload starts with `<run>:<connection>:<sequence>|` and is padded to `--payload`
//! bytes, so verification needs nothing but the topic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rumqttc::{Event, Outgoing, Packet, QoS};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "edgegate-load",
    version,
    about = "MQTT and CoAP load generator for edgegate"
)]
struct Args {
    /// Gateway MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    /// Gateway CoAP address: simulate CoAP devices sending CON POSTs instead of MQTT.
    #[arg(long, value_name = "ADDR")]
    coap: Option<String>,
    /// Number of concurrent connections (CoAP: devices, each with its own UDP socket).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Unacknowledged publishes allowed per connection (CoAP: outstanding CON requests per
    /// device; keep it within the gateway's `max_exchanges_per_peer`, 16 by default).
    #[arg(long, default_value_t = 32)]
    inflight: u16,
    /// Payload size in bytes (at least the 30-odd byte id prefix).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Payloads are JSON telemetry of about `--payload` bytes instead of text:
    /// `{"id":"<id>","seq":N,"s00":21.5,...}`, one `sNN` double per 13 bytes beyond the first
    /// 48 (the same fields for every message of a size), spaces before the `}` to make up the
    /// size. For `format = "avro"` and `"json"` routes; see [`json_schema`] for its schema.
    #[arg(long, conflicts_with = "subscribers")]
    json: bool,
    /// Payloads are Sparkplug B NDATA of about `--payload` bytes instead of text: metrics
    /// `id` (String, the message's id), `seq` (UInt64) and one Double `sNN` per 13 bytes
    /// beyond the first 48, by name (no births needed), `seq` 0 to 255 per connection. Publish
    /// them as edge nodes (`--topic 'spBv1.0/load/NDATA/node-{conn}'`) to a
    /// `format = "sparkplug_b"` route with `records = "per_payload"`, whose record carries the
    /// id that `--verify` looks for.
    #[arg(long, conflicts_with_all = ["subscribers", "json"])]
    sparkplug: bool,
    /// Print the Avro schema of `--json` payloads of `--payload` bytes, and exit (what to
    /// register for an `avro` route they go to).
    #[arg(long)]
    print_schema: bool,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// MQTT protocol: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4)]
    protocol: u8,
    /// Messages in total (split evenly over the connections).
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Publish for this many seconds instead of a fixed count.
    #[arg(long)]
    duration: Option<f64>,
    /// Topic per connection; `{conn}` is replaced by the connection number.
    #[arg(long, default_value = "load/{conn}/telemetry")]
    topic: String,
    /// Read Kafka back and check every acknowledged message arrived.
    #[arg(long)]
    verify: bool,
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka: String,
    /// The Kafka topic the route sends these messages to.
    #[arg(long, default_value = "load")]
    kafka_topic: String,
    /// Read Kafka back with `isolation.level = read_committed` (a gateway in exactly-once
    /// mode: only committed records count as arrived).
    #[arg(long)]
    read_committed: bool,
    /// How long to wait for Kafka to hold everything.
    #[arg(long, default_value_t = 300.0)]
    verify_timeout: f64,
    /// PID of the gateway, to report its peak RSS (VmHWM).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Connect over TLS (rustls, ring), trusting this CA bundle (PEM) for the gateway's
    /// certificate. The host of `--mqtt` is the name checked (an IP needs an IP SAN).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM) to present, with `--tls-key`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Instead of publishing: open this many connections (at most `--connections` connecting
    /// at once), report connections (TLS handshakes + CONNACK) per second, hold them idle for
    /// `--hold` seconds and report the gateway's RSS per connection (with `--gateway-pid`).
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Seconds to hold idle connections open.
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Local subscribers: MQTT 3.1.1 connections that subscribe before the first publish,
    /// then count what the gateway delivers them and check it against what they asked for.
    #[arg(long, default_value_t = 0, value_name = "N")]
    subscribers: usize,
    /// A subscriber's topic filter (several for one subscriber: separated by `,`). Repeat it
    /// to make filters overlap: subscriber i takes the (i mod n)-th value. Default: `--topic`
    /// with `{conn}` as `+`, so every subscriber gets every message.
    #[arg(long = "filter", value_name = "F")]
    filters: Vec<String>,
    /// QoS the subscribers ask for (a delivery has the lower of it and `--qos`).
    #[arg(long, default_value_t = 1, value_name = "Q")]
    sub_qos: u8,
    /// Messages a second each subscriber takes at most, as a local application that does
    /// work per message would (0: as fast as it can). It reads no faster, so the gateway
    /// meets its pace through TCP and its session queue, as with a real slow subscriber.
    #[arg(long, default_value_t = 0, value_name = "N")]
    sub_rate: u64,
    /// Once every publish is acknowledged, how long subscribers may go without a new
    /// message before what has not arrived counts as missing.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    drain_timeout: f64,
    /// Instead of publishing: the downlink at scale. N devices make persistent sessions,
    /// `--commands` commands for them are produced to `--kafka-topic` while they are away,
    /// then they all come back and must each get theirs exactly once, in order (at most
    /// `--connections` connecting at once). Needs the gateway's admin listener (`--admin`)
    /// and a `[[downlink]]` with `mqtt_topic = "devices/{key}/commands"`.
    #[arg(long, value_name = "N")]
    downlink: Option<usize>,
    /// Commands produced for `--downlink` (round robin over the devices).
    #[arg(long, default_value_t = 100_000)]
    commands: usize,
    /// The gateway's id: the `edgegate-gateway` header of each command.
    #[arg(long, default_value = "edgegate")]
    gateway_id: String,
    /// The gateway's admin listener (`/readyz` says how many commands it holds).
    #[arg(long, default_value = "127.0.0.1:9100")]
    admin: String,
}

#[path = "load/downlink.rs"]
mod downlink;
#[path = "load/wire.rs"]
mod wire;

/// When the first publish of the run went out: where deliveries per second start from.
static FIRST_PUBLISH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A connection the gateway closes before its CONNACK (its per-address connection rate,
/// 100/s by default, when subscribers connect too) is tried again this often, this many
/// times, rather than lost.
const CONNECT_RETRIES: u32 = 50;
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The TLS client configuration built from `--tls-*`, shared by every connection.
static TLS: std::sync::OnceLock<Option<Arc<tokio_rustls::rustls::ClientConfig>>> =
    std::sync::OnceLock::new();

fn tls_config(args: &Args) -> anyhow::Result<Option<Arc<tokio_rustls::rustls::ClientConfig>>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(ca) = &args.tls_ca else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("--tls-ca")? {
        roots.add(cert.context("--tls-ca")?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .context("--tls-cert")?
                .collect::<Result<Vec<_>, _>>()
                .context("--tls-cert")?;
            let key = PrivateKeyDer::from_pem_file(key).context("--tls-key")?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

fn transport() -> Option<rumqttc::Transport> {
    TLS.get()
        .and_then(Option::as_ref)
        .map(|c| rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(c.clone())))
}

fn gateway_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    edgegate::memory::status_kib(&pid.to_string(), field)
}

/// `--idle N`: connection setup rate and memory per idle connection.
async fn idle(args: &Args, n: usize) -> anyhow::Result<()> {
    let (host, port) = split_addr(&args.mqtt);
    let run = format!("{:08x}", rand::random::<u32>());
    let before = args.gateway_pid.and_then(gateway_rss_kib);
    let slots = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1)));
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut connecting = Vec::with_capacity(n);
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await?;
        let (host, run) = (host.clone(), run.clone());
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel::<bool>();
        connecting.push(connected_rx);
        held.push(tokio::spawn(async move {
            let mut options = rumqttc::MqttOptions::new(format!("idle-{run}-{i}"), host, port);
            options.set_keep_alive(Duration::from_secs(300));
            if let Some(t) = transport() {
                options.set_transport(t);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
            let mut connected_tx = Some(connected_tx);
            let mut permit = Some(permit);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        drop(permit.take());
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(true);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(false);
                        }
                        drop(client);
                        return;
                    }
                }
            }
        }));
    }
    let mut ok = 0usize;
    for rx in connecting {
        if rx.await.unwrap_or(false) {
            ok += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "idle: {ok} of {n} connections established in {elapsed:.2} s = {:.0} connections/s ({}, {} connecting at once)",
        ok as f64 / elapsed,
        if TLS.get().and_then(Option::as_ref).is_some() {
            "TLS"
        } else {
            "plaintext"
        },
        args.connections
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    if let (Some(pid), Some(before)) = (args.gateway_pid, before) {
        if let Some(after) = gateway_rss_kib(pid) {
            println!(
                "gateway RSS: {before} KiB before, {after} KiB with {ok} idle connections = {:.1} KiB per connection",
                (after.saturating_sub(before)) as f64 / ok.max(1) as f64
            );
        }
    }
    for task in held {
        task.abort();
    }
    Ok(())
}

/// What one connection did.
#[derive(Default)]
struct ConnResult {
    acked: Vec<u64>,
    latencies_us: Vec<u32>,
    errors: u64,
    /// Requests that ended without acknowledgement, by why (CoAP response code, "timeout",
    /// "reset"): never counted as acknowledged, so never expected in Kafka.
    failed: HashMap<String, u64>,
    /// CoAP requests sent again after their ACK timeout.
    retransmissions: u64,
    /// Connections closed before CONNACK and tried again.
    connect_retries: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_schema {
        println!("{}", json_schema(args.payload));
        return Ok(());
    }
    if args.qos > 2 || args.sub_qos > 2 || !(args.protocol == 4 || args.protocol == 5) {
        bail!("--qos and --sub-qos must be 0..=2 and --protocol 4 or 5");
    }
    if args.subscribers > 0 && (args.coap.is_some() || args.idle.is_some()) {
        bail!("--subscribers needs MQTT publishers (not --coap or --idle)");
    }
    if args.coap.is_some() && args.inflight > coap::GATEWAY_PER_PEER {
        eprintln!(
            "note: --inflight {} is above the gateway's default max_exchanges_per_peer ({}); the excess is answered 5.03",
            args.inflight,
            coap::GATEWAY_PER_PEER
        );
    }
    let _ = TLS.set(tls_config(&args)?);
    if let Some(n) = args.idle {
        return idle(&args, n).await;
    }
    if let Some(devices) = args.downlink {
        return downlink::run(downlink::Plan {
            mqtt: args.mqtt.clone(),
            admin: args.admin.clone(),
            kafka: args.kafka.clone(),
            topic: args.kafka_topic.clone(),
            gateway_id: args.gateway_id.clone(),
            devices,
            commands: args.commands,
            connecting: args.connections,
            gateway_pid: args.gateway_pid,
            timeout: Duration::from_secs_f64(args.verify_timeout),
        })
        .await;
    }
    let run = format!("{:08x}", rand::random::<u32>());
    let per_conn = args.count.div_ceil(args.connections.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    // The verifier starts reading Kafka before the first publish, from the topic's current
    // end, so "end to end" is the moment the last record became readable, not how long it
    // takes to read the topic's history afterwards.
    let verifier = if args.verify {
        Some(Verifier::start(&args, &run)?)
    } else {
        None
    };
    // Every subscriber has its SUBACK before the first publish, so each should get every
    // message its filters match.
    let fanout = if args.subscribers > 0 {
        Some(subscribe::Fanout::start(&args, &run, per_conn).await?)
    } else {
        None
    };
    let cpu_before = args.gateway_pid.and_then(cpu_seconds);
    let own_cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for conn in 0..args.connections {
        let (args, run, stop) = (args.clone(), run.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            if args.coap.is_some() {
                coap::device(&args, &run, conn, per_conn, &stop).await
            } else {
                connection(&args, &run, conn, per_conn, &stop).await
            }
        }));
    }
    if let Some(secs) = args.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.context("connection task")?);
    }
    let elapsed = started.elapsed();
    let acked: usize = results.iter().map(|r| r.acked.len()).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut latencies: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    if args.coap.is_some() {
        println!(
            "requests: {acked} acknowledged (2.04) in {:.2} s = {:.0} req/s ({} devices, window {}, {} B, CoAP CON)",
            elapsed.as_secs_f64(),
            acked as f64 / elapsed.as_secs_f64(),
            args.connections,
            args.inflight,
            args.payload,
        );
        let retransmissions: u64 = results.iter().map(|r| r.retransmissions).sum();
        let mut failed: std::collections::BTreeMap<&str, u64> = Default::default();
        for (why, n) in results.iter().flat_map(|r| r.failed.iter()) {
            *failed.entry(why).or_default() += n;
        }
        println!("retransmissions: {retransmissions}; not acknowledged: {failed:?}");
    } else {
        println!(
            "published: {acked} acknowledged in {:.2} s = {:.0} msgs/s ({} connections, inflight {}, {} B, QoS {}, MQTT {})",
            elapsed.as_secs_f64(),
            acked as f64 / elapsed.as_secs_f64(),
            args.connections,
            args.inflight,
            args.payload,
            args.qos,
            if args.protocol == 5 { "5" } else { "3.1.1" },
        );
    }
    if args.qos > 0 || args.coap.is_some() {
        println!(
            "ack latency ms: p50 {:.2}  p99 {:.2}  max {:.2}",
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
    }
    if errors > 0 {
        println!("connection errors: {errors}");
    }
    let retries: u64 = results.iter().map(|r| r.connect_retries).sum();
    if retries > 0 {
        println!("connects retried: {retries} (closed by the gateway before CONNACK)");
    }
    let fanout = match fanout {
        Some(fanout) => {
            println!("subscribers: {}", fanout.describe(&args));
            let rate = acked as f64 / elapsed.as_secs_f64();
            Some(fanout.finish(&args, &results, rate).await?)
        }
        None => None,
    };
    if let Some(verifier) = verifier {
        let expected: HashSet<(usize, u64)> = results
            .iter()
            .enumerate()
            .flat_map(|(c, r)| r.acked.iter().map(move |s| (c, *s)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs_f64(args.verify_timeout);
        let (found, duplicates, last_seen) = verifier.finish(&expected, deadline);
        let missing = expected.len() - found;
        let e2e = last_seen.map_or(f64::NAN, |t| t.duration_since(started).as_secs_f64());
        println!(
            "kafka: {found} of {acked} acknowledged messages found, {missing} missing, {duplicates} duplicates; end to end {:.2} s = {:.0} msgs/s",
            e2e,
            acked as f64 / e2e
        );
        if missing > 0 {
            bail!("{missing} acknowledged messages are missing from Kafka");
        }
    }
    if let Some(pid) = args.gateway_pid {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status
                .lines()
                .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
            {
                println!("gateway {line}");
            }
        }
        // CPU time is what a shared, noisy machine does not distort: compare runs by it.
        if let (Some((u0, s0)), Some((u1, s1))) = (cpu_before, cpu_seconds(pid)) {
            let (user, sys) = (u1 - u0, s1 - s0);
            println!(
                "gateway CPU: user {user:.2} s + sys {sys:.2} s = {:.1} µs per acknowledged message (Kafka forwarding included)",
                (user + sys) * 1e6 / acked.max(1) as f64
            );
            // On a small machine the load generator competes with the gateway: say how much.
            if let (Some((u0, s0)), Some((u1, s1))) =
                (own_cpu_before, cpu_seconds(std::process::id()))
            {
                println!(
                    "edgegate-load CPU: user {:.2} s + sys {:.2} s (publishers, subscribers, Kafka check)",
                    u1 - u0,
                    s1 - s0
                );
            }
            if let Some(fanout) = &fanout {
                println!(
                    "gateway CPU per delivery: {:.2} µs (all of it, publishing and forwarding included, over {} deliveries)",
                    (user + sys) * 1e6 / fanout.deliveries.max(1) as f64,
                    fanout.deliveries
                );
            }
        }
    }
    if let Some(fanout) = fanout {
        if fanout.violations > 0 {
            bail!(
                "{} deliveries broke the contract (out of order, duplicated, outside the filters or corrupt)",
                fanout.violations
            );
        }
    }
    Ok(())
}

/// User and system CPU seconds a process has used so far (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the line: 0-based 11 and 12 after the name.
    Some((ticks(11)? / hz, ticks(12)? / hz))
}

/// One connection: publish `count` messages (or until `stop`), record the acknowledged
/// sequences and their latencies.
async fn connection(
    args: &Args,
    run: &str,
    conn: usize,
    count: usize,
    stop: &AtomicBool,
) -> ConnResult {
    let (host, port) = split_addr(&args.mqtt);
    let client_id = format!("load-{run}-{conn}");
    let topic = args.topic.replace("{conn}", &conn.to_string());
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let mut result = ConnResult::default();
    let limit = if args.duration.is_some() {
        usize::MAX
    } else {
        count
    };
    if args.protocol == 5 {
        v5::connection(
            args,
            run,
            conn,
            limit,
            stop,
            &host,
            port,
            &client_id,
            &topic,
            qos,
            &mut result,
        )
        .await;
        return result;
    }
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options.set_inflight(args.inflight.max(1));
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(t) = transport() {
        options.set_transport(t);
    }
    let (client, mut eventloop) =
        rumqttc::AsyncClient::new(options, usize::from(args.inflight).max(10));
    let mut publisher = {
        let (client, run, topic, size) =
            (client.clone(), run.to_owned(), topic.clone(), args.shape());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::spawn(async move {
            let mut seq = 0u64;
            while (seq as usize) < limit && !flag.load(Ordering::Relaxed) {
                if client
                    .publish(topic.as_str(), qos, false, payload(&run, conn, seq, size))
                    .await
                    .is_err()
                {
                    break;
                }
                seq += 1;
            }
            seq
        });
        (handle, stop)
    };
    // Publishes go out in order, so the n-th outgoing publish carries sequence n.
    let mut next_out = 0u64;
    let mut pending: HashMap<u16, (u64, Instant)> = HashMap::new();
    let mut published: Option<u64> = None;
    let mut connected = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            publisher.1.store(true, Ordering::Relaxed);
        }
        if published.is_none() && publisher.0.is_finished() {
            // Everything the publisher queued is still to go out: wait for all of it.
            published = Some((&mut publisher.0).await.unwrap_or(next_out));
        }
        if let Some(total) = published {
            if pending.is_empty() && next_out >= total {
                break;
            }
        }
        match poll_event(connected, eventloop.poll()).await {
            Err(_) => continue,
            Ok(Err(_)) if !connected && result.connect_retries < u64::from(CONNECT_RETRIES) => {
                result.connect_retries += 1;
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
            }
            Ok(Err(e)) => {
                result.errors += 1;
                eprintln!("connection {conn}: {e}");
                break;
            }
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if next_out == 0 {
                    FIRST_PUBLISH.get_or_init(Instant::now);
                }
                if qos == QoS::AtMostOnce {
                    result.acked.push(next_out);
                } else {
                    pending.insert(pkid, (next_out, Instant::now()));
                }
                next_out += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                ack_one(&mut pending, ack.pkid, &mut result)
            }
            Ok(Ok(Event::Incoming(Packet::PubRec(rec)))) => {
                ack_one(&mut pending, rec.pkid, &mut result)
            }
            Ok(Ok(_)) => {}
        }
    }
    publisher.0.abort();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    result
}

/// The connection's next event: within 200 ms once connected (the loop has other things to
/// look at); while connecting, however long rumqttc's own connect timeout lets it take.
/// rumqttc's `poll` is not cancel-safe while it connects: a poll dropped then leaves its
/// CONNECT on the wire and the next poll opens another connection, and the gateway may read
/// the first CONNECT after the second and hand the session to the abandoned connection.
async fn poll_event<T>(
    connected: bool,
    poll: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    if connected {
        tokio::time::timeout(Duration::from_millis(200), poll).await
    } else {
        Ok(poll.await)
    }
}

fn ack_one(pending: &mut HashMap<u16, (u64, Instant)>, pkid: u16, result: &mut ConnResult) {
    if let Some((seq, sent)) = pending.remove(&pkid) {
        result.acknowledged(seq, sent);
    }
}

impl ConnResult {
    /// Message `seq`, first sent at `sent`, is acknowledged now.
    fn acknowledged(&mut self, seq: u64, sent: Instant) {
        self.acked.push(seq);
        self.latencies_us
            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
    }

    fn fail(&mut self, why: impl Into<String>) {
        *self.failed.entry(why.into()).or_default() += 1;
    }
}

mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::{AsyncClient, Event as Event5, MqttOptions};

    #[allow(clippy::too_many_arguments)]
    pub async fn connection(
        args: &Args,
        run: &str,
        conn: usize,
        limit: usize,
        stop: &AtomicBool,
        host: &str,
        port: u16,
        client_id: &str,
        topic: &str,
        qos: QoS,
        result: &mut ConnResult,
    ) {
        let qos5 = match qos {
            QoS::AtMostOnce => QoS5::AtMostOnce,
            QoS::AtLeastOnce => QoS5::AtLeastOnce,
            QoS::ExactlyOnce => QoS5::ExactlyOnce,
        };
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_outgoing_inflight_upper_limit(args.inflight.max(1));
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(t) = super::transport() {
            options.set_transport(t);
        }
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(args.inflight).max(10));
        let flag = Arc::new(AtomicBool::new(false));
        let mut publisher = {
            let (client, run, topic, size, flag) = (
                client.clone(),
                run.to_owned(),
                topic.to_owned(),
                args.shape(),
                flag.clone(),
            );
            tokio::spawn(async move {
                let mut seq = 0u64;
                while (seq as usize) < limit && !flag.load(Ordering::Relaxed) {
                    if client
                        .publish(topic.as_str(), qos5, false, payload(&run, conn, seq, size))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    seq += 1;
                }
                seq
            })
        };
        let mut next_out = 0u64;
        let mut pending: HashMap<u16, (u64, Instant)> = HashMap::new();
        let mut published: Option<u64> = None;
        let mut connected = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                flag.store(true, Ordering::Relaxed);
            }
            if published.is_none() && publisher.is_finished() {
                published = Some((&mut publisher).await.unwrap_or(next_out));
            }
            if let Some(total) = published {
                if pending.is_empty() && next_out >= total {
                    break;
                }
            }
            match poll_event(connected, eventloop.poll()).await {
                Err(_) => continue,
                Ok(Err(_)) if !connected && result.connect_retries < u64::from(CONNECT_RETRIES) => {
                    result.connect_retries += 1;
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Ok(Err(e)) => {
                    result.errors += 1;
                    eprintln!("connection {conn}: {e}");
                    break;
                }
                Ok(Ok(Event5::Incoming(Packet5::ConnAck(_)))) => connected = true,
                Ok(Ok(Event5::Outgoing(Outgoing::Publish(pkid)))) => {
                    if next_out == 0 {
                        FIRST_PUBLISH.get_or_init(Instant::now);
                    }
                    if qos == QoS::AtMostOnce {
                        result.acked.push(next_out);
                    } else {
                        pending.insert(pkid, (next_out, Instant::now()));
                    }
                    next_out += 1;
                }
                Ok(Ok(Event5::Incoming(Packet5::PubAck(ack)))) => {
                    if ack.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success {
                        ack_one(&mut pending, ack.pkid, result);
                    } else {
                        pending.remove(&ack.pkid);
                        result.errors += 1;
                    }
                }
                Ok(Ok(Event5::Incoming(Packet5::PubRec(rec)))) => {
                    ack_one(&mut pending, rec.pkid, result)
                }
                Ok(Ok(_)) => {}
            }
        }
        publisher.abort();
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
}

/// What a message's payload looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    size: usize,
    json: bool,
    sparkplug: bool,
}

impl Args {
    fn shape(&self) -> Shape {
        Shape {
            size: self.payload,
            json: self.json,
            sparkplug: self.sparkplug,
        }
    }
}

fn payload(run: &str, conn: usize, seq: u64, shape: Shape) -> Vec<u8> {
    if shape.json {
        return json_payload(run, conn, seq, shape.size);
    }
    if shape.sparkplug {
        return sparkplug_payload(run, conn, seq, shape.size);
    }
    let mut p = format!("{run}:{conn}:{seq}|").into_bytes();
    if p.len() < shape.size {
        p.resize(shape.size, b'x');
    }
    p
}

/// The `sNN` fields of a `--json` payload of `size` bytes.
fn json_sensors(size: usize) -> usize {
    size.saturating_sub(48) / 13
}

fn json_payload(run: &str, conn: usize, seq: u64, size: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut p = format!(r#"{{"id":"{run}:{conn}:{seq}|","seq":{seq}"#);
    for i in 0..json_sensors(size) {
        // Readings that change with the message, as a sensor's would.
        let _ = write!(
            p,
            r#","s{i:02}":{}"#,
            20.0 + ((seq + i as u64) % 97) as f64 / 8.0
        );
    }
    while p.len() + 1 < size {
        p.push(' ');
    }
    p.push('}');
    p.into_bytes()
}

/// A `--sparkplug` NDATA payload of about `size` bytes: the same readings as a `--json`
/// payload of that size, as Sparkplug B metrics by name (sparkplug_b.proto: Payload 1
/// timestamp, 2 metrics, 3 seq; Metric 1 name, 3 timestamp, 4 datatype, 11 long_value,
/// 13 double_value, 15 string_value).
fn sparkplug_payload(run: &str, conn: usize, seq: u64, size: usize) -> Vec<u8> {
    const UINT64: u64 = 8;
    const DOUBLE: u64 = 10;
    const STRING: u64 = 12;
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes(out: &mut Vec<u8>, number: u64, b: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let metric = |name: &str, datatype: u64, value: &dyn Fn(&mut Vec<u8>)| {
        let mut m = Vec::with_capacity(32);
        bytes(&mut m, 1, name.as_bytes());
        varint(&mut m, 3 << 3);
        varint(&mut m, now);
        varint(&mut m, 4 << 3);
        varint(&mut m, datatype);
        value(&mut m);
        m
    };
    let mut p = Vec::with_capacity(size + 16);
    varint(&mut p, 1 << 3);
    varint(&mut p, now);
    let id = format!("{run}:{conn}:{seq}|");
    let id = metric("id", STRING, &|m| bytes(m, 15, id.as_bytes()));
    bytes(&mut p, 2, &id);
    let counter = metric("seq", UINT64, &|m| {
        varint(m, 11 << 3);
        varint(m, seq);
    });
    bytes(&mut p, 2, &counter);
    for i in 0..json_sensors(size) {
        let reading = 20.0 + ((seq + i as u64) % 97) as f64 / 8.0;
        let sensor = metric(&format!("s{i:02}"), DOUBLE, &|m| {
            varint(m, 13 << 3 | 1);
            m.extend_from_slice(&reading.to_le_bytes());
        });
        bytes(&mut p, 2, &sensor);
    }
    varint(&mut p, 3 << 3);
    varint(&mut p, seq % 256);
    p
}

/// The Avro schema of `--json` payloads of `size` bytes (`--print-schema`).
fn json_schema(size: usize) -> String {
    let mut fields = vec![
        r#"{"name":"id","type":"string"}"#.to_owned(),
        r#"{"name":"seq","type":"long"}"#.to_owned(),
    ];
    fields.extend(
        (0..json_sensors(size)).map(|i| format!(r#"{{"name":"s{i:02}","type":"double"}}"#)),
    );
    format!(
        r#"{{"type":"record","name":"Telemetry","namespace":"edgegate.load","fields":[{}]}}"#,
        fields.join(",")
    )
}

fn split_addr(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (
            host.trim_matches(['[', ']']).to_owned(),
            port.parse().unwrap_or(1883),
        ),
        None => (addr.to_owned(), 1883),
    }
}

/// Reads the Kafka topic from where it ended before the run, while the run publishes, and
/// remembers when each of this run's messages was first readable.
/// Per message of this run: when it was first read, and how many copies were read.
type Seen = HashMap<(usize, u64), (Instant, u32)>;

struct Verifier {
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Verifier {
    fn start(args: &Args, run: &str) -> anyhow::Result<Verifier> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.kafka)
            .set("group.id", format!("edgegate-load-{run}"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set(
                "isolation.level",
                if args.read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()
            .context("creating the Kafka consumer")?;
        // Partitions that exist now start at their end; a topic that does not exist yet
        // (auto-created by the gateway's first record) is read from its beginning.
        let mut assignment = TopicPartitionList::new();
        if let Ok(metadata) =
            consumer.fetch_metadata(Some(&args.kafka_topic), Duration::from_secs(5))
        {
            for topic in metadata.topics() {
                for partition in topic.partitions() {
                    let (_, high) = consumer
                        .fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(5))
                        .unwrap_or((0, 0));
                    assignment.add_partition_offset(
                        topic.name(),
                        partition.id(),
                        Offset::Offset(high),
                    )?;
                }
            }
        }
        let seen = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (topic, prefix) = (args.kafka_topic.clone(), format!("{run}:"));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                while assignment.count() == 0 && !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(1)) {
                        for t in m.topics() {
                            for p in t.partitions() {
                                assignment.add_partition_offset(
                                    t.name(),
                                    p.id(),
                                    Offset::Beginning,
                                )?;
                            }
                        }
                    }
                }
                consumer.assign(&assignment)?;
                let mut reported = false;
                while !stop.load(Ordering::Relaxed) {
                    let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    // A topic the gateway's first record just created is unknown to some
                    // brokers of a cluster for a moment: consumption errors are transient
                    // here (the verify timeout bounds the wait), said once.
                    let message = match message {
                        Ok(message) => message,
                        Err(e) => {
                            if !reported {
                                reported = true;
                                eprintln!("verifier: {e}; reading on");
                            }
                            continue;
                        }
                    };
                    let Some(value) = message.payload().map(<[u8]>::to_vec) else {
                        continue;
                    };
                    let Some(id) = parse_id(&value, &prefix) else {
                        continue;
                    };
                    let mut seen = seen
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    seen.entry(id).or_insert((Instant::now(), 0)).1 += 1;
                }
                Ok(())
            })
        };
        Ok(Verifier { seen, stop, thread })
    }

    /// Waits until every acknowledged message was seen or `deadline`; returns (found,
    /// duplicates, when the last acknowledged message became readable).
    fn finish(
        self,
        expected: &HashSet<(usize, u64)>,
        deadline: Instant,
    ) -> (usize, usize, Option<Instant>) {
        let count = || {
            let seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            expected.iter().filter(|id| seen.contains_key(id)).count()
        };
        while count() < expected.len() && Instant::now() < deadline && !self.thread.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // A moment more to catch duplicates.
        std::thread::sleep(Duration::from_secs(1));
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(Err(e)) = self.thread.join() {
            eprintln!("verifier: {e}");
        }
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = expected.iter().filter(|id| seen.contains_key(id)).count();
        let duplicates = seen
            .values()
            .map(|(_, n)| n.saturating_sub(1) as usize)
            .sum();
        let last = expected
            .iter()
            .filter_map(|id| seen.get(id).map(|(t, _)| *t))
            .max();
        (found, duplicates, last)
    }
}

/// `(connection, sequence)` of one of this run's payloads.
/// The id starts the payload, or (`--json`, and what a route encoded from it) is found in
/// its first bytes, or (`--sparkplug`: the record a `sparkplug_b` route wrote) in its first
/// few hundred.
fn parse_id(value: &[u8], prefix: &str) -> Option<(usize, u64)> {
    let start = value
        .windows(prefix.len())
        .take(512)
        .position(|w| w == prefix.as_bytes())?;
    let rest = &value[start + prefix.len()..];
    let end = rest.iter().position(|b| *b == b'|')?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    let (conn, seq) = text.split_once(':')?;
    Some((conn.parse().ok()?, seq.parse().ok()?))
}

/// Local subscribers (`--subscribers`): MQTT 3.1.1 connections that subscribe before the
/// first publish and check every delivery of this run against the publishers' results: each
/// acknowledged message whose topic one of the subscriber's filters matches must arrive, once,
/// in its publisher's order, on its topic, whole. Messages of other runs are ignored.
mod subscribe {
    use std::sync::atomic::AtomicU64;

    use tokio::sync::oneshot;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// How long a subscriber may take to connect and subscribe.
    const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

    /// The subscribers of a run, subscribed and counting.
    pub struct Fanout {
        subscribers: Vec<Subscriber>,
        stop: CancellationToken,
    }

    struct Subscriber {
        filters: Vec<String>,
        /// By publisher connection: whether one of the filters matches its topic.
        wanted: Arc<[bool]>,
        /// Messages received at least once so far, read to know when deliveries stop.
        distinct: Arc<AtomicU64>,
        task: tokio::task::JoinHandle<Received>,
    }

    /// What one subscriber received.
    #[derive(Default)]
    struct Received {
        /// By publisher connection, by sequence number: copies received (saturating).
        copies: Vec<Vec<u8>>,
        /// By publisher connection: the highest sequence number received.
        highest: Vec<Option<usize>>,
        /// Copies of this run's messages, duplicates included.
        deliveries: u64,
        /// First copies that came after a later message of the same publisher.
        out_of_order: u64,
        /// Messages whose publisher's topic none of the filters match.
        unmatched: u64,
        /// Messages on another topic than their publisher's, or of another length.
        corrupt: u64,
        last: Option<Instant>,
        errors: u64,
    }

    /// What [`Fanout::finish`] found, for the CPU line and the exit status.
    pub struct Summary {
        pub deliveries: u64,
        /// Out of order, duplicated, outside the filters or corrupt: never allowed.
        pub violations: u64,
    }

    /// Whether `topic` matches the MQTT topic filter `filter` (`+` one level, `#` the rest;
    /// neither at the first level matches a `$` topic). Written apart from the gateway's
    /// own matcher on purpose: this is what checks it.
    pub fn matches(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let (mut f, mut t) = (filter.split('/'), topic.split('/'));
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    impl Fanout {
        /// Connects `--subscribers` subscribers and returns once every one has its SUBACK.
        pub async fn start(args: &Args, run: &str, per_conn: usize) -> anyhow::Result<Fanout> {
            let values = if args.filters.is_empty() {
                vec![args.topic.replace("{conn}", "+")]
            } else {
                args.filters.clone()
            };
            let topics: Arc<[String]> = (0..args.connections)
                .map(|c| args.topic.replace("{conn}", &c.to_string()))
                .collect();
            let stop = CancellationToken::new();
            let mut subscribers = Vec::with_capacity(args.subscribers);
            let mut ready = Vec::with_capacity(args.subscribers);
            for i in 0..args.subscribers {
                let filters: Vec<String> = values[i % values.len()]
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                if let Some(f) = filters.iter().find(|f| f.starts_with("$share/")) {
                    bail!(
                        "--filter {f}: a shared subscription splits messages between its members; the check needs every subscriber to get every match"
                    );
                }
                let wanted: Arc<[bool]> = topics
                    .iter()
                    .map(|t| filters.iter().any(|f| matches(f, t)))
                    .collect();
                let distinct = Arc::new(AtomicU64::new(0));
                let (ready_tx, ready_rx) = oneshot::channel();
                ready.push(ready_rx);
                let check = Check {
                    prefix: format!("{run}:"),
                    topics: Arc::clone(&topics),
                    wanted: Arc::clone(&wanted),
                    size: args.payload,
                    max_seq: if args.duration.is_some() {
                        MAX_SEQ
                    } else {
                        per_conn
                    },
                };
                let task = tokio::spawn(subscriber(
                    args.clone(),
                    format!("sub-{run}-{i}"),
                    filters.clone(),
                    check,
                    Arc::clone(&distinct),
                    ready_tx,
                    stop.clone(),
                ));
                subscribers.push(Subscriber {
                    filters,
                    wanted,
                    distinct,
                    task,
                });
            }
            for (i, rx) in ready.into_iter().enumerate() {
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(why))) => bail!("subscriber {i}: {why}"),
                    Ok(Err(_)) => bail!("subscriber {i} ended before its SUBACK"),
                    Err(_) => bail!("subscriber {i}: no SUBACK within {SUBSCRIBE_TIMEOUT:?}"),
                }
            }
            Ok(Fanout { subscribers, stop })
        }

        /// Once publishing is over: waits until every subscriber has what it should get, or
        /// nothing new arrived for `--drain-timeout`, then reports what arrived.
        pub async fn finish(
            self,
            args: &Args,
            results: &[ConnResult],
            publish_rate: f64,
        ) -> anyhow::Result<Summary> {
            let expected: Vec<u64> = self
                .subscribers
                .iter()
                .map(|s| {
                    results
                        .iter()
                        .zip(s.wanted.iter())
                        .filter(|(_, wanted)| **wanted)
                        .map(|(r, _)| r.acked.len() as u64)
                        .sum()
                })
                .collect();
            let drain = Duration::from_secs_f64(args.drain_timeout);
            let (mut total, mut moved) = (0u64, Instant::now());
            loop {
                let distinct: Vec<u64> = self
                    .subscribers
                    .iter()
                    .map(|s| s.distinct.load(Ordering::Relaxed))
                    .collect();
                if distinct.iter().zip(&expected).all(|(d, e)| d >= e) {
                    break;
                }
                let now: u64 = distinct.iter().sum();
                if now != total {
                    (total, moved) = (now, Instant::now());
                } else if moved.elapsed() >= drain {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.stop.cancel();
            let (mut missing, mut duplicates) = (0u64, 0u64);
            let (mut out_of_order, mut unmatched, mut corrupt, mut errors) = (0, 0, 0, 0);
            let (mut deliveries, mut last) = (0u64, None::<Instant>);
            let (mut fewest, mut most) = (u64::MAX, 0u64);
            for s in self.subscribers {
                let r = s.task.await.context("subscriber task")?;
                for (c, result) in results.iter().enumerate() {
                    let copies = r.copies.get(c).map_or(&[][..], Vec::as_slice);
                    if s.wanted[c] {
                        missing += result
                            .acked
                            .iter()
                            .filter(|seq| {
                                usize::try_from(**seq)
                                    .ok()
                                    .and_then(|i| copies.get(i))
                                    .is_none_or(|n| *n == 0)
                            })
                            .count() as u64;
                    }
                    duplicates += copies
                        .iter()
                        .map(|n| u64::from(n.saturating_sub(1)))
                        .sum::<u64>();
                }
                out_of_order += r.out_of_order;
                unmatched += r.unmatched;
                corrupt += r.corrupt;
                errors += r.errors;
                deliveries += r.deliveries;
                (fewest, most) = (fewest.min(r.deliveries), most.max(r.deliveries));
                last = last.max(r.last);
            }
            let expected_total: u64 = expected.iter().sum();
            let secs = match (FIRST_PUBLISH.get(), last) {
                (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
                _ => f64::NAN,
            };
            println!(
                "delivered: {deliveries} of {expected_total} expected in {secs:.2} s = {:.0} deliveries/s to {} subscribers (first publish to last delivery; published {publish_rate:.0} msgs/s)",
                deliveries as f64 / secs,
                expected.len(),
            );
            println!(
                "delivery check: {missing} missing, {out_of_order} out of order, {duplicates} duplicates, {unmatched} outside the filters, {corrupt} corrupt; {fewest} to {most} per subscriber"
            );
            if missing > 0 {
                println!(
                    "note: a full session queue drops that subscriber's copy (max_queued_messages, max_queued_bytes): see edgegate_local_dropped_total"
                );
            }
            if errors > 0 {
                println!("subscriber errors: {errors}");
            }
            Ok(Summary {
                deliveries,
                violations: out_of_order + duplicates + unmatched + corrupt,
            })
        }

        /// "N (...): k × filter, filter; k × filter" in the order the filters were given.
        pub fn describe(&self, args: &Args) -> String {
            let mut groups: Vec<(String, usize)> = Vec::new();
            for s in &self.subscribers {
                let name = s.filters.join(", ");
                match groups.iter_mut().find(|(f, _)| *f == name) {
                    Some((_, n)) => *n += 1,
                    None => groups.push((name, 1)),
                }
            }
            let groups: Vec<String> = groups.iter().map(|(f, n)| format!("{n} × {f}")).collect();
            let pace = if args.sub_rate > 0 {
                format!(", each taking at most {} messages/s", args.sub_rate)
            } else {
                String::new()
            };
            format!(
                "{} (MQTT 3.1.1, QoS {}{pace}, subscribed before the first publish): {}",
                self.subscribers.len(),
                args.sub_qos,
                groups.join("; ")
            )
        }
    }

    /// What a subscriber checks each delivery against.
    struct Check {
        /// This run's payloads start with it: `<run>:`.
        prefix: String,
        /// By publisher connection: its topic.
        topics: Arc<[String]>,
        /// By publisher connection: whether one of the subscriber's filters matches its topic.
        wanted: Arc<[bool]>,
        /// `--payload`.
        size: usize,
        /// Sequence numbers from here on are no publisher's.
        max_seq: usize,
    }

    /// One subscriber: connect, subscribe, say so on `ready`, then record every delivery
    /// until `stop`. With `--sub-rate` it takes at most that many messages a second and
    /// acknowledges each as it takes it; what it has not taken stays unread in its socket,
    /// so the gateway's window towards it fills, as with an application doing work per
    /// message. Its client is [`wire`]'s (see there why not rumqttc).
    async fn subscriber(
        args: Args,
        client_id: String,
        filters: Vec<String>,
        check: Check,
        distinct: Arc<AtomicU64>,
        ready: oneshot::Sender<Result<(), String>>,
        stop: CancellationToken,
    ) -> Received {
        // With `--count` each publisher's share is known: room for it up front, so the hot
        // loop does not reallocate.
        let room = if check.max_seq < MAX_SEQ {
            check.max_seq
        } else {
            0
        };
        let mut r = Received {
            copies: check
                .wanted
                .iter()
                .map(|w| Vec::with_capacity(if *w { room } else { 0 }))
                .collect(),
            highest: vec![None; check.wanted.len()],
            ..Received::default()
        };
        let mut ready = Some(ready);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let opened = tokio::select! {
            () = &mut stopped => return r,
            opened = open(&args, &client_id, &filters) => opened,
        };
        let (mut io, mut inbox) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                r.failed(&mut ready, &filters, e);
                return r;
            }
        };
        let mut taker = Taker {
            every: (args.sub_rate > 0).then(|| Duration::from_secs_f64(1.0 / args.sub_rate as f64)),
            first: None,
            taken: 0,
            acks: Vec::with_capacity(4096),
        };
        let mut last_write = Instant::now();
        let failure = loop {
            let now = Instant::now();
            let due = match taker.take(&mut inbox, now, &mut r, &check, &distinct, &mut ready) {
                Ok(due) => due,
                Err(e) => break Some(e),
            };
            if !taker.acks.is_empty() {
                if let Err(e) = wire::send(&mut io, &taker.acks).await {
                    break Some(e.to_string());
                }
                taker.acks.clear();
                last_write = now;
            }
            match due {
                // Paced: nothing more is read before the next message is due.
                Some(due) => tokio::select! {
                    biased;
                    () = &mut stopped => break None,
                    () = tokio::time::sleep_until(due.into()) => {}
                },
                None => tokio::select! {
                    biased;
                    () = &mut stopped => break None,
                    read = inbox.fill(&mut io) => match read {
                        Ok(0) => break Some("the gateway closed the connection".to_owned()),
                        Ok(_) => {}
                        Err(e) => break Some(e.to_string()),
                    },
                    // Idle for half the keep alive: the gateway must hear from us.
                    () = tokio::time::sleep_until((last_write + wire::KEEP_ALIVE / 2).into()) => {
                        if let Err(e) = wire::send(&mut io, &wire::PINGREQ).await {
                            break Some(e.to_string());
                        }
                        last_write = Instant::now();
                    }
                },
            }
        };
        if let Some(e) = failure {
            r.failed(&mut ready, &filters, e);
        }
        let bye = wire::send(&mut io, &wire::DISCONNECT);
        let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        r
    }

    /// Connects (retrying while the gateway is not yet listening or refuses) and sends the
    /// SUBSCRIBE; its SUBACK comes in with the deliveries.
    async fn open(
        args: &Args,
        client_id: &str,
        filters: &[String],
    ) -> Result<(Box<dyn wire::Io>, wire::Inbox), String> {
        let (host, port) = split_addr(&args.mqtt);
        let tls = TLS.get().cloned().flatten();
        let mut retries = 0;
        loop {
            let attempt = async {
                let mut io = wire::dial(&host, port, tls.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                wire::send(&mut io, &wire::connect(client_id))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut inbox = wire::Inbox::default();
                loop {
                    match wire::parse(inbox.pending())? {
                        Some((wire::Packet::ConnAck { code: 0 }, n)) => {
                            inbox.consume(n);
                            break;
                        }
                        Some((wire::Packet::ConnAck { code }, _)) => {
                            return Err(format!("CONNACK return code {code}"));
                        }
                        Some((other, _)) => return Err(format!("{other:?} before CONNACK")),
                        None => {
                            if inbox.fill(&mut io).await.map_err(|e| e.to_string())? == 0 {
                                return Err("the gateway closed the connection".to_owned());
                            }
                        }
                    }
                }
                wire::send(&mut io, &wire::subscribe(filters, args.sub_qos.min(2)))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((io, inbox))
            };
            match attempt.await {
                Ok(opened) => return Ok(opened),
                Err(_) if retries < CONNECT_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A subscriber's taking of deliveries, at its pace.
    struct Taker {
        /// `--sub-rate`'s interval between two messages taken.
        every: Option<Duration>,
        /// When the first message was taken.
        first: Option<Instant>,
        taken: u32,
        /// Acknowledgements of what was taken, written once per batch.
        acks: Vec<u8>,
    }

    impl Taker {
        /// Takes every whole packet read as far as the pace allows at `now`; returns when
        /// the next message is due if the pace stopped it.
        fn take(
            &mut self,
            inbox: &mut wire::Inbox,
            now: Instant,
            r: &mut Received,
            check: &Check,
            distinct: &AtomicU64,
            ready: &mut Option<oneshot::Sender<Result<(), String>>>,
        ) -> Result<Option<Instant>, String> {
            let mut took = false;
            let mut due = None;
            while let Some((packet, n)) = wire::parse(inbox.pending())? {
                match packet {
                    wire::Packet::Publish {
                        qos,
                        pkid,
                        topic,
                        payload,
                    } => {
                        if let (Some(every), Some(first)) = (self.every, self.first) {
                            let at = first + every * self.taken;
                            if at > now {
                                due = Some(at);
                                break;
                            }
                        }
                        self.first.get_or_insert(now);
                        self.taken += 1;
                        took = true;
                        r.record(topic, payload, check, distinct);
                        match qos {
                            0 => {}
                            1 => wire::ack(&mut self.acks, wire::PUBACK, pkid),
                            _ => wire::ack(&mut self.acks, wire::PUBREC, pkid),
                        }
                    }
                    wire::Packet::PubRel { pkid } => {
                        wire::ack(&mut self.acks, wire::PUBCOMP, pkid);
                    }
                    wire::Packet::SubAck { codes } => {
                        if let Some(tx) = ready.take() {
                            let refused = codes.iter().any(|c| *c >= 0x80);
                            let _ = tx.send(if refused {
                                Err(format!("the gateway refused a filter: {codes:?}"))
                            } else {
                                Ok(())
                            });
                        }
                    }
                    wire::Packet::ConnAck { .. } | wire::Packet::Other => {}
                }
                inbox.consume(n);
            }
            if took {
                r.last = Some(now);
            }
            Ok(due)
        }
    }

    /// With `--duration`, sequence numbers beyond this are not a run's: counted as corrupt,
    /// not stored (with `--count`, those beyond a connection's share are).
    const MAX_SEQ: usize = 1 << 28;

    impl Received {
        /// A connection's failure: the error for `ready` if still waiting, else a line.
        fn failed(
            &mut self,
            ready: &mut Option<oneshot::Sender<Result<(), String>>>,
            filters: &[String],
            why: String,
        ) {
            self.errors += 1;
            match ready.take() {
                Some(tx) => {
                    let _ = tx.send(Err(why));
                }
                None => eprintln!("subscriber {filters:?}: {why}"),
            }
        }

        fn record(&mut self, topic: &[u8], payload: &[u8], check: &Check, distinct: &AtomicU64) {
            let prefix = check.prefix.as_str();
            let Some((conn, seq)) = parse_id(payload, prefix) else {
                return;
            };
            self.deliveries += 1;
            let (Some(expected), Some(seq)) = (
                check.topics.get(conn),
                usize::try_from(seq).ok().filter(|s| *s < check.max_seq),
            ) else {
                self.corrupt += 1;
                return;
            };
            let id_len = prefix.len()
                + payload[prefix.len()..]
                    .iter()
                    .take_while(|b| **b != b'|')
                    .count()
                + 1;
            if topic != expected.as_bytes() || payload.len() != check.size.max(id_len) {
                self.corrupt += 1;
            }
            if !check.wanted[conn] {
                self.unmatched += 1;
            }
            let copies = &mut self.copies[conn];
            if copies.len() <= seq {
                copies.resize(seq + 1, 0);
            }
            if copies[seq] == 0 {
                distinct.fetch_add(1, Ordering::Relaxed);
                if self.highest[conn].is_some_and(|h| h > seq) {
                    self.out_of_order += 1;
                }
            }
            copies[seq] = copies[seq].saturating_add(1);
            self.highest[conn] = self.highest[conn].max(Some(seq));
        }
    }

    #[cfg(test)]
    mod tests {
        use super::matches;

        #[test]
        fn filters_match_as_mqtt_says() {
            assert!(matches("load/#", "load/7/telemetry"));
            assert!(matches("load/#", "load"));
            assert!(matches("load/+/telemetry", "load/7/telemetry"));
            assert!(matches("+/+/+", "load/7/telemetry"));
            assert!(matches("#", "load/7/telemetry"));
            assert!(!matches("load/+", "load/7/telemetry"));
            assert!(!matches("load/+/telemetry", "load/7/status"));
            assert!(!matches("load/7/telemetry/#", "load/7"));
            assert!(!matches("#", "$SYS/x"));
            assert!(!matches("+/x", "$SYS/x"));
            assert!(matches("$SYS/#", "$SYS/x"));
        }
    }
}

/// CoAP mode: simulated devices sending confirmable POSTs (RFC 7252), encoded and decoded
/// with coap-lite.
mod coap {
    use std::net::SocketAddr;

    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
    use tokio::net::UdpSocket;

    use super::*;

    /// The gateway's default `[coap] max_exchanges_per_peer`: a larger window is refused 5.03.
    pub const GATEWAY_PER_PEER: u16 = 16;
    /// RFC 7252 ACK_TIMEOUT and MAX_RETRANSMIT.
    const ACK_TIMEOUT: Duration = Duration::from_secs(2);
    const MAX_RETRANSMIT: u8 = 4;
    /// After an empty ACK the device waits this long for the separate 2.04 (the gateway
    /// retransmits it for up to about 45 s with its defaults) before counting it as failed.
    const SEPARATE_TIMEOUT: Duration = Duration::from_secs(60);

    /// One outstanding request.
    struct Pending {
        seq: u64,
        mid: u16,
        /// The encoded CON, sent again on timeout.
        datagram: Vec<u8>,
        first_sent: Instant,
        /// When to retransmit (or, once `separate`, give up).
        deadline: Instant,
        timeout: Duration,
        retransmissions: u8,
        /// The empty ACK came: the 2.04 follows as a separate response; stop retransmitting.
        separate: bool,
    }

    /// One device: its own UDP socket (the gateway's per-peer limits and dedup key are the
    /// source address), `count` CON POSTs to `/t/dev<conn>` (or until `stop`) with at most
    /// `--inflight` outstanding, matched by message id (ACK, RST) and token (the sequence
    /// number: separate responses).
    pub async fn device(
        args: &Args,
        run: &str,
        conn: usize,
        count: usize,
        stop: &AtomicBool,
    ) -> ConnResult {
        let mut result = ConnResult::default();
        let limit = if args.duration.is_some() {
            u64::MAX
        } else {
            count as u64
        };
        let socket = match connect(args.coap.as_deref().unwrap_or_default()).await {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("device {conn}: {e:#}");
                result.errors += 1;
                return result;
            }
        };
        let device = format!("dev{conn}");
        let window = usize::from(args.inflight.max(1));
        let mut next_mid: u16 = rand::random();
        let mut next_seq = 0u64;
        // By sequence number (= token); `mids` finds them by message id.
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut mids: HashMap<u16, u64> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        loop {
            while pending.len() < window && next_seq < limit && !stop.load(Ordering::Relaxed) {
                next_mid = next_mid.wrapping_add(1);
                let seq = next_seq;
                next_seq += 1;
                let Some(datagram) = request(
                    next_mid,
                    seq,
                    &device,
                    payload(run, conn, seq, args.shape()),
                ) else {
                    result.fail("encode");
                    continue;
                };
                if socket.send(&datagram).await.is_err() {
                    result.errors += 1;
                }
                let now = Instant::now();
                let timeout = ACK_TIMEOUT.mul_f64(1.0 + rand::random::<f64>() * 0.5);
                mids.insert(next_mid, seq);
                pending.insert(
                    seq,
                    Pending {
                        seq,
                        mid: next_mid,
                        datagram,
                        first_sent: now,
                        deadline: now + timeout,
                        timeout,
                        retransmissions: 0,
                        separate: false,
                    },
                );
            }
            if pending.is_empty() {
                break;
            }
            let deadline = pending
                .values()
                .map(|p| p.deadline)
                .min()
                .unwrap_or_else(Instant::now);
            match tokio::time::timeout_at(deadline.into(), socket.recv(&mut buf)).await {
                Ok(Ok(len)) => {
                    on_datagram(&socket, &buf[..len], &mut pending, &mut mids, &mut result).await;
                }
                Ok(Err(e)) => {
                    // ICMP port unreachable surfaces here; the retransmission timer copes.
                    result.errors += 1;
                    if result.errors == 1 {
                        eprintln!("device {conn}: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(_) => expire(&socket, &mut pending, &mut mids, &mut result).await,
            }
        }
        result
    }

    async fn connect(addr: &str) -> anyhow::Result<UdpSocket> {
        let peer: SocketAddr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .with_context(|| format!("{addr} resolves to nothing"))?;
        let local: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(peer).await?;
        Ok(socket)
    }

    /// CON POST /t/{device} with the sequence number as its 4-byte token.
    fn request(mid: u16, seq: u64, device: &str, payload: Vec<u8>) -> Option<Vec<u8>> {
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = mid;
        packet.set_token((seq as u32).to_be_bytes().to_vec());
        packet.add_option(CoapOption::UriPath, b"t".to_vec());
        packet.add_option(CoapOption::UriPath, device.as_bytes().to_vec());
        packet.payload = payload;
        packet.to_bytes().ok()
    }

    async fn on_datagram(
        socket: &UdpSocket,
        datagram: &[u8],
        pending: &mut HashMap<u64, Pending>,
        mids: &mut HashMap<u16, u64>,
        result: &mut ConnResult,
    ) {
        let Ok(packet) = Packet::from_bytes(datagram) else {
            result.fail("unparseable answer");
            return;
        };
        let mid = packet.header.message_id;
        let seq = match packet.header.get_type() {
            MessageType::Acknowledgement | MessageType::Reset => mids.get(&mid).copied(),
            // A separate response (CON, which we must ACK) or a NON one: matched by token.
            kind => {
                if kind == MessageType::Confirmable {
                    let mut ack = Packet::new();
                    ack.header.set_type(MessageType::Acknowledgement);
                    ack.header.message_id = mid;
                    if let Ok(bytes) = ack.to_bytes() {
                        let _ = socket.send(&bytes).await;
                    }
                }
                <[u8; 4]>::try_from(packet.get_token())
                    .ok()
                    .map(|t| u64::from(u32::from_be_bytes(t)))
                    .and_then(|low| pending.keys().copied().find(|s| *s as u32 as u64 == low))
            }
        };
        // Late duplicates of answers already handled are ignored.
        let Some(seq) = seq else { return };
        if packet.header.get_type() == MessageType::Reset {
            finish(seq, pending, mids);
            return result.fail("reset");
        }
        match packet.header.code {
            MessageClass::Empty => {
                if let Some(p) = pending.get_mut(&seq) {
                    p.separate = true;
                    p.deadline = Instant::now() + SEPARATE_TIMEOUT;
                }
            }
            MessageClass::Response(ResponseType::Changed) => {
                if let Some(p) = finish(seq, pending, mids) {
                    result.acknowledged(p.seq, p.first_sent);
                }
            }
            code => {
                finish(seq, pending, mids);
                let code = u8::from(code);
                result.fail(format!("{}.{:02}", code >> 5, code & 0x1F));
            }
        }
    }

    fn finish(
        seq: u64,
        pending: &mut HashMap<u64, Pending>,
        mids: &mut HashMap<u16, u64>,
    ) -> Option<Pending> {
        let p = pending.remove(&seq)?;
        mids.remove(&p.mid);
        Some(p)
    }

    /// Retransmits what timed out with the timeout doubled; gives up after MAX_RETRANSMIT.
    async fn expire(
        socket: &UdpSocket,
        pending: &mut HashMap<u64, Pending>,
        mids: &mut HashMap<u16, u64>,
        result: &mut ConnResult,
    ) {
        let now = Instant::now();
        let due: Vec<u64> = pending
            .values()
            .filter(|p| p.deadline <= now)
            .map(|p| p.seq)
            .collect();
        for seq in due {
            let Some(p) = pending.get_mut(&seq) else {
                continue;
            };
            if p.separate {
                finish(seq, pending, mids);
                result.fail("no separate response");
            } else if p.retransmissions >= MAX_RETRANSMIT {
                finish(seq, pending, mids);
                result.fail("timeout");
            } else {
                p.retransmissions += 1;
                p.timeout *= 2;
                p.deadline = now + p.timeout;
                result.retransmissions += 1;
                let _ = socket.send(&p.datagram).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--json` payloads are JSON of the size asked for, their id is found, and they encode
    /// with the schema `--print-schema` gives, the id readable in the Avro record too.
    /// `--sparkplug` payloads decode as Sparkplug B, are about their size, and the record a
    /// `sparkplug_b` route makes of one (per payload) carries the id `--verify` looks for, in
    /// sequence with no anomaly.
    #[test]
    fn sparkplug_payloads_convert_to_records_carrying_their_id() {
        use edgegate::format::sparkplug::{Records, Sparkplug, proto};
        for size in [100, 300, 1000] {
            let gateway = Sparkplug::default();
            for seq in [0u64, 1, 2] {
                let p = sparkplug_payload("1234567", 42, seq, size);
                assert!(
                    p.len() > size / 2 && p.len() < size * 2,
                    "{size}: {} B",
                    p.len()
                );
                let decoded = proto::decode(bytes::Bytes::from(p.clone())).unwrap();
                assert_eq!(decoded.metrics.len(), 2 + json_sensors(size));
                let converted = gateway
                    .convert(
                        "spBv1.0/load/NDATA/node-42",
                        &bytes::Bytes::from(p),
                        Records::PerPayload,
                    )
                    .unwrap();
                assert_eq!(converted.records.len(), 1);
                assert!(converted.anomalies.is_empty(), "{:?}", converted.anomalies);
                assert_eq!(
                    parse_id(&converted.records[0], "1234567:"),
                    Some((42, seq)),
                    "{}",
                    String::from_utf8_lossy(&converted.records[0])
                );
            }
        }
    }

    #[test]
    fn json_payloads_fit_their_size_and_their_schema() {
        for size in [60, 100, 300, 1000] {
            let schema = apache_avro::Schema::parse_str(&json_schema(size)).unwrap();
            let writer = edgegate::format::registry::avro::Writer::new(schema);
            for (conn, seq) in [(0, 0), (42, 123_456), (99, 99_999_999)] {
                let p = json_payload("1234567", conn, seq, size);
                let value: serde_json::Value = serde_json::from_slice(&p).unwrap();
                assert_eq!(value["seq"], seq);
                if seq < 1_000_000 {
                    assert_eq!(p.len(), size, "{}", String::from_utf8_lossy(&p));
                }
                assert_eq!(parse_id(&p, "1234567:"), Some((conn, seq)));
                let framed = writer.encode(1, &p).unwrap();
                assert_eq!(parse_id(&framed, "1234567:"), Some((conn, seq)));
                assert!(framed.len() < p.len());
            }
        }
        assert_eq!(
            parse_id(b"1234567:3:4|xxx", "1234567:"),
            Some((3, 4)),
            "text payloads"
        );
        assert_eq!(parse_id(b"7654321:3:4|xxx", "1234567:"), None);
    }
}
