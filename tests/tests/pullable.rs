//! Pullable before patched, against a real backup registry that requires
//! credentials (TLS and htpasswd) and the API server (the emulator, and a
//! real one when IMAGE_BACKUP_TEST_KUBECONFIG gives it): without reading
//! pods' pull secrets nothing can be moved and the ImageBackup says so; a
//! workload whose pods have no credentials for it is left as it is and the
//! ImageBackup says why; one whose pods have a pull secret for it is moved; with the
//! install's pull Secret named and copying allowed, the Secret is copied
//! into the workload's namespace and added to its pod spec. With private
//! images refused, an image pulled with a pull secret is not backed up.

use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_oci::registry::RegistryConfig;
use image_backup_tests::{
    Containerd, MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, Placement, Workloads, agent_client, cluster, coordinator_client, coordinator_config, eventually,
        prepare,
    },
    init_tracing, on_both_api_servers,
    one_node::OneNode,
    run::{start_agent, start_coordinator},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

const USER: &str = "puller";
const PASSWORD: &str = "pull-s3cret";
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A docker config with credentials for `host`.
fn docker_config(host: &str) -> String {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    json!({ "auths": { host: { "auth": auth } } }).to_string()
}

async fn pull_secret(client: &Client, ns: &str, name: &str, host: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": ns },
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": { ".dockerconfigjson": docker_config(host) },
    }))
    .unwrap();
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    // A real API server keeps Secrets from an earlier run.
    let _ = api.delete(name, &Default::default()).await;
    api.create(&PostParams::default(), &secret).await.unwrap();
}

async fn deployment(client: &Client, ns: &str, name: &str) -> Deployment {
    Api::<Deployment>::namespaced(client.clone(), ns).get(name).await.unwrap()
}

fn image_of(d: &Deployment) -> String {
    d.spec.template.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default()
}

fn pull_secrets_of(d: &Deployment) -> Vec<String> {
    let spec = d.spec.template.spec.as_ref();
    spec.and_then(|s| s.image_pull_secrets.clone()).unwrap_or_default().into_iter().map(|r| r.name).collect()
}

async fn pullable(kind: ApiServerKind) {
    init_tracing();
    let Some((_cluster, client)) = cluster(kind).await else { return };
    prepare(&client, &["shop", "team"]).await;
    // Copies an earlier run made on a real API server would be found.
    for ns in ["shop", "team"] {
        let _ = Api::<Secret>::namespaced(client.clone(), ns).delete("backup-pull", &Default::default()).await;
    }
    let registry =
        Registry::start(RegistryAuth::TlsBasic { username: USER.into(), password: PASSWORD.into() }).await.unwrap();
    let host = registry.host();
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("config.json");
    std::fs::write(&credentials, docker_config(&host)).unwrap();
    let access = RegistryConfig {
        ca_bundle: Some(registry.ca_path()),
        docker_config: Some(credentials),
        ..RegistryConfig::default()
    };

    // Three Deployments of one image the node holds; the source is gone.
    let node = Containerd::start().await.unwrap();
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let src = source.host();
    drop(source);
    let image = TestImage::single(MediaTypes::Oci, &[64 << 10], 111);
    let reference = format!("{src}/shop/app:1");
    image.import(&node, &reference, &[], &[]).await.unwrap();
    let w = Workloads { client: client.clone() };
    let spec = [("app", reference.as_str(), image.digest(), false)];
    for (ns, name) in [("shop", "plain"), ("shop", "private"), ("team", "tool")] {
        w.deploy("Deployment", ns, name, json!({}), &spec, Placement { nodes: &["node-a"], ready: true }).await;
    }
    // private's pods pull with a Secret of their own.
    pull_secret(&client, "shop", "private-pull", &host).await;
    let private = Patch::Merge(
        json!({ "spec": { "template": { "spec": { "imagePullSecrets": [{ "name": "private-pull" }] } } } }),
    );
    Api::<Deployment>::namespaced(client.clone(), "shop")
        .patch("private", &PatchParams::default(), &private)
        .await
        .unwrap();
    // The install's pull Secret.
    pull_secret(&client, "image-backup", "backup-pull", &host).await;

    let base = CoordinatorConfig {
        registry: access.clone(),
        backup_pull_secret: Some("backup-pull".into()),
        ..coordinator_config(&host)
    };
    let coordinator_client = coordinator_client(kind, &client).await;
    let agents = agent_client(kind, &client).await;
    let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&reference).unwrap());
    let backups = Api::<image_backup_crds::ImageBackup>::all(client.clone());

    // Not allowed to read the pods' pull secrets (the default install): the
    // pods' own credentials are not known, so nothing is moved, and the
    // ImageBackup says what would change that.
    let blind = CoordinatorConfig { read_pull_secrets: false, ..base.clone() };
    let coordinator = start_coordinator(&client, &coordinator_client, blind).await.with_agents_client(agents.clone());
    start_agent(&node, "node-a", &coordinator, access.clone()).await;
    eventually("the ImageBackup says the pods' pull secrets are not read", WAIT, || async {
        let status = backups.get(&name).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let private = status.workloads.iter().find(|n| n.workload == "Deployment/shop/private");
        match private {
            Some(note) if note.message.contains("--read-pull-secrets") => Ok(()),
            _ => Err(format!("{:?}", status.workloads)),
        }
    })
    .await;
    assert_eq!(image_of(&deployment(&client, "shop", "private").await), reference, "private left as it is");
    coordinator.stop().await;

    let coordinator =
        start_coordinator(&client, &coordinator_client, base.clone()).await.with_agents_client(agents.clone());
    start_agent(&node, "node-a", &coordinator, access.clone()).await;

    let pinned = format!("{host}/backup/{}/shop/app@{}", src.replace(':', "_"), image.digest());
    eventually("private runs its backup", WAIT, || async {
        let now = image_of(&deployment(&client, "shop", "private").await);
        if now == pinned { Ok(()) } else { Err(now) }
    })
    .await;
    assert_eq!(pull_secrets_of(&deployment(&client, "shop", "private").await), ["private-pull"], "nothing added");
    eventually("the ImageBackup says why plain and tool are left as they are", WAIT, || async {
        let status = backups.get(&name).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        // Those two only: the note the coordinator that could not read pull
        // secrets left about private goes once private's rollout is done.
        let mut notes: Vec<(String, String)> = status
            .workloads
            .iter()
            .filter(|n| n.workload != "Deployment/shop/private")
            .map(|n| (n.workload.clone(), n.message.clone()))
            .collect();
        notes.sort();
        match notes.as_slice() {
            [(plain, why_plain), (tool, why_tool)]
                if plain == "Deployment/shop/plain"
                    && tool == "Deployment/team/tool"
                    && why_plain.contains("refuses the backups to anonymous pulls")
                    && why_tool.contains("--copy-pull-secret") =>
            {
                Ok(())
            }
            _ => Err(format!("{notes:?}")),
        }
    })
    .await;
    for (ns, name) in [("shop", "plain"), ("team", "tool")] {
        assert_eq!(image_of(&deployment(&client, ns, name).await), reference, "{name} left as it is");
    }
    coordinator.stop().await;

    // Copying allowed: the install's Secret goes where it is missing, and
    // into the pod specs.
    let copying = CoordinatorConfig { copy_pull_secret: true, ..base };
    let coordinator = start_coordinator(&client, &coordinator_client, copying).await.with_agents_client(agents);
    start_agent(&node, "node-a", &coordinator, access).await;
    for (ns, name) in [("shop", "plain"), ("team", "tool")] {
        eventually(&format!("{name} runs its backup with the install's pull secret"), WAIT, || async {
            let now = deployment(&client, ns, name).await;
            if image_of(&now) == pinned && pull_secrets_of(&now) == ["backup-pull"] {
                Ok(())
            } else {
                Err(format!("{} with {:?}", image_of(&now), pull_secrets_of(&now)))
            }
        })
        .await;
        let copy = Api::<Secret>::namespaced(client.clone(), ns).get("backup-pull").await.unwrap();
        let config = copy.data.unwrap_or_default().remove(".dockerconfigjson").expect("a docker config");
        assert!(String::from_utf8_lossy(&config.0).contains(&host), "copied with the backup registry's entry");
    }
}
on_both_api_servers!(pullable: workloads_are_moved_only_to_backups_their_pods_can_pull_on_the_emulator, workloads_are_moved_only_to_backups_their_pods_can_pull_on_a_real_api_server);

