//! Wiring: one ImageBackup watch shared by the three controllers and
//! JobService, the controllers, heartbeat expiry, the gRPC port and the
//! probes, run until shutdown.

use std::{
    net::SocketAddr,
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt, TryStreamExt};
use image_backup_crds::ImageBackup;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentHub, AgentSessions},
    backups,
    config::CoordinatorConfig,
    context::Shared,
    error::{Error, contained},
    grpc::{JobFeed, Jobs, grpc_routes},
    jobs::LiveJobs,
    leader,
    metrics::Metrics,
    probes::{self, Probes},
    relist::{Change, Seen},
    trust::{agents::AgentAuthenticator, listener::tls_incoming, readers::Readers, tls},
    workloads::{
        self, Wakers,
        usage::{Usage, WorkloadKey},
        workload::RollsOut,
    },
};

/// Changes a slow controller may fall behind the shared ImageBackup watch.
const SHARED_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "the ImageBackup CRD (imagebackups.backup.k8slab.io) is not served by the API server: apply deploy/crds/ first"
    )]
    CrdMissing,
    #[error("cannot list ImageBackups: {0}")]
    CrdCheck(kube::Error),
    #[error("the ImageBackup store cannot be shared between controllers")]
    Unshared,
    #[error("backup registry settings")]
    Registry(#[from] image_backup_oci::registry::RegistryError),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    #[error("another coordinator leads now; restarting as a follower")]
    LostLeadership,
    #[error("metrics and probes server: {0}")]
    Probes(std::io::Error),
    #[error("gRPC listener: {0}")]
    Listener(std::io::Error),
    #[error("TLS of the gRPC port")]
    Tls(#[from] crate::trust::tls::TlsError),
    #[error("gRPC server on {addr}: {error}")]
    Grpc { addr: SocketAddr, error: tonic::transport::Error },
}

/// Runs the coordinator until `shutdown` resolves. `client` is best made by
/// [`Metrics::counted_client`], so /metrics counts its requests.
pub async fn run(
    client: Client,
    config: CoordinatorConfig,
    grpc_listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    coordinator_id: String,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    check_crd(&client).await?;
    let (jobs, woken) = LiveJobs::new();
    let jobs = Arc::new(jobs);
    let hub = AgentHub::new(coordinator_id.clone(), Duration::from_secs(5), jobs.clone());
    let deadline = config.heartbeat_deadline;
    let usage = Arc::new(Usage::default());
    let feed = JobFeed::new(usage.clone());
    let (backup_store, writer) = reflector::store_shared::<ImageBackup>(SHARED_BUFFER);

    // Probes answer from the start. The pod's readiness is `/healthz` (both
    // replicas ready, see deploy/coordinator.yaml; the Service finds the
    // leader by its role label); `/readyz` tells whoever asks whether this
    // replica leads and has synced.
    let shutdown = shutdown.shared();
    let ready = Arc::new(AtomicBool::new(false));
    let mut probes = tokio::spawn(probes::serve(
        metrics_listener,
        Probes { metrics: metrics.clone(), hub: hub.clone(), backups: backup_store.clone(), ready: ready.clone() },
        shutdown.clone(),
    ));
    // A restarted leader's container keeps its pod's label: clear it first.
    let namespace = config.namespace.clone();
    leader::label_role(&client, &namespace, &coordinator_id, false).await;
    let leading = tokio::select! {
        leading = leader::lead(client.clone(), config.lease.clone(), &coordinator_id, shutdown.clone()) => leading?,
        result = &mut probes => return Err(probe_failure(result)),
    };
    let Some(mut leadership) = leading else {
        info!("stopped before leading");
        return Ok(());
    };
    leader::label_role(&client, &namespace, &coordinator_id, true).await;

    let subscribe = || writer.subscribe().ok_or(RunError::Unshared);
    let (for_backups, for_deployments, for_daemonsets) = (subscribe()?, subscribe()?, subscribe()?);
    // Deletions reach no shared subscriber: the watch itself hands them on;
    // freed rollout slots wake the workloads in line.
    let (wake_deployments, deployment_wakes) = tokio::sync::mpsc::unbounded_channel();
    let (wake_daemonsets, daemonset_wakes) = tokio::sync::mpsc::unbounded_channel();
    let wakers = Wakers { deployments: wake_deployments, daemonsets: wake_daemonsets };
    let shared = Shared::new(
        client.clone(),
        config,
        backup_store.clone(),
        usage,
        metrics.clone(),
        jobs.waker(),
        leadership.fence(),
    )?;
    let backups_ctx = backups::Context::new(shared.clone(), hub.clone(), jobs);
    let workloads_ctx = workloads::Context::new(shared.clone(), wakers)?;
    let mut seen = Seen::new(|backup: &ImageBackup| backup.name_any());
    let backup_watch = watcher(Api::<ImageBackup>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(forget_managed_fields)
        .reflect_shared(writer)
        .for_each({
            let (backups_ctx, workloads_ctx, feed) = (backups_ctx.clone(), workloads_ctx.clone(), feed.clone());
            move |event| {
                match &event {
                    Ok(event) => {
                        for change in seen.observe(event) {
                            feed.publish(&change);
                            if let Change::Deleted(name, _) = change {
                                backups::deleted(&backups_ctx, &name);
                                workloads::backup_deleted(&workloads_ctx, &name);
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "ImageBackup watch failed; retrying"),
                }
                futures::future::ready(())
            }
        });

    let addr = grpc_listener.local_addr().map_err(RunError::Listener)?;
    let sessions = AgentSessions::new(
        hub.clone(),
        Arc::new(AgentAuthenticator::new(client.clone(), shared.config.agents.clone())),
    );
    let readers = Arc::new(Readers::new(client.clone(), shared.config.anonymous_reads, &shared.config.agents.audience));
    let jobs_service = Jobs { backups: backup_store.clone(), feed: feed.clone(), agents: hub.clone(), readers };
    let routes = grpc_routes(jobs_service, sessions).await?;
    let server =
        tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(20))).add_routes(routes);
    let stopped = {
        let shutdown = shutdown.clone();
        let hub = hub.clone();
        async move {
            shutdown.await;
            // Long-lived agent sessions would hold a graceful shutdown
            // open forever; ending them sends the agents to reconnect.
            hub.close_sessions();
        }
    };
    let (grpc, certificates) = match shared.config.tls.clone() {
        Some(settings) => {
            let (config, keeper) = tls::serving(client.clone(), settings).await?;
            let incoming = tls_incoming(grpc_listener, config);
            (server.serve_with_incoming_shutdown(incoming, stopped).boxed(), keeper.boxed())
        }
        None => {
            warn!("gRPC is served in plain text: agents' tokens and jobs cross the network readable");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            (server.serve_with_incoming_shutdown(incoming, stopped).boxed(), std::future::pending().boxed())
        }
    };
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

    // Agent reports and freed slots wake exactly the jobs they concern.
    let wakes = UnboundedReceiverStream::new(woken).map(|name| ObjectRef::<ImageBackup>::new(&name));
    let limits = controller::Config::default().concurrency(shared.config.concurrency);
    let backup_controller =
        Controller::for_shared_stream(for_backups, backup_store.clone())
            .with_config(limits.clone())
            .reconcile_on(wakes)
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |backup, ctx| async move {
                    reconciled(&ctx.clone(), &*backup.clone(), backups::reconcile(backup, ctx)).await
                },
                error_policy,
                backups_ctx.clone(),
            )
            .for_each(|result| async move { log_result("ImageBackup", result) });

    // Workloads wake up when one of their ImageBackups finishes.
    let (deployment_watch, deployment_store) = workload_watch::<Deployment>(&client, &workloads_ctx);
    let deployments = Controller::for_stream(deployment_watch, deployment_store)
        .with_config(limits.clone())
        .reconcile_on(UnboundedReceiverStream::new(deployment_wakes))
        .watches_shared_stream(for_deployments, {
            let ctx = workloads_ctx.clone();
            move |backup| workloads::users_of::<Deployment>(&ctx, &backup, "Deployment")
        })
        .graceful_shutdown_on(shutdown.clone());
    let (daemonset_watch, daemonset_store) = workload_watch::<DaemonSet>(&client, &workloads_ctx);
    let daemonsets = Controller::for_stream(daemonset_watch, daemonset_store)
        .with_config(limits)
        .reconcile_on(UnboundedReceiverStream::new(daemonset_wakes))
        .watches_shared_stream(for_daemonsets, {
            let ctx = workloads_ctx.clone();
            move |backup| workloads::users_of::<DaemonSet>(&ctx, &backup, "DaemonSet")
        })
        .graceful_shutdown_on(shutdown.clone());
    let synced = {
        let stores = (backup_store.clone(), deployments.store(), daemonsets.store());
        let (ready, ctx) = (ready.clone(), workloads_ctx.clone());
        async move {
            let (backups, deployments, daemonsets) = stores;
            let _ =
                tokio::join!(backups.wait_until_ready(), deployments.wait_until_ready(), daemonsets.wait_until_ready());
            ctx.mark_synced();
            ready.store(true, Ordering::Release);
            info!("caches synced; ready");
        }
    };
    let deployments = deployments
        .run(
            |deployment, ctx| async move {
                reconciled(&ctx.clone(), &*deployment.clone(), workloads::reconcile_deployment(deployment, ctx)).await
            },
            error_policy,
            workloads_ctx.clone(),
        )
        .for_each(|result| async move { log_result("Deployment", result) });
    let daemonsets = daemonsets
        .run(
            |daemonset, ctx| async move {
                reconciled(&ctx.clone(), &*daemonset.clone(), workloads::reconcile_daemonset(daemonset, ctx)).await
            },
            error_policy,
            workloads_ctx.clone(),
        )
        .for_each(|result| async move { log_result("DaemonSet", result) });

    tokio::select! {
        result = grpc => result.map_err(|error| RunError::Grpc { addr, error })?,
        result = &mut probes => return Err(probe_failure(result)),
        () = async { tokio::join!(backup_controller, deployments, daemonsets, synced); } => {},
        () = backup_watch => {},
        () = expiry => {},
        () = backups::unused::sweep(backups_ctx.clone()) => {},
        () = certificates => {},
        // Another coordinator leads now: this one stops writing at once
        // (and its agents' sessions end with it).
        () = leadership.lost() => {
            ready.store(false, Ordering::Release);
            hub.close_sessions();
            leader::label_role(&client, &namespace, &coordinator_id, false).await;
            return Err(RunError::LostLeadership);
        }
    }
    leader::label_role(&client, &namespace, &coordinator_id, false).await;
    leadership.release().await;
    info!("coordinator stopped");
    Ok(())
}

fn probe_failure(result: Result<Result<(), std::io::Error>, tokio::task::JoinError>) -> RunError {
    match result {
        Ok(Err(e)) => RunError::Probes(e),
        Ok(Ok(())) => RunError::Probes(std::io::Error::other("the probes server stopped")),
        Err(e) => RunError::Probes(std::io::Error::other(e.to_string())),
    }
}

/// A workload kind's watch and its store. Each event also tells the digest
/// cache when a workload was first seen rolled out, and a deleted workload
/// leaves the in-memory indexes.
fn workload_watch<K>(
    client: &Client,
    ctx: &Arc<workloads::Context>,
) -> (impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static, Store<K>)
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource + RollsOut,
    K: Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let ctx = ctx.clone();
    let key = |object: &K| WorkloadKey {
        kind: <K as k8s_openapi::Resource>::KIND,
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
    };
    let mut seen = Seen::new(key);
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(forget_managed_fields)
        .reflect(writer)
        .inspect_ok(move |event| {
            for change in seen.observe(event) {
                match change {
                    Change::Added(object) | Change::Modified(object) => {
                        let generation = object.meta().generation.unwrap_or(0);
                        ctx.digests.observed(key(object), generation, object.rollout_complete());
                    }
                    Change::Deleted(key, _) => workloads::gone(&ctx, &key),
                }
            }
        })
        .touched_objects();
    (stream, store)
}

