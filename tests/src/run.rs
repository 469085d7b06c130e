//! The product's own processes in a test: the coordinator (in-process, on
//! loopback ports, over TLS with the CA it makes) and agents on harness
//! containerds, each with the pod, the bound token and the trusted CA it
//! would have in a cluster.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use image_backup_agent::{
    containerd::{ContainerdStore, ReadPath},
    daemon::{Agent, DaemonConfig},
    guard::Guard,
    link::{CoordinatorLink, LinkTls},
    push::{PushOptions, Pusher},
};
use image_backup_coordinator::{config::CoordinatorConfig, run::run};
use image_backup_oci::{BackupTarget, registry::RegistryConfig};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::{
    Containerd,
    cluster::eventually,
    containerd::NAMESPACE,
    identity::{AGENT_NAMESPACE, agent_token, write_token},
};

/// A coordinator a test started, and what clients need to reach it.
#[derive(Clone)]
pub struct Coordinator {
    pub grpc: SocketAddr,
    pub metrics_url: String,
    admin: Client,
    /// The CA its certificate chains to, as agents get it; `None` in plain
    /// text.
    ca: Option<String>,
    /// Where backups go, as agents are configured too.
    backup: BackupTarget,
    /// What agents read the API with (their pods, jobs' pull secrets).
    agents_client: Client,
    /// Stops it cleanly (see [`Coordinator::stop`]); `None` for a replica.
    stop: Option<Arc<tokio::sync::Notify>>,
    task: Option<Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>>,
    /// Completes its rollouts where no real controller does.
    _rollouts: Option<Arc<crate::rollouts::RolloutController>>,
}

/// Starts the coordinator with `client` (on a real server, its own
/// ServiceAccount's); `admin` makes what agents need. It runs until the
/// test ends.
pub async fn start_coordinator(admin: &Client, client: &Client, config: CoordinatorConfig) -> Coordinator {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("gRPC port");
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("metrics port");
    let (addr, metrics_url) = addresses(&grpc, &metrics);
    let (tls, backup) = (config.tls.clone(), config.backup.clone());
    let counters = image_backup_coordinator::metrics::Metrics::new();
    let stop = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let stop = stop.clone();
        async move { stop.notified().await }
    };
    let coordinator = run(client.clone(), config, grpc, metrics, "coordinator-0".into(), counters, shutdown);
    let task = tokio::spawn(async move {
        // A test that waits on a coordinator that has stopped says why.
        if let Err(e) = coordinator.await {
            eprintln!("the coordinator stopped: {e:?}");
        }
    });
    let ca = match tls {
        Some(tls) => Some(published_ca(admin, &tls.namespace, &tls.ca_config_map).await),
        None => None,
    };
    let task = Some(Arc::new(tokio::sync::Mutex::new(Some(task))));
    let rollouts = crate::rollouts::start(admin).await.map(Arc::new);
    Coordinator {
        grpc: addr,
        metrics_url,
        admin: admin.clone(),
        ca,
        backup,
        agents_client: admin.clone(),
        stop: Some(stop),
        task,
        _rollouts: rollouts,
    }
}

fn addresses(grpc: &tokio::net::TcpListener, metrics: &tokio::net::TcpListener) -> (SocketAddr, String) {
    let addr = grpc.local_addr().expect("gRPC address");
    (addr, format!("http://{}/metrics", metrics.local_addr().expect("metrics address")))
}

