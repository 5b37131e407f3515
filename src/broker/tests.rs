//! The broker without sockets: sessions, fan-out, retained messages, bounded queues.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::index::Options;
use super::mailbox::{Outbound, QueueLimits};
use super::{Broker, BrokerConfig, Message, Props, Request, SubscribeRefused};

fn broker(dir: &std::path::Path, messages: usize) -> Broker {
    broker_reading(dir, messages, 1 << 20)
}

/// [`broker`] with `read_back_bytes` as the read-back budget.
fn broker_reading(dir: &std::path::Path, messages: usize, read_back_bytes: usize) -> Broker {
    Broker::open(
        dir,
        BrokerConfig {
            queue: QueueLimits {
                messages,
                bytes: 1 << 20,
            },
            total_queued_bytes: 1 << 30,
            read_back_bytes,
            max_retained: 100,
            max_session_expiry: Duration::from_secs(3600),
            max_subscriptions: 4,
            max_offline_sessions: 3,
        },
    )
    .expect("open")
}

fn message(topic: &str, payload: &str, qos: u8, retain: bool, from: Option<&str>) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
        publisher: from.map(Arc::from),
        expires_ms: None,
        props: Props::default(),
        command: None,
    })
}

fn request(filter: &str, qos: u8) -> Request<'_> {
    Request {
        filter,
        options: Options {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        },
        retain_handling: 0,
    }
}

fn drain(mailbox: &super::mailbox::Mailbox) -> Vec<Outbound> {
    mailbox.take(usize::MAX, usize::MAX, 0, true).ready
}

fn payloads(out: &[Outbound]) -> Vec<String> {
    out.iter()
        .map(|o| String::from_utf8_lossy(&o.message.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn fan_out_grants_the_lower_qos_and_keeps_publish_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s1 = b.attach("s1", true, None);
    let s2 = b.attach("s2", true, None);
    assert_eq!(b.subscribe(&s1, &request("a/+", 1)), Ok(1));
    assert_eq!(b.subscribe(&s2, &request("a/#", 0)), Ok(0));
    for i in 0..5 {
        b.publish(&message("a/b", &i.to_string(), 2, false, Some("dev")));
    }
    b.publish(&message("other", "x", 1, false, None));
    let got1 = drain(&s1.mailbox);
    assert_eq!(payloads(&got1), ["0", "1", "2", "3", "4"]);
    assert!(got1.iter().all(|o| o.qos == 1 && !o.retain));
    let got2 = drain(&s2.mailbox);
    assert!(got2.iter().all(|o| o.qos == 0));
    assert_eq!(got2.len(), 5);
}

#[tokio::test]
async fn a_full_queue_drops_only_that_subscribers_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 3);
    let slow = b.attach("slow", true, None);
    let fast = b.attach("fast", true, None);
    b.subscribe(&slow, &request("t", 1)).expect("sub");
    b.subscribe(&fast, &request("t", 1)).expect("sub");
    for i in 0..10 {
        b.publish(&message("t", &i.to_string(), 1, false, None));
        // The fast one keeps up.
        assert_eq!(drain(&fast.mailbox).len(), 1);
    }
    assert_eq!(payloads(&drain(&slow.mailbox)), ["0", "1", "2"]);
    assert_eq!(b.stats().queued_bytes, 0, "the total follows what is taken");
}

#[tokio::test]
async fn retained_messages_follow_retain_handling_and_clear_with_an_empty_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    b.retain(&message("r/1", "one", 1, true, None))
        .await
        .expect("retain");
    b.retain(&message("r/2", "two", 0, true, None))
        .await
        .expect("retain");
    b.retain(&message("r/2", "", 0, true, None))
        .await
        .expect("clear");
    let s = b.attach("s", true, None);
    b.subscribe(&s, &request("r/+", 2)).expect("sub");
    let got = drain(&s.mailbox);
    assert_eq!(payloads(&got), ["one"]);
    assert!(
        got[0].retain,
        "[MQTT-3.3.1-8] sent with RETAIN on subscribe"
    );
    assert_eq!(got[0].qos, 1);
    // Retain Handling 1: only for a new subscription.
    let mut again = request("r/+", 2);
    again.retain_handling = 1;
    b.subscribe(&s, &again).expect("sub");
    assert!(drain(&s.mailbox).is_empty());
    // Retain Handling 2: never.
    let mut never = request("r/#", 2);
    never.retain_handling = 2;
    b.subscribe(&s, &never).expect("sub");
    assert!(drain(&s.mailbox).is_empty());
    // Not for a shared subscription.
    b.subscribe(&s, &request("$share/g/r/+", 1)).expect("sub");
    assert!(drain(&s.mailbox).is_empty());
    // Live messages lose RETAIN unless Retain As Published.
    b.publish(&message("r/1", "live", 1, true, None));
    assert!(drain(&s.mailbox).iter().all(|o| !o.retain));
    drop(b);
    let b = broker(dir.path(), 100);
    let s = b.attach("s", true, None);
    b.subscribe(&s, &request("#", 1)).expect("sub");
    assert_eq!(
        payloads(&drain(&s.mailbox)),
        ["one"],
        "retained survive a reopen"
    );
}

