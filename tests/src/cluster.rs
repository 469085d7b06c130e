//! A cluster for system tests: the API server (the emulator, or a real one
//! from IMAGE_BACKUP_TEST_KUBECONFIG), the ImageBackup CRD, and what a
//! kubelet and the workload controllers would write (Pods with the digests
//! they run, rolled-out workload statuses), since neither runs here; plus
//! agents on harness containerds.

use std::time::Duration;

use apiserver_emulator::ApiServer;
use image_backup_coordinator::{
    config::CoordinatorConfig,
    trust::{
        agents::{AgentAccount, DEFAULT_AUDIENCE},
        tls::{TlsSettings, TlsSource},
    },
};
use image_backup_core::template::ORIGINAL_IMAGES_ANNOTATION;
use image_backup_crds::ImageBackup;
use image_backup_oci::registry::RegistryConfig;
use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet},
        core::v1::{Namespace, Pod, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// Registers the ImageBackup CRD and the namespaces, and waits until the
/// custom resource is served.
pub async fn prepare(client: &Client, namespaces: &[&str]) {
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&image_backup_crds::crd_yaml().expect("CRD YAML")).expect("CRD parses");
    // Applied, not created: a server kept from an earlier run gets this
    // build's schema (it prunes the status fields its schema lacks).
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd.metadata.name.clone().expect("CRD name");
    let params = PatchParams::apply("image-backup-tests").force();
    crds.patch(&name, &params, &Patch::Apply(&crd)).await.expect("apply the ImageBackup CRD");
    let backups: Api<ImageBackup> = Api::all(client.clone());
    eventually("CRD served", Duration::from_secs(10), || async {
        backups.list(&Default::default()).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    // The product's own namespace always: the coordinator keeps its CA
    // there, and agents' pods run there.
    let own = ["image-backup"];
    for ns in namespaces.iter().chain(own.iter().filter(|own| !namespaces.contains(own))) {
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
        )
        .await;
        // Pods are refused without it, and only a controller-manager makes it.
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), ns),
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } }),
        )
        .await;
    }
}

/// The coordinator's settings in tests: backups under `backup/` of a
/// plain-HTTP registry, quick retries.
pub fn coordinator_config(backup_host: &str) -> CoordinatorConfig {
    use image_backup_coordinator::workloads::workload::Exclusions;
    CoordinatorConfig {
        backup: image_backup_oci::BackupTarget { registry: backup_host.into(), prefix: "backup".into() },
        registry: RegistryConfig { insecure_hosts: vec![backup_host.into()], ..RegistryConfig::default() },
        exclusions: Exclusions::new(Vec::new(), "image-backup"),
        namespace: "image-backup".into(),
        report_only: false,
        max_rollouts: 5,
        rollout_timeout: Duration::from_secs(300),
        backup_pull_secret: None,
        copy_pull_secret: false,
        read_pull_secrets: true,
        refuse_private_images: false,
        rewrite_managed: false,
        managed_markers: Vec::new(),
        max_attempts: 3,
        retry_backoff: Duration::from_millis(500),
        max_retry_backoff: Duration::from_secs(5),
        heartbeat_deadline: Duration::from_secs(10),
        reduce_after: Duration::from_secs(3),
        require_complete_index: false,
        verify_every: Duration::from_secs(3600),
        unused_grace: Duration::ZERO,
        prune: false,
        prune_quarantine: Duration::from_secs(2),
        concurrency: 8,
        agents: AgentAccount {
            namespace: "image-backup".into(),
            service_account: crate::identity::AGENT_ACCOUNT.into(),
            audience: DEFAULT_AUDIENCE.into(),
        },
        // Over TLS, as installed: a CA of its own, a certificate for the
        // address the tests dial.
        tls: Some(TlsSettings {
            source: TlsSource::OwnCa { ca_secret: "image-backup-ca".into(), names: vec!["127.0.0.1".into()] },
            ca_config_map: "image-backup-ca".into(),
            namespace: "image-backup".into(),
        }),
        anonymous_reads: false,
        lease: image_backup_coordinator::leader::LeaseSettings {
            name: "image-backup-coordinator".into(),
            namespace: "image-backup".into(),
            duration: Duration::from_secs(4),
        },
    }
}

