//! The install, for real: both images built from this checkout by
//! `images/build` (the README's command), pulled by the real node's kubelet
//! from a registry the test starts, and deploy/ applied with
//! `kubectl apply -k`. The coordinator Deployment and the agent DaemonSet
//! come up as real pods; the agent pod copies a real workload's image out of
//! the node's containerd (its source is gone by then), the coordinator pod
//! moves the workload to the backup, and its new pod runs from it.
//!
//! Needs the real one-node cluster that `.ci/run` starts (KUBECONFIG,
//! K8S_NODE_NAME, K8S_CONTAINERD_SOCKET, K8S_CERTS_D,
//! K8S_CONTAINERD_CONTENT_DIR); skipped without it.

use std::time::Duration;

use image_backup_crds::{ImageBackup, Phase};
use image_backup_tests::{
    MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{eventually, within},
    install::{Install, Settings, build_and_push, build_archives, checkout},
    node::{K8S_NAMESPACE, RealNode, rolled_out, runnable_image, scene, sleeper},
};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::Pod,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_on_a_real_node_and_moves_a_workload_to_its_backup() {
    let Some((node, client, ns)) = scene().await else { return };
    let images = Registry::start(RegistryAuth::None).await.unwrap();
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let backup = Registry::start(RegistryAuth::None).await.unwrap();
    for registry in [&images, &source, &backup] {
        node.trust_plain_http(&registry.host()).unwrap();
    }

    // The images, as a user builds them, with the workspace's version.
    let repository = build_and_push(&images.host()).await.unwrap();
    let mut pushed = Vec::new();
    for (name, user) in [("image-backup-coordinator", "65532:65532"), ("image-backup-agent", "0:0")] {
        pushed.push((name, looks_right(&images, name, user).await));
    }
    // Or as archives for nodes: the same images, which containerd loads.
    let archives = tempfile::tempdir().unwrap();
    build_archives(archives.path()).await.unwrap();
    for (name, digest) in &pushed {
        let file = archives.path().join(format!("{name}-{VERSION}.tar"));
        assert_eq!(&archived_digest(&file), digest, "one commit, one image");
        let reference = format!("ghcr.io/k8slab/{name}:{VERSION}");
        let listed = ctr(&node, &["images", "import", &file.display().to_string()]);
        assert!(listed.contains(&reference), "{listed}");
        ctr(&node, &["images", "rm", &reference]);
    }

    // A workload the kubelet runs from its source, which is gone before
    // anything is installed: the agent can only copy from the node.
    let image = TestImage::of(MediaTypes::Oci, runnable_image());
    source.push("e2e/sleeper", "1", &image).await.unwrap();
    let source_ref = format!("{}/e2e/sleeper:1", source.host());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments.create(&PostParams::default(), &sleeper(&ns, "sleeper", &source_ref)).await.unwrap();
    eventually("the kubelet runs the source image", Duration::from_secs(120), || {
        rolled_out(&deployments, "sleeper", None)
    })
    .await;
    let digest = image.digest();
    let source_host = source.host();
    drop(source);

    let install =
        Install::apply(&node, &Settings { images: &repository, backup_registry: &backup.host() }).await.unwrap();
    let system: Api<Pod> = Api::namespaced(client.clone(), "image-backup");
    let up = within(Duration::from_secs(180), || async {
        let coordinator = Api::<Deployment>::namespaced(client.clone(), "image-backup")
            .get("image-backup-coordinator")
            .await
            .map_err(|e| e.to_string())?;
        let agent = Api::<DaemonSet>::namespaced(client.clone(), "image-backup")
            .get("image-backup-agent")
            .await
            .map_err(|e| e.to_string())?;
        let available = coordinator.status.and_then(|s| s.available_replicas).unwrap_or(0);
        let ready = agent.status.map(|s| s.number_ready).unwrap_or(0);
        if available == 1 && ready == 1 { Ok(()) } else { Err(format!("{available} coordinator, {ready} agent")) }
    });
    if let Err(why) = up.await {
        panic!("the install did not come up ({why}):\n{}", install.diagnose());
    }
    for pod in system.list(&ListParams::default()).await.unwrap() {
        let image = pod.spec.as_ref().map(|s| s.containers[0].image.clone().unwrap_or_default()).unwrap_or_default();
        assert!(image.starts_with(&repository) && image.ends_with(&format!(":{VERSION}")), "{image}");
    }

    // The workload moves to its backup, copied by the agent pod.
    let backup_path = format!("backup/{}/e2e/sleeper", source_host.replace(':', "_"));
    let pinned = format!("{}/{backup_path}@{digest}", backup.host());
    let moved = within(Duration::from_secs(120), || rolled_out(&deployments, "sleeper", Some(&pinned))).await;
    if let Err(why) = moved {
        panic!("the workload was not moved to {pinned} ({why}):\n{}", install.diagnose());
    }
    let stored = backup.manifest(&backup_path, digest).await.unwrap();
    assert!(stored.is_some(), "{pinned} is in the backup registry");
    let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&source_ref).unwrap());
    let status = Api::<ImageBackup>::all(client.clone()).get(&name).await.unwrap().status.unwrap();
    assert_eq!(status.phase, Phase::Completed);
    let agent_pod = system
        .list(&ListParams::default().labels("app.kubernetes.io/name=image-backup-agent"))
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(status.agent, agent_pod.metadata.name, "the agent pod copied it");
    assert_eq!(status.node.as_deref(), Some(node.node_name.as_str()));

    // Its new pod runs, from the backup.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually("the new pod runs from the backup", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels("app=sleeper")).await.map_err(|e| e.to_string())?;
        let running: Vec<_> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.containers[0].image.clone()))
            .collect();
        if running == [pinned.clone()] { Ok(()) } else { Err(format!("running {running:?}")) }
    })
    .await;

    // What the pod exports says so too (a throwaway cluster may hold other
    // workloads it backed up).
    let metrics = reqwest::get(&install.metrics_url).await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        line.and_then(|l| l.rsplit_once(' ')).map(|(_, v)| v.parse::<f64>().unwrap())
    };
    assert_eq!(value("image_backup_connected_agents"), Some(1.0), "{metrics}");
    assert!(value("image_backup_jobs{phase=\"Completed\"}") >= Some(1.0), "{metrics}");
    drop(install);
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()).delete(&ns, &Default::default()).await.unwrap();
}