#[tokio::test]
async fn a_persistent_session_keeps_subscriptions_and_qos1_while_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s = b.attach("dev", false, Some(None));
    assert!(!s.session_present);
    b.subscribe(&s, &request("cmd/#", 1)).expect("sub");
    b.publish(&message("cmd/a", "sent", 1, false, None));
    let sent = drain(&s.mailbox);
    // The connection dies before the PUBACK.
    b.detach(&s, sent, Some(None));
    b.publish(&message("cmd/a", "queued", 1, false, None));
    b.publish(&message("cmd/a", "qos0 dropped", 0, false, None));
    assert_eq!(b.stats().sessions_offline, 1);
    let s = b.attach("dev", false, Some(None));
    assert!(s.session_present);
    let got = drain(&s.mailbox);
    assert_eq!(payloads(&got), ["sent", "queued"]);
    assert!(got[0].dup && !got[1].dup, "resent with DUP");
    // A clean start forgets it all.
    b.detach(&s, Vec::new(), Some(None));
    let s = b.attach("dev", true, None);
    assert!(!s.session_present);
    b.publish(&message("cmd/a", "after", 1, false, None));
    assert!(drain(&s.mailbox).is_empty());
    assert_eq!(b.stats().subscriptions, 0);
}

#[tokio::test]
async fn a_takeover_keeps_the_session_with_the_newer_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let old = b.attach("dev", false, Some(None));
    b.subscribe(&old, &request("t", 1)).expect("sub");
    let new = b.attach("dev", false, Some(None));
    assert!(new.session_present);
    // The old connection ends after the new one attached: it must not take the session
    // offline nor drop its subscriptions.
    b.detach(&old, Vec::new(), Some(None));
    b.publish(&message("t", "m", 0, false, None));
    assert_eq!(drain(&new.mailbox).len(), 1);
    assert_eq!(b.stats().sessions_online, 1);
}

#[tokio::test]
async fn sessions_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s = b.attach("dev", false, Some(None));
    b.subscribe(&s, &request("t", 1)).expect("sub");
    b.detach(&s, Vec::new(), Some(Some(Duration::ZERO)));
    assert_eq!(b.sweep(), 1);
    assert_eq!(b.stats().subscriptions, 0);
    let s = b.attach("dev", false, Some(None));
    assert!(!s.session_present);
}

#[tokio::test]
async fn bad_filters_and_shared_no_local_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s = b.attach("s", true, None);
    assert_eq!(
        b.subscribe(&s, &request("a/#/b", 1)),
        Err(SubscribeRefused::FilterInvalid)
    );
    let mut shared = request("$share/g/a", 1);
    shared.options.no_local = true;
    assert_eq!(
        b.subscribe(&s, &shared),
        Err(SubscribeRefused::SharedNoLocal)
    );
    assert!(!b.unsubscribe(&s, "a/b"));
    b.subscribe(&s, &request("a/b", 1)).expect("sub");
    assert!(b.unsubscribe(&s, "a/b"));
}

#[tokio::test]
async fn subscriptions_per_session_and_offline_sessions_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s = b.attach("greedy", true, None);
    for i in 0..4 {
        b.subscribe(&s, &request(&format!("t/{i}"), 1))
            .expect("sub");
    }
    assert_eq!(
        b.subscribe(&s, &request("t/5", 1)),
        Err(SubscribeRefused::Quota)
    );
    // Replacing one it holds is not a new one.
    assert_eq!(b.subscribe(&s, &request("t/0", 2)), Ok(2));
    // A reconnect loop with fresh client ids: only the newest offline sessions stay.
    for i in 0..10 {
        let s = b.attach(&format!("loop-{i}"), false, Some(None));
        b.subscribe(&s, &request("x", 1)).expect("sub");
        b.detach(&s, Vec::new(), Some(Some(Duration::from_secs(60 + i))));
    }
    let stats = b.stats();
    assert_eq!(stats.sessions_offline, 3);
    assert_eq!(stats.subscriptions, 4 + 3);
    let s = b.attach("loop-9", false, Some(None));
    assert!(s.session_present, "the newest survive");
    let s = b.attach("loop-0", false, Some(None));
    assert!(!s.session_present);
}

