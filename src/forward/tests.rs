//! The forwarder's error handling against rdkafka's MockCluster (in-process brokers with
//! error injection), reading from an in-memory log. The real-broker tests, with the real
//! log, are in `tests/forward.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::config::KafkaConfig;
use super::context::LinkTracker;
use super::worker::{DeadLetterSink, RecordSource, Settings, Worker};
use super::{LinkState, Progress, dead_letter, record};
use crate::buffer::{AppendError, LogError, StoredRecord};
use crate::record::{Record, Source};

/// An in-memory stand-in for the log: records come from a channel, acks are recorded.
struct MemSource {
    rx: mpsc::UnboundedReceiver<StoredRecord>,
    acks: Arc<Mutex<Vec<u64>>>,
}

impl RecordSource for MemSource {
    async fn read_batch(
        &mut self,
        max_records: usize,
        _max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let Some(first) = self.rx.recv().await else {
            return Err(LogError::Closed);
        };
        let mut out = vec![first];
        while out.len() < max_records {
            match self.rx.try_recv() {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    fn ack(&self, seq: u64) {
        self.acks.lock().expect("acks lock").push(seq);
    }
}

#[derive(Clone, Default)]
struct MemSink(Arc<Mutex<Vec<Record>>>);

impl DeadLetterSink for MemSink {
    async fn store(&self, record: Record) -> Result<(), AppendError> {
        self.0.lock().expect("sink lock").push(record);
        Ok(())
    }
}

struct Harness {
    cluster: MockCluster<'static, DefaultProducerContext>,
    tx: Option<mpsc::UnboundedSender<StoredRecord>>,
    acks: Arc<Mutex<Vec<u64>>>,
    dead: MemSink,
    link: watch::Receiver<LinkState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), super::ForwardError>>,
}

const TOPIC: &str = "telemetry";

fn sample(seq: u64, key: &str, size: usize) -> StoredRecord {
    StoredRecord {
        seq,
        record: Record {
            source: Source::Mqtt,
            received_ms: 1_700_000_000_000 + seq as i64,
            device: key.to_owned(),
            origin: format!("plant/{key}/telemetry"),
            kafka_topic: TOPIC.to_owned(),
            key: Some(Bytes::from(key.to_owned())),
            headers: vec![("mqtt-qos".into(), Bytes::from_static(b"1"))],
            payload: Bytes::from(format!("{seq:0>width$}", width = size.max(8))),
        },
    }
}

fn start(tweak: impl FnOnce(&mut KafkaConfig)) -> Harness {
    // `RUST_LOG=edgegate=debug cargo test` shows what the forwarder did.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    let mut cfg = KafkaConfig {
        brokers: vec![cluster.bootstrap_servers()],
        retry_backoff_min: crate::config::Duration::from_millis(10),
        retry_backoff_max: crate::config::Duration::from_millis(200),
        ..KafkaConfig::default()
    };
    tweak(&mut cfg);
    let (tx, rx) = mpsc::unbounded_channel();
    let acks = Arc::new(Mutex::new(Vec::new()));
    let dead = MemSink::default();
    let link = Arc::new(LinkTracker::new());
    let (progress, _) = watch::channel(Progress::default());
    let settings = Settings {
        grace: Duration::from_secs(5),
        delivery_timeout: Duration::from_secs(2),
        backoff_min: cfg.retry_backoff_min.get(),
        backoff_max: cfg.retry_backoff_max.get(),
        max_in_flight_records: cfg.max_in_flight_records,
        max_in_flight_bytes: cfg.max_in_flight_bytes.get() as usize,
        stall_timeout: cfg.stall_timeout.get(),
        brokers: cfg.brokers.join(","),
    };
    let worker = Worker::new(
        settings,
        "gw",
        MemSource {
            rx,
            acks: acks.clone(),
        },
        dead.clone(),
        cfg.client_config("gw").expect("no secrets to read"),
        link.clone(),
        progress,
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Harness {
        cluster,
        tx: Some(tx),
        acks,
        dead,
        link: link.subscribe(),
        shutdown,
        task,
    }
}

impl Harness {
    fn send(&self, records: impl IntoIterator<Item = StoredRecord>) {
        let tx = self.tx.as_ref().expect("still open");
        for r in records {
            tx.send(r).expect("worker alive");
        }
    }

    /// Closes the in-memory log: the worker finishes what is in flight and returns.
    async fn finish(mut self) -> Harness {
        self.tx = None;
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("worker finishes")
            .expect("worker task")
            .expect("worker result");
        self
    }

    fn acked(&self) -> Vec<u64> {
        let mut a = self.acks.lock().expect("acks").clone();
        a.sort_unstable();
        a
    }

    fn dead_letters(&self) -> Vec<Record> {
        self.dead.0.lock().expect("sink").clone()
    }

    /// Every record in the topic: (seq from the record id, payload).
    fn consume(&self) -> Vec<(u64, Bytes)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .set("group.id", "check")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(TOPIC, 0, Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let mut idle = 0;
        while idle < 10 {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    idle = 0;
                    let headers = m.headers().expect("headers");
                    let id = headers.get(0);
                    assert_eq!(id.key, record::RECORD_ID);
                    let id = std::str::from_utf8(id.value.expect("id value")).expect("utf-8");
                    let seq = id
                        .strip_prefix("gw:")
                        .expect("gateway prefix")
                        .parse()
                        .expect("seq");
                    out.push((seq, Bytes::copy_from_slice(m.payload().unwrap_or_default())));
                }
                Some(Err(e)) => panic!("consume: {e}"),
                None => idle += 1,
            }
        }
        out
    }
}

