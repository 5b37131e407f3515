//! The downlink: Kafka records become MQTT messages for the devices on site, held on the
//! gateway's disk until the device is there to take them.
//!
//! ```text
//! Kafka topic --consumer (group edgegate-<gateway id>)--> ours? --> MQTT topic (template)
//!   --> broker.publish (a persistent session's copy is journaled)
//!   --> mark the offset handled (same journal, after) --> store the offset --> Kafka commit
//! device PUBACK/PUBCOMP, expiry, refusal, no session --> outcome --> status record --> log --> Kafka
//! ```
//!
//! **Durable before committed.** A command is queued (journaled, fsync'd) for every
//! persistent session that subscribes to its topic before its offset is marked handled in
//! the same journal, and only then is the offset stored for Kafka's commit. A crash at any
//! point loses nothing: the consumer re-reads from the last commit, and every record up to
//! the journal's mark (which the queued records themselves carry) is skipped, so a command
//! is not queued twice. A session that is not persistent gets the command only if it is
//! connected (MQTT promises it nothing more).
//!
//! **Outcomes** go through the log like device data, so the cloud learns them across
//! outages: one record per command and session on the `status_topic`, keyed like the
//! command, JSON `{"outcome", "client_id", "topic", "partition", "offset", "mqtt_topic"}`
//! with the correlation in the header `edgegate-correlation`.

pub mod config;
pub mod template;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt as _;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientConfig, ClientContext, Statistics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Command, Message, Outcome, OutcomeKind, Props, Report};
use crate::buffer::Log;
use crate::forward::config::KafkaConfig;
use crate::record::{Record, Source};
use config::{Address, DownlinkConfig};
use template::{Template, Values};

/// The header whose value (seconds) overrides a downlink's `ttl` for one command.
pub const EXPIRY_HEADER: &str = "edgegate-expiry";
/// Headers a command's correlation is taken from, in order.
const CORRELATION_HEADERS: [&str; 2] = ["mqtt-correlation-data", "correlation-id"];
/// Records taken per journal commit at most: a backlog is queued in batches, one fsync each,
/// not one per command.
const BATCH: usize = 1024;
/// Outcomes appended to the log per durability wait, at most.
const OUTCOME_BATCH: usize = 1024;

/// Why the downlink could not start.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("cannot read a Kafka secret: {0}")]
    Secret(String),
    #[error("cannot create the Kafka consumer: {0}")]
    Consumer(String),
}

struct Downlink {
    config: DownlinkConfig,
    template: Template,
    status_topic: Option<Arc<str>>,
}

