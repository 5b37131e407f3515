//! One gateway for one test. [`Builder`] writes its `gateway.toml` into a fresh directory and
//! starts it either in this process ([`Builder::start`] → [`InProcess`]) or as the real
//! binary ([`Builder::start_process`] → [`Process`]). Either way every listener binds port 0
//! and the addresses come back from the gateway itself: from `edgegate::start` in process,
//! from the binary's "Listening for ..." log lines otherwise. No port is picked beforehand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::config::GatewayToml;

/// How long a gateway may take to start (log recovery, binding) on a loaded machine.
const STARTUP: Duration = Duration::from_secs(30);

/// The environment a binary gateway does not inherit from the test runner unless a test sets
/// it: systemd's notify socket, watchdog and journal belong to whoever runs `cargo test`.
const NOT_INHERITED: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// The addresses a started gateway listens on; `None` for a listener it does not have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listening {
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub coap: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// A gateway's directory and config, before it starts.
pub struct Builder {
    /// Holds `gateway.toml`, the log (`log/`), the binary's output (`gateway.log`) and any
    /// file a test puts beside them (certificates, password files); deleted with the gateway.
    dir: tempfile::TempDir,
    config: GatewayToml,
    /// Binary only: variables to set in its environment, in order.
    env: Vec<(String, String)>,
    /// Binary only: `--log-format`, or none to let the binary choose.
    log_format: Option<&'static str>,
    /// Binary only: after the first start, write the bound addresses into `gateway.toml`.
    pin: bool,
}

/// A gateway for `config`, in a fresh temporary directory.
pub fn gateway(config: GatewayToml) -> Builder {
    Builder {
        dir: tempfile::tempdir().expect("a temporary directory for the gateway"),
        config,
        env: vec![("RUST_LOG".into(), "info".into())],
        log_format: Some("text"),
        pin: false,
    }
}

impl Builder {
    /// The gateway's directory: relative paths in the config are resolved against it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `gateway.toml` now (for a test that checks it before the start) and returns
    /// its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("gateway.toml");
        self.config.write(&path);
        path
    }

    /// Binary only: sets a variable in the gateway's environment.
    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Binary only: the log filter (`RUST_LOG`); `info` unless set. The startup lines the
    /// harness reads addresses from are at `info`, so the filter must keep them.
    pub fn rust_log(self, filter: &str) -> Builder {
        self.env("RUST_LOG", filter)
    }

    /// Binary only: `--log-format text` (the default here) or `json`, or `None` for no
    /// `--log-format` at all (then the binary chooses: the journal under systemd, else text).
    pub fn log_format(mut self, format: Option<&'static str>) -> Builder {
        self.log_format = format;
        self
    }

    /// Binary only: once started, the listeners' ports are written into `gateway.toml`, so
    /// [`Process::restart`] binds the same ones (clients reconnect to the address they
    /// had) and `edgegate status --config` finds the admin endpoint.
    pub fn pin_addresses(mut self) -> Builder {
        self.pin = true;
        self
    }

    /// Starts the gateway in this process, on a runtime of its own; returns once every
    /// listener is bound. The default: use it unless the test needs what only a process has.
    pub fn start(self) -> InProcess {
        let config_path = self.write_config();
        InProcess::start(self.dir, config_path)
    }

    /// Starts the real binary (`edgegate run`) and returns once its MQTT listener is bound.
    /// For tests that need signals, SIGKILL, exit codes, systemd's environment, the log
    /// output, the gateway's own environment variables, or metrics no other gateway in the
    /// process adds to.
    pub fn start_process(self) -> Process {
        let mut process = self.spawn_process();
        process.wait_started();
        process
    }

    /// Starts the real binary and returns at once, before it has bound anything: for a test
    /// that watches the start itself (systemd's READY). [`Process::mqtt_addr`] and the
    /// others wait for their log lines.
    pub fn spawn_process(self) -> Process {
        let config_path = self.write_config();
        let mut process = Process {
            log_path: self.dir.path().join("gateway.log"),
            config_path,
            config: self.config,
            env: self.env,
            log_format: self.log_format,
            pin: self.pin,
            pinned: false,
            child: None,
            run_start: 0,
            dir: self.dir,
        };
        process.spawn();
        process
    }
}

