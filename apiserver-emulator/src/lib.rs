//! An in-process Kubernetes API server emulator for tests.
//!
//! It speaks real HTTP/1.1 on `127.0.0.1:<random port>` to a real
//! `kube::Client`, and behaves like kube-apiserver v1.26 wherever a
//! controller depends on it, as recorded from a real one in `transcripts/`
//! (the replay tests in `tests/replay.rs` hold it to them):
//!
//! - one store for every type, a global resourceVersion (as etcd's revision),
//!   uid, creationTimestamp, generation rules per type, the defaults of
//!   Deployments, DaemonSets and Pods;
//! - admission before validation: a namespace must exist, and a Pod's
//!   ServiceAccount (`default` unless named) too, else `403 Forbidden` as
//!   from a real server without the controller-manager that makes `default`;
//! - server-side apply with field ownership (see below for its limits);
//! - GET, LIST (label/field selectors, limit/continue over a consistent
//!   snapshot, resourceVersion / resourceVersionMatch), CREATE (generateName),
//!   PUT (optimistic concurrency), DELETE (finalizers, preconditions,
//!   propagationPolicy=Foreground, Pod grace), DELETE of a collection,
//!   `/status` subresources, merge / JSON / strategic merge patches;
//! - WATCH with resourceVersion replay from a bounded history per type,
//!   synthetic initial ADDED events, selector transitions, bookmarks, and
//!   `410 Expired` once the history no longer holds the requested version;
//! - CRDs registering their types (structural schema: pruning with warnings,
//!   types, required, minimum, enum), TokenRequest / TokenReview, Leases with
//!   MicroTime, core and events.k8s.io Events sharing one storage;
//! - discovery (`/api`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`, `/version`).
//!
//! Using it:
//!
//! ```ignore
//! let server = ApiServer::start().await?;
//! let client: kube::Client = server.client().await?;
//! // ... or hand `server.kubeconfig_yaml()` to a process under test.
//! ```
//!
//! Tests meant to run against a real API server too (the image-backup-tests
//! harness picks one from `IMAGE_BACKUP_TEST_KUBECONFIG`) should only use the `kube::Client`;
//! what only the emulator offers is [`Options`], [`ApiServer::compact`],
//! [`ApiServer::restart_watch_cache`] and [`ApiServer::issue_token`] (on a
//! real server, tokens come from the TokenRequest API, which the emulator
//! serves as well).
//!
//! Known differences from the real server:
//! - server-side apply keeps field ownership per manager (conflicts with
//!   `FieldManagerConflict` causes, `force`, removal of fields a manager
//!   stops applying) on a simplified model: lists with a merge key on
//!   built-in kinds are keyed, all other lists are atomic, no schema-declared
//!   list types on CRDs; `managedFields` are not rendered, and an apply that
//!   only changes ownership keeps the resourceVersion;
//! - validation of built-in kinds is limited to what the transcripts show
//!   (names, container names, Leases, Events); no immutable-field checks;
//! - a Pod gets its ServiceAccount's name but no token volume, and no
//!   default tolerations;
//! - past states are rebuilt from the per-type history, so its end acts as
//!   an etcd compaction too (exact LISTs and continue tokens older than it
//!   get 410); [`ApiServer::compact`] and [`ApiServer::restart_watch_cache`]
//!   do what compaction and a restart do;
//! - a CRD's types are served once its create returns (the real server
//!   takes some milliseconds: a LIST right after the create may get 404,
//!   so clients wait for them either way);
//! - deleting a Namespace removes it and its content at once (the real one
//!   stays Terminating without a namespace controller);
//! - no RBAC: requests without credentials or with the admin token may do
//!   everything, ServiceAccount tokens nothing (403); a pod-bound token is
//!   invalid as soon as its Pod is gone (the real server caches reviews);
//! - `dryRun=All` validates and answers without storing, the answer to a
//!   create without a resourceVersion; no `?pretty`, no protobuf, no streaming lists
//!   (`sendInitialEvents`), no aggregated discovery; BOOKMARKs come every
//!   [`Options::bookmark_interval`] instead of about once a minute;
//! - JSON keys come out sorted (built-in kinds' keys come in struct order on
//!   the real server), and bodies always have a Content-Length.

mod admission;
mod auth;
mod errors;
mod fields;
mod http;
mod patch;
mod rbac;
mod resources;
mod selectors;
mod store;
mod validation;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Why an emulator could not start, or a client for it could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the API server port: {0}")]
    Bind(std::io::Error),
    #[error("emulator kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kube client for the emulator: {0}")]
    Client(#[from] kube::Error),
}

/// Settings of an emulator; `Default` suits most tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many changes of each resource type the watch history keeps (the
    /// real server keeps a watch cache per type). A watch from a
    /// resourceVersion older than that gets `410 Expired`, as from a real
    /// server whose watch cache has moved on; tests make this small to
    /// force it.
    pub watch_history: usize,
    /// How often a watch with `allowWatchBookmarks` gets a BOOKMARK (the
    /// real server: about once a minute).
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { watch_history: 10_000, bookmark_interval: Duration::from_secs(1) }
    }
}

/// A running emulator; stops (with every open connection and watch) on drop.
pub struct ApiServer {
    addr: SocketAddr,
    state: Arc<http::State>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Starts an emulator with default [`Options`].
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let state = Arc::new(http::State {
            store: store::Store::new(options.watch_history),
            tokens: auth::Tokens::default(),
            admin_token: format!("emulator-admin-{}", store::new_uid()),
            bookmark_interval: options.bookmark_interval,
            server_address: addr.to_string(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the accept task on
            // drop also ends every open request and watch.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("API server emulator: accept failed: {e}");
                        continue;
                    }
                };
                let state = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| http::handle(state.clone(), req));
                    if let Err(e) =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                    {
                        tracing::debug!("API server emulator: connection ended: {e}");
                    }
                });
                // Reap finished connections so the set does not grow forever.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one context for this emulator and its admin token.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
             users:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: emulator\n  context:\n    \
             cluster: emulator\n    user: admin\n    namespace: default\ncurrent-context: emulator\n",
            url = self.url(),
            token = self.state.admin_token
        )
    }

    /// A `kube::Client` for this emulator, built from [`Self::kubeconfig_yaml`]
    /// the way a client built from a real kubeconfig is.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Mints a ServiceAccount token for `namespace/service_account` with the
    /// API server's own audience, as a projected token in a Pod would be.
    /// TokenReview authenticates it; the ServiceAccount need not exist.
    pub fn issue_token(&self, namespace: &str, service_account: &str) -> String {
        http::issue_token(&self.state, namespace, service_account, &[])
    }

    /// Like [`Self::issue_token`], for the given audiences.
    pub fn issue_token_for(&self, namespace: &str, service_account: &str, audiences: &[&str]) -> String {
        http::issue_token(&self.state, namespace, service_account, audiences)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.store.current_rv()
    }

    /// Compacts "etcd" at the current resourceVersion: LISTs of an exact
    /// older version and older continue tokens get `410 Expired`; watches
    /// from older versions still replay, as long as the history holds them.
    pub fn compact(&self) {
        self.state.store.compact();
    }

    /// Empties the watch history, as an API server restart empties its
    /// watch cache: a watch from any earlier resourceVersion gets one ERROR
    /// event `410 Expired` (clients must relist). Objects are kept.
    pub fn restart_watch_cache(&self) {
        self.state.store.drop_history();
    }

    /// The issuer (and default audience) of the tokens.
    pub fn token_issuer(&self) -> &'static str {
        auth::ISSUER
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