/// Consumes the `[[downlink]]` topics until `shutdown`. Outcomes are written by
/// [`write_outcomes`], which runs whether or not a downlink is configured.
pub async fn run(
    downlinks: Vec<DownlinkConfig>,
    kafka: KafkaConfig,
    gateway_id: String,
    broker: Broker,
    shutdown: CancellationToken,
) -> Result<(), DownlinkError> {
    if downlinks.is_empty() {
        return Ok(());
    }
    let consumer = consumer(&kafka, &gateway_id, &broker)?;
    let by_topic: HashMap<String, Downlink> = downlinks
        .into_iter()
        .filter_map(|c| {
            // Checked at load; a template that does not parse here is skipped, not a panic.
            let template = Template::parse(&c.mqtt_topic).ok()?;
            let status_topic = c.status_topic.as_deref().map(Arc::from);
            Some((
                c.topic.clone(),
                Downlink {
                    config: c,
                    template,
                    status_topic,
                },
            ))
        })
        .collect();
    let topics: Vec<&str> = by_topic.keys().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| DownlinkError::Consumer(e.to_string()))?;
    tracing::info!(topics = ?topics, group = %group(&gateway_id), "Consuming commands from Kafka.");

    let mut batch = Vec::with_capacity(BATCH);
    'consume: loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        // Whatever else has arrived joins it: one journal commit for the lot.
        batch.push(first);
        while batch.len() < BATCH {
            match consumer.recv().now_or_never() {
                Some(m) => batch.push(m),
                None => break,
            }
        }
        // Each record, and whether it is marked handled once the batch is done.
        let mut taken = Vec::with_capacity(batch.len());
        // Outcomes reported for records of this batch and not yet known to be in the log.
        let mut owed = false;
        for message in batch.drain(..) {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "The downlink consumer reported an error.");
                    continue;
                }
            };
            let mut handled = false;
            if let Some(downlink) = by_topic.get(message.topic()) {
                match take(&broker, downlink, &gateway_id, &message) {
                    Take::Skip => {}
                    Take::Report(command, kind) => {
                        broker.outcome(&command, None, kind);
                        owed = true;
                        handled = true;
                    }
                    Take::Publish(m) => {
                        if !owed {
                            owed = broker.publish(&m).reported > 0;
                        } else if broker.has_subscriber(&m.topic) {
                            // A journaled copy marks this record, and every one before it,
                            // handled after a crash: the outcomes owed are in the log first.
                            if !broker.outcomes_written().await {
                                break 'consume;
                            }
                            owed = broker.publish(&m).reported > 0;
                        } else if let Some(c) = &m.command {
                            // No copy to journal: reported, with no wait for the others.
                            broker.outcome(c, None, OutcomeKind::NoSession);
                        }
                        handled = true;
                    }
                }
            }
            taken.push((message, handled));
        }
        // Marked handled only once their outcomes are in the log: a crash in between takes
        // the records again and reports them again, never leaves a report out.
        if owed && !broker.outcomes_written().await {
            break;
        }
        let marked: Vec<_> = taken
            .iter()
            .filter(|(_, handled)| *handled)
            .map(|(m, _)| broker.mark_handled(m.topic(), m.partition(), m.offset()))
            .collect();
        // The journal commits in order: once the marks are durable, so is every copy queued
        // before them.
        for result in futures::future::join_all(marked).await {
            if let Err(e) = result {
                tracing::error!(error = %e, "Cannot journal the downlink's position; commands may be taken again after a restart.");
            }
        }
        for (message, _) in &taken {
            if let Err(e) = consumer.store_offset_from_message(message) {
                tracing::debug!(error = %e, "Cannot store a downlink offset.");
            }
        }
    }
    // What was stored is committed on the way out.
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

fn group(gateway_id: &str) -> String {
    format!("edgegate-{gateway_id}")
}

/// The consumer's context: its statistics give the lag behind the downlink's topics.
struct LagReport {
    broker: Broker,
}

impl ClientContext for LagReport {
    fn stats(&self, stats: Statistics) {
        // Partitions this consumer fetches; -1 is librdkafka's internal "unassigned" one,
        // and a negative lag means not known yet.
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.broker.set_downlink_lag(lag);
    }
}

impl ConsumerContext for LagReport {}

fn consumer(
    kafka: &KafkaConfig,
    gateway_id: &str,
    broker: &Broker,
) -> Result<StreamConsumer<LagReport>, DownlinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", kafka.brokers.join(","))
        .set(
            "client.id",
            format!("{}-downlink", kafka.client_id_for(gateway_id)),
        )
        .set("group.id", group(gateway_id))
        // Offsets are stored only once the command is durable on the gateway; the stored
        // ones are committed in the background.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        // A new gateway takes the commands already waiting; the ttl expires stale ones.
        .set("auto.offset.reset", "earliest")
        .set("reconnect.backoff.max.ms", "1000")
        // For the lag metric.
        .set("statistics.interval.ms", "5000")
        // librdkafka prefetches up to 64 MiB by default; the backlog waits in Kafka, not in
        // the gateway's memory (the sessions' journal holds what was taken).
        .set("queued.max.messages.kbytes", "2048")
        .set("queued.min.messages", "1000")
        // Those limits are checked between fetches, and one fetch takes up to 1 MiB of a
        // partition: compressed batches of small commands (lz4, 10,000 to a batch) made that
        // 50,000 commands parsed at once, a 23 MB rise of the heap while a backlog was taken
        // (tools/bench-downlink, heaptrack). A fetch still returns one whole batch however
        // large (so a large command is never stuck); it just does not add nine more.
        .set("max.partition.fetch.bytes", "65536")
        // With fetches that small the queue limits are met after every fetch, and librdkafka
        // then waits fetch.queue.backoff.ms (1 s by default) before it looks again: taking a
        // backlog fell from 26,000 to 10,000 commands/s. The queue drains in milliseconds.
        .set("fetch.queue.backoff.ms", "20")
        // A commands topic created after the gateway started is found within 30 s, not at
        // librdkafka's default metadata refresh of 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "30000");
    kafka
        .apply_security(&mut c)
        .map_err(|e| DownlinkError::Secret(e.to_string()))?;
    c.create_with_context(LagReport {
        broker: broker.clone(),
    })
    .map_err(|e| DownlinkError::Consumer(e.to_string()))
}

