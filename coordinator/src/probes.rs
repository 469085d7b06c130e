//! `/metrics`, `/healthz` and `/readyz` on their own port, so scraping and
//! kubelet probes never compete with agent sessions.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use image_backup_crds::ImageBackup;
use kube::runtime::reflector::Store;

use crate::{agents::AgentHub, metrics::Metrics};

/// What the probes read.
#[derive(Clone)]
pub struct Probes {
    pub metrics: Arc<Metrics>,
    pub hub: Arc<AgentHub>,
    pub backups: Store<ImageBackup>,
    /// Set once every cache has synced: before that, the coordinator would
    /// act on a partial picture of the cluster.
    pub ready: Arc<AtomicBool>,
}

/// Serves the probes on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(probes);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(probes): State<Probes>) -> impl IntoResponse {
    let text = probes.metrics.render(&probes.hub, &probes.backups);
    (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}

async fn ready(State(probes): State<Probes>) -> impl IntoResponse {
    if probes.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}