fn seqs(records: &[(u64, Bytes)]) -> Vec<u64> {
    records.iter().map(|(s, _)| *s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_everything_in_order_and_acks_it() {
    let h = start(|_| {});
    h.send((1..=2000).map(|s| sample(s, "dev-1", 100)));
    let h = h.finish().await;
    assert_eq!(h.acked(), (1..=2000).collect::<Vec<_>>());
    assert!(h.dead_letters().is_empty());
    let got = tokio::task::block_in_place(|| h.consume());
    assert_eq!(seqs(&got), (1..=2000).collect::<Vec<_>>());
    assert_eq!(*h.link.borrow(), LinkState::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_errors_retry_in_order() {
    let h = start(|_| {});
    h.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5],
    );
    h.send((1..=500).map(|s| sample(s, "dev-1", 100)));
    let h = h.finish().await;
    assert_eq!(h.acked(), (1..=500).collect::<Vec<_>>());
    assert!(h.dead_letters().is_empty());
    let got = tokio::task::block_in_place(|| h.consume());
    assert_eq!(seqs(&got), (1..=500).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_topic_goes_to_the_dead_letter_log() {
    let h = start(|_| {});
    h.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    h.send([sample(1, "dev-1", 100)]);
    let h = h.finish().await;
    assert_eq!(h.acked(), [1], "a dead-lettered record leaves the main log");
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1);
    let headers = &dead[0].headers;
    assert_eq!(
        headers[headers.len() - 1],
        (dead_letter::FAILED_SEQ.into(), Bytes::from_static(b"1"))
    );
    let (key, error) = &headers[headers.len() - 2];
    assert_eq!(key, dead_letter::ERROR);
    assert!(
        String::from_utf8_lossy(error).contains("authoriz"),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_isolated_and_innocent_records_flow() {
    let h = start(|_| {});
    // The broker rejects one batch as too large; sent alone, every record fits.
    h.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    h.send((1..=50).map(|s| sample(s, "dev-1", 100)));
    let h = h.finish().await;
    assert_eq!(h.acked(), (1..=50).collect::<Vec<_>>());
    assert!(h.dead_letters().is_empty(), "nobody was guilty alone");
    let got = tokio::task::block_in_place(|| h.consume());
    let mut got = seqs(&got);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, (1..=50).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_producer_is_dead_lettered_alone() {
    let h = start(|cfg| {
        cfg.batch_max_bytes = crate::config::ByteSize(10_000);
        cfg.properties
            .insert("message.max.bytes".into(), "10000".into());
    });
    h.send([
        sample(1, "dev-1", 100),
        sample(2, "dev-1", 50_000),
        sample(3, "dev-1", 100),
    ]);
    let h = h.finish().await;
    assert_eq!(h.acked(), [1, 2, 3]);
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.len(), 50_000);
    let got = tokio::task::block_in_place(|| h.consume());
    assert_eq!(seqs(&got), [1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_undelivered_records_in_the_log() {
    let h = start(|cfg| {
        cfg.properties
            .insert("socket.connection.setup.timeout.ms".into(), "1000".into());
    });
    h.cluster.broker_down(1).expect("broker down");
    h.send((1..=10).map(|s| sample(s, "dev-1", 100)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.shutdown.cancel();
    let mut h = h;
    let task = std::mem::replace(&mut h.task, tokio::spawn(async { Ok(()) }));
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("stops within the grace period")
        .expect("task")
        .expect("result");
    assert!(
        h.acked().is_empty(),
        "nothing may leave the log without Kafka"
    );
    assert!(h.dead_letters().is_empty());
}