/// What one record of a downlink topic comes to.
enum Take {
    /// Taken before, or not for this gateway.
    Skip,
    /// Not to be delivered: expired already, or no MQTT topic for it.
    Report(Arc<Command>, OutcomeKind),
    /// A message for the sessions that subscribe to its topic.
    Publish(Arc<Message>),
}

/// Reads one record: skipped, reported, or a message to publish. The caller marks it
/// handled once that is done (and its outcome is in the log).
fn take(
    broker: &Broker,
    downlink: &Downlink,
    gateway_id: &str,
    record: &BorrowedMessage<'_>,
) -> Take {
    let (topic, partition, offset) = (record.topic(), record.partition(), record.offset());
    if broker
        .handled(topic, partition)
        .is_some_and(|at| offset <= at)
    {
        return Take::Skip;
    }
    let headers = record.headers();
    let header = |name: &str| -> Option<&[u8]> {
        headers.and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value))
    };
    let mut key = record.key();
    match downlink.config.address {
        Address::All => {}
        Address::Header => {
            if header(&downlink.config.gateway_header) != Some(gateway_id.as_bytes()) {
                return Take::Skip;
            }
        }
        Address::KeyPrefix => {
            let prefix = format!("{gateway_id}/");
            match key.and_then(|k| k.strip_prefix(prefix.as_bytes())) {
                Some(rest) => key = Some(rest),
                None => return Take::Skip,
            }
        }
    }
    let now = crate::ingest::now_ms();
    let sent_ms = record.timestamp().to_millis().unwrap_or(now);
    let ttl_ms = header(EXPIRY_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u32>().ok())
        .map_or_else(
            || i64::try_from(downlink.config.ttl.get().as_millis()).unwrap_or(i64::MAX),
            |secs| i64::from(secs) * 1000,
        );
    let expires_ms = sent_ms.saturating_add(ttl_ms);
    let correlation = CORRELATION_HEADERS
        .iter()
        .find_map(|h| header(h))
        .map(Bytes::copy_from_slice);
    let command = Arc::new(Command {
        topic: topic.to_owned(),
        partition,
        offset,
        key: record.key().map(Bytes::copy_from_slice),
        correlation: correlation.clone(),
        status_topic: downlink.status_topic.clone(),
        sent_ms,
    });
    let rendered = downlink.template.render(&Values {
        key,
        header: &header,
        gateway_id,
    });
    match rendered {
        _ if expires_ms <= now => Take::Report(command, OutcomeKind::Expired),
        Err(why) => {
            tracing::warn!(
                topic,
                partition,
                offset,
                why,
                "Refused a command: no MQTT topic for it."
            );
            Take::Report(command, OutcomeKind::Refused)
        }
        Ok(mqtt_topic) => {
            let text = |h: &str| header(h).and_then(|v| String::from_utf8(v.to_vec()).ok());
            tracing::debug!(topic, partition, offset, mqtt_topic, "Took a command.");
            Take::Publish(Arc::new(Message {
                topic: Arc::from(mqtt_topic.as_str()),
                payload: record
                    .payload()
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_default(),
                qos: downlink.config.qos,
                retain: false,
                publisher: None,
                expires_ms: Some(expires_ms),
                props: Props {
                    payload_format_utf8: false,
                    content_type: text("content-type"),
                    response_topic: text("mqtt-response-topic"),
                    correlation_data: correlation,
                    user_properties: Vec::new(),
                },
                command: Some(command),
            }))
        }
    }
}

