//! Prometheus metrics and the HTTP probes, on their own port so scraping
//! and kubelet probes never compete with agent sessions.

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{agents::AgentHub, jobs::JobBoard};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<PhaseLabel, Gauge>,
    agents: Gauge,
    pub bytes_pushed: Counter,
    pub push_seconds: Histogram,
    pub patches: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("image_backup");
        let jobs = Family::<PhaseLabel, Gauge>::default();
        registry.register("jobs", "ImageBackups by phase", jobs.clone());
        let agents = Gauge::default();
        registry.register("connected_agents", "Agents with a live session", agents.clone());
        let bytes_pushed = Counter::default();
        registry.register("pushed_bytes", "Bytes agents uploaded to the backup registry", bytes_pushed.clone());
        let push_seconds = Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]);
        registry.register("push_duration_seconds", "Duration of successful copies", push_seconds.clone());
        let patches = Family::<OutcomeLabel, Counter>::default();
        registry.register("workload_patches", "Workload patches to backup references, by outcome", patches.clone());
        Arc::new(Self { registry, jobs, agents, bytes_pushed, push_seconds, patches })
    }

    pub fn patched(&self, outcome: &str) {
        self.patches.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    /// The exposition text, with the gauges read from the hub and board now.
    pub async fn render(&self, hub: &AgentHub, board: &JobBoard) -> String {
        self.agents.set(i64::try_from(hub.agents().len()).unwrap_or(i64::MAX));
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for phase in ["Pending", "Assigned", "Pushing", "Completed", "Failed"] {
            counts.insert(phase.into(), 0);
        }
        for job in board.jobs().await {
            *counts.entry(crate::jobs::phase_name(job.phase).into()).or_default() += 1;
        }
        for (phase, count) in counts {
            self.jobs.get_or_create(&PhaseLabel { phase }).set(count);
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

#[derive(Clone)]
struct Probe {
    metrics: Arc<Metrics>,
    hub: Arc<AgentHub>,
    board: Arc<JobBoard>,
}

/// `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    hub: Arc<AgentHub>,
    board: Arc<JobBoard>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .with_state(Probe { metrics, hub, board });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn render(State(probe): State<Probe>) -> impl IntoResponse {
    let text = probe.metrics.render(&probe.hub, &probe.board).await;
    (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}