#[tokio::test]
async fn persistent_sessions_and_their_queued_messages_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let dev = b.attach("dev", false, Some(Some(Duration::from_secs(600))));
    b.subscribe(&dev, &request("cmd/#", 1)).expect("sub");
    b.subscribe(&dev, &request("tmp", 1)).expect("sub");
    assert!(b.unsubscribe(&dev, "tmp"));
    let transient = b.attach("app", true, None);
    b.subscribe(&transient, &request("cmd/#", 1)).expect("sub");
    // One is delivered and acknowledged, one delivered and not, one waits.
    for i in 0..3 {
        let durable = b
            .publish(&message("cmd/x", &format!("c{i}"), 1, false, None))
            .durable;
        durable
            .expect("journaled for the persistent session")
            .await
            .expect("durable");
    }
    let sent = dev.mailbox.take(2, 2, 0, true).ready;
    assert_eq!(sent.len(), 2);
    dev.mailbox.finish(sent[0].store_id);
    // QoS 0 for a persistent session is not journaled.
    assert!(
        b.publish(&message("cmd/x", "q0", 0, false, None))
            .durable
            .is_none()
    );
    // The last write is durable once a later durable one is.
    let durable = b.publish(&message("cmd/x", "c3", 1, false, None)).durable;
    durable.expect("journaled").await.expect("durable");
    drop((dev, transient, b));

    let b = broker(dir.path(), 100);
    let stats = b.stats();
    assert_eq!(stats.sessions_offline, 1, "only the persistent session");
    assert_eq!(stats.subscriptions, 1);
    let dev = b.attach("dev", false, Some(None));
    assert!(dev.session_present);
    let got = drain(&dev.mailbox);
    assert_eq!(payloads(&got), ["c1", "c2", "c3"], "unfinished, in order");
    assert!(got.iter().all(|o| o.dup));
    b.publish(&message("cmd/y", "after", 1, false, None));
    assert_eq!(
        payloads(&drain(&dev.mailbox)),
        ["after"],
        "the subscription came back"
    );
    // A clean start ends it on disk too.
    for o in &got {
        dev.mailbox.finish(o.store_id);
    }
    b.detach(&dev, Vec::new(), None);
    let clean = b.attach("dev", true, None);
    let durable = b.publish(&message("x", "x", 1, false, None)).durable;
    assert!(durable.is_none());
    drop(clean);
    // Let the writer take the gone record: a later durable write follows it.
    let other = b.attach("other", false, Some(None));
    b.subscribe(&other, &request("z", 1)).expect("sub");
    b.publish(&message("z", "z", 1, false, None))
        .durable
        .expect("journaled")
        .await
        .expect("durable");
    drop((other, b));
    let b = broker(dir.path(), 100);
    let dev = b.attach("dev", false, Some(None));
    assert!(!dev.session_present, "the clean start ended it for good");
}

#[tokio::test]
async fn held_messages_are_sent_whole_after_the_session_stops_being_persistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let s = b.attach("dev", false, Some(None));
    b.subscribe(&s, &request("cmd/#", 2)).expect("sub");
    b.detach(&s, Vec::new(), Some(None));
    // Held while the device is away (kept as journal records, decoded when taken).
    let mut sent = Vec::new();
    for (i, qos) in [1u8, 2, 1].into_iter().enumerate() {
        let mut m = (*message(&format!("cmd/{i}"), &format!("c{i}"), qos, false, None)).clone();
        m.expires_ms = Some(i64::MAX - 1);
        m.props.correlation_data = Some(Bytes::from(vec![i as u8; 3]));
        m.props.user_properties = vec![("k".into(), format!("v{i}"))];
        let m = Arc::new(m);
        b.publish(&m)
            .durable
            .expect("journaled")
            .await
            .expect("durable");
        sent.push(m);
    }
    let held = b.stats();
    assert_eq!(held.queued_messages, 3);
    let cost: usize = sent.iter().map(|m| m.cost()).sum();
    assert_eq!(held.queued_bytes, cost);
    // Resumed to end with this connection (MQTT 5: no Clean Start, Session Expiry 0): the
    // journal goes, the held messages stay, decoded.
    let s = b.attach("dev", false, None);
    assert!(s.session_present);
    assert_eq!(b.stats().queued_bytes, cost);
    let got = drain(&s.mailbox);
    assert_eq!(b.stats().queued_bytes, 0);
    assert_eq!(payloads(&got), ["c0", "c1", "c2"]);
    for (out, m) in got.iter().zip(&sent) {
        assert_eq!(out.qos, m.qos);
        assert_eq!(&*out.message.topic, &*m.topic);
        assert_eq!(out.message.expires_ms, m.expires_ms);
        assert_eq!(out.message.props.correlation_data, m.props.correlation_data);
        assert_eq!(out.message.props.user_properties, m.props.user_properties);
        assert!(!out.dup, "never sent");
    }
}

