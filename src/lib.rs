//! edgegate: an edge IoT gateway. Devices publish over MQTT (and CoAP); every message is
//! written to a durable log on local disk before the device is acknowledged, and the log is
//! forwarded, in order, to Apache Kafka whenever the link allows.
//!
//! The data path reads top to bottom in the module names:
//! [`ingest`] (listeners) → [`route`] → [`buffer`] (the durable log) → [`forward`] (Kafka).
//! [`run`] wires them together; `main.rs` and the integration tests both call it. [`admin`]
//! observes the running gateway: metrics, health, systemd notifications, `edgegate status`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod forward;
pub mod ingest;
pub mod reload;
pub mod route;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Log, LogConfig, LogError};
use crate::config::Config;
use crate::forward::Forwarder;
use crate::ingest::Pipeline;
use crate::route::Router;

/// What can stop the gateway from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the log: {0}")]
    Log(#[from] LogError),
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for CoAP on {addr}: {source}")]
    BindUdp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for MQTT over TLS on {addr}: {source}")]
    BindTls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up MQTT over TLS: {0}")]
    Tls(#[from] ingest::mqtt::tls::TlsError),
    #[error("the routes are invalid: {0}")]
    Routes(#[from] route::InvalidRoutes),
    #[error("cannot set up [auth]: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("cannot start the Kafka forwarder: {0}")]
    Forward(#[from] forward::ForwardError),
    #[error("{0}")]
    Config(String),
    #[error("a background task failed: {0}")]
    Task(String),
}

/// Messages from the signal handlers (or a test) to the running gateway.
#[derive(Debug, Clone)]
pub enum Control {
    /// Re-read the reloadable parts of the configuration: routes, the MQTT TLS certificate,
    /// key and client CA, and `[auth]` (rules and the password file).
    Reload(Box<Config>),
}

/// A started gateway: listeners bound, log recovered, forwarder running.
pub struct Gateway {
    mqtt_addr: SocketAddr,
    /// The TLS listener's address, when `[mqtt.tls] enabled`.
    mqtts_addr: Option<SocketAddr>,
    /// The settings a reload replaces, published to the stages that use them.
    settings: Arc<reload::Settings>,
    coap_addr: Option<SocketAddr>,
    /// The admin listener's address; `None` when disabled or its port could not be bound.
    admin_addr: Option<SocketAddr>,
    health: admin::Health,
    /// The admin listener and the gauge refresher.
    admin: TaskTracker,
    log: Log,
    shutdown: CancellationToken,
    grace: Duration,
    listeners: TaskTracker,
    forwarder: tokio::task::JoinHandle<Result<(), forward::ForwardError>>,
}

/// Opens the log, binds the listeners and starts forwarding. `base` resolves relative paths
/// in the config (the config file's directory). Stops when `shutdown` is cancelled.
pub async fn start(
    config: Config,
    base: &Path,
    shutdown: CancellationToken,
) -> Result<Gateway, RunError> {
    let gateway_id = config.gateway.id();
    // First, so what recovery counts while opening the log is recorded.
    let metrics = if config.admin.enabled {
        admin::metrics::install()
    } else {
        None
    };
    let log_config = config.buffer.log_config(base).map_err(RunError::Config)?;
    if let Some(keys) = &log_config.keys {
        tracing::info!(key_id = %format_args!("{:08x}", keys.current_id()), "Records are encrypted in the log.");
    }
    check_buffer_dir(&log_config)?;

    let (log, _report) = open_log(log_config.clone()).await?;
    let dead_letter_config = LogConfig {
        dir: log_config.dir.join("dead-letter"),
        overflow: buffer::Overflow::DropOldest,
        max_bytes: (log_config.max_bytes / 8).max(log_config.segment_bytes * 2),
        ..log_config.clone()
    };
    let (dead_letter, _) = open_log(dead_letter_config).await?;

    // TLS files and the password file are checked before any port is bound.
    let mut settings = reload::Settings::new(&config, base);
    let routes = settings.publish::<Router>(&config)?;
    let auth = settings.publish::<auth::Auth>(&config)?;
    let mqtt_tls = if config.mqtt.tls.enabled {
        Some(settings.publish::<ServerConfig>(&config)?)
    } else {
        None
    };
    let settings = Arc::new(settings);
    let pipeline = Pipeline::new(log.clone(), routes);

    let listener = TcpListener::bind(&config.mqtt.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.mqtt.listen.clone(),
            source,
        })?;
    let mqtt_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: config.mqtt.listen.clone(),
        source,
    })?;

    let tls_listener = match mqtt_tls {
        Some(handle) => {
            let bind_error = |source| RunError::BindTls {
                addr: config.mqtt.tls.listen.clone(),
                source,
            };
            let listener = TcpListener::bind(&config.mqtt.tls.listen)
                .await
                .map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            Some((listener, handle, addr))
        }
        None => None,
    };
    let mqtts_addr = tls_listener.as_ref().map(|(_, _, addr)| *addr);

    let coap_socket = if config.coap.enabled {
        let bind_error = |source| RunError::BindUdp {
            addr: config.coap.listen.clone(),
            source,
        };
        let socket = UdpSocket::bind(&config.coap.listen)
            .await
            .map_err(bind_error)?;
        let addr = socket.local_addr().map_err(bind_error)?;
        ingest::coap::size_receive_buffer(&socket, &config.coap);
        Some((socket, addr))
    } else {
        None
    };
    let coap_addr = coap_socket.as_ref().map(|(_, addr)| *addr);
    warn_anonymous(&config, mqtt_addr, mqtts_addr, coap_addr);

    let reader = log
        .reader()
        .ok_or_else(|| RunError::Task("the log's reader was already taken".into()))?;
    // The forwarder's own drain ends a little before the whole shutdown's, so it can log what
    // it left behind before `wait` gives up on it.
    let forwarder = Forwarder::new(&config.kafka, &gateway_id, reader, dead_letter.clone())?
        .with_shutdown_grace(config.gateway.shutdown_grace.get().mul_f64(0.9));
    let (link, progress, last_error) = (
        forwarder.link_state(),
        forwarder.progress(),
        forwarder.last_error(),
    );
    let forwarder = tokio::spawn(forwarder.run(shutdown.clone()));

    let listeners = TaskTracker::new();
    let mqtt_config = std::sync::Arc::new(config.mqtt.clone());
    listeners.spawn(ingest::mqtt::serve_listeners(
        ingest::mqtt::Listeners {
            plain: listener,
            tls: tls_listener.map(|(listener, handle, _)| (listener, handle)),
        },
        mqtt_config,
        pipeline.clone(),
        auth.clone(),
        shutdown.clone(),
    ));
    if let Some(mqtts_addr) = mqtts_addr {
        tracing::info!(%mqtts_addr, client_certs = ?config.mqtt.tls.client_certs, "Listening for MQTT over TLS.");
        tokio::spawn(ingest::mqtt::tls::watch_files(
            settings.clone(),
            shutdown.clone(),
        ));
    }
    if let Some((socket, coap_addr)) = coap_socket {
        listeners.spawn(ingest::coap::serve(
            socket,
            std::sync::Arc::new(config.coap.clone()),
            auth.clone(),
            pipeline.clone(),
            shutdown.clone(),
        ));
        tracing::info!(%coap_addr, "Listening for CoAP.");
    }
    listeners.close();
    tracing::info!(%mqtt_addr, gateway_id = %gateway_id, "Listening for MQTT.");

    let health = admin::Health::new(admin::Parts {
        log: log.clone(),
        dead_letter,
        link,
        progress,
        last_error,
        expected_listeners: listeners.len(),
        listeners: listeners.clone(),
        shutdown: shutdown.clone(),
    });
    let admin = TaskTracker::new();
    admin.spawn(admin::metrics::refresh(
        health.clone(),
        metrics,
        shutdown.clone(),
    ));
    let admin_addr = if config.admin.enabled {
        bind_admin(&config.admin.listen)
            .await
            .map(|(listener, addr)| {
                admin.spawn(admin::server::serve(
                    listener,
                    health.clone(),
                    metrics,
                    shutdown.clone(),
                ));
                tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
                addr
            })
    } else {
        None
    };
    admin.close();

    Ok(Gateway {
        mqtt_addr,
        mqtts_addr,
        settings,
        coap_addr,
        admin_addr,
        health,
        admin,
        log,
        shutdown,
        grace: config.gateway.shutdown_grace.get(),
        listeners,
        forwarder,
    })
}

