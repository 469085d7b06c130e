//! The install as a platform engineer runs it: both images built by
//! `images/build` (the README's command) and pushed to a registry, then
//! deploy/ applied with `kubectl apply -k` on the real one-node cluster,
//! through the test overlay `tests/install/` (where that node differs from a
//! cloud cluster) and an overlay of it for what differs per run.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use anyhow::{Context, bail};
use serde_json::json;

use crate::node::RealNode;

/// The images' repository under the test registry, as `ghcr.io/k8slab` in
/// deploy/.
const REPOSITORY: &str = "k8slab";
/// The Service names the coordinator's certificate covers by default.
const COORDINATOR_NAME: &str = "image-backup-coordinator.image-backup.svc";

/// The checkout's root.
pub fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace").to_path_buf()
}

/// `images/build --push`: both images, from this checkout, into the
/// plain-HTTP registry `registry`. Returns the repository the images are in.
pub async fn build_and_push(registry: &str) -> anyhow::Result<String> {
    let repository = format!("{registry}/{REPOSITORY}");
    images_build(&["--push", &repository, "--insecure"]).await?;
    Ok(repository)
}

/// `images/build --archive`: both images as OCI archives in `dir`, named
/// as deploy/ names them.
pub async fn build_archives(dir: &Path) -> anyhow::Result<()> {
    images_build(&["--archive", &dir.display().to_string()]).await
}

/// `images/build ARGS` with buildah, in a store of the test's own.
async fn images_build(args: &[&str]) -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let storage = store.path().join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            store.path().join("graph").display(),
            store.path().join("run").display()
        ),
    )?;
    // Nothing is looked up anywhere: FROM scratch names no registry.
    let registries = store.path().join("registries.conf");
    std::fs::write(&registries, "unqualified-search-registries = []\n")?;
    let output = tokio::process::Command::new(checkout().join("images/build"))
        .args(args)
        .args(["--builder", "buildah"])
        .env("CONTAINERS_STORAGE_CONF", &storage)
        .env("CONTAINERS_REGISTRIES_CONF", &registries)
        .output()
        .await
        .context("running images/build")?;
    check("images/build", &output)
}

/// Where the installed pods reach what the test runs.
pub struct Settings<'a> {
    /// `build_and_push`'s repository.
    pub images: &'a str,
    /// The backup registry, plain HTTP.
    pub backup_registry: &'a str,
}

/// deploy/, applied; deleted again on drop, as the README uninstalls it.
pub struct Install {
    overlay: tempfile::TempDir,
    kubeconfig: PathBuf,
    /// The coordinator pod's /metrics, on the node's network.
    pub metrics_url: String,
}

// === impl Install ===

impl Install {
    /// `kubectl apply -k` of deploy/ through the test overlays, after
    /// deleting what an earlier run may have left.
    pub async fn apply(node: &RealNode, settings: &Settings<'_>) -> anyhow::Result<Self> {
        let config = crate::kube_config(&node.kubeconfig).await?;
        let api_port = config.cluster_url.port_u16().context("the API server's port")?;
        let grpc_port = crate::process::free_port()?;
        let metrics_port = crate::process::free_port()?;

        let overlay = tempfile::tempdir()?;
        let kustomization = kustomization(
            &relative(overlay.path(), &checkout().join("tests/install"))?,
            settings,
            Ports { api: api_port, grpc: grpc_port, metrics: metrics_port },
            &node.containerd_socket,
            &node.content_dir,
        );
        std::fs::write(overlay.path().join("kustomization.yaml"), serde_yaml::to_string(&kustomization)?)?;

        let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let install = Self { overlay, kubeconfig: node.kubeconfig.clone(), metrics_url };
        install.delete()?;
        install.kubectl(&["apply", "-k", &install.dir()])?;
        Ok(install)
    }