#[tokio::test]
async fn the_broker_keeps_its_files_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let broker_dir = dir.path().join("log/broker");
    let b = broker(&broker_dir, 100);
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&broker_dir), 0o700);
    for file in ["retained.journal", "sessions.journal"] {
        assert_eq!(mode(&broker_dir.join(file)), 0o600, "{file}");
    }
    drop(b);
    // One made before keeps its data and becomes private.
    let path = broker_dir.join("sessions.journal");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let _b = broker(&broker_dir, 100);
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn a_journal_sync_covers_what_was_appended_without_waiting() {
    use super::journal::{self, Journal};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.journal");
    let magic = *b"EGTESTJ1";
    let found = journal::read(&path, &magic, 0).expect("read");
    let j = Journal::start(&path, &magic, &found, Box::new(Vec::new)).expect("start");
    for i in 0..100u32 {
        j.append_later(&i.to_be_bytes());
    }
    j.sync().await.expect("sync");
    // Read back as a restart would, while the writer is still running.
    let bodies: Vec<Vec<u8>> = journal::read(&path, &magic, 0)
        .expect("read")
        .bodies
        .iter()
        .map(|b| b.to_vec())
        .collect();
    let want: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(
        bodies, want,
        "every record appended before the sync, in order"
    );
}

/// Measuring the journal against what is live costs a snapshot of everything live, so it
/// happens after at least that much more was appended, not on every commit: a backlog of
/// commands taken one commit at a time stayed linear.
#[tokio::test]
async fn the_journal_is_measured_against_its_live_records_amortised() {
    use std::sync::atomic::AtomicUsize;

    use super::journal::{self, Journal, MIN_COMPACT_BYTES};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.journal");
    let magic = *b"EGTESTJ2";
    let found = journal::read(&path, &magic, 0).expect("read");
    // Everything stays live: the journal only grows, and is never worth rewriting.
    let live = Arc::new(std::sync::Mutex::new(Vec::<bytes::Bytes>::new()));
    let snapshots = Arc::new(AtomicUsize::new(0));
    let (l, n) = (Arc::clone(&live), Arc::clone(&snapshots));
    let j = Journal::start(
        &path,
        &magic,
        &found,
        Box::new(move || {
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            l.lock()
                .expect("live")
                .iter()
                .cloned()
                .map(journal::Live::Body)
                .collect()
        }),
    )
    .expect("start");
    let record = vec![7u8; 1000];
    let commits = 8 * MIN_COMPACT_BYTES as usize / record.len();
    for _ in 0..commits {
        live.lock().expect("live").push(record.clone().into());
        // One commit each, as a command taken alone would be.
        j.append(&record).await.expect("append");
    }
    let taken = snapshots.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=6).contains(&taken),
        "{taken} snapshots over {commits} commits of an 8 MiB journal"
    );
}

/// A persistent session's held messages live in the sessions journal, not in memory: once
/// durable the journal knows only their places, which move with every rewrite of the file
/// (here many: a busy subscriber finishes everything it gets), and after a reopen; the
/// session takes them back whole and in order.
#[tokio::test]
async fn held_messages_are_read_back_from_the_journal_across_rewrites_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 10_000);
    let dev = b.attach("dev", false, Some(None));
    b.subscribe(&dev, &request("cmd/#", 1)).expect("sub");
    b.detach(&dev, Vec::new(), Some(None));
    let busy = b.attach("busy", false, Some(None));
    b.subscribe(&busy, &request("busy/#", 1)).expect("sub");
    let padding = "p".repeat(1000);
    let (mut appended, mut want) = (0usize, Vec::new());
    for i in 0..4000 {
        let m = message("busy/x", &padding, 1, false, None);
        b.publish(&m)
            .durable
            .expect("journaled")
            .await
            .expect("durable");
        appended += m.cost();
        for out in drain(&busy.mailbox) {
            busy.mailbox.finish(out.store_id);
        }
        if i % 10 == 0 {
            let payload = format!("c{i} {}", &padding[..i % 300]);
            let m = message("cmd/dev", &payload, 1, false, None);
            b.publish(&m)
                .durable
                .expect("journaled")
                .await
                .expect("durable");
            want.push(payload);
        }
    }
    // A later durable write covers the done records written without waiting.
    b.inner.journal.sync().await.expect("sync");
    let journal_len = std::fs::metadata(dir.path().join("sessions.journal"))
        .expect("journal")
        .len() as usize;
    assert!(
        journal_len < appended / 4,
        "the journal was rewritten: {journal_len} bytes after {appended} appended"
    );
    assert_eq!(
        b.inner.journal.kept_counts(),
        (0, want.len()),
        "every held message is read from the file, none is held in memory"
    );
    assert_eq!(b.stats().queued_messages, want.len());

    let dev = b.attach("dev", false, Some(None));
    let got = drain(&dev.mailbox);
    assert_eq!(payloads(&got), want, "whole and in order");
    // Taken, not acknowledged: still the journal's, and sent again after a reopen.
    drop((dev, busy, b));
    let b = broker(dir.path(), 10_000);
    assert_eq!(b.inner.journal.kept_counts(), (0, want.len()));
    let dev = b.attach("dev", false, Some(None));
    let got = drain(&dev.mailbox);
    assert_eq!(payloads(&got), want, "whole and in order after a reopen");
    assert!(got.iter().all(|o| o.dup));
    for out in &got {
        dev.mailbox.finish(out.store_id);
    }
    assert_eq!(b.inner.journal.kept_counts(), (0, 0), "finished: forgotten");
}