impl Gateway {
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The bound MQTT-over-TLS address, when `[mqtt.tls] enabled`.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts_addr
    }

    /// The bound CoAP address, when `[coap] enabled`.
    pub fn coap_addr(&self) -> Option<SocketAddr> {
        self.coap_addr
    }

    /// The bound admin address, when `[admin] enabled` and its port could be bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A handle for health reports (`/readyz`, systemd).
    pub fn health(&self) -> admin::Health {
        self.health.clone()
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Applies a control message (SIGHUP reload).
    pub fn control(&self, message: Control) {
        match message {
            Control::Reload(config) => self.settings.reload(*config),
        }
    }

    /// Runs until shutdown, then drains: listeners stop accepting and finish their in-flight
    /// appends, the log commits, the forwarder delivers what it can within the grace period.
    pub async fn wait(self, mut control: mpsc::Receiver<Control>) -> Result<(), RunError> {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(message) = control.recv() => self.control(message),
            }
        }
        tracing::info!(grace = ?self.grace, "Shutting down.");
        let deadline = tokio::time::Instant::now() + self.grace;
        let listeners_done = tokio::time::timeout_at(deadline, self.listeners.wait())
            .await
            .is_ok();
        // The forwarder stops reading at shutdown and waits for its in-flight deliveries;
        // whatever it does not finish stays in the log and is sent after the restart.
        let mut forwarder = self.forwarder;
        let forwarded = match tokio::time::timeout_at(deadline, &mut forwarder).await {
            Ok(joined) => joined
                .map_err(|e| RunError::Task(e.to_string()))?
                .map_err(RunError::from),
            Err(_) => {
                forwarder.abort();
                tracing::warn!(
                    "The forwarder did not finish within the grace period; undelivered records stay in the log."
                );
                Ok(())
            }
        };
        let closed = self.log.close().await;
        let admin_done = tokio::time::timeout_at(deadline, self.admin.wait())
            .await
            .is_ok();
        tracing::info!(listeners_done, admin_done, "Shut down.");
        forwarded?;
        closed.map_err(RunError::from)
    }
}

