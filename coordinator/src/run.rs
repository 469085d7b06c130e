//! Wiring: the controllers, the agent-event follower, heartbeat expiry and
//! the gRPC port, run until shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use image_backup_crds::ImageBackup;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::{
    Api, Client,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use tracing::{info, warn};

use crate::{
    agents::AgentHub,
    config::CoordinatorConfig,
    controller::{
        Context, ReconcileError, agent_triggers, follow_agents, reconcile_backup, reconcile_daemonset,
        reconcile_deployment,
    },
    jobs::{JobBoard, grpc_routes},
    metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("backup registry settings: {0}")]
    Registry(#[from] image_backup_oci::registry::RegistryError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("metrics and probes server: {0}")]
    Probes(std::io::Error),
    #[error("gRPC listener: {0}")]
    Listener(std::io::Error),
    #[error("gRPC server on {addr}: {source}")]
    Grpc { addr: SocketAddr, source: tonic::transport::Error },
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: CoordinatorConfig,
    grpc_listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    coordinator_id: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let hub = AgentHub::new(coordinator_id, Duration::from_secs(5));
    let board = JobBoard::new();
    let deadline = config.heartbeat_deadline;
    let metrics = Metrics::new();
    let ctx = Context::new(client.clone(), config, hub.clone(), board.clone(), metrics.clone())?;
    let shutdown = shutdown.shared();
    let probes = crate::metrics::serve(metrics_listener, metrics, hub.clone(), board.clone(), shutdown.clone());

    let addr = grpc_listener.local_addr().map_err(RunError::Listener)?;
    let routes = grpc_routes(board.clone(), hub.clone()).await?;
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc_listener), {
            let shutdown = shutdown.clone();
            let hub = hub.clone();
            async move {
                shutdown.await;
                // Long-lived agent sessions would hold a graceful shutdown
                // open forever; ending them sends the agents to reconnect.
                hub.close_sessions();
            }
        });
    info!(%addr, "gRPC listening");

    let expiry = {
        let hub = hub.clone();
        async move {
            let mut tick = tokio::time::interval(deadline / 4);
            loop {
                tick.tick().await;
                hub.expire(deadline);
            }
        }
    };

    let backups = Api::<ImageBackup>::all(client.clone());
    let backup_controller = Controller::new(backups.clone(), watcher::Config::default())
        .reconcile_all_on(agent_triggers(&hub))
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_backup, error_policy, ctx.clone())
        .for_each(|result| async move { log_result("ImageBackup", result) });

    // Workloads wake up when one of their ImageBackups changes.
    let deployment_controller = Controller::new(Api::<Deployment>::all(client.clone()), watcher::Config::default())
        .watches(backups.clone(), watcher::Config::default(), |backup| workloads_of(&backup, "Deployment"))
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_deployment, error_policy, ctx.clone())
        .for_each(|result| async move { log_result("Deployment", result) });
    let daemonset_controller = Controller::new(Api::<DaemonSet>::all(client.clone()), watcher::Config::default())
        .watches(backups, watcher::Config::default(), |backup| workloads_of(&backup, "DaemonSet"))
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_daemonset, error_policy, ctx.clone())
        .for_each(|result| async move { log_result("DaemonSet", result) });

    let follower = follow_agents(ctx.clone());
    tokio::select! {
        result = grpc => result.map_err(|source| RunError::Grpc { addr, source })?,
        result = probes => result.map_err(RunError::Probes)?,
        () = async { tokio::join!(backup_controller, deployment_controller, daemonset_controller); } => {},
        () = follower => {},
        () = expiry => {},
    }
    info!("coordinator stopped");
    Ok(())
}

fn workloads_of<K>(backup: &ImageBackup, kind: &str) -> Vec<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()>,
{
    backup
        .status
        .iter()
        .flat_map(|s| s.workloads.iter())
        .filter_map(|key| {
            let mut parts = key.splitn(3, '/');
            let (k, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
            (k == kind).then(|| ObjectRef::new(name).within(namespace))
        })
        .collect()
}

fn error_policy<K>(_: Arc<K>, error: &ReconcileError, _: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(kind: &str, result: Result<T, E>) {
    if let Err(e) = result {
        tracing::debug!(kind, error = %e, "controller");
    }
}
