//! A real three-broker Kafka cluster (KRaft, one controller, brokers 1, 2 and 3 on
//! 127.0.0.1), run by `tools/kafka/kafka-cluster.sh`, for the failover tests
//! (`tests/cluster.rs`) and whatever else needs replication: topics made here have three
//! replicas and `min.insync.replicas=2`.
//!
//! # Where the cluster comes from
//!
//! One per test binary that asks for it, started on first use and shared by its tests, which
//! take turns ([`cluster`] returns a guard: the scenarios stop brokers, so they cannot
//! overlap). The script's watchdog stops every node and deletes its run dir
//! (`target/tmp/kafka-cluster-<pid>`) when the test binary exits, however it exits. So
//! `tools/test` and a plain `cargo test` alike start the cluster only when a test that needs
//! it runs, and only for as long as that test binary runs.
//!
//! `EDGEGATE_TEST_KAFKA_CLUSTER=<bootstrap list>` (with `KAFKA_CLUSTER_DIR`, what
//! `kafka-cluster.sh env` prints) uses a cluster started by hand instead, for a quicker
//! edit-run loop. `EDGEGATE_TEST_KAFKA_CLUSTER=skip` skips the tests that need a cluster (a
//! machine without the memory for four JVMs), saying so on stderr.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// The cluster of this test binary.
pub struct Cluster {
    /// The three brokers, comma-separated.
    bootstrap: String,
    /// `tools/kafka/kafka-cluster.sh`.
    ctl: PathBuf,
    /// What the script needs to find this cluster again.
    ctl_env: Vec<(&'static str, OsString)>,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// Held by the test that uses the cluster: one at a time.
static TURN: Mutex<()> = Mutex::new(());

/// The cluster, while the caller's turn lasts.
pub struct ClusterGuard {
    cluster: &'static Cluster,
    _turn: MutexGuard<'static, ()>,
}

impl std::ops::Deref for ClusterGuard {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        self.cluster
    }
}

impl Drop for ClusterGuard {
    /// A failed scenario may leave brokers down: the next one finds all three up again.
    fn drop(&mut self) {
        if let Err(e) = self.cluster.ctl(&["start"]) {
            eprintln!("could not start every node again after a cluster test: {e}");
        }
    }
}

/// Waits for the cluster (starting it on first use) and keeps it for the caller until the
/// guard is dropped; `None`, said on stderr, when `EDGEGATE_TEST_KAFKA_CLUSTER=skip`.
pub fn cluster(test: &str) -> Option<ClusterGuard> {
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    match CLUSTER.get_or_init(Cluster::init) {
        Some(cluster) => Some(ClusterGuard {
            cluster,
            _turn: turn,
        }),
        None => {
            eprintln!(
                "{test}: SKIPPED: EDGEGATE_TEST_KAFKA_CLUSTER=skip (unset, the test starts a \
                 three-broker cluster with tools/kafka/kafka-cluster.sh)"
            );
            None
        }
    }
}

impl Cluster {
    fn init() -> Option<Cluster> {
        let ctl = std::env::var_os("EDGEGATE_TEST_KAFKA_CLUSTER_CTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kafka/kafka-cluster.sh")
            });
        match std::env::var("EDGEGATE_TEST_KAFKA_CLUSTER") {
            Ok(v) if v == "skip" => return None,
            Ok(bootstrap) => {
                let dir = std::env::var_os("KAFKA_CLUSTER_DIR").unwrap_or_else(|| {
                    panic!(
                        "EDGEGATE_TEST_KAFKA_CLUSTER is set but KAFKA_CLUSTER_DIR is not: \
                         export what `kafka-cluster.sh env` prints"
                    )
                });
                return Some(Cluster {
                    bootstrap,
                    ctl,
                    ctl_env: vec![("KAFKA_CLUSTER_DIR", dir)],
                });
            }
            Err(_) => {}
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("kafka-cluster-{}", std::process::id()));
        let mut cluster = Cluster {
            bootstrap: String::new(),
            ctl,
            ctl_env: vec![
                ("KAFKA_CLUSTER_DIR", dir.clone().into()),
                ("KAFKA_WATCH_PID", std::process::id().to_string().into()),
                ("KAFKA_WATCH_CLEAN", "1".into()),
            ],
        };
        eprintln!(
            "starting a three-broker Kafka cluster in {} (EDGEGATE_TEST_KAFKA_CLUSTER=skip skips these tests)",
            dir.display()
        );
        let started = Instant::now();
        cluster.ctl(&["fetch"]).unwrap_or_else(|e| panic!("{e}"));
        cluster.ctl(&["start"]).unwrap_or_else(|e| panic!("{e}"));
        cluster.bootstrap = cluster
            .ctl(&["bootstrap"])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned();
        eprintln!(
            "cluster {} up in {:.1} s",
            cluster.bootstrap,
            started.elapsed().as_secs_f64()
        );
        Some(cluster)
    }

    /// Runs `kafka-cluster.sh <args>`; stdout, or an error with everything it printed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(&self.ctl)
            .args(args)
            .envs(self.ctl_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.ctl.display()))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(format!(
            "`{} {}` failed ({}):\n{}{}",
            self.ctl.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        ))
    }

    fn must(&self, args: &[&str]) -> String {
        self.ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The brokers, comma-separated, for `[kafka] brokers` or `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The three broker addresses.
    pub fn brokers(&self) -> Vec<&str> {
        self.bootstrap.split(',').collect()
    }

    /// A client config for this cluster.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    /// SIGKILL broker `n` (1, 2 or 3): a crash. Port and data stay.
    pub fn kill(&self, n: u32) {
        self.must(&["kill", &n.to_string()]);
    }

    /// SIGTERM broker `n`: a controlled shutdown (it hands its leaderships over first).
    pub fn stop(&self, n: u32) {
        self.must(&["stop", &n.to_string()]);
    }

    /// Starts broker `n` again on its port and data; returns once it answers.
    pub fn start(&self, n: u32) {
        self.must(&["start", &n.to_string()]);
    }

    /// The broker leading `partition` of `topic`.
    pub fn leader(&self, topic: &str, partition: i32) -> u32 {
        let out = self.must(&["leader", topic, &partition.to_string()]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("leader of {topic}/{partition}: {e}: {out:?}"))
    }

    /// The in-sync replicas of `partition` of `topic`.
    pub fn isr(&self, topic: &str, partition: i32) -> Vec<u32> {
        let out = self.must(&["isr", topic, &partition.to_string()]);
        out.trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("a node id"))
            .collect()
    }

    /// Until every partition of `topic` has all three replicas in sync.
    pub fn wait_isr(&self, topic: &str) {
        self.must(&["wait-isr", topic]);
    }

    /// Creates `name` with `partitions` partitions, three replicas and
    /// `min.insync.replicas=2`, and waits until every replica is in sync.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .unwrap_or_else(|e| panic!("cannot create an admin client: {e}"));
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(3))
            .set("min.insync.replicas", "2");
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = futures::executor::block_on(admin.create_topics([&topic], &options))
            .unwrap_or_else(|e| panic!("creating topic {name}: {e}"));
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => panic!("creating topic {topic}: {code}"),
            }
        }
        self.wait_isr(name);
    }
}