/// A message's MQTT 5 properties count against a queue's bytes like its payload: a packet
/// of small payload and large user properties cannot fill a queue past its byte limit.
#[test]
fn properties_count_against_a_queues_bytes() {
    use super::mailbox::{Dropped, Mailbox, Totals};
    let plain = message("t", "x", 1, false, None);
    let mut heavy = (*plain).clone();
    heavy.props = Props {
        content_type: Some("c".repeat(100)),
        response_topic: Some("r".repeat(200)),
        correlation_data: Some(Bytes::from("d".repeat(300))),
        user_properties: vec![("k".repeat(1000), "v".repeat(3000))],
        ..Props::default()
    };
    let heavy = Arc::new(heavy);
    assert_eq!(heavy.cost(), plain.cost() + 100 + 200 + 300 + 4000);
    let mailbox = Mailbox::new(
        QueueLimits {
            messages: 100,
            bytes: 2 * heavy.cost(),
        },
        Totals::new(1 << 30),
    );
    let out = || Outbound::new(Arc::clone(&heavy), 1, false, Vec::new());
    mailbox.push(out()).expect("room");
    mailbox.push(out()).expect("room");
    assert_eq!(mailbox.push(out()).err(), Some(Dropped::QueueFull));
}

/// What `Mailbox::refuses` says without the lock follows every change made under it: a full
/// queue (by count or by bytes) refuses, room made by a take or a clear is seen at once, a
/// requeue past the limit refuses again, and QoS 0 is refused only while the client is away.
#[test]
fn a_full_queue_is_seen_without_its_lock_and_room_as_soon_as_it_is_made() {
    use super::mailbox::{Dropped, Mailbox, Totals};
    let small = message("t", "x", 1, false, None);
    let big = message("t", &"y".repeat(200), 1, false, None);
    let (s, b) = (small.cost(), big.cost());
    let mailbox = Mailbox::new(
        QueueLimits {
            messages: 3,
            bytes: 2 * s + b - 1,
        },
        Totals::new(1 << 30),
    );
    let out = |m: &Arc<Message>| Outbound::new(Arc::clone(m), 1, false, Vec::new());
    // Never connected: QoS 0 is refused, QoS 1/2 waits for the client.
    assert_eq!(mailbox.refuses(0, s), Some(Dropped::Offline));
    assert_eq!(mailbox.refuses(1, s), None);
    mailbox.set_online(true);
    assert_eq!(mailbox.refuses(0, s), None);

    mailbox.push(out(&small)).expect("room");
    mailbox.push(out(&small)).expect("room");
    // One more small one fits; the big one is over the bytes, as push says too.
    assert_eq!(mailbox.refuses(1, b), Some(Dropped::QueueFull));
    assert_eq!(mailbox.push(out(&big)).err(), Some(Dropped::QueueFull));
    assert_eq!(mailbox.refuses(1, s), None);
    mailbox.push(out(&small)).expect("room");
    // At the message limit: nothing fits, however small.
    assert_eq!(mailbox.refuses(1, s), Some(Dropped::QueueFull));
    assert_eq!(mailbox.refuses(0, s), Some(Dropped::QueueFull));

    let taken = mailbox.take(1, 1, 0, true).ready;
    assert_eq!(taken.len(), 1);
    assert_eq!(mailbox.refuses(1, s), None, "a take makes room at once");
    // Sent and not acknowledged, back at the front past the limit: full again.
    mailbox.requeue(taken);
    assert_eq!(mailbox.refuses(1, s), Some(Dropped::QueueFull));
    mailbox.clear();
    assert_eq!(
        mailbox.refuses(1, b),
        None,
        "a cleared queue has all its room"
    );

    mailbox.set_online(false);
    assert_eq!(mailbox.refuses(0, s), Some(Dropped::Offline));
    assert_eq!(mailbox.refuses(1, s), None);
}

