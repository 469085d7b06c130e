//! The coordinator at scale: many ready workloads over many images, agents
//! simulated over the real gRPC protocol (they push small real images to a
//! real registry when assigned), the real coordinator binary, and the API
//! server emulator or a real kube-apiserver.
//!
//! ```sh
//! cargo build --release -p image-backup-coordinator && cargo bench -p image-backup-tests --bench coordinator
//! # against a real API server without controllers (the cluster script's K8S_CONTROLLERS=0 mode):
//! # (it deletes every workload, pod, event and ImageBackup there first)
//! IMAGE_BACKUP_BENCH_KUBECONFIG=/tmp/k8s-api/kubeconfig cargo bench -p image-backup-tests --bench coordinator
//! ```
//!
//! Sizes: BENCH_WORKLOADS (5000), BENCH_IMAGES (500), BENCH_NAMESPACES (100),
//! BENCH_AGENTS (4, each holding every image, 4 copies at once).
//! IMAGE_BACKUP_COORDINATOR_BIN runs another build's coordinator (to compare
//! two versions in one sitting).
//!
//! Reports the time from the coordinator's start to every workload patched,
//! its peak RSS (VmHWM), the Kubernetes API requests it made per workload
//! (its own count, by verb), and how long one more ready workload with a new
//! image then takes to be patched.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use apiserver_emulator::ApiServer;
use futures::{StreamExt, TryStreamExt};
use image_backup_oci::ImageRef;
use image_backup_proto::v1::{
    AgentMessage, Heartbeat, Inventory, InventoryImage, JobResult, JobSuccess, Register, agent_message,
    agent_service_client::AgentServiceClient, coordinator_message, job_result,
};
use image_backup_tests::{
    MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{Placement, Workloads, prepare},
    process::free_port,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::mpsc;

/// API requests in flight while the bench sets the cluster up.
const SETUP_CONCURRENCY: usize = 32;

fn size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (workloads, images, namespaces, agents) = (
        size("BENCH_WORKLOADS", 5000),
        size("BENCH_IMAGES", 500),
        size("BENCH_NAMESPACES", 100),
        size("BENCH_AGENTS", 4),
    );
    let coordinator = coordinator_binary()?;
    let (emulator, client, kubeconfig, server) = match std::env::var_os("IMAGE_BACKUP_BENCH_KUBECONFIG") {
        Some(path) => {
            let client = Client::try_from(image_backup_tests::kube_config(&path).await?)?;
            // What an earlier run left would be watched too.
            image_backup_tests::cluster::wipe(&client).await;
            (None, client, PathBuf::from(path), "real kube-apiserver")
        }
        None => {
            let server = ApiServer::start().await?;
            let client = server.client().await?;
            let path = std::env::temp_dir().join(format!("bench-kubeconfig-{}", std::process::id()));
            std::fs::write(&path, server.kubeconfig_yaml())?;
            (Some(server), client, path, "API server emulator")
        }
    };
    println!("{workloads} workloads over {images} images in {namespaces} namespaces, {agents} agents, {server}");

    let registry = Arc::new(Registry::start(RegistryAuth::None).await?);
    // One image more than the workloads run: the agents hold it too, for
    // the workload created once the others are patched.
    let made: Vec<TestImage> =
        (0..=images).map(|i| TestImage::single(MediaTypes::Oci, &[512], 1000 + i as u64)).collect();
    let made = Arc::new(made);
    let started = Instant::now();
    let names: Vec<String> = (0..namespaces).map(|n| format!("bench-{n}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    prepare(&client, &refs).await;
    futures::stream::iter(0..workloads)
        .map(|j| deploy(&client, &names[j % namespaces], j, &made[j % images], j % images))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    println!("set up in {:.1?}", started.elapsed());

    let grpc = format!("127.0.0.1:{}", free_port()?);
    let metrics = format!("127.0.0.1:{}", free_port()?);
    // BENCH_WRAPPER (e.g. `heaptrack -o /tmp/coordinator`) runs the
    // coordinator under a profiler; RSS is then the wrapper's.
    let wrapper: Vec<String> =
        std::env::var("BENCH_WRAPPER").unwrap_or_default().split_whitespace().map(str::to_string).collect();
    let mut command = match wrapper.split_first() {
        Some((tool, args)) => {
            let mut command = Command::new(tool);
            command.args(args).arg(&coordinator);
            command
        }
        None => Command::new(&coordinator),
    };
    let mut process = command
        .env("KUBECONFIG", &kubeconfig)
        .env("IMAGE_BACKUP_REGISTRY", registry.host())
        .env("IMAGE_BACKUP_INSECURE_REGISTRIES", registry.host())
        .env("IMAGE_BACKUP_GRPC_ADDR", &grpc)
        .env("IMAGE_BACKUP_METRICS_ADDR", &metrics)
        .env("IMAGE_BACKUP_TLS_NAMES", "127.0.0.1")
        // Every workload may roll out at once: the bench measures the
        // coordinator, not the pace a cluster's rollouts set (at the
        // default of 5 in flight, 5,000 rollouts of a second each take
        // over 1,000 s).
        .env("IMAGE_BACKUP_MAX_ROLLOUTS", (workloads + 1).to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", coordinator.display()))?;
    let start = Instant::now();
    // What the workload controllers write once a rollout completes (a
    // second after the patch), where none runs.
    // BENCH_ROLLOUTS=0 leaves them in flight, to measure without them.
    let _rollouts = match std::env::var("BENCH_ROLLOUTS").as_deref() {
        Ok("0") => None,
        _ => image_backup_tests::rollouts::start(&client).await,
    };
    // As agents in a cluster: each with its pod's token, trusting the CA
    // the coordinator publishes.
    let ca = image_backup_tests::run::published_ca(&client, "image-backup", "image-backup-ca").await;
    for a in 0..agents {
        let node = format!("node-{a}");
        let token = image_backup_tests::identity::agent_token(&client, &node).await;
        let link = Link { coordinator: grpc.clone(), ca: ca.clone(), token };
        tokio::spawn(simulated_agent(link, node, made.clone(), registry.clone()));
    }

    let patched = patched(&client, &registry.host(), workloads).await?;
    let converged = start.elapsed();
    let text = reqwest::get(format!("http://{metrics}/metrics")).await?.text().await?;
    let requests = counter_sum(&text, "image_backup_kube_requests_total");
    let by_verb: Vec<&str> = text.lines().filter(|l| l.starts_with("image_backup_kube_requests_total{")).collect();

    // One more ready workload with an image nobody ran before.
    let extra_start = Instant::now();
    deploy(&client, &names[0], workloads, &made[images], images).await?;
    wait_patched(&client, &names[0], workloads, &registry.host()).await?;
    let one_more = extra_start.elapsed();

    let peak_rss_kb = vm_hwm(process.id())?;
    process.kill()?;
    process.wait()?;
    println!(
        "every workload patched in {:.1} s ({patched} patched); peak RSS {:.1} MB; {requests} API requests, {:.2} per workload",
        converged.as_secs_f64(),
        peak_rss_kb as f64 / 1024.0,
        requests as f64 / workloads as f64
    );
    for line in by_verb {
        println!("  {line}");
    }
    println!("one more ready workload patched {:.0} ms after it was created", one_more.as_secs_f64() * 1000.0);
    drop(emulator);
    Ok(())
}

/// A Deployment `app-<j>` of one pod running image `i`, rolled out, with
/// the pod a kubelet would have reported.
async fn deploy(client: &Client, ns: &str, j: usize, image: &TestImage, i: usize) -> anyhow::Result<()> {
    let reference = format!("bench.local/app-{i}:1");
    let containers = [("app", reference.as_str(), image.digest(), false)];
    let at = Placement { nodes: &["node-0"], ready: true };
    Workloads { client: client.clone() }
        .deploy("Deployment", ns, &format!("app-{j}"), json!({}), &containers, at)
        .await;
    Ok(())
}

/// Follows every Deployment until `expected` of them run a backup.
async fn patched(client: &Client, backup_host: &str, expected: usize) -> anyhow::Result<usize> {
    let mut done = HashSet::new();
    let mut events =
        std::pin::pin!(watcher(Api::<Deployment>::all(client.clone()), watcher::Config::default()).applied_objects());
    while let Some(deployment) = events.try_next().await? {
        if runs_backup(&deployment, backup_host) {
            done.insert((deployment.metadata.namespace.clone(), deployment.metadata.name.clone()));
            if done.len() >= expected {
                break;
            }
        }
    }
    Ok(done.len())
}

async fn wait_patched(client: &Client, ns: &str, j: usize, backup_host: &str) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name=app-{j}"));
    let mut events = std::pin::pin!(watcher(api, config).applied_objects());
    while let Some(deployment) = events.try_next().await? {
        if runs_backup(&deployment, backup_host) {
            return Ok(());
        }
    }
    bail!("the watch of app-{j} ended")
}

fn runs_backup(deployment: &Deployment, backup_host: &str) -> bool {
    let spec = deployment.spec.template.spec.as_ref();
    spec.is_some_and(|s| s.containers.iter().all(|c| c.image.as_deref().is_some_and(|i| i.starts_with(backup_host))))
}

/// An agent that holds every image and, when assigned, pushes it to the
/// target for real (the coordinator checks the registry) and reports it.
async fn simulated_agent(link: Link, node: String, images: Arc<Vec<TestImage>>, registry: Arc<Registry>) {
    if let Err(e) = run_agent(&link, &node, &images, &registry).await {
        eprintln!("simulated agent {node}: {e:#}");
    }
}

/// How a simulated agent reaches the coordinator.
struct Link {
    coordinator: String,
    ca: String,
    token: String,
}

async fn run_agent(link: &Link, node: &str, images: &[TestImage], registry: &Registry) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(1024);
    let send = |message| AgentMessage { message: Some(message) };
    tx.send(send(agent_message::Message::Register(Register {
        node_name: node.into(),
        agent_id: format!("agent-{node}"),
        max_concurrent_jobs: 4,
        ..Register::default()
    })))
    .await?;
    let added = images
        .iter()
        .enumerate()
        .map(|(i, image)| InventoryImage {
            name: format!("bench.local/app-{i}:1"),
            digest: image.digest().into(),
            media_type: image.root().media_type.clone(),
            present_manifests: Vec::new(),
            manifests: Vec::new(),
            in_use: true,
        })
        .collect();
    tx.send(send(agent_message::Message::Inventory(Inventory { full: true, added, removed: Vec::new() }))).await?;
    let tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&link.ca));
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", link.coordinator))?.tls_config(tls)?;
    let mut client = loop {
        match endpoint.connect().await {
            Ok(channel) => break AgentServiceClient::new(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let request = image_backup_tests::run::with_token(tokio_stream::wrappers::ReceiverStream::new(rx), &link.token);
    let mut replies = client.session(request).await?.into_inner();
    let heartbeat = tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let beat = Heartbeat { sent_at: None, running_job_ids: Vec::new() };
            if heartbeat.send(AgentMessage { message: Some(agent_message::Message::Heartbeat(beat)) }).await.is_err() {
                return;
            }
        }
    });
    while let Some(reply) = replies.message().await? {
        let Some(coordinator_message::Message::Assignment(assignment)) = reply.message else { continue };
        let Some(image) = images.iter().find(|image| image.digest() == assignment.digest) else { continue };
        let target = ImageRef::parse(&assignment.target)?;
        let started = Instant::now();
        registry.push(target.repository(), target.tag().unwrap_or("latest"), image).await?;
        let success = JobSuccess {
            pinned_reference: target.pinned(image.digest()),
            digest: image.digest().into(),
            bytes_uploaded: image.total_size(),
            duration_seconds: started.elapsed().as_secs_f64(),
            ..JobSuccess::default()
        };
        let result = JobResult {
            job_id: assignment.job_id,
            attempt: assignment.attempt,
            digest: assignment.digest,
            outcome: Some(job_result::Outcome::Success(success)),
        };
        tx.send(send(agent_message::Message::Result(result))).await?;
    }
    Ok(())
}

fn counter_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// Peak resident set of a running process, in kB.
fn vm_hwm(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
}

fn coordinator_binary() -> anyhow::Result<PathBuf> {
    // Another build's binary, to compare two versions in one run.
    if let Ok(path) = std::env::var("IMAGE_BACKUP_COORDINATOR_BIN") {
        return Ok(path.into());
    }
    // target/release/deps/coordinator-HASH -> target/release/image-backup-coordinator
    let exe = std::env::current_exe()?;
    let path = exe.parent().and_then(Path::parent).context("bench binary location")?.join("image-backup-coordinator");
    if !path.exists() {
        bail!("{} not found: run `cargo build --release -p image-backup-coordinator` first", path.display());
    }
    Ok(path)
}