/// Writes each outcome to its command's status topic, through the log. Started before the
/// listeners serve and whether or not a downlink is configured: a session restored from the
/// journal may finish a command (delivered, expired) at once, and commands held under an
/// earlier configuration still have outcomes to report. Runs until `sessions` (the
/// listeners and their connections) have ended and what they reported is written, so a
/// command a device acknowledged during the shutdown is reported too.
pub async fn write_outcomes(
    mut rx: mpsc::UnboundedReceiver<Report>,
    log: Log,
    gateway_id: String,
    sessions: TaskTracker,
) {
    let mut outcomes = Vec::with_capacity(OUTCOME_BATCH);
    let mut ended = false;
    loop {
        if ended {
            while outcomes.len() < OUTCOME_BATCH {
                match rx.try_recv() {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(_) => break,
                }
            }
            if outcomes.is_empty() {
                return;
            }
        } else {
            let received = tokio::select! {
                biased;
                n = rx.recv_many(&mut outcomes, OUTCOME_BATCH) => n,
                () = sessions.wait() => {
                    ended = true;
                    continue;
                }
            };
            if received == 0 {
                return;
            }
        }
        // Appended together, awaited together: one group commit, not one per outcome.
        let mut durable = Vec::with_capacity(outcomes.len());
        let mut then = Vec::new();
        let mut barriers = Vec::new();
        for report in outcomes.drain(..) {
            let (outcome, finish) = match report {
                Report::Outcome(outcome, finish) => (outcome, finish),
                Report::Barrier(b) => {
                    barriers.push(b);
                    continue;
                }
            };
            then.extend(finish);
            let Some(status_topic) = outcome.command.status_topic.as_deref() else {
                continue;
            };
            let record = status_record(&outcome, status_topic, &gateway_id);
            match log.append(&record) {
                Ok(d) => durable.push(d),
                Err(e) => tracing::warn!(error = %e, "A command's outcome was not stored."),
            }
        }
        for result in futures::future::join_all(durable).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "A command's outcome was not stored.");
            }
        }
        // In the log now (or refused by it, which waiting would not change): the commands
        // leave their sessions' journal, and whoever waits for them is told.
        for finish in then {
            finish.run();
        }
        for barrier in barriers {
            let _ = barrier.send(());
        }
    }
}

