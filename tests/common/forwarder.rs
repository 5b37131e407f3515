//! The forwarder alone, over a log the test opens and fills itself: for tests of what it sends
//! to Kafka and what it leaves in the log, which look at the log's state (a whole gateway,
//! [`super::gateway`], keeps its log to itself).

use std::path::Path;
use std::time::{Duration, Instant};

use edgegate::buffer::{Durability, Log, LogConfig};
use edgegate::forward::config::KafkaConfig;
use edgegate::forward::{ForwardError, Forwarder, LastError, LinkState, Progress};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Opens the log in `dir` and the dead-letter log in `dir/dead-letter`, as the gateway lays
/// them out, off the async runtime's threads.
pub async fn open_logs(dir: &Path, durability: Durability) -> (Log, Log) {
    let main = LogConfig {
        durability,
        ..LogConfig::new(dir)
    };
    let dead = LogConfig::new(dir.join("dead-letter"));
    tokio::task::spawn_blocking(move || {
        let (log, _) = Log::open(main).expect("open the log");
        let (dead, _) = Log::open(dead).expect("open the dead-letter log");
        (log, dead)
    })
    .await
    .expect("open task")
}

/// A forwarder running on the test's runtime.
pub struct Forwarding {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), ForwardError>>,
    pub progress: watch::Receiver<Progress>,
    pub link: watch::Receiver<LinkState>,
    pub last_error: LastError,
}

/// Starts a forwarder from `log`'s reader to Kafka as `gateway_id`, refused records going to
/// `dead`; `grace` is its drain time at shutdown.
pub fn forward(
    log: &Log,
    dead: &Log,
    config: &KafkaConfig,
    gateway_id: &str,
    grace: Duration,
) -> Forwarding {
    // `RUST_LOG=edgegate=info` shows what the forwarder did.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let reader = log.reader().expect("the log's reader");
    let forwarder = Forwarder::new(config, gateway_id, log.dir(), reader, dead.clone())
        .expect("forwarder")
        .with_shutdown_grace(grace);
    let shutdown = CancellationToken::new();
    Forwarding {
        progress: forwarder.progress(),
        link: forwarder.link_state(),
        last_error: forwarder.last_error(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(forwarder.run(shutdown)),
    }
}

impl Forwarding {
    /// Waits until at least `n` records are delivered or dead-lettered; panics with the
    /// progress and the last error after `timeout`.
    pub async fn delivered_at_least(&self, n: u64, timeout: Duration) {
        let mut progress = self.progress.clone();
        let waited = tokio::time::timeout(
            timeout,
            progress.wait_for(|p| p.delivered + p.dead_lettered >= n),
        )
        .await
        .map(|r| r.map(drop));
        match waited {
            Ok(r) => r.expect("progress watch"),
            Err(_) => panic!(
                "fewer than {n} records finished within {timeout:?}: {:?}; last error {:?}",
                *self.progress.borrow(),
                self.last_error.get()
            ),
        }
    }

    /// Waits (at most 30 s) until the last error contains one of `needles`; returns it.
    pub async fn refused_with(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(error) = self.last_error.get() {
                if needles.iter().any(|n| error.contains(n)) {
                    return error;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no error containing {needles:?} within 30 s; last error {:?}",
                self.last_error.get()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Shuts it down and waits for its drain (at most 30 s); it must end without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("forwarder stops within its grace period")
            .expect("forwarder task")
            .expect("forwarder result");
    }
}
