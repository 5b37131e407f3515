//! Proves the test harness itself: the shared broker takes writes, survives being stopped and
//! being killed, comes back on the same address with its data, and `consume_all` reads
//! everything back in order. If this fails, every Kafka test after it is suspect.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

const PARTITIONS: i32 = 3;
const KEYS: u64 = 10;

fn producer() -> FutureProducer {
    common::client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // librdkafka backs off reconnects up to 10 s by default; the restarts here take seconds.
        .set("reconnect.backoff.max.ms", "1000")
        .create()
        .expect("producer")
}

/// Queues records `seqs` (key `device-<seq % KEYS>`, payload and header `seq` = the number)
/// without waiting for delivery.
fn enqueue(
    producer: &FutureProducer,
    topic: &str,
    seqs: std::ops::Range<u64>,
) -> Vec<DeliveryFuture> {
    seqs.map(|seq| {
        let key = format!("device-{}", seq % KEYS);
        let payload = seq.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: "seq",
            value: Some(payload.as_bytes()),
        });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("enqueue")
    })
    .collect()
}

async fn delivered(futures: Vec<DeliveryFuture>) {
    for future in futures {
        future
            .await
            .expect("delivery future dropped")
            .map_err(|(e, _)| e)
            .expect("delivery");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_broker_stop_and_kill_in_order() {
    let broker = common::exclusive();
    let topic = common::unique_topic("harness");
    common::create_topic(&topic, PARTITIONS);
    common::create_topic(&topic, PARTITIONS); // idempotent
    let producer = producer();

    delivered(enqueue(&producer, &topic, 0..1000)).await;

    // Queued while the broker is down; delivered once it is back on the same address.
    broker.stop_broker_async().await;
    let during_outage = enqueue(&producer, &topic, 1000..1500);
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.start_broker_async().await;
    delivered(during_outage).await;

    broker.kill_broker_async().await;
    broker.start_broker_async().await;
    delivered(enqueue(&producer, &topic, 1500..2000)).await;

    let records = common::consume_all(&topic, 2000, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 2000, "no record lost or duplicated");

    for record in &records {
        assert_eq!(record.header("seq"), record.payload.as_deref());
        assert_eq!(
            record.key.as_deref(),
            Some(format!("device-{}", seq(record) % KEYS).as_bytes())
        );
        assert!(record.timestamp_ms.is_some());
    }
    let seqs: BTreeSet<u64> = records.iter().map(seq).collect();
    assert_eq!(seqs, (0..2000).collect(), "every record once");

    // One producer, sending in order: each partition holds its records in send order.
    let partitions = common::by_partition(&records);
    assert_eq!(partitions.len(), PARTITIONS as usize);
    for (partition, records) in partitions {
        let seqs: Vec<u64> = records.into_iter().map(seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "partition {partition} out of order: {seqs:?}"
        );
    }
}

fn seq(record: &common::Consumed) -> u64 {
    let payload = record.payload.as_deref().expect("payload");
    std::str::from_utf8(payload)
        .expect("utf-8 payload")
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn consume_all_returns_what_exists_when_fewer_arrive() {
    let _kafka = common::shared();
    let topic = common::unique_topic("harness-short");
    common::create_topic(&topic, 1);
    let producer = producer();
    delivered(enqueue(&producer, &topic, 0..3)).await;
    let records = common::consume_all(&topic, 5, Duration::from_secs(3)).await;
    let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 1, 2]);
}