    /// `kubectl ARGS` against the cluster, its stdout.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")?;
        check(&format!("kubectl {}", args.join(" ")), &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// What a person would look at when the install does not come up: the
    /// pods, their events and their logs.
    pub fn diagnose(&self) -> String {
        let show = |args: &[&str]| self.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
        let mut report = show(&["-n", "image-backup", "get", "pods", "-o", "wide"]);
        report += &show(&["-n", "image-backup", "describe", "pods"]);
        for app in ["image-backup-coordinator", "image-backup-agent"] {
            let selector = format!("app.kubernetes.io/name={app}");
            report += &format!("\n--- logs of {app}\n");
            report += &show(&["-n", "image-backup", "logs", "-l", &selector, "--tail", "40", "--all-containers"]);
        }
        report
    }

    fn dir(&self) -> String {
        self.overlay.path().display().to_string()
    }

    /// `kubectl delete -k`, waiting until the pods are gone: a coordinator
    /// left running would take over the next test's workloads.
    fn delete(&self) -> anyhow::Result<()> {
        self.kubectl(&["delete", "-k", &self.dir(), "--ignore-not-found", "--wait", "--timeout", "120s"]).map(|_| ())
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        if let Err(error) = self.delete() {
            eprintln!("uninstalling: {error:#}");
        }
    }
}

struct Ports {
    api: u16,
    grpc: u16,
    metrics: u16,
}

/// The per-run overlay: the images from the test registry, the backup
/// registry, free ports on the node's network, and containerd where the
/// test node keeps it.
fn kustomization(
    base: &str,
    settings: &Settings<'_>,
    ports: Ports,
    socket: &Path,
    content: &Path,
) -> serde_json::Value {
    let image = |name: &str| json!({ "name": format!("ghcr.io/k8slab/{name}"), "newName": format!("{}/{name}", settings.images) });
    let env = |name: &str, value: String| json!({ "name": name, "value": value });
    let settings_patch = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "image-backup-settings" },
        "data": {
            "IMAGE_BACKUP_REGISTRY": settings.backup_registry,
            "IMAGE_BACKUP_INSECURE_REGISTRIES": settings.backup_registry,
        },
    });
    let coordinator = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "image-backup-coordinator" },
        "spec": { "template": { "spec": { "containers": [{
            "name": "coordinator",
            "env": [
                env("KUBERNETES_SERVICE_PORT", ports.api.to_string()),
                env("IMAGE_BACKUP_GRPC_ADDR", format!("0.0.0.0:{}", ports.grpc)),
                env("IMAGE_BACKUP_METRICS_ADDR", format!("0.0.0.0:{}", ports.metrics)),
            ],
        }] } } },
    });
    // On the host's network a containerPort is a host port, and the
    // probes use the named one.
    let coordinator_ports = json!([
        { "op": "replace", "path": "/spec/template/spec/containers/0/ports/0/containerPort", "value": ports.grpc },
        { "op": "replace", "path": "/spec/template/spec/containers/0/ports/1/containerPort", "value": ports.metrics },
    ]);
    let agent = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": { "name": "image-backup-agent" },
        "spec": { "template": { "spec": {
            "containers": [{
                "name": "agent",
                "env": [
                    env("KUBERNETES_SERVICE_PORT", ports.api.to_string()),
                    env("IMAGE_BACKUP_COORDINATOR", format!("https://127.0.0.1:{}", ports.grpc)),
                    env("IMAGE_BACKUP_COORDINATOR_NAME", COORDINATOR_NAME.into()),
                ],
                // The agent reads the content directory at the path
                // containerd reports.
                "volumeMounts": [{ "name": "containerd-content", "mountPath": content, "readOnly": true }],
            }],
            "volumes": [
                { "name": "containerd-socket", "hostPath": { "path": socket, "type": "Socket" } },
                { "name": "containerd-content", "hostPath": { "path": content, "type": "Directory" } },
            ],
        } } },
    });
    let patch = |object: &serde_json::Value| json!({ "patch": serde_yaml::to_string(object).expect("YAML of JSON") });
    json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "images": [image("image-backup-coordinator"), image("image-backup-agent")],
        "patches": [
            patch(&settings_patch),
            patch(&coordinator),
            {
                "target": { "kind": "Deployment", "name": "image-backup-coordinator" },
                "patch": serde_yaml::to_string(&coordinator_ports).expect("YAML of JSON"),
            },
            patch(&agent),
        ],
    })
}

/// `to` relative to the directory `from`: kustomize refuses absolute paths.
fn relative(from: &Path, to: &Path) -> anyhow::Result<String> {
    let from = from.canonicalize()?;
    let to = to.canonicalize()?;
    let up = from.components().count() - 1;
    let down: PathBuf = to.components().skip(1).collect();
    Ok(format!("{}{}", "../".repeat(up), down.display()))
}

fn check(what: &str, output: &Output) -> anyhow::Result<()> {
    if output.status.success() {
        return Ok(());
    }
    let tail = |bytes: &[u8]| crate::process::last_lines(&String::from_utf8_lossy(bytes), 40);
    bail!("{what} failed ({}):\n{}\n{}", output.status, tail(&output.stdout), tail(&output.stderr))
}
