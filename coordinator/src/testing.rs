//! Reconciles run against scripted API server responses, as kube-rs's
//! controller-rs tests them: a controller's context whose client talks to a script
//! that checks each request the reconcile makes, in order, and answers it.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use image_backup_crds::ImageBackup;
use kube::{
    Client,
    client::Body,
    runtime::reflector::{self, Store},
};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    agents::AgentHub,
    backups,
    cli::Cli,
    config::CoordinatorConfig,
    context::Shared,
    jobs::LiveJobs,
    leader::Fence,
    metrics::Metrics,
    workloads::{self, usage::Usage, wakers::Wakers},
};

/// One request the reconcile must make next, and the answer it gets.
pub struct Exchange {
    pub method: Method,
    /// The path and query, as sent.
    pub path: String,
    /// Checks the request's JSON body (none for a GET).
    pub body: Box<dyn Fn(&Value) + Send>,
    pub status: StatusCode,
    /// The answer's body; `null` sends the request's own back, as the API
    /// server does for a write that goes through.
    pub answer: Value,
}

impl Exchange {
    pub fn new(method: Method, path: &str, status: StatusCode, answer: Value) -> Self {
        Self { method, path: path.into(), body: Box::new(|_| {}), status, answer }
    }

    pub fn checking(mut self, body: impl Fn(&Value) + Send + 'static) -> Self {
        self.body = Box::new(body);
        self
    }
}

/// The script's end: waits for it to be played out whole, and fails the
/// test on a request it did not expect.
pub struct Script(JoinHandle<()>);

impl Script {
    pub async fn done(self) {
        tokio::time::timeout(Duration::from_secs(5), self.0)
            .await
            .expect("the reconcile made every scripted request")
            .expect("every request was as scripted");
    }
}

/// A client whose API server is `script`, played in order.
pub fn scripted(script: Vec<Exchange>) -> (Client, Script) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut script = VecDeque::from(script);
    let played = tokio::spawn(async move {
        while let Some(next) = script.pop_front() {
            let (request, respond) = handle.next_request().await.expect("a request");
            let path = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            assert_eq!((request.method(), path.as_str()), (&next.method, next.path.as_str()));
            let bytes = request.into_body().collect_bytes().await.expect("a readable body");
            if !bytes.is_empty() {
                (next.body)(&serde_json::from_slice(&bytes).expect("a JSON body"));
            }
            let answer = if next.answer.is_null() {
                bytes.to_vec()
            } else {
                serde_json::to_vec(&next.answer).expect("a JSON answer")
            };
            let response = Response::builder().status(next.status).body(Body::from(answer)).expect("a response");
            respond.send_response(response);
        }
    });
    (Client::new(service, "default"), Script(played))
}

/// What the controllers share on `client`, with the settings `flags` give,
/// the ImageBackups of `store` and the usage of `usage`.
pub fn shared(client: Client, flags: &[&str], store: Store<ImageBackup>, usage: Arc<Usage>) -> Arc<Shared> {
    let (jobs, _) = LiveJobs::new();
    Shared::new(client, config(flags), store, usage, Metrics::new(), jobs.waker(), Fence::always()).expect("shared")
}

/// The ImageBackup controller's context over `shared` (see [`shared`]).
pub fn backups_context(
    client: Client,
    flags: &[&str],
    store: Store<ImageBackup>,
    usage: Arc<Usage>,
) -> Arc<backups::Context> {
    let (jobs, _) = LiveJobs::new();
    let jobs = Arc::new(jobs);
    let hub = AgentHub::new("coordinator", Duration::from_secs(5), jobs.clone());
    backups::Context::new(shared(client, flags, store, usage), hub, jobs)
}

/// The workload controllers' context over `shared` (see [`shared`]).
pub fn workloads_context(
    client: Client,
    flags: &[&str],
    store: Store<ImageBackup>,
    usage: Arc<Usage>,
) -> Arc<workloads::Context> {
    let (deployments, _) = mpsc::unbounded_channel();
    let (daemonsets, _) = mpsc::unbounded_channel();
    let wakers = Wakers { deployments, daemonsets };
    workloads::Context::new(shared(client, flags, store, usage), wakers).expect("a context")
}

/// The settings `flags` give, the backup registry `backup.test` unless
/// they name one.
pub fn config(flags: &[&str]) -> CoordinatorConfig {
    let registry: &[&str] =
        if flags.contains(&"--backup-registry") { &[] } else { &["--backup-registry", "backup.test"] };
    let args = [&["image-backup-coordinator"], registry, flags].concat();
    Cli::try_parse_from(args).expect("valid flags").config()
}

/// A store holding `backups`.
pub fn store(backups: Vec<ImageBackup>) -> Store<ImageBackup> {
    let (store, mut writer) = reflector::store();
    for backup in backups {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(backup));
    }
    store
}

/// A registry that serves the manifests `served` (`repository@digest`) to
/// HEAD requests and nothing else; its `host:port`.
pub async fn registry(served: Vec<String>) -> String {
    registry_serving(served.into_iter().map(|manifest| (manifest, Vec::new())).collect()).await
}

/// A registry that serves each manifest of `served` (`repository@digest`
/// and its bytes) to HEAD and GET, as an OCI index, and nothing else; its
/// `host:port`.
pub async fn registry_serving(served: Vec<(String, Vec<u8>)>) -> String {
    use axum::{extract::Request, http::StatusCode as Status, response::IntoResponse};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let host = listener.local_addr().expect("an address").to_string();
    let served: Arc<std::collections::HashMap<String, Vec<u8>>> = Arc::new(served.into_iter().collect());
    let app = axum::Router::new().fallback(move |request: Request| {
        let served = served.clone();
        async move {
            let path = request.uri().path().trim_start_matches("/v2/").to_string();
            let found = path.split_once("/manifests/").map(|(repository, digest)| format!("{repository}@{digest}"));
            let Some((manifest, bytes)) = found.and_then(|m| served.get_key_value(&m)) else {
                return Status::NOT_FOUND.into_response();
            };
            let digest = manifest.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_default();
            let headers = [
                ("docker-content-digest", digest),
                ("content-type", "application/vnd.oci.image.index.v1+json".to_string()),
            ];
            match *request.method() {
                Method::HEAD => (Status::OK, headers).into_response(),
                Method::GET => (Status::OK, headers, bytes.clone()).into_response(),
                _ => Status::NOT_FOUND.into_response(),
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    host
}
