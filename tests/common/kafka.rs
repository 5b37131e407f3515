//! The Kafka fixture shared by every integration test: one real Apache Kafka broker (KRaft,
//! single node, 127.0.0.1) per test run, run by `tools/kafka/kafka-ci.sh`.
//!
//! # Where the broker comes from
//!
//! `tools/test` starts one broker for the whole run and exports `EDGEGATE_TEST_KAFKA`
//! (bootstrap address), `EDGEGATE_TEST_KAFKA_CTL` (the script) and `KAFKA_RUN_DIR`, and the
//! broker's secured listeners with their credentials (`EDGEGATE_TEST_KAFKA_SASL_SSL`, ...; see
//! [`secured`]); every test binary then uses that broker. Under a plain `cargo test`, the first test that asks for Kafka
//! in each test binary starts a broker of its own with the same script, in
//! `target/tmp/kafka-<pid>`; the script's watchdog stops it and deletes that directory when the
//! test binary exits, however it exits.
//!
//! # Sharing one broker
//!
//! Tests in one binary run in parallel threads and all talk to the same broker:
//!
//! - Each test writes to its own topics (`unique_topic`), so no test sees another's records.
//! - A test that needs the broker up holds `shared()` for its whole body.
//! - A test that stops the broker (an outage test) holds `exclusive()` for its whole body and
//!   stops and starts the broker only through that guard. It waits for every `shared()` holder
//!   to finish, and they wait for it; if it fails with the broker stopped, dropping the guard
//!   starts the broker again, so one failed outage test does not fail the rest.
//!
//! Outage tests share a binary with other tests only through these guards. Tests in different
//! binaries never overlap because `cargo test` runs test binaries one after another.
//!
//! The guards are plain `std` locks, held across `.await` on purpose: every test runs on its
//! own thread, so a test blocked on the lock blocks nobody else. Script calls and
//! `consume_all_blocking` block their thread; from a `#[tokio::test]` whose runtime also runs a
//! gateway, use the `_async` variants so the gateway keeps running meanwhile.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// The broker of this test run.
pub struct KafkaFixture {
    /// `host:port` for clients.
    bootstrap: String,
    /// `tools/kafka/kafka-ci.sh`, which starts and stops the broker.
    ctl: PathBuf,
    /// What the script needs to find this broker again. Empty when `tools/test` started it:
    /// then the script finds it through the inherited `KAFKA_RUN_DIR`.
    ctl_env: Vec<(&'static str, OsString)>,
}

static KAFKA: OnceLock<KafkaFixture> = OnceLock::new();

/// Readers: tests that need the broker up. Writer: a test that stops it.
static BROKER: RwLock<()> = RwLock::new(());

/// Set while an `Exclusive` holder has the broker stopped, so its drop can restart it.
static BROKER_DOWN: AtomicBool = AtomicBool::new(false);

/// The broker of this test run, started on first use if `tools/test` did not start one.
/// Panics, with the script's output, if it cannot be started.
pub fn kafka() -> &'static KafkaFixture {
    KAFKA.get_or_init(KafkaFixture::init)
}

/// The broker's bootstrap address, `127.0.0.1:<port>`.
pub fn bootstrap() -> String {
    kafka().bootstrap.clone()
}

impl KafkaFixture {
    fn init() -> KafkaFixture {
        let ctl = std::env::var_os("EDGEGATE_TEST_KAFKA_CTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kafka/kafka-ci.sh")
            });
        if let Ok(bootstrap) = std::env::var("EDGEGATE_TEST_KAFKA") {
            return KafkaFixture {
                bootstrap,
                ctl,
                ctl_env: Vec::new(),
            };
        }
        let run_dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kafka-{}", std::process::id()));
        let fixture = KafkaFixture {
            bootstrap: String::new(),
            ctl,
            ctl_env: vec![
                ("KAFKA_RUN_DIR", run_dir.clone().into()),
                ("KAFKA_WATCH_PID", std::process::id().to_string().into()),
                ("KAFKA_WATCH_CLEAN", "1".into()),
            ],
        };
        eprintln!(
            "EDGEGATE_TEST_KAFKA is not set (tools/test sets it); starting a broker in {}",
            run_dir.display()
        );
        fixture.ctl("fetch").unwrap_or_else(|e| panic!("{e}"));
        fixture.ctl("start").unwrap_or_else(|e| panic!("{e}"));
        let file = run_dir.join("bootstrap");
        let bootstrap = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
            .trim()
            .to_string();
        KafkaFixture {
            bootstrap,
            ..fixture
        }
    }

    /// Runs `kafka-ci.sh <command>`; the error carries the script's output.
    fn ctl(&self, command: &str) -> Result<(), String> {
        self.ctl_output(command).map(drop)
    }

    /// Runs `kafka-ci.sh <command>` and returns what it printed on stdout.
    fn ctl_output(&self, command: &str) -> Result<String, String> {
        if self.ctl_env.is_empty() && std::env::var_os("KAFKA_RUN_DIR").is_none() {
            return Err(format!(
                "cannot `{command}` the broker at {}: EDGEGATE_TEST_KAFKA is set but \
                 KAFKA_RUN_DIR is not, so it was not started by tools/test",
                self.bootstrap
            ));
        }
        let output = Command::new(&self.ctl)
            .arg(command)
            .envs(self.ctl_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.ctl.display()))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(format!(
            "`{} {command}` failed ({}):\n{}{}\nInstall the prerequisites `tools/test` lists, \
             or run the tests with `tools/test`.",
            self.ctl.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ))
    }
}