/// What a user checks of a pushed image: the version, commit and source in
/// its labels, the user it runs as, and that it holds its binary and
/// nothing else. Returns its digest.
async fn looks_right(images: &Registry, name: &str, user: &str) -> String {
    let repository = format!("k8slab/{name}");
    let manifest = images.manifest(&repository, VERSION).await.unwrap();
    let manifest = manifest.unwrap_or_else(|| panic!("{repository}:{VERSION} pushed"));
    let body: Value = serde_json::from_slice(&manifest.bytes).unwrap();
    let config = images.blob(&repository, body["config"]["digest"].as_str().unwrap()).await.unwrap().unwrap();
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["config"]["User"], user, "{name}");
    assert_eq!(config["config"]["Entrypoint"], json!([format!("/{name}")]));
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.revision"], revision());
    assert_eq!(labels["org.opencontainers.image.source"], "https://github.com/k8slab/image-backup");
    let mut files = Vec::new();
    for layer in body["layers"].as_array().unwrap() {
        let blob = images.blob(&repository, layer["digest"].as_str().unwrap()).await.unwrap().unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                files.push(entry.path().unwrap().display().to_string());
            }
        }
    }
    assert_eq!(files, [name], "the image holds its binary alone");
    manifest.digest
}

/// The commit `images/build` labels the images with.
fn revision() -> String {
    let output = std::process::Command::new("git").arg("-C").arg(checkout()).args(["rev-parse", "HEAD"]).output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "unknown".into(),
    }
}

/// The manifest digest of the one image in an OCI archive.
fn archived_digest(file: &std::path::Path) -> String {
    let mut archive = tar::Archive::new(std::fs::File::open(file).unwrap());
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("index.json") {
            let index: Value = serde_json::from_reader(entry).unwrap();
            return index["manifests"][0]["digest"].as_str().unwrap().to_string();
        }
    }
    panic!("{} has no index.json", file.display())
}

/// `ctr ARGS` on the node's containerd, in the kubelet's namespace.
fn ctr(node: &RealNode, args: &[&str]) -> String {
    let output = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&node.containerd_socket)
        .args(["--namespace", K8S_NAMESPACE])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "ctr {args:?}: {text}{}", String::from_utf8_lossy(&output.stderr));
    text
}