/// The broker refuses a full queue's copy without queueing it and counts it, while the
/// other subscribers of the same message get theirs; a take lets the next one in.
#[tokio::test]
async fn a_full_queue_refuses_until_its_subscriber_takes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 2);
    let slow = b.attach("slow", true, None);
    let other = b.attach("other", true, None);
    b.subscribe(&slow, &request("t/#", 1)).expect("sub");
    b.subscribe(&other, &request("t/+", 1)).expect("sub");
    for i in 0..4 {
        let p = b.publish(&message("t/a", &i.to_string(), 1, false, None));
        assert_eq!(p.queued, if i < 2 { 2 } else { 1 }, "message {i}");
        drain(&other.mailbox);
    }
    assert_eq!(payloads(&slow.mailbox.take(1, 1, 0, true).ready), ["0"]);
    assert_eq!(b.publish(&message("t/a", "4", 1, false, None)).queued, 2);
    assert_eq!(payloads(&drain(&slow.mailbox)), ["1", "4"]);
}

/// A message's trip through a mailbox keeps everything the connection needs, whether it
/// was queued inline (a first trip) or boxed (a resend with its DUP flag and packet id),
/// and a command is counted as held in either form.
#[test]
fn a_queued_message_keeps_its_flags_ids_and_command_in_every_form() {
    use super::Command;
    use super::mailbox::{Mailbox, Totals};
    let mailbox = Mailbox::new(
        QueueLimits {
            messages: 10,
            bytes: 1 << 20,
        },
        Totals::new(1 << 20),
    );
    mailbox.set_online(true);
    let first = message("a/b", "first", 2, true, None);
    let mut command = (*message("c/d", "command", 1, false, None)).clone();
    command.command = Some(Arc::new(Command {
        topic: "iot.commands".into(),
        partition: 0,
        offset: 7,
        key: None,
        correlation: None,
        status_topic: None,
        sent_ms: 1_234,
    }));
    let command = Arc::new(command);
    mailbox
        .push(Outbound::new(
            Arc::clone(&first),
            2,
            true,
            vec![3, 268_435_455],
        ))
        .expect("queued");
    mailbox
        .push(Outbound::new(Arc::clone(&command), 1, false, Vec::new()))
        .expect("queued");
    let held = mailbox.held();
    assert_eq!((held.messages, held.commands), (2, 1));
    assert_eq!(held.oldest_command_ms, Some(1_234));

    let got = drain(&mailbox);
    assert_eq!(got.len(), 2);
    assert!(Arc::ptr_eq(&got[0].message, &first));
    assert_eq!((got[0].qos, got[0].retain, got[0].dup), (2, true, false));
    assert_eq!(got[0].subscription_ids, vec![3, 268_435_455]);
    assert_eq!(
        (got[0].pkid, got[0].store_id, got[0].released),
        (0, 0, false)
    );
    assert!(Arc::ptr_eq(&got[1].message, &command));
    assert_eq!((got[1].qos, got[1].retain), (1, false));
    assert!(got[1].subscription_ids.is_empty());
    assert_eq!(mailbox.held().commands, 0);

    // Sent and not acknowledged: back at the front, boxed, with DUP and its packet id.
    let mut sent = got.into_iter().next().expect("first");
    sent.pkid = 42;
    mailbox.requeue(vec![sent]);
    let again = drain(&mailbox);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].pkid, again[0].dup, again[0].qos), (42, true, 2));
    assert_eq!(again[0].subscription_ids, vec![3, 268_435_455]);
    assert!(mailbox.is_empty());
}

fn command_message(topic: &str, offset: i64) -> Arc<Message> {
    let mut m = (*message(topic, "command", 1, false, None)).clone();
    m.command = Some(Arc::new(super::Command {
        topic: "iot.commands".into(),
        partition: 0,
        offset,
        key: None,
        correlation: None,
        status_topic: Some(Arc::from("iot.command-status")),
        sent_ms: 1_000,
    }));
    Arc::new(m)
}

/// A session restored from the journal can finish a command the moment its client is back,
/// before the status writer runs (the downlink's consumer starts after the listeners): that
/// outcome waits for the writer instead of being dropped.
#[test]
fn an_outcome_reported_before_the_status_writer_runs_waits_for_it() {
    use super::OutcomeKind;
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    // Nobody subscribes: reported at once.
    assert_eq!(b.publish(&command_message("dev/7/cmd", 7)).queued, 0);
    let mut outcomes = b.take_outcomes().expect("the writer's end");
    let first = outcome(
        outcomes
            .try_recv()
            .expect("reported before the writer took its end"),
    );
    assert_eq!(first.kind, OutcomeKind::NoSession);
    assert_eq!(first.command.offset, 7);
    // And after: the same channel.
    assert_eq!(b.publish(&command_message("dev/7/cmd", 8)).reported, 1);
    assert_eq!(
        outcome(outcomes.try_recv().expect("second")).command.offset,
        8
    );
    assert!(b.take_outcomes().is_none(), "one writer");
}