/// The same broker's secured listeners and the credentials they accept: see the header of
/// `tools/kafka/kafka-ci.sh` for what each listener asks of a client.
#[derive(Debug)]
pub struct Secured {
    /// `host:port` of the SASL_SSL listener (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN).
    pub sasl_ssl: String,
    /// `host:port` of the SSL listener that requires a client certificate.
    pub ssl: String,
    /// The CA that signed the broker's certificate (and the client's).
    pub ca: PathBuf,
    /// A CA that signed neither.
    pub other_ca: PathBuf,
    pub client_cert: PathBuf,
    /// Mode 0600, as the gateway wants a key.
    pub client_key: PathBuf,
    pub sasl_user: String,
    pub sasl_password: String,
}

static SECURED: OnceLock<Secured> = OnceLock::new();

/// The secured listeners, from the `EDGEGATE_TEST_KAFKA_*` variables `tools/test` exports,
/// or from `kafka-ci.sh env` when this test binary started the broker itself.
pub fn secured() -> &'static Secured {
    SECURED.get_or_init(|| {
        let fixture = kafka();
        let from_script: HashMap<String, String> = if fixture.ctl_env.is_empty() {
            HashMap::new()
        } else {
            fixture
                .ctl_output("env")
                .unwrap_or_else(|e| panic!("{e}"))
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let get = |suffix: &str| -> String {
            let name = format!("EDGEGATE_TEST_KAFKA_{suffix}");
            std::env::var(&name)
                .ok()
                .or_else(|| from_script.get(&name).cloned())
                .unwrap_or_else(|| {
                    panic!(
                        "{name} is not set: run the tests with tools/test, whose broker has the \
                         secured listeners (`kafka-ci.sh env` lists them)"
                    )
                })
        };
        Secured {
            sasl_ssl: get("SASL_SSL"),
            ssl: get("SSL"),
            ca: get("CA").into(),
            other_ca: get("OTHER_CA").into(),
            client_cert: get("CLIENT_CERT").into(),
            client_key: get("CLIENT_KEY").into(),
            sasl_user: get("SASL_USER"),
            sasl_password: get("SASL_PASSWORD"),
        }
    })
}

/// Held by a test that needs the broker up; see the module docs.
pub struct Shared {
    _guard: RwLockReadGuard<'static, ()>,
}

/// Waits until no test has the broker stopped, and keeps it that way until dropped.
pub fn shared() -> Shared {
    kafka();
    Shared {
        _guard: BROKER.read().unwrap_or_else(PoisonError::into_inner),
    }
}

/// Held by a test that stops the broker; the only way to stop and start it.
pub struct Exclusive {
    _guard: RwLockWriteGuard<'static, ()>,
}

/// Waits until no other test uses the broker, and keeps them out until dropped.
pub fn exclusive() -> Exclusive {
    kafka();
    Exclusive {
        _guard: BROKER.write().unwrap_or_else(PoisonError::into_inner),
    }
}

impl Exclusive {
    /// Stops the broker process gracefully (SIGTERM); its port and data stay for `start_broker`.
    pub fn stop_broker(&self) {
        broker_ctl("stop");
    }

    /// Kills the broker process (SIGKILL), as a crash would; its port and data stay.
    pub fn kill_broker(&self) {
        broker_ctl("kill");
    }

    /// Starts the broker again on the same address with the same data; returns once it
    /// answers a metadata request.
    pub fn start_broker(&self) {
        broker_ctl("start");
    }

    /// Freezes the broker process (SIGSTOP): connections are accepted, nothing answers.
    pub fn pause_broker(&self) {
        broker_ctl("pause");
    }

    /// Lets a paused broker run on (SIGCONT); returns once it answers.
    pub fn resume_broker(&self) {
        broker_ctl("resume");
    }

    /// `stop_broker` off the async runtime's threads.
    pub async fn stop_broker_async(&self) {
        broker_ctl_async("stop").await;
    }

    /// `kill_broker` off the async runtime's threads.
    pub async fn kill_broker_async(&self) {
        broker_ctl_async("kill").await;
    }