fn status_record(outcome: &Outcome, status_topic: &str, gateway_id: &str) -> Record {
    let c = &outcome.command;
    let client = outcome.client.as_deref().unwrap_or("");
    let payload = serde_json::json!({
        "outcome": outcome.kind.label(),
        "client_id": outcome.client.as_deref(),
        "topic": c.topic,
        "partition": c.partition,
        "offset": c.offset,
        "gateway_id": gateway_id,
    });
    let mut headers = vec![(
        "edgegate-outcome".to_owned(),
        Bytes::from_static(outcome.kind.label().as_bytes()),
    )];
    if let Some(correlation) = &c.correlation {
        headers.push(("edgegate-correlation".to_owned(), correlation.clone()));
    }
    Record {
        source: Source::Mqtt,
        received_ms: crate::ingest::now_ms(),
        device: client.to_owned(),
        origin: format!("$edgegate/downlink/{}", c.topic),
        kafka_topic: status_topic.to_owned(),
        key: c.key.clone(),
        headers,
        payload: Bytes::from(payload.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::buffer::LogConfig;

    fn outcome(offset: i64, status_topic: Option<&str>) -> Outcome {
        Outcome {
            command: Arc::new(Command {
                topic: "iot.commands".into(),
                partition: 0,
                offset,
                key: Some(Bytes::from_static(b"pump7")),
                correlation: Some(Bytes::from_static(b"req-1")),
                status_topic: status_topic.map(Arc::from),
                sent_ms: 1_000,
            }),
            client: Some(Arc::from("pump7")),
            kind: OutcomeKind::Delivered,
        }
    }

    /// A device may acknowledge a command while the gateway shuts down (its connection
    /// drains): that outcome is written before the writer stops, not dropped with the
    /// channel, and one without a status topic is not written at all.
    #[tokio::test]
    async fn outcomes_reported_while_the_sessions_end_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = LogConfig::new(dir.path().join("log"));
        config.commit_delay = Duration::from_millis(1);
        let (log, _) = tokio::task::spawn_blocking(move || Log::open(config))
            .await
            .expect("join")
            .expect("open the log");
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Report::Outcome(outcome(1, Some("status")), None))
            .expect("send");
        tx.send(Report::Outcome(outcome(2, None), None))
            .expect("send");
        let sessions = TaskTracker::new();
        let (ack, acked) = tokio::sync::oneshot::channel::<()>();
        let late = tx.clone();
        sessions.spawn(async move {
            // The session's last acknowledgement, as it drains.
            let _ = acked.await;
            late.send(Report::Outcome(outcome(3, Some("status")), None))
                .expect("send");
        });
        sessions.close();
        let writer = tokio::spawn(write_outcomes(
            rx,
            log.clone(),
            "gw".into(),
            sessions.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "runs while a session is open");
        ack.send(()).expect("ack");
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("stops once the sessions have ended")
            .expect("join");
        assert_eq!(log.next_seq(), 2, "offsets 1 and 3; 2 has no status topic");
        let mut reader = log.reader().expect("reader");
        let mut offsets = Vec::new();
        for stored in reader.read_batch(10, 1 << 20).await.expect("read") {
            let v: serde_json::Value =
                serde_json::from_slice(&stored.record.payload).expect("JSON");
            assert_eq!(v["outcome"], "delivered");
            assert_eq!(v["client_id"], "pump7");
            offsets.push(v["offset"].as_i64().expect("offset"));
        }
        assert_eq!(offsets, vec![1, 3]);
    }

    /// The downlink marks a record handled only after `outcomes_written`: it must answer
    /// once the outcomes reported before it are durable in the log (a slow disk here), and
    /// say so when the writer has stopped.
    #[tokio::test]
    async fn outcomes_written_answers_once_earlier_outcomes_are_durable() {
        use crate::broker::BrokerConfig;
        use crate::broker::mailbox::QueueLimits;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = LogConfig::new(dir.path().join("log"));
        config.commit_delay = Duration::from_millis(1);
        let (log, _) =
            tokio::task::spawn_blocking(move || Log::open_slow(config, Duration::from_millis(200)))
                .await
                .expect("join")
                .expect("open the log");
        let broker = Broker::open(
            &dir.path().join("broker"),
            BrokerConfig {
                queue: QueueLimits {
                    messages: 10,
                    bytes: 1 << 20,
                },
                total_queued_bytes: 1 << 20,
                read_back_bytes: 1 << 20,
                max_retained: 10,
                max_session_expiry: Duration::from_secs(60),
                max_subscriptions: 4,
                max_offline_sessions: 4,
            },
        )
        .expect("broker");
        let sessions = TaskTracker::new();
        let writer = tokio::spawn(write_outcomes(
            broker.take_outcomes().expect("outcomes"),
            log.clone(),
            "gw".into(),
            sessions.clone(),
        ));
        let command = outcome(9, Some("status")).command;
        broker.outcome(&command, None, OutcomeKind::NoSession);
        assert!(broker.outcomes_written().await);
        let mut reader = log.reader().expect("reader");
        let read = reader
            .read_batch(10, 1 << 20)
            .now_or_never()
            .expect("durable when the barrier answered")
            .expect("read");
        assert_eq!(read.len(), 1);
        // Nothing owed: answered at once.
        assert!(broker.outcomes_written().await);
        sessions.close();
        writer.await.expect("join");
        assert!(!broker.outcomes_written().await, "the writer has stopped");
    }
}