/// The value of one series (`name{labels}`) on a Prometheus endpoint.
pub async fn metric(url: &str, series: &str) -> Result<f64, String> {
    let text = reqwest::get(url).await.map_err(|e| e.to_string())?.text().await.map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| format!("no {series} in\n{text}"))
}

/// Registry settings for an agent or coordinator that gives up on
/// `host` after `give_up_after` of quick retries.
pub fn quick_retries(host: &str, give_up_after: Duration) -> RegistryConfig {
    RegistryConfig {
        insecure_hosts: vec![host.into()],
        retry: image_backup_oci::registry::RetryPolicy {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            max_elapsed: give_up_after,
        },
        ..RegistryConfig::default()
    }
}

/// Which API server a system test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiServerKind {
    /// The in-process emulator, one per test.
    Emulator,
    /// A real kube-apiserver without controllers (as envtest runs it), from
    /// `IMAGE_BACKUP_TEST_KUBECONFIG`; shared, so its tests take turns.
    Real,
}

/// What keeps a test's API server: the emulator, or the turn on the real one.
pub enum ClusterGuard {
    Emulator(ApiServer),
    Real(tokio::sync::MutexGuard<'static, ()>),
}

/// One test at a time on the shared real API server.
static REAL_SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The API server of `kind`; `None` for a real one when none is given (the
/// test is then skipped). A real server is wiped of what earlier tests left
/// (workloads, pods, events, ImageBackups), so each test starts as on a
/// fresh emulator.
pub async fn cluster(kind: ApiServerKind) -> Option<(ClusterGuard, Client)> {
    match kind {
        ApiServerKind::Emulator => {
            let server = ApiServer::start().await.expect("start the API server emulator");
            let client = server.client().await.expect("a client for the emulator");
            Some((ClusterGuard::Emulator(server), client))
        }
        ApiServerKind::Real => {
            let Some(path) = std::env::var_os("IMAGE_BACKUP_TEST_KUBECONFIG") else {
                eprintln!("skipped: IMAGE_BACKUP_TEST_KUBECONFIG names no real API server");
                return None;
            };
            let turn = REAL_SERVER.lock().await;
            let config = crate::kube_config(path).await.expect("read IMAGE_BACKUP_TEST_KUBECONFIG");
            let client = Client::try_from(config).expect("a client for the real API server");
            wipe(&client).await;
            Some((ClusterGuard::Real(turn), client))
        }
    }
}

/// The client the coordinator runs with. On a real API server: the
/// coordinator's ServiceAccount with exactly the RBAC of `deploy/rbac.yaml`,
/// so a verb the coordinator uses but the install does not grant fails the
/// test (403). The emulator has no RBAC: the admin client.
pub async fn coordinator_client(kind: ApiServerKind, admin: &Client) -> Client {
    if kind == ApiServerKind::Emulator {
        return admin.clone();
    }
    let client = account_client(admin, "image-backup-coordinator").await;
    // RBAC reaches the API server's authorizer through its own watch: wait
    // until the rules hold, or the coordinator's start-up check is refused.
    let backups: Api<ImageBackup> = Api::all(client.clone());
    let deployments: Api<Deployment> = Api::all(client.clone());
    eventually("the coordinator's RBAC takes effect", Duration::from_secs(30), || async {
        backups.list(&Default::default()).await.map_err(|e| e.to_string())?;
        deployments.list(&Default::default()).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    client
}

/// The client agents run with: on a real API server their ServiceAccount
/// with the RBAC of `deploy/rbac.yaml` (a verb an agent uses but the
/// install does not grant fails the test), on the emulator the admin.
pub async fn agent_client(kind: ApiServerKind, admin: &Client) -> Client {
    if kind == ApiServerKind::Emulator {
        return admin.clone();
    }
    let client = account_client(admin, crate::identity::AGENT_ACCOUNT).await;
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = kube::api::ListParams::default().fields("spec.nodeName=node-a");
    eventually("the agent's RBAC takes effect", Duration::from_secs(30), || async {
        pods.list(&on_node).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    client
}

/// A client of the ServiceAccount `account` of the install, with the RBAC
/// of `deploy/rbac.yaml` applied, on the real API server.
/// The coordinator's client (as [`coordinator_client`]) reaching the API
/// server of `guard` through a [`TcpProxy`] the test can stall.
pub async fn coordinator_client_through(
    kind: ApiServerKind,
    admin: &Client,
    guard: &ClusterGuard,
) -> (Client, crate::tcp_proxy::TcpProxy) {
    let mut config = match guard {
        ClusterGuard::Emulator(server) => {
            let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("a kubeconfig");
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("its settings")
        }
        ClusterGuard::Real(_) => {
            coordinator_client(kind, admin).await;
            account_config(admin, "image-backup-coordinator").await
        }
    };
    let host = config.cluster_url.host().expect("the API server's host");
    let port = config.cluster_url.port_u16().expect("the API server's port");
    let upstream: std::net::SocketAddr = format!("{host}:{port}").parse().expect("an IP address");
    let proxy = crate::tcp_proxy::TcpProxy::start(upstream).await.expect("a proxy in front of the API server");
    let scheme = config.cluster_url.scheme_str().unwrap_or("http").to_string();
    config.cluster_url = format!("{scheme}://{}", proxy.addr).parse().expect("the proxy's URL");
    (Client::try_from(config).expect("a client through the proxy"), proxy)
}

async fn account_client(admin: &Client, account: &str) -> Client {
    Client::try_from(account_config(admin, account).await).expect("a client with the ServiceAccount's token")
}

/// Settings of a client of the real API server as `account` of the
/// install's namespace, with the install's RBAC applied.
async fn account_config(admin: &Client, account: &str) -> kube::Config {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    use kube::api::PostParams;
    // The install's RBAC, and the options tests of pull secrets need.
    let rbac = [
        include_str!("../../deploy/rbac.yaml"),
        include_str!("../../deploy/options/copy-pull-secret.yaml"),
        include_str!("../../deploy/options/read-pull-secrets.yaml"),
    ];
    let mut named = Vec::new();
    for doc in rbac.into_iter().flat_map(serde_yaml::Deserializer::from_str) {
        let object: Value = serde::Deserialize::deserialize(doc).expect("deploy/rbac.yaml parses");
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        named.push(format!("{}/{name}", object["kind"].as_str().unwrap_or_default()));
        match object["kind"].as_str() {
            Some("ServiceAccount") => {
                create(&Api::<ServiceAccount>::namespaced(admin.clone(), "image-backup"), object).await;
            }
            // Applied in place, so the test holds the checked-in rules and
            // no earlier grant disappears while a coordinator runs.
            Some("ClusterRole") => apply(&Api::<ClusterRole>::all(admin.clone()), &name, object).await,
            Some("ClusterRoleBinding") => apply(&Api::<ClusterRoleBinding>::all(admin.clone()), &name, object).await,
            Some("Role") => apply(&Api::<Role>::namespaced(admin.clone(), "image-backup"), &name, object).await,
            Some("RoleBinding") => {
                apply(&Api::<RoleBinding>::namespaced(admin.clone(), "image-backup"), &name, object).await;
            }
            _ => {}
        }
    }
    // Grants an earlier version of deploy/ made and this one no longer
    // does go too, as `kubectl apply --prune` would take them.
    let ours = kube::api::ListParams::default().labels("app.kubernetes.io/part-of=image-backup");
    let gone = |kind: &str, name: Option<String>| {
        let name = name.unwrap_or_default();
        (!named.contains(&format!("{kind}/{name}"))).then_some(name)
    };
    let roles: Api<Role> = Api::namespaced(admin.clone(), "image-backup");
    for name in roles.list(&ours).await.unwrap().items.into_iter().filter_map(|r| gone("Role", r.metadata.name)) {
        roles.delete(&name, &Default::default()).await.unwrap();
    }
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), "image-backup");
    for name in
        bindings.list(&ours).await.unwrap().items.into_iter().filter_map(|b| gone("RoleBinding", b.metadata.name))
    {
        bindings.delete(&name, &Default::default()).await.unwrap();
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), "image-backup")
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for the ServiceAccount {account}: {e}"))
        .status
        .and_then(|status| status.token)
        .expect("TokenRequest answers with a token");
    let path = std::env::var_os("IMAGE_BACKUP_TEST_KUBECONFIG").expect("a real API server");
    let mut config = crate::kube_config(path).await.expect("read IMAGE_BACKUP_TEST_KUBECONFIG");
    config.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    config
}

async fn apply<K>(api: &Api<K>, name: &str, object: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply("image-backup-tests").force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// Deletes what tests create, in every namespace (a throwaway API server
/// only). Pods go at once: with no
/// kubelet, a graceful delete would leave them terminating for good.
pub async fn wipe(client: &Client) {
    use kube::api::{DeleteParams, ListParams};
    let all = ListParams::default();
    let now = DeleteParams::default().grace_period(0);
    // The CA an earlier coordinator published may not be the next one's
    // (a test serves a TLS Secret of its own): each coordinator publishes
    // its CA again when it starts.
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "image-backup");
    let _ = config_maps.delete("image-backup-ca", &kube::api::DeleteParams::default()).await;
    // A replica of an earlier test that held the Lease is gone for good.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "image-backup");
    leases.delete_collection(&now, &all).await.expect("delete Leases");
    let namespaces = Api::<Namespace>::all(client.clone()).list(&all).await.expect("list namespaces");
    for ns in namespaces.items.iter().filter_map(|n| n.metadata.name.as_deref()) {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        deployments.delete_collection(&now, &all).await.expect("delete Deployments");
        let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        daemonsets.delete_collection(&now, &all).await.expect("delete DaemonSets");
        // No garbage collector runs on a server without controllers.
        let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
        replica_sets.delete_collection(&now, &all).await.expect("delete ReplicaSets");
        let revisions: Api<ControllerRevision> = Api::namespaced(client.clone(), ns);
        revisions.delete_collection(&now, &all).await.expect("delete ControllerRevisions");
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.delete_collection(&now, &all).await.expect("delete Pods");
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
        events.delete_collection(&now, &all).await.expect("delete Events");
    }
    // Last: the previous test's coordinator may live a moment longer than
    // its turn, and it makes an ImageBackup again for a workload still
    // pinned to it.
    let backups: Api<ImageBackup> = Api::all(client.clone());
    if backups.list_metadata(&ListParams::default().limit(1)).await.is_ok() {
        backups.delete_collection(&now, &all).await.expect("delete ImageBackups");
    }
}

/// Declares a system test twice: on the emulator, and on the real API
/// server when `IMAGE_BACKUP_TEST_KUBECONFIG` gives one. `$scenario` is an
/// `async fn(ApiServerKind)`.
#[macro_export]
macro_rules! on_both_api_servers {
    ($scenario:ident: $emulator:ident, $real:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $emulator() {
            $scenario($crate::cluster::ApiServerKind::Emulator).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $real() {
            $scenario($crate::cluster::ApiServerKind::Real).await
        }
    };
}

pub async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => created,
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(&object.meta().name.clone().unwrap()).await.unwrap(),
        Err(e) => panic!("create {:?}: {e}", object.meta().name),
    }
}

pub struct Workloads {
    pub client: Client,
}

/// A test workload as the owner of its revisions.
#[derive(Clone, Copy)]
struct Owner<'a> {
    kind: &'a str,
    ns: &'a str,
    name: &'a str,
    uid: &'a str,
}

fn owner_reference(kind: &str, name: &str, uid: &str) -> Value {
    json!({ "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": true })
}

fn spec_of(list: &[&Spec<'_>]) -> Vec<Value> {
    list.iter().map(|c| json!({ "name": c.0, "image": c.1 })).collect()
}

/// A container of a test workload: name, image, the digest its pods run,
/// and whether it is an init container.
pub type Spec<'a> = (&'a str, &'a str, &'a str, bool);

/// Where a test workload runs and how far its rollout is.
pub struct Placement<'a> {
    pub nodes: &'a [&'a str],
    pub ready: bool,
}