    /// `start_broker` off the async runtime's threads.
    pub async fn start_broker_async(&self) {
        broker_ctl_async("start").await;
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        if BROKER_DOWN.load(Ordering::SeqCst) {
            // No panic here: this may run while the test is already unwinding.
            match kafka().ctl("start") {
                Ok(()) => BROKER_DOWN.store(false, Ordering::SeqCst),
                Err(e) => eprintln!("could not restart the broker after an outage test: {e}"),
            }
        }
    }
}

fn broker_ctl(command: &'static str) {
    // Marked down before stopping: a stop that fails halfway still gets a restart attempt.
    if command != "start" && command != "resume" {
        BROKER_DOWN.store(true, Ordering::SeqCst);
    }
    kafka().ctl(command).unwrap_or_else(|e| panic!("{e}"));
    if command == "start" || command == "resume" {
        BROKER_DOWN.store(false, Ordering::SeqCst);
    }
}

async fn broker_ctl_async(command: &'static str) {
    if let Err(e) = tokio::task::spawn_blocking(move || broker_ctl(command)).await {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A client config for the test broker, for producers, consumers and admin clients.
pub fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    config
}

/// A topic name no other test uses: `<prefix>-<16 hex digits>`.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Creates `name` with `partitions` partitions (replication factor 1) unless it exists, and
/// waits until every partition has a leader. Blocks for a fraction of a second.
pub fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create an admin client: {e}"));
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics([&topic], &options))
        .unwrap_or_else(|e| panic!("creating topic {name}: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("creating topic {topic}: {code}"),
        }
    }
    let consumer: BaseConsumer = client_config()
        .create()
        .unwrap_or_else(|e| panic!("cannot create a metadata client: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while partitions_with_leaders(&consumer, name) < partitions as usize {
        assert!(
            Instant::now() < deadline,
            "topic {name}: not every partition has a leader after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many partitions of `topic` have a leader; 0 if the topic does not exist (yet).
pub fn partitions_with_leaders(consumer: &BaseConsumer, topic: &str) -> usize {
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return 0;
    };
    metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions())
        .filter(|p| p.leader() >= 0)
        .count()
}

/// One record read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// In the record's order; a header without a value has an empty one.
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Consumed {
    /// The value of the first header called `key`.
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// `consume_all_blocking` on a blocking thread, so a gateway running on the caller's runtime
/// keeps working while this waits for its records.
pub async fn consume_all(topic: &str, expected_count: usize, timeout: Duration) -> Vec<Consumed> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consume_all_blocking(&topic, expected_count, timeout))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Reads `topic` from the beginning of every partition until `expected_count` records have
/// arrived, then one more second to catch duplicates, or until `timeout`; returns what it read,
/// in arrival order (ordered by offset within each partition). Waits for the topic to appear.
/// Partitions are assigned directly, without a group subscription, so there is no rebalance.
pub fn consume_all_blocking(
    topic: &str,
    expected_count: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    consume_all_from(client_config(), topic, expected_count, timeout)
}

/// `consume_all_blocking` with the client settings given: another cluster's bootstrap
/// (`bootstrap.servers`), or `isolation.level`.
pub fn consume_all_from(
    mut config: ClientConfig,
    topic: &str,
    expected_count: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    const DUPLICATE_GRACE: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = config
        // librdkafka needs a group for assign(); nothing is committed to it.
        .set("group.id", unique_topic("edgegate-test-consumer"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a consumer: {e}"));

    let partitions = loop {
        let n = partitions_with_leaders(&consumer, topic);
        if n > 0 {
            break n;
        }
        if Instant::now() >= deadline {
            eprintln!("consume_all: topic {topic} did not appear within {timeout:?}");
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap_or_else(|e| panic!("assigning {topic}/{partition}: {e}"));
    }
    consumer
        .assign(&assignment)
        .unwrap_or_else(|e| panic!("assigning {topic}: {e}"));

    let mut records = Vec::with_capacity(expected_count);
    let mut stop_at = deadline;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        match consumer.poll((stop_at - now).min(Duration::from_millis(100))) {
            None => {}
            Some(Ok(message)) => {
                records.push(Consumed::from_message(&message));
                if records.len() == expected_count {
                    stop_at = stop_at.min(Instant::now() + DUPLICATE_GRACE);
                }
            }
            // Transient: the broker may be restarting. librdkafka retries on its own.
            Some(Err(e)) => eprintln!("consume_all: {topic}: {e}"),
        }
    }
    records
}

impl Consumed {
    fn from_message(message: &impl Message) -> Consumed {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Consumed {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        }
    }
}

/// Groups records by partition, each group in offset order, for per-partition order checks.
pub fn by_partition(records: &[Consumed]) -> HashMap<i32, Vec<&Consumed>> {
    let mut groups: HashMap<i32, Vec<&Consumed>> = HashMap::new();
    for record in records {
        groups.entry(record.partition).or_default().push(record);
    }
    for group in groups.values_mut() {
        group.sort_by_key(|r| r.offset);
    }
    groups
}
