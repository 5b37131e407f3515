//! edgegate: an edge IoT gateway. Devices publish over MQTT (and CoAP); every message is
//! written to a durable log on local disk before the device is acknowledged, and the log is
//! forwarded, in order, to Apache Kafka whenever the link allows.
//!
//! The data path reads top to bottom in the module names:
//! [`ingest`] (listeners) → [`route`] → [`buffer`] (the durable log) → [`forward`] (Kafka).
//! [`start`] is the composition root: it opens the log, binds every listener, and hands each
//! stage its sockets, its config and the [`reload`]able settings it reads; each stage serves
//! in its own module. [`run`] adds systemd's notifications; `main.rs` and the integration
//! tests call these. [`admin`] observes the running gateway: metrics, health, systemd
//! notifications, `edgegate status`.

// Two modules may call into C directly: `forward::rebootstrap` (librdkafka) and `memory`
// (glibc's allocator), each says why.
#![deny(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod buffer;
pub mod config;
pub mod downlink;
// Faults for the tests of the safety nets: in builds with debug assertions (the tests'),
// never in a release build.
#[cfg(debug_assertions)]
pub mod fault;
pub mod format;
pub mod forward;
pub mod ingest;
pub mod logging;
pub mod memory;
pub mod record;
pub mod reload;
pub mod route;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Log, LogError};
use crate::config::Config;
use crate::forward::Forwarder;
use crate::ingest::Pipeline;
use crate::route::Router;