/// A coordinator in a runtime of its own, which [`Replica::kill`] stops at
/// once, as a crashed pod: no Lease released, no session ended cleanly.
pub struct Replica {
    pub coordinator: Coordinator,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Starts a coordinator replica named `id` (its Lease identity). It does
/// not wait for the CA: a follower publishes nothing until it leads.
pub async fn start_replica(admin: &Client, client: &Client, config: CoordinatorConfig, id: &str) -> Replica {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the replica");
    let (grpc, metrics) = (loopback(), loopback());
    let (addr, metrics_url) =
        (grpc.local_addr().expect("gRPC address"), metrics.local_addr().expect("metrics address"));
    let (client, id, backup) = (client.clone(), id.to_string(), config.backup.clone());
    runtime.spawn(async move {
        let grpc = tokio::net::TcpListener::from_std(grpc).expect("gRPC listener");
        let metrics = tokio::net::TcpListener::from_std(metrics).expect("metrics listener");
        let counters = image_backup_coordinator::metrics::Metrics::new();
        if let Err(e) = run(client, config, grpc, metrics, id.clone(), counters, std::future::pending()).await {
            eprintln!("coordinator {id} stopped: {e:?}");
        }
    });
    let coordinator = Coordinator {
        grpc: addr,
        metrics_url: format!("http://{metrics_url}/metrics"),
        admin: admin.clone(),
        ca: None,
        backup,
        agents_client: admin.clone(),
        stop: None,
        task: None,
        _rollouts: crate::rollouts::start(admin).await.map(Arc::new),
    };
    Replica { coordinator, runtime: Some(runtime) }
}

/// A loopback listener for a runtime to take over.
fn loopback() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.set_nonblocking(true).expect("non-blocking");
    listener
}

// === impl Replica ===

impl Replica {
    /// Whether its /readyz says ready (leading, caches synced).
    pub async fn ready(&self) -> bool {
        let url = self.coordinator.metrics_url.replace("/metrics", "/readyz");
        reqwest::get(url).await.is_ok_and(|r| r.status().is_success())
    }

    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The CA the coordinator publishes for agents, once it has.
pub async fn published_ca(admin: &Client, namespace: &str, name: &str) -> String {
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), namespace);
    let ca = || async {
        let found = config_maps.get_opt(name).await.map_err(|e| e.to_string())?;
        found.and_then(|c| c.data).and_then(|d| d.get("ca.crt").cloned()).ok_or_else(|| "not yet".to_string())
    };
    eventually("the coordinator publishes its CA", Duration::from_secs(30), || async { ca().await.map(|_| ()) }).await;
    ca().await.expect("published above")
}

// === impl Coordinator ===

impl Coordinator {
    /// The URL clients dial.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// The CA clients trust, in PEM.
    pub fn ca(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    /// Its agents read the API with `client` (by default the admin's).
    pub fn with_agents_client(mut self, client: Client) -> Self {
        self.agents_client = client;
        self
    }

    /// Stops it as a SIGTERM would (the Lease released), and waits until it
    /// has.
    pub async fn stop(&self) {
        if let (Some(stop), Some(task)) = (&self.stop, &self.task) {
            stop.notify_one();
            if let Some(task) = task.lock().await.take() {
                let _ = task.await;
            }
        }
    }

    /// This coordinator as reached at `grpc` (a Service in front of it),
    /// trusting `ca`.
    pub fn behind(&self, grpc: SocketAddr, ca: Option<String>) -> Coordinator {
        Coordinator { grpc, ca, ..self.clone() }
    }

    /// A channel to the gRPC port, trusting its CA.
    pub async fn channel(&self) -> Channel {
        let mut endpoint = Endpoint::from_shared(self.url()).expect("a URL");
        if let Some(ca) = &self.ca {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).expect("TLS settings");
        }
        endpoint.connect().await.expect("connect to the coordinator")
    }

    /// How the agent of `node` reaches this coordinator: the token of its
    /// own pod on `node`, and the published CA.
    pub async fn link(&self, node: &str) -> AgentLink {
        let token = agent_token(&self.admin, node).await;
        self.link_with(node, &token)
    }

    /// As [`Coordinator::link`], with a given token.
    pub fn link_with(&self, node: &str, token: &str) -> AgentLink {
        let files = Arc::new(tempfile::tempdir().expect("a directory for the agent's files"));
        let token_file = write_token(files.path(), node, token);
        let tls = self.ca.as_ref().map(|ca| {
            let ca_file: PathBuf = files.path().join("ca.crt");
            std::fs::write(&ca_file, ca).expect("write the CA");
            LinkTls { ca_file, server_name: None }
        });
        let link = CoordinatorLink::new(self.url(), tls, Some(token_file)).expect("a coordinator link");
        let guard = Guard::new(self.backup.clone(), node, Some(self.agents_client.clone()));
        AgentLink { link, files, guard }
    }
}

