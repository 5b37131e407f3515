//! The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, on a small axum server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Health;

/// What every request handler sees.
struct Shared {
    health: Health,
    /// `None` when another metrics recorder owns the process.
    metrics: Option<&'static PrometheusHandle>,
}

/// Binds `[admin] listen`. The admin listener is for observing the gateway: a port that
/// cannot be bound (another exporter on 9100) is logged, and the data path runs on without it.
pub async fn bind(listen: &str) -> Option<(TcpListener, SocketAddr)> {
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

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Option<&'static PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Shared { health, metrics }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "The admin listener stopped on an error.");
    }
}

async fn render_metrics(State(shared): State<Arc<Shared>>) -> Response {
    match shared.metrics {
        Some(handle) => {
            super::metrics::set_gauges(&shared.health, &shared.health.log.stats());
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder was installed in this process\n",
        )
            .into_response(),
    }
}

/// The process is alive and its runtime schedules tasks: nothing more is checked.
async fn healthz() -> &'static str {
    "alive\n"
}

/// 200 while the gateway accepts data (ready or degraded), 503 otherwise; the JSON body
/// says which and why.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let readiness = shared.health.readiness();
    let code = if readiness.status.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_string(&readiness) {
        Ok(body) => (code, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