impl Workloads {
    /// A workload whose pods run `containers` ([name, image, digest]) on
    /// `nodes`, as revision 2 of it; `ready` writes the rolled-out status a
    /// controller would.
    pub async fn deploy(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        labels: Value,
        containers: &[Spec<'_>],
        at: Placement<'_>,
    ) {
        let Placement { nodes, ready } = at;
        let (init, app): (Vec<_>, Vec<_>) = containers.iter().partition(|c| c.3);
        let mut pod_spec = json!({ "containers": spec_of(&app) });
        if !init.is_empty() {
            pod_spec["initContainers"] = json!(spec_of(&init));
        }
        let object = json!({
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": {
                "name": name, "namespace": ns, "labels": labels,
                "annotations": { "deployment.kubernetes.io/revision": "2" },
            },
            "spec": {
                "replicas": if kind == "Deployment" { json!(nodes.len()) } else { Value::Null },
                "selector": { "matchLabels": { "app": name } },
                "template": { "metadata": { "labels": { "app": name } }, "spec": pod_spec },
            },
        });
        let n = nodes.len();
        let (generation, uid) = match kind {
            "Deployment" => {
                let created = create(&Api::<Deployment>::namespaced(self.client.clone(), ns), object).await;
                (created.metadata.generation.unwrap_or(1), created.metadata.uid.unwrap_or_default())
            }
            _ => {
                let created = create(&Api::<DaemonSet>::namespaced(self.client.clone(), ns), object).await;
                (created.metadata.generation.unwrap_or(1), created.metadata.uid.unwrap_or_default())
            }
        };
        let workload = Owner { kind, ns, name, uid: &uid };
        self.revision(&workload, 2, containers, nodes, false).await;
        if !ready {
            return;
        }
        let patch = |status: Value| Patch::Merge(json!({ "status": status }));
        let params = PatchParams::default();
        if kind == "Deployment" {
            let status = json!({ "observedGeneration": generation, "replicas": n, "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n });
            Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch_status(name, &params, &patch(status))
                .await
                .unwrap();
        } else {
            let status = json!({ "observedGeneration": generation, "desiredNumberScheduled": n, "currentNumberScheduled": n, "numberMisscheduled": 0, "numberReady": n, "numberAvailable": n, "updatedNumberScheduled": n });
            Api::<DaemonSet>::namespaced(self.client.clone(), ns)
                .patch_status(name, &params, &patch(status))
                .await
                .unwrap();
        }
    }

    /// Revision 1 of a deployed workload, and a pod of it on each of
    /// `nodes` still running `containers` (terminating ones, if asked), as
    /// pods of an old ReplicaSet linger after a rollout.
    pub async fn old_revision(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        containers: &[Spec<'_>],
        nodes: &[&str],
        terminating: bool,
    ) {
        let uid = match kind {
            "Deployment" => {
                Api::<Deployment>::namespaced(self.client.clone(), ns).get(name).await.unwrap().metadata.uid
            }
            _ => Api::<DaemonSet>::namespaced(self.client.clone(), ns).get(name).await.unwrap().metadata.uid,
        };
        let uid = uid.unwrap_or_default();
        self.revision(&Owner { kind, ns, name, uid: &uid }, 1, containers, nodes, terminating).await;
    }

    /// What the workload controller and the kubelets write for revision
    /// `number`: a ReplicaSet or ControllerRevision labelled with its hash,
    /// and a running pod per node carrying that label.
    async fn revision(
        &self,
        owner: &Owner<'_>,
        number: u32,
        containers: &[Spec<'_>],
        nodes: &[&str],
        terminating: bool,
    ) {
        let Owner { kind, ns, name, uid } = *owner;
        let hash = format!("rev{number}");
        let (key, revision) = if kind == "Deployment" {
            (
                "pod-template-hash",
                json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {
                        "name": format!("{name}-{hash}"), "namespace": ns,
                        "labels": { "app": name, "pod-template-hash": hash },
                        "annotations": { "deployment.kubernetes.io/revision": number.to_string() },
                        "ownerReferences": [owner_reference(kind, name, uid)],
                    },
                    "spec": {
                        "replicas": 0,
                        "selector": { "matchLabels": { "app": name, "pod-template-hash": hash } },
                        "template": {
                            "metadata": { "labels": { "app": name, "pod-template-hash": hash } },
                            "spec": { "containers": spec_of(&containers.iter().filter(|c| !c.3).collect::<Vec<_>>()) },
                        },
                    },
                }),
            )
        } else {
            (
                "controller-revision-hash",
                json!({
                    "apiVersion": "apps/v1", "kind": "ControllerRevision",
                    "metadata": {
                        "name": format!("{name}-{hash}"), "namespace": ns,
                        "labels": { "app": name, "controller-revision-hash": hash },
                        "ownerReferences": [owner_reference(kind, name, uid)],
                    },
                    "data": {},
                    "revision": number,
                }),
            )
        };
        if kind == "Deployment" {
            create(&Api::<ReplicaSet>::namespaced(self.client.clone(), ns), revision).await;
        } else {
            create(&Api::<ControllerRevision>::namespaced(self.client.clone(), ns), revision).await;
        }
        let (init, app): (Vec<_>, Vec<_>) = containers.iter().partition(|c| c.3);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        for (i, node) in nodes.iter().enumerate() {
            let pod_name = format!("{name}-{hash}-{i}");
            create(
                &pods,
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": pod_name, "namespace": ns, "labels": { "app": name, key: hash } },
                    "spec": { "nodeName": node, "containers": spec_of(&app) },
                }),
            )
            .await;
            let statuses = |list: &[&Spec<'_>]| {
                list.iter()
                    .map(|c| {
                        let repo = c.1.rsplit_once(':').map_or(c.1, |(r, _)| r);
                        json!({ "name": c.0, "image": c.1, "imageID": format!("{repo}@{}", c.2), "ready": true, "restartCount": 0 })
                    })
                    .collect::<Vec<_>>()
            };
            let status = json!({ "status": { "phase": "Running", "containerStatuses": statuses(&app), "initContainerStatuses": statuses(&init) } });
            pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
            if terminating {
                // Bound to a node, a deleted pod stays, terminating, until
                // its kubelet confirms; none does here.
                let params = kube::api::DeleteParams { grace_period_seconds: Some(300), ..Default::default() };
                pods.delete(&pod_name, &params).await.unwrap();
            }
        }
    }

    pub async fn images(&self, kind: &str, ns: &str, name: &str) -> (Vec<String>, Option<String>) {
        let value: Value = match kind {
            "Deployment" => {
                serde_json::to_value(Api::<Deployment>::namespaced(self.client.clone(), ns).get(name).await.unwrap())
                    .unwrap()
            }
            _ => serde_json::to_value(Api::<DaemonSet>::namespaced(self.client.clone(), ns).get(name).await.unwrap())
                .unwrap(),
        };
        let spec = &value["spec"]["template"]["spec"];
        let images = ["initContainers", "containers"]
            .iter()
            .flat_map(|list| spec[list].as_array().cloned().unwrap_or_default())
            .map(|c| c["image"].as_str().unwrap_or_default().to_string())
            .collect();
        let annotation = value["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].as_str().map(str::to_string);
        (images, annotation)
    }
}

pub async fn eventually<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    if let Err(why) = within(timeout, check).await {
        panic!("{what}: still not true after {timeout:?}: {why}")
    }
}

/// Waits until `check` holds, or says why it did not within `timeout`.
pub async fn within<F, Fut>(timeout: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(why) if tokio::time::Instant::now() > deadline => return Err(why),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