/// What an agent gets from its cluster: the link to the coordinator, the
/// files it reads (its token, the CA), which last as long as the agent, and
/// its guard (the backup location, the API to see its node's pods).
pub struct AgentLink {
    pub link: CoordinatorLink,
    pub files: Arc<tempfile::TempDir>,
    pub guard: Guard,
}

/// Starts an agent daemon for `node` on a harness containerd, reading jobs'
/// the API as one in the cluster does with its own account (its node's
/// pods); it runs until the returned task is aborted.
pub async fn start_agent(
    containerd: &Containerd,
    node: &str,
    coordinator: &Coordinator,
    registry: RegistryConfig,
) -> tokio::task::JoinHandle<()> {
    let link = coordinator.link(node).await;
    start_agent_on(&containerd.socket(), NAMESPACE, node, link, registry, 2).await
}

/// Starts an agent daemon for `node` on any containerd (a real node's).
pub async fn start_agent_on(
    socket: &std::path::Path,
    namespace: &str,
    node: &str,
    link: AgentLink,
    registry: RegistryConfig,
    max_jobs: u32,
) -> tokio::task::JoinHandle<()> {
    let AgentLink { link, files, guard } = link;
    let store = ContainerdStore::connect(socket, namespace)
        .await
        .expect("connect to containerd")
        .with_read_path(ReadPath::Auto)
        .await;
    let agent = Agent::new(
        DaemonConfig {
            coordinator: link,
            node_name: node.into(),
            agent_id: format!("agent-{node}"),
            max_jobs,
            reconnect_max: Duration::from_secs(1),
            progress_interval: Duration::from_millis(200),
            job_timeout: Duration::from_secs(600),
        },
        Pusher::new(store, registry, PushOptions::default()),
        guard,
    );
    tokio::spawn(async move {
        let _files = files;
        agent.run(std::future::pending()).await;
    })
}

/// A token of someone allowed to read jobs: a ServiceAccount bound to the
/// `image-backup-job-reader` ClusterRole of deploy/rbac.yaml, made for the
/// coordinator's audience, as README tells people to set up for grpcurl.
pub async fn reader_token(admin: &Client) -> String {
    reader_token_for(admin, &[image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE]).await
}

/// As [`reader_token`], for `audiences` (none: the API server's own).
pub async fn reader_token_for(admin: &Client, audiences: &[&str]) -> String {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    };
    use kube::api::{Patch, PatchParams, PostParams};
    let role = serde_yaml::Deserializer::from_str(include_str!("../../deploy/rbac.yaml"))
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"] == "ClusterRole" && doc["metadata"]["name"] == "image-backup-job-reader")
        .expect("deploy/rbac.yaml has the job reader ClusterRole");
    let apply = PatchParams::apply("image-backup-tests").force();
    Api::<ClusterRole>::all(admin.clone())
        .patch("image-backup-job-reader", &apply, &Patch::Apply(&role))
        .await
        .expect("apply the job reader ClusterRole");
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "image-backup-job-reader-test"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "image-backup-job-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "job-reader", "namespace": AGENT_NAMESPACE}],
    });
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch("image-backup-job-reader-test", &apply, &Patch::Apply(&binding))
        .await
        .expect("bind the job reader ClusterRole");
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
    crate::cluster::create(
        &accounts,
        serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "job-reader"}}),
    )
    .await;
    let audiences = Some(audiences.iter().map(|a| a.to_string()).collect()).filter(|a: &Vec<String>| !a.is_empty());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), audiences, ..TokenRequestSpec::default() }),
        ..TokenRequest::default()
    };
    accounts
        .create_token_request("job-reader", &PostParams::default(), &request)
        .await
        .expect("a token for the job reader")
        .status
        .and_then(|status| status.token)
        .expect("TokenRequest answers with a token")
}

/// `request` with `token` as its bearer.
pub fn with_token<T>(request: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    let value = format!("Bearer {token}").parse().expect("a token is ASCII");
    request.metadata_mut().insert("authorization", value);
    request
}