/// With private images refused (a multi-tenant cluster), an image a
/// workload's pods pull with a pull secret for its registry is not copied
/// into the backup registry, where anyone with its pull credentials could
/// pull it; the workload says why, and a public one beside it is moved.
async fn private_refused(kind: ApiServerKind) {
    // A namespace of its own: on a real API server, other tests give
    // `shop`'s default ServiceAccount a pull secret, which would make
    // every image there private.
    let Some(s) = OneNode::new(kind, &["tenant"]).await else { return };
    let public = s.image("tenant/public:1", 91).await;
    let private = s.image("tenant/private:1", 92).await;
    s.deploy("Deployment", "tenant", "public", json!({}), &public).await;
    s.deploy("Deployment", "tenant", "private", json!({}), &private).await;
    pull_secret(&s.client, "tenant", "source-pull", &s.src).await;
    let with_secret = Patch::Merge(
        json!({ "spec": { "template": { "spec": { "imagePullSecrets": [{ "name": "source-pull" }] } } } }),
    );
    Api::<Deployment>::namespaced(s.client.clone(), "tenant")
        .patch("private", &PatchParams::default(), &with_secret)
        .await
        .unwrap();
    let config = CoordinatorConfig { refuse_private_images: true, ..coordinator_config(&s.backup_host()) };
    let _coordinator = s.start(config).await;

    s.runs("Deployment", "tenant", "public", &s.pinned(&public)).await;
    eventually("the private one says why it is not backed up", WAIT, || async {
        let events = s.events("tenant", "private").await;
        if events.iter().any(|e| e == "PrivateImagesNotBackedUp") { Ok(()) } else { Err(format!("{events:?}")) }
    })
    .await;
    assert_eq!(s.image_of("Deployment", "tenant", "private").await, private.0);
    assert!(s.image_backup(&private).await.is_none(), "no ImageBackup for the private image");
    let copied = s.backup.manifest(&s.repository(&private), private.1.digest()).await.unwrap();
    assert!(copied.is_none(), "nothing of it in the backup registry");
}
on_both_api_servers!(private_refused: private_images_are_not_backed_up_when_refused_on_the_emulator, private_images_are_not_backed_up_when_refused_on_a_real_api_server);