// ---- the only calls into edgegate's config loading and start ----------------------------

/// Loads `path` as `edgegate run` does, validation included; panics with every problem.
pub fn load_config(path: &Path) -> edgegate::config::Config {
    edgegate::config::Config::load(path).unwrap_or_else(|e| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        panic!("{e}\n--- {}:\n{text}", path.display())
    })
}

/// What the gateway's thread hands back once `edgegate::start` has returned.
struct Started {
    listening: Listening,
    health: edgegate::admin::Health,
}

/// Loads the config and runs `edgegate::start` then `wait` on a runtime of its own, in a
/// thread of its own: blocking test code (std sockets, `consume_all_blocking`, client
/// processes) then cannot starve the gateway, and sync and async tests start it alike.
fn run_in_process(
    config_path: &Path,
    shutdown: CancellationToken,
    control: tokio::sync::mpsc::Receiver<edgegate::Control>,
) -> (Started, std::thread::JoinHandle<Result<(), String>>) {
    let config = load_config(config_path);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build the gateway's runtime: {e}"))?;
            runtime.block_on(async move {
                let gateway = edgegate::start(config, shutdown)
                    .await
                    .map_err(|e| format!("the gateway did not start: {e}"))?;
                let listening = Listening {
                    mqtt: Some(gateway.mqtt_addr()),
                    mqtts: gateway.mqtts_addr(),
                    coap: gateway.coap_addr(),
                    admin: gateway.admin_addr(),
                };
                let health = gateway.health();
                // The test may be gone already (it panicked); the gateway still stops cleanly.
                let _ = started_tx.send(Started { listening, health });
                gateway.wait(control).await.map_err(|e| e.to_string())
            })
        })
        .expect("spawn the gateway's thread");
    match started_rx.recv() {
        Ok(started) => (started, thread),
        // The thread ended without starting the gateway: its result says why.
        Err(_) => match thread.join() {
            Ok(Err(e)) => panic!("{e}"),
            Ok(Ok(())) => panic!("the gateway stopped before it started"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

// ---- in process ---------------------------------------------------------------------------

/// A gateway started with `edgegate::start` in this process. Dropping it stops it.
///
/// Every gateway in a process shares the one metrics recorder (`/metrics` sums over all of
/// them) and writes its logs through the test's subscriber (`RUST_LOG=edgegate=debug` shows
/// them); a test that needs its own counters or its log lines uses a [`Process`].
pub struct InProcess {
    listening: Listening,
    health: edgegate::admin::Health,
    shutdown: CancellationToken,
    /// Kept open, as `edgegate run`'s signal handler keeps it: the gateway reads it until
    /// shutdown.
    _control: tokio::sync::mpsc::Sender<edgegate::Control>,
    /// The gateway's thread; `None` once joined.
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    config_path: PathBuf,
    /// Dropped last: the log is closed by then.
    dir: tempfile::TempDir,
}

impl InProcess {
    fn start(dir: tempfile::TempDir, config_path: PathBuf) -> InProcess {
        // `RUST_LOG=edgegate=debug` shows what the gateway did, within the test's output.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let shutdown = CancellationToken::new();
        let (control, control_rx) = tokio::sync::mpsc::channel(4);
        let (started, thread) = run_in_process(&config_path, shutdown.clone(), control_rx);
        InProcess {
            listening: started.listening,
            health: started.health,
            shutdown,
            _control: control,
            thread: Some(thread),
            config_path,
            dir,
        }
    }

    pub fn listening(&self) -> Listening {
        self.listening
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.listening.mqtt.expect("the MQTT listener is always on")
    }

    /// Panics if `[mqtt.tls]` is not enabled.
    pub fn mqtts_addr(&self) -> SocketAddr {
        self.listening
            .mqtts
            .expect("no MQTT over TLS: enable [mqtt.tls] in the test's config")
    }

    /// Panics if `[coap]` is disabled.
    pub fn coap_addr(&self) -> SocketAddr {
        self.listening
            .coap
            .expect("no CoAP listener: [coap] is disabled in the test's config")
    }

    /// Panics if `[admin]` is disabled or its port could not be bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.listening
            .admin
            .expect("no admin listener: [admin] is disabled or could not bind")
    }

    /// The gateway's health, as `/readyz` and systemd see it.
    pub fn health(&self) -> edgegate::admin::Health {
        self.health.clone()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Begins the shutdown (as SIGTERM would) without waiting for it.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits for the drain (at most `[gateway] shutdown_grace`); the
    /// gateway's own result, as `edgegate run` would exit on it.
    pub fn stop(mut self) -> Result<(), String> {
        self.join()
    }

    fn join(&mut self) -> Result<(), String> {
        self.shutdown.cancel();
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(panic)) => Err(format!("the gateway's thread panicked: {panic:?}")),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Waited for, so the log is closed and the ports are free before the directory goes.
        if let Err(e) = self.join() {
            eprintln!("the in-process gateway stopped on an error: {e}");
        }
    }
}

// ---- the real binary ----------------------------------------------------------------------

/// The real `edgegate` binary, `edgegate run --config <dir>/gateway.toml`, its stderr (the
/// log) appended to `<dir>/gateway.log` across restarts. Dropping it kills it (SIGKILL).
pub struct Process {
    child: Option<Child>,
    config: GatewayToml,
    config_path: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    log_format: Option<&'static str>,
    pin: bool,
    /// Whether the addresses of the first start are in `gateway.toml` already.
    pinned: bool,
    /// Where the current run's lines begin in `gateway.log`.
    run_start: u64,
    /// Dropped last, after the child is killed.
    dir: tempfile::TempDir,
}

impl Process {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the gateway is still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        self.run_start = log.metadata().map_or(0, |m| m.len());
        let mut command = Command::new(env!("CARGO_BIN_EXE_edgegate"));
        command.arg("run");
        if let Some(format) = self.log_format {
            command.args(["--log-format", format]);
        }
        command.arg("--config").arg(&self.config_path);
        for name in NOT_INHERITED {
            command.env_remove(name);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        // `edgegate run` logs on stderr and prints nothing on stdout.
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgegate");
        self.child = Some(child);
    }

    /// Waits for "Listening for MQTT.", the last listener `start` binds; the first time, pins
    /// the addresses if asked to.
    fn wait_started(&mut self) {
        let deadline = Instant::now() + STARTUP;
        let listening = loop {
            let listening = self.logged();
            if listening.mqtt.is_some() {
                break listening;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("edgegate exited at startup: {status}\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "edgegate did not start within {STARTUP:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if self.pin && !self.pinned {
            let admin = self.config.admin_enabled().then(|| self.admin_addr());
            let listening = Listening { admin, ..listening };
            self.config = self.config.clone().pin(&listening);
            self.config.write(&self.config_path);
            self.pinned = true;
        }
    }

    /// What the current run has logged so far, without waiting.
    pub fn logged(&self) -> Listening {
        let text = self.log_text();
        let start = usize::try_from(self.run_start)
            .unwrap_or(usize::MAX)
            .min(text.len());
        parse_listening(text.get(start..).unwrap_or_default())
    }

    /// Waits until the current run has logged the address `found` picks.
    fn wait_logged(
        &self,
        what: &str,
        found: impl Fn(&Listening) -> Option<SocketAddr>,
    ) -> SocketAddr {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(addr) = found(&self.logged()) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in the gateway's log within {STARTUP:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.wait_logged("MQTT listener", |l| l.mqtt)
    }

    /// Needs `[mqtt.tls]` enabled.
    pub fn mqtts_addr(&self) -> SocketAddr {
        self.wait_logged("MQTT over TLS listener", |l| l.mqtts)
    }

    /// Needs `[coap]` enabled.
    pub fn coap_addr(&self) -> SocketAddr {
        self.wait_logged("CoAP listener", |l| l.coap)
    }

    /// Panics if `[admin]` is disabled in the config.
    pub fn admin_addr(&self) -> SocketAddr {
        assert!(
            self.config.admin_enabled(),
            "no admin listener: [admin] is disabled in the test's config"
        );
        self.wait_logged("admin listener", |l| l.admin)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites `gateway.toml` through the builder (for a SIGHUP reload or the next restart).
    pub fn rewrite_config(&mut self, change: impl FnOnce(GatewayToml) -> GatewayToml) {
        self.config = change(self.config.clone());
        self.config.write(&self.config_path);
    }

    /// Replaces `gateway.toml` with `text` as it is (a broken file, say); the builder's
    /// config stays as it was.
    pub fn write_config_text(&self, text: &str) {
        std::fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the gateway is running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    /// Sends a signal (`-HUP`, `-TERM`, ...) with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}: {status}", self.pid());
    }

    /// SIGHUP: reload.
    pub fn hup(&self) {
        self.signal("-HUP");
    }

    /// SIGKILL, as a power cut would: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status of the graceful shutdown (SIGKILL and a panic after 30 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait()
    }

    /// Waits for the process to exit (after a signal sent with [`Process::signal`]) and
    /// returns its status; SIGKILL and a panic after 30 s.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the gateway is running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("edgegate did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the binary again on the same config and log (after a kill or a stop) and
    /// waits until it listens.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_started();
    }

    /// Where the binary's output goes (every run's).
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// Everything the binary printed, over every run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (at most 10 s) until one line of the log contains every one of `parts`;
    /// returns that line.
    pub fn wait_for_log(&self, parts: &[&str]) -> String {
        self.wait_for_log_within(parts, Duration::from_secs(10))
    }

    /// [`Process::wait_for_log`], waiting at most `within`.
    pub fn wait_for_log_within(&self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the gateway said last, wherever it failed.
        if std::thread::panicking() {
            let text = self.log_text();
            let kept = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("failed-gateway-{}.log", std::process::id()));
            let _ = std::fs::write(&kept, &text);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(80);
            eprintln!(
                "---- the gateway's last {} lines (all of them in {}):\n{}",
                lines.len() - from,
                kept.display(),
                lines[from..].join("\n")
            );
        }
    }
}

/// The listeners' addresses in the lines `edgegate::start` logs as it binds them (text or
/// JSON): "Listening for MQTT over TLS." (`mqtts_addr`), "Listening for CoAP."
/// (`coap_addr`), "Listening for MQTT." (`mqtt_addr`), "Serving /metrics, ..." (`addr`).
fn parse_listening(log: &str) -> Listening {
    let mut listening = Listening::default();
    for line in log.lines() {
        let slot = if line.contains("Listening for MQTT over TLS.") {
            (&mut listening.mqtts, "mqtts_addr")
        } else if line.contains("Listening for CoAP.") {
            (&mut listening.coap, "coap_addr")
        } else if line.contains("Listening for MQTT.") {
            (&mut listening.mqtt, "mqtt_addr")
        } else if line.contains("Serving /metrics") {
            (&mut listening.admin, "addr")
        } else {
            continue;
        };
        *slot.0 = field(line, slot.1).and_then(|v| v.parse().ok());
    }
    listening
}

/// One field of a log line: `name=value` in text, `"fields": {"name": "value"}` in JSON.
fn field(line: &str, name: &str) -> Option<String> {
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        return value["fields"][name].as_str().map(str::to_owned);
    }
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .map(str::to_owned)
}