/// Field ownership is never read here, and on a real API server it is
/// often the largest part of a watched object.
fn forget_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Fails at start, with a message that says what to do, when the CRD is
/// not installed or the coordinator may not read it.
async fn check_crd(client: &Client) -> Result<(), RunError> {
    match Api::<ImageBackup>::all(client.clone()).list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(RunError::CrdMissing),
        Err(e) => Err(RunError::CrdCheck(e)),
    }
}

fn error_policy<K: Resource, C: Deref<Target = Shared>>(object: Arc<K>, error: &Error, ctx: Arc<C>) -> Action
where
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    ctx.metrics.reconcile_failed(&kind);
    let name = object.meta().name.clone().unwrap_or_default();
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let retry_in = ctx.failures.failed(&object_key(&*object), error);
    warn!(%kind, %namespace, %name, %error, ?retry_in, "reconcile failed; retrying");
    Action::requeue(retry_in)
}

/// `Kind/namespace/name` of an object, the key of its failures in a row.
fn object_key<K: Resource>(object: &K) -> String
where
    K::DynamicType: Default,
{
    let meta = object.meta();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    format!("{kind}/{}/{}", meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

/// Runs a reconcile (a panic in it becomes an error); a success ends the
/// object's failures in a row.
async fn reconciled<K: Resource>(
    ctx: &Shared,
    object: &K,
    reconcile: impl std::future::Future<Output = Result<Action, Error>>,
) -> Result<Action, Error>
where
    K::DynamicType: Default,
{
    let result = contained(object, reconcile).await;
    if result.is_ok() {
        ctx.failures.succeeded(&object_key(object));
    }
    result
}

fn log_result<T>(kind: &str, result: Result<T, controller::Error<Error, watcher::Error>>) {
    match result {
        Ok(_) => {}
        // Reported by the error policy already.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        // Deleted between the event and the reconcile.
        Err(controller::Error::ObjectNotFound(object)) => debug!(kind, %object, "gone before its reconcile"),
        // A watch that fails (a 403, a CRD removed) stalls everything.
        Err(e) => warn!(kind, error = %e, "controller stream failed"),
    }
}