fn outcome(report: super::Report) -> super::Outcome {
    match report {
        super::Report::Outcome(o, _) => o,
        super::Report::Barrier(_) => panic!("a barrier, not an outcome"),
    }
}

fn offsets_ended(
    outcomes: &mut tokio::sync::mpsc::UnboundedReceiver<super::Report>,
) -> Vec<(String, i64)> {
    let mut got = Vec::new();
    while let Ok(report) = outcomes.try_recv() {
        let o = outcome(report);
        assert_eq!(o.kind, super::OutcomeKind::SessionEnded, "{o:?}");
        got.push((
            o.client.as_deref().unwrap_or("").to_owned(),
            o.command.offset,
        ));
    }
    got
}

/// A command held for a session that ends without it (expiry, a clean start, a session that
/// does not outlive its connection) is reported, not forgotten: the cloud learns it will not
/// be delivered. Other messages held with it are not.
#[tokio::test]
async fn commands_a_session_will_never_send_are_reported_when_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker(dir.path(), 100);
    let mut outcomes = b.take_outcomes().expect("outcomes");

    // Expired while offline: its commands were journaled and are read back for the report.
    let s = b.attach("sleepy", false, Some(None));
    b.subscribe(&s, &request("sleepy/cmd", 1)).expect("sub");
    b.detach(&s, Vec::new(), Some(Some(Duration::ZERO)));
    b.publish(&command_message("sleepy/cmd", 1));
    b.publish(&message("sleepy/cmd", "not a command", 1, false, None));
    b.publish(&command_message("sleepy/cmd", 2));
    assert_eq!(b.sweep(), 1);
    assert_eq!(
        offsets_ended(&mut outcomes),
        [("sleepy".to_owned(), 1), ("sleepy".to_owned(), 2)]
    );

    // Replaced by a clean start, with one command in flight on the old connection and one
    // queued.
    let s = b.attach("dev", false, Some(None));
    b.subscribe(&s, &request("dev/cmd", 1)).expect("sub");
    b.publish(&command_message("dev/cmd", 3));
    let in_flight = drain(&s.mailbox);
    assert_eq!(in_flight.len(), 1);
    b.publish(&command_message("dev/cmd", 4));
    let fresh = b.attach("dev", true, Some(None));
    assert_eq!(offsets_ended(&mut outcomes), [("dev".to_owned(), 4)]);
    b.detach(&s, in_flight, Some(None));
    assert_eq!(offsets_ended(&mut outcomes), [("dev".to_owned(), 3)]);

    // A session that ends with its connection: what it sent unacknowledged, and what it
    // had queued.
    b.subscribe(&fresh, &request("dev/cmd", 1)).expect("sub");
    b.detach(&fresh, Vec::new(), Some(None));
    let s = b.attach("dev", false, None);
    assert!(s.session_present);
    b.publish(&command_message("dev/cmd", 5));
    let in_flight = drain(&s.mailbox);
    b.publish(&command_message("dev/cmd", 6));
    b.detach(&s, in_flight, None);
    assert_eq!(
        offsets_ended(&mut outcomes),
        [("dev".to_owned(), 5), ("dev".to_owned(), 6)]
    );
    // Kept by a session that outlives its connection: nothing to report.
    let s = b.attach("kept", false, Some(None));
    b.subscribe(&s, &request("kept/cmd", 1)).expect("sub");
    b.publish(&command_message("kept/cmd", 7));
    let in_flight = drain(&s.mailbox);
    b.detach(&s, in_flight, Some(None));
    assert!(offsets_ended(&mut outcomes).is_empty());
}