/// What can stop the gateway from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the log: {0}")]
    Log(#[from] LogError),
    #[error(transparent)]
    Bind(#[from] ingest::BindError),
    #[error("cannot set up MQTT over TLS: {0}")]
    Tls(#[from] ingest::mqtt::tls::TlsError),
    #[error("the routes are invalid: {0}")]
    Routes(#[from] route::InvalidRoutes),
    #[error("cannot open the broker's state in {}: {source}", .dir.display())]
    Broker {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up [auth]: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("cannot rebuild the QoS 2 state: {0}")]
    Receipts(#[from] ingest::receipts::ReceiptsError),
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
    /// Load this config file again and apply its reloadable parts: the routes, the MQTT TLS
    /// certificate, key and client CA, and `[auth]` (see [`reload`]).
    Reload(PathBuf),
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
    /// The status writer: command outcomes into the log, until the listeners have ended.
    outcomes: Option<tokio::task::JoinHandle<()>>,
    forwarder: tokio::task::JoinHandle<Result<(), forward::ForwardError>>,
}

/// Opens the log, binds the listeners and starts forwarding, from a loaded config
/// ([`Config::load`] has checked it and read the files it names). Stops when `shutdown` is
/// cancelled.
///
/// The stages in the order data flows through them: the log first (nothing is accepted
/// before it is recovered), the settings a reload replaces, every listener bound before any
/// serves (a port in use fails the start), the forwarder, then the admin endpoints.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Gateway, RunError> {
    let gateway_id = config.gateway.id();
    // First, so what recovery counts while opening the log is recorded.
    let metrics = if config.admin.enabled {
        admin::metrics::install()
    } else {
        None
    };

    // buffer: the durable log, and the dead-letter log beside it.
    let log_config = config.log_config().map_err(RunError::Config)?;
    if let Some(keys) = &log_config.keys {
        tracing::info!(key_id = %format_args!("{:08x}", keys.current_id()), "Records are encrypted in the log.");
    }
    // The receipt store's checkpoint first: the log opens pinned there, so no segment whose
    // receipts the store has not absorbed can be removed before it is rebuilt.
    let broker_dir = log_config.dir.join(ingest::mqtt::BROKER_DIR);
    let receipts_found = ingest::receipts::read(&broker_dir)?;
    let (log, _) = Log::open_pinned_async(log_config.clone(), receipts_found.checkpoint()).await?;
    let (dead_letter, _) = Log::open_async(forward::dead_letter::log_config(&log_config)).await?;
    // The local broker's retained messages, beside the log.
    let broker = broker::Broker::open(&broker_dir, config.mqtt.broker()).map_err(|source| {
        RunError::Broker {
            dir: broker_dir.clone(),
            source,
        }
    })?;
    // QoS 2 packet ids awaiting PUBREL and CoAP dedup keys: the store and the receipts in
    // the log, before any append; then only for sessions the broker still has.
    let coap_limits = config.coap.enabled.then(|| ingest::receipts::CoapLimits {
        lifetime: config.coap.exchange_lifetime.get(),
        capacity: config.coap.dedup_capacity,
    });
    let receipts = ingest::receipts::Receipts::start(
        receipts_found,
        &log,
        log_config.keys.as_deref(),
        coap_limits,
    )
    .await?;
    receipts.retain_clients(|client| broker.has_persistent_session(client));
    tokio::spawn(receipts.clone().run(shutdown.clone()));

    // What a reload replaces, published to the stages that read it.
    let mut settings = reload::Settings::new(&config);
    let routes = settings.publish::<Router>(&config)?;
    let auth = settings.publish::<auth::Auth>(&config)?;
    let upstream = settings
        .publish::<format::registry::client::Upstream>(&config)
        .map_err(|e| RunError::Task(format!("[schema_registry]: {e}")))?;
    let mqtt_tls = if config.mqtt.tls.enabled {
        // The files' state before they are read: a change from here on is a change the
        // watcher must see, even one made before it first runs.
        let files = config.mqtt.tls.files_state();
        Some((settings.publish::<ServerConfig>(&config)?, files))
    } else {
        None
    };
    let settings = Arc::new(settings);

    // ingest: bound before anything serves.
    let (mqtt_tls, tls_files) = match mqtt_tls {
        Some((tls, files)) => (Some(tls), files),
        None => (None, Vec::new()),
    };
    let mqtt = ingest::mqtt::Listeners::bind(&config.mqtt, mqtt_tls).await?;
    let coap = if config.coap.enabled {
        Some(ingest::coap::bind(&config.coap).await?)
    } else {
        None
    };
    let (mqtt_addr, mqtts_addr) = (mqtt.addr(), mqtt.tls_addr());
    let coap_addr = coap.as_ref().map(|(_, addr)| *addr);
    auth::announce_anonymous(
        config.auth.anonymous,
        [Some(mqtt_addr), mqtts_addr, coap_addr]
            .into_iter()
            .flatten(),
    );

    // forward: reads the log from its head.
    let reader = log
        .reader()
        .ok_or_else(|| RunError::Task("the log's reader was already taken".into()))?;
    // The forwarder's own drain ends a little before the whole shutdown's, so it can log what
    // it left behind before `wait` gives up on it.
    // The schemas of `avro` routes, from the cache under the buffer directory, kept fresh
    // from the registry by a task of their own.
    let schemas = Arc::new(format::registry::Registry::open(
        format::registry::cache::path(log.dir()),
    ));
    if upstream.borrow().client.is_some() {
        schemas.will_learn();
    }
    tokio::spawn(schemas.clone().run(upstream, shutdown.clone()));
    let forwarder = Forwarder::new(
        &config.kafka,
        &gateway_id,
        log.dir(),
        reader,
        dead_letter.clone(),
    )?
    .with_schemas(schemas.clone())
    .with_shutdown_grace(config.gateway.shutdown_grace.get().mul_f64(0.9));
    let (link, progress, last_error) = (
        forwarder.link_state(),
        forwarder.progress(),
        forwarder.last_error(),
    );
    let forwarder = tokio::spawn(forwarder.run(shutdown.clone()));

    // ingest → route → buffer: the listeners start serving.
    let sparkplug = broker_dir.join(format::sparkplug::JOURNAL);
    let pipeline = Pipeline::new(log.clone(), routes)
        .with_sparkplug_journal(&sparkplug)
        .map_err(|source| RunError::Broker {
            dir: broker_dir.clone(),
            source,
        })?
        .with_receipts(receipts)
        .with_schemas(schemas);
    let listeners = TaskTracker::new();
    // Command outcomes → the log, from before the first session can finish a command until
    // the last one has ended.
    let outcomes = broker.take_outcomes().map(|outcomes| {
        tokio::spawn(downlink::write_outcomes(
            outcomes,
            log.clone(),
            gateway_id.clone(),
            listeners.clone(),
        ))
    });
    listeners.spawn(ingest::mqtt::serve_listeners(
        mqtt,
        Arc::new(config.mqtt.clone()),
        pipeline.clone(),
        auth.clone(),
        broker.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(broker::sweep(broker.clone(), shutdown.clone()));
    // downlink: Kafka → the broker, outcomes back through the log.
    let downlink = downlink::run(
        config.downlink.clone(),
        config.kafka.clone(),
        gateway_id.clone(),
        broker.clone(),
        shutdown.clone(),
    );
    tokio::spawn(async move {
        if let Err(e) = downlink.await {
            tracing::error!(error = %e, "The downlink stopped: commands from Kafka are not taken.");
        }
    });
    if let Some(mqtts_addr) = mqtts_addr {
        tracing::info!(%mqtts_addr, client_certs = ?config.mqtt.tls.client_certs, "Listening for MQTT over TLS.");
        tokio::spawn(ingest::mqtt::tls::watch_files(
            settings.clone(),
            tls_files,
            shutdown.clone(),
        ));
    }
    if let Some((socket, coap_addr)) = coap {
        listeners.spawn(ingest::coap::serve(
            socket,
            Arc::new(config.coap.clone()),
            auth,
            pipeline,
            shutdown.clone(),
        ));
        tracing::info!(%coap_addr, "Listening for CoAP.");
    }
    listeners.close();
    tracing::info!(%mqtt_addr, gateway_id = %gateway_id, "Listening for MQTT.");

    // admin: observes all of the above.
    let health = admin::Health::new(admin::Parts {
        log: log.clone(),
        dead_letter,
        link,
        progress,
        last_error,
        expected_listeners: listeners.len(),
        listeners: listeners.clone(),
        shutdown: shutdown.clone(),
        broker: Some(broker),
    });
    let admin = TaskTracker::new();
    admin.spawn(admin::metrics::refresh(
        health.clone(),
        metrics,
        shutdown.clone(),
    ));
    let admin_addr = if config.admin.enabled {
        admin::server::bind(&config.admin.listen)
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
        outcomes,
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
            Control::Reload(path) => self.settings.reload(&path),
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
        // What the sessions reported as they ended (a command acknowledged during the
        // shutdown) is in the log before it closes.
        if let Some(outcomes) = self.outcomes {
            if tokio::time::timeout_at(deadline, outcomes).await.is_err() {
                tracing::warn!(
                    "Command outcomes were still being written when the grace period ended."
                );
            }
        }
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
    shutdown: CancellationToken,
    control: mpsc::Receiver<Control>,
) -> Result<(), RunError> {
    let gateway = start(config, shutdown.clone()).await?;
    let notifier = tokio::spawn(admin::notify::run(gateway.health(), shutdown));
    let result = gateway.wait(control).await;
    // It sent STOPPING when shutdown began; it has nothing left to do.
    notifier.abort();
    result
}

#[cfg(test)]
mod tests;
