//! Runs the whole system on this machine: a real containerd and a real
//! backup registry (the Debian packages, on temporary sockets and ports),
//! the coordinator and one agent as local processes, and a sample
//! Deployment whose backup you can watch. The cluster is the one in
//! KUBECONFIG when set (an API server without controllers, as envtest runs
//! it, since this program writes the pod statuses a kubelet would), else
//! the embedded API server emulator.
//!
//! ```sh
//! tests/setup && cargo build --release --workspace --bins && target/release/image-backup-local
//! ```

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use apiserver_emulator::ApiServer;
use image_backup_crds::ImageBackup;
use image_backup_tests::{
    Containerd, MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{Placement, Workloads},
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, api::PostParams};
use serde_json::json;

const SAMPLE: &str = "docker.io/library/sample-web:1.0";

/// A child process stopped with the program.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.parent().context("binary directory")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace's binaries first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

async fn create<K>(api: &Api<K>, object: serde_json::Value) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object)?;
    let name = object.meta().name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(&name).await?),
        Err(e) => Err(e).with_context(|| format!("creating {name}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let coordinator_bin = sibling("image-backup-coordinator")?;
    let agent_bin = sibling("image-backup-agent")?;
    let work = tempfile::Builder::new().prefix("image-backup-local").tempdir()?;

    // The cluster.
    let (emulator, kubeconfig) = match std::env::var_os("KUBECONFIG") {
        Some(path) => (None, PathBuf::from(path)),
        None => {
            let server = ApiServer::start().await?;
            let path = work.path().join("kubeconfig");
            std::fs::write(&path, server.kubeconfig_yaml())?;
            (Some(server), path)
        }
    };
    let client = client_for(&kubeconfig).await?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&image_backup_crds::crd_yaml()?)?;
    create(&Api::<CustomResourceDefinition>::all(client.clone()), serde_json::to_value(crd)?).await?;
    for ns in ["demo", "image-backup"] {
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
        )
        .await?;
        // Pods are refused without it, and only a controller-manager makes it.
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), ns),
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default" } }),
        )
        .await?;
    }
    let backups: Api<ImageBackup> = Api::all(client.clone());
    for _ in 0..50 {
        if backups.list(&Default::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The node and the backup registry.
    let containerd = Containerd::start().await?;
    let registry = Registry::start(RegistryAuth::None).await?;
    let image = TestImage::single(MediaTypes::Oci, &[24 << 20, 8 << 20], 7);
    image.import(&containerd, SAMPLE, &[], &[]).await?;

    // The coordinator and the agent, as they run in a cluster.
    let grpc = format!("127.0.0.1:{}", image_backup_tests::process::free_port()?);
    let metrics = format!("127.0.0.1:{}", image_backup_tests::process::free_port()?);
    let log = |name: &str| -> anyhow::Result<Stdio> { Ok(std::fs::File::create(work.path().join(name))?.into()) };
    let _coordinator = Process(
        Command::new(&coordinator_bin)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--backup-registry", &registry.host(), "--insecure-registry", &registry.host()])
            .args(["--grpc-addr", &grpc, "--metrics-addr", &metrics, "--retry-backoff", "2s"])
            // Its own CA, and a certificate for the address dialled here.
            .args(["--tls-names", "127.0.0.1,localhost"])
            .stdout(log("coordinator.log")?)
            .stderr(log("coordinator.log")?)
            .spawn()
            .context("starting the coordinator")?,
    );
    // What a cluster gives an agent pod: the coordinator's CA (from the
    // ConfigMap it publishes) and a token bound to the agent's pod.
    let ca = work.path().join("ca.crt");
    std::fs::write(&ca, published_ca(&client).await?)?;
    let token = work.path().join("agent-token");
    std::fs::write(&token, image_backup_tests::identity::agent_token(&client, "local-node").await)?;
    let reader = work.path().join("reader-token");
    std::fs::write(&reader, image_backup_tests::run::reader_token(&client).await)?;
    let _agent = Process(
        Command::new(&agent_bin)
            .env("RUST_LOG", "info")
            // To see what its node's pods run, as in a cluster.
            .env("KUBECONFIG", &kubeconfig)
            .arg("run")
            .args(["--backup-registry", &registry.host()])
            .arg("--containerd")
            .arg(containerd.socket())
            .args(["--insecure-registry", &registry.host(), "--coordinator", &format!("https://{grpc}")])
            .arg("--coordinator-ca")
            .arg(&ca)
            .arg("--token-file")
            .arg(&token)
            .args(["--node-name", "local-node"])
            .stdout(log("agent.log")?)
            .stderr(log("agent.log")?)
            .spawn()
            .context("starting the agent")?,
    );

    // The sample workload, rolled out the way a kubelet and the deployment
    // controller would report it.
    deploy_sample(&client, image.digest()).await?;

    println!("image-backup is running on this machine:");
    match &emulator {
        Some(_) => println!("  cluster      embedded API server emulator, kubeconfig {}", kubeconfig.display()),
        None => println!("  cluster      {}", kubeconfig.display()),
    }
    println!("  containerd   {} (node local-node)", containerd.socket().display());
    println!("  registry     http://{} (backups under /backup/)", registry.host());
    println!(
        "  coordinator  gRPC {grpc}, metrics http://{metrics}/metrics, log {}",
        work.path().join("coordinator.log").display()
    );
    println!("  agent        log {}", work.path().join("agent.log").display());
    let grpcurl = format!("grpcurl -cacert {} -H \"authorization: Bearer $(cat {})\"", ca.display(), reader.display());
    println!("Try: {grpcurl} {grpc} list");
    println!("     {grpcurl} {grpc} imagebackup.v1.JobService/ListJobs");
    println!("     KUBECONFIG={} kubectl get imagebackups", kubeconfig.display());
    println!("Watching demo/sample-web (Ctrl-C stops everything):");
    watch(&client, &backups, &work.path().join("coordinator.log")).await
}

/// The CA the coordinator publishes for agents, once it has (it makes it
/// when it starts).
async fn published_ca(client: &Client) -> anyhow::Result<String> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "image-backup");
    for _ in 0..100 {
        if let Some(ca) =
            config_maps.get_opt("image-backup-ca").await?.and_then(|c| c.data).and_then(|d| d.get("ca.crt").cloned())
        {
            return Ok(ca);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the coordinator did not publish its CA in 10s (see its log)")
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    Ok(Client::try_from(image_backup_tests::kube_config(kubeconfig).await?)?)
}

/// The sample Deployment with a ReplicaSet and a running pod of it, as the
/// deployment controller and a kubelet would report them.
async fn deploy_sample(client: &Client, digest: &str) -> anyhow::Result<()> {
    let workloads = Workloads { client: client.clone() };
    let at = Placement { nodes: &["local-node"], ready: true };
    workloads.deploy("Deployment", "demo", "sample-web", json!({}), &[("web", SAMPLE, digest, false)], at).await;
    Ok(())
}

async fn watch(client: &Client, backups: &Api<ImageBackup>, coordinator_log: &Path) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "demo");
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let mut lines = Vec::new();
        for backup in backups.list(&Default::default()).await?.items {
            let status = backup.status.unwrap_or_default();
            lines.push(format!(
                "  ImageBackup {}: {:?} {} {}",
                backup.spec.source,
                status.phase,
                status.progress.unwrap_or_default(),
                status.backup_reference.or(status.message).or(status.last_error).unwrap_or_default()
            ));
        }
        let deployment = deployments.get("sample-web").await?;
        let image = deployment
            .spec
            .template
            .spec
            .and_then(|s| s.containers.first().and_then(|c| c.image.clone()))
            .unwrap_or_default();
        lines.push(format!("  demo/sample-web runs {image}"));
        let now = lines.join("\n");
        if now != last {
            println!("{now}");
            last = now;
        }
        if std::fs::metadata(coordinator_log).is_err() {
            bail!("coordinator log vanished");
        }
    }
}