/// Starts the gateway and runs it until `shutdown`, telling systemd (when it runs the
/// gateway) when it is ready, how it is doing, and when it stops.
pub async fn run(
    config: Config,
    base: &Path,
    shutdown: CancellationToken,
    control: mpsc::Receiver<Control>,
) -> Result<(), RunError> {
    let gateway = start(config, base, shutdown.clone()).await?;
    let notifier = tokio::spawn(admin::notify::run(gateway.health(), shutdown));
    let result = gateway.wait(control).await;
    // It sent STOPPING when shutdown began; it has nothing left to do.
    notifier.abort();
    result
}

/// Anonymous access reachable from the network is worth a line at every start.
fn warn_anonymous(
    config: &Config,
    plain: SocketAddr,
    tls: Option<SocketAddr>,
    coap: Option<SocketAddr>,
) {
    use crate::auth::config::Anonymous;
    let exposed = std::iter::once(plain)
        .chain(tls)
        .chain(coap)
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.to_string())
        .collect::<Vec<_>>();
    match config.auth.anonymous {
        Anonymous::Always if !exposed.is_empty() => tracing::warn!(
            listeners = ?exposed,
            "Anonymous MQTT and CoAP clients are accepted on a non-loopback address ([auth] anonymous = \"always\"): any host that can reach it may publish."
        ),
        Anonymous::Loopback if !exposed.is_empty() => tracing::info!(
            listeners = ?exposed,
            "Anonymous MQTT and CoAP clients are accepted from loopback only; MQTT devices on the network need a certificate or a password, and CoAP devices on the network are refused 4.01."
        ),
        _ => {}
    }
}

/// The admin listener is for observing the gateway: a port that cannot be bound (another
/// exporter on 9100) is logged, and the data path runs on without it.
async fn bind_admin(listen: &str) -> Option<(TcpListener, SocketAddr)> {
    let bound = match TcpListener::bind(listen).await {
        Ok(listener) => listener.local_addr().map(|addr| (listener, addr)),
        Err(e) => Err(e),
    };
    bound
        .inspect_err(|error| {
            tracing::error!(
                addr = listen,
                %error,
                "Cannot listen for the admin endpoints; running without /metrics, /healthz and /readyz. Set [admin] listen to a free port."
            );
        })
        .ok()
}

async fn open_log(config: LogConfig) -> Result<(Log, buffer::RecoveryReport), RunError> {
    tokio::task::spawn_blocking(move || Log::open(config))
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(RunError::from)
}

/// Preconditions before binding anything: the buffer directory exists (or can be made) and
/// is writable.
fn check_buffer_dir(config: &LogConfig) -> Result<(), RunError> {
    let dir: PathBuf = config.dir.clone();
    buffer::create_private_dir(&dir).map_err(|source| LogError::Dir {
        path: dir.clone(),
        source,
    })?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|source| LogError::Dir {
        path: dir.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests;