/// A journaled command the device acknowledged leaves its session's journal only once its
/// outcome is in the log (the writer runs what the report carries): killed in between, the
/// gateway delivers it again and reports it again, rather than forget the report.
#[tokio::test]
async fn an_acknowledged_command_stays_journaled_until_its_outcome_is_written() {
    use super::{OutcomeKind, Report};
    let dir = tempfile::tempdir().expect("tempdir");
    for write_it in [false, true] {
        let b = broker(dir.path(), 100);
        let mut outcomes = b.take_outcomes().expect("outcomes");
        let s = b.attach("dev", false, Some(None));
        b.subscribe(&s, &request("dev/cmd", 1)).expect("sub");
        let published = b.publish(&command_message("dev/cmd", 1));
        published
            .durable
            .expect("journaled")
            .await
            .expect("durable");
        let sent = drain(&s.mailbox);
        assert_eq!(sent.len(), 1);
        // The PUBACK.
        b.finished(&s, &sent[0], OutcomeKind::Delivered);
        let Ok(Report::Outcome(o, Some(finish))) = outcomes.try_recv() else {
            panic!("an outcome that finishes the journal entry")
        };
        assert_eq!((o.kind, o.command.offset), (OutcomeKind::Delivered, 1));
        if write_it {
            finish.run();
        }
        b.sync_sessions().await.expect("sync");
        drop(s);
        drop(b);
        // The restart.
        let b = broker(dir.path(), 100);
        let s = b.attach("dev", false, Some(None));
        assert!(s.session_present);
        let again = drain(&s.mailbox);
        if write_it {
            assert!(again.is_empty(), "finished once its outcome was written");
            b.detach(&s, Vec::new(), None);
        } else {
            assert_eq!(again.len(), 1, "still journaled: delivered again");
            assert!(again[0].dup);
            assert_eq!(
                again[0].message.command.as_ref().expect("command").offset,
                1
            );
            // Finished for good before the next round.
            b.finished(&s, &again[0], OutcomeKind::Delivered);
            let Ok(Report::Outcome(_, Some(finish))) =
                b.take_outcomes().expect("outcomes").try_recv()
            else {
                panic!("an outcome")
            };
            finish.run();
            b.detach(&s, Vec::new(), None);
        }
        b.sync_sessions().await.expect("sync");
    }
}

/// Journaled messages are read back into memory only within the read-back budget, across
/// sessions: a connection with something in flight takes no more once it is spent (its
/// acknowledgements call it back), an idle one still gets one, and whatever is dropped
/// (finished, expired, given up) or put back for a later connection gives its share back.
#[tokio::test]
async fn journaled_messages_are_read_back_within_one_budget_for_all_sessions() {
    use super::mailbox::READ_BACK_OVERHEAD;
    let payload = "p".repeat(1000);
    let cost = message("cmd/x", &format!("0{payload}"), 1, false, None).cost() + READ_BACK_OVERHEAD;
    let dir = tempfile::tempdir().expect("tempdir");
    let b = broker_reading(dir.path(), 100, 3 * cost);
    let keep = Some(Some(Duration::from_secs(600)));
    let (one, two) = (b.attach("one", false, keep), b.attach("two", false, keep));
    b.subscribe(&one, &request("cmd/#", 1)).expect("sub");
    b.subscribe(&two, &request("cmd/#", 1)).expect("sub");
    for i in 0..6 {
        let durable = b
            .publish(&message("cmd/x", &format!("{i}{payload}"), 1, false, None))
            .durable;
        durable.expect("journaled").await.expect("durable");
    }
    let first = |out: &[Outbound]| -> Vec<char> {
        out.iter()
            .map(|o| char::from(o.message.payload[0]))
            .collect()
    };

    // Three fit; the fourth waits although the client's window has room.
    let mut got_one = one.mailbox.take(128, 256, 0, true).ready;
    assert_eq!(first(&got_one), ['0', '1', '2']);
    assert_eq!(b.stats().read_back_bytes, 3 * cost);
    assert!(one.mailbox.take(128, 256, 0, false).ready.is_empty());
    // Idle, the other session gets one over the budget, and no more.
    let got_two = two.mailbox.take(128, 256, 0, true).ready;
    assert_eq!(first(&got_two), ['0']);
    assert_eq!(b.stats().read_back_bytes, 4 * cost);
    assert!(two.mailbox.take(128, 256, 0, false).ready.is_empty());

    // Acknowledged: its share goes back, and the next is read in its place.
    let acked = got_one.remove(0);
    one.mailbox.finish(acked.store_id);
    drop(acked);
    drop(got_two);
    assert_eq!(b.stats().read_back_bytes, 2 * cost);
    let third = one.mailbox.take(128, 256, 0, false).ready;
    assert_eq!(first(&third), ['3']);
    assert_eq!(b.stats().read_back_bytes, 3 * cost);
    // Sent and not acknowledged, put back for the next connection: counted as queued again,
    // taken again outside the budget (already in memory), and the budget has room for two.
    one.mailbox.requeue(got_one);
    assert_eq!(b.stats().read_back_bytes, cost);
    let again = one.mailbox.take(128, 256, 0, false).ready;
    assert_eq!(first(&again), ['1', '2', '4', '5']);
    assert!(again[..2].iter().all(|o| o.dup && o.read_back.is_none()));
    assert_eq!(b.stats().read_back_bytes, 3 * cost);
    assert!(two.mailbox.take(128, 256, 0, false).ready.is_empty());
    drop((third, again));
    assert_eq!(b.stats().read_back_bytes, 0);
    assert_eq!(
        first(&two.mailbox.take(128, 256, 0, false).ready),
        ['1', '2', '3']
    );
}
