//! The install manifests in deploy/: every object parses as its Kubernetes
//! type, every setting they pass is a flag the binaries read, RBAC grants
//! exactly what the coordinator uses, and the agent reaches every node's
//! containerd.

use std::collections::BTreeSet;

use clap::CommandFactory;
use k8s_openapi::api::{
    admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Container, PodSpec},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
    rbac::v1::ClusterRole,
};
use serde::Deserialize;
use serde_json::Value;

fn manifests() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let mut objects = Vec::new();
    for file in kustomization["resources"].as_array().unwrap() {
        let text = std::fs::read_to_string(dir.join(file.as_str().unwrap())).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            if !value.is_null() {
                objects.push(value);
            }
        }
    }
    objects
}

fn find<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str, name: &str) -> T {
    let object = objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} in deploy/"));
    serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{kind} {name} is not a valid {kind}: {e}"))
}

/// Environment variables a container gets, from `env` and `envFrom`.
fn env_names(container: &Container, objects: &[Value]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
    for source in container.env_from.iter().flatten() {
        let name = source.config_map_ref.as_ref().map(|c| c.name.clone()).unwrap_or_default();
        let config: ConfigMap = find(objects, "ConfigMap", &name);
        names.extend(config.data.unwrap_or_default().into_keys());
    }
    names
}

fn flag_envs(command: &clap::Command) -> BTreeSet<String> {
    command.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect()
}

#[test]
fn every_object_is_a_valid_kubernetes_object() {
    let objects = manifests();
    let kinds: BTreeSet<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "DaemonSet",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ])
    );
    for object in &objects {
        let result = match object["kind"].as_str().unwrap() {
            "Deployment" => serde_json::from_value::<Deployment>(object.clone()).map(|_| ()),
            "DaemonSet" => serde_json::from_value::<DaemonSet>(object.clone()).map(|_| ()),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(object.clone()).map(|_| ()),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(object.clone()).map(|_| ()),
            "PodDisruptionBudget" => serde_json::from_value::<PodDisruptionBudget>(object.clone()).map(|_| ()),
            "NetworkPolicy" => serde_json::from_value::<NetworkPolicy>(object.clone()).map(|_| ()),
            "ValidatingAdmissionPolicy" => {
                serde_json::from_value::<ValidatingAdmissionPolicy>(object.clone()).map(|_| ())
            }
            "ValidatingAdmissionPolicyBinding" => {
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(object.clone()).map(|_| ())
            }
            _ => Ok(()),
        };
        result.unwrap_or_else(|e| panic!("{}: {e}", object["metadata"]["name"]));
    }
}

#[test]
fn every_setting_is_a_flag_the_binary_reads() {
    let objects = manifests();
    // Read by the runtime or the Kubernetes downward API wiring, not flags.
    let generic = BTreeSet::from(["RUST_LOG".to_string()]);
    let coordinator_flags = flag_envs(&image_backup_coordinator::cli::Cli::command());
    let agent = image_backup_agent::cli::Cli::command();
    let agent_flags = flag_envs(agent.find_subcommand("run").unwrap());

    let deployment: Deployment = find(&objects, "Deployment", "image-backup-coordinator");
    let pod: PodSpec = deployment.spec.template.spec.unwrap();
    for name in env_names(&pod.containers[0], &objects) {
        assert!(
            coordinator_flags.contains(&name) || generic.contains(&name),
            "coordinator gets {name}, which it never reads"
        );
    }
    let daemonset: DaemonSet = find(&objects, "DaemonSet", "image-backup-agent");
    let pod: PodSpec = daemonset.spec.template.spec.unwrap();
    let agent_env = env_names(&pod.containers[0], &objects);
    // The shared settings ConfigMap carries the coordinator's keys too.
    let shared: ConfigMap = find(&objects, "ConfigMap", "image-backup-settings");
    let shared: BTreeSet<String> = shared.data.unwrap_or_default().into_keys().collect();
    for name in &agent_env {
        assert!(
            agent_flags.contains(name) || generic.contains(name) || shared.contains(name),
            "agent gets {name}, which it never reads"
        );
    }
    for required in ["NODE_NAME", "IMAGE_BACKUP_COORDINATOR", "IMAGE_BACKUP_CONTAINERD"] {
        assert!(agent_env.contains(required), "agent needs {required}");
    }
}

#[test]
fn rbac_grants_only_what_the_coordinator_uses() {
    let role: ClusterRole = find(&manifests(), "ClusterRole", "image-backup-coordinator");
    let mut grants: Vec<String> = role
        .rules
        .unwrap()
        .into_iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.unwrap_or_default();
            let resources = rule.resources.unwrap_or_default();
            let verbs = rule.verbs;
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |r| {
                    let g = g.clone();
                    verbs.clone().into_iter().map(move |v| format!("{g}/{r}:{v}"))
                })
            })
        })
        .collect();
    grants.sort();
    assert_eq!(
        grants,
        [
            "/pods:list",
            "/serviceaccounts:get",
            "apps/controllerrevisions:list",
            "apps/daemonsets:get",
            "apps/daemonsets:list",
            "apps/daemonsets:patch",
            "apps/daemonsets:watch",
            "apps/deployments:get",
            "apps/deployments:list",
            "apps/deployments:patch",
            "apps/deployments:watch",
            "apps/replicasets:list",
            "apps/statefulsets:list",
            "authentication.k8s.io/tokenreviews:create",
            "authorization.k8s.io/subjectaccessreviews:create",
            "backup.k8slab.io/imagebackups/status:update",
            "backup.k8slab.io/imagebackups:create",
            "backup.k8slab.io/imagebackups:delete",
            "backup.k8slab.io/imagebackups:get",
            "backup.k8slab.io/imagebackups:list",
            "backup.k8slab.io/imagebackups:patch",
            "backup.k8slab.io/imagebackups:watch",
            "batch/cronjobs:list",
            "batch/jobs:list",
            "events.k8s.io/events:create",
        ]
    );
}

/// The agent reads no Secret: no role bound to its ServiceAccount grants
/// any verb on Secrets, so the coordinator's CA key and every job's
/// credentials are out of a node's reach.
#[test]
fn the_agent_reads_no_secret() {
    let objects = manifests();
    let bound_to_agent: Vec<(String, String)> = objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding")))
        .filter(|o| o["subjects"].as_array().into_iter().flatten().any(|s| s["name"] == "image-backup-agent"))
        .map(|o| {
            (o["roleRef"]["kind"].as_str().unwrap().to_string(), o["roleRef"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(bound_to_agent, [("ClusterRole".to_string(), "image-backup-agent".to_string())]);
    for (kind, name) in bound_to_agent {
        let role =
            objects.iter().find(|o| o["kind"] == kind.as_str() && o["metadata"]["name"] == name.as_str()).unwrap();
        for rule in role["rules"].as_array().unwrap() {
            let resources: Vec<&str> =
                rule["resources"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
            assert!(!resources.iter().any(|r| *r == "secrets" || *r == "*"), "{name} grants {resources:?}");
        }
    }
}

#[test]
fn the_agent_runs_on_every_node_next_to_containerd() {
    let daemonset: DaemonSet = find(&manifests(), "DaemonSet", "image-backup-agent");
    let pod = daemonset.spec.template.spec.unwrap();
    assert!(pod.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let container = &pod.containers[0];
    let node_name = container.env.iter().flatten().find(|e| e.name == "NODE_NAME").unwrap();
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));
    let socket = pod.volumes.iter().flatten().find(|v| v.name == "containerd-socket").unwrap();
    assert_eq!(socket.host_path.as_ref().map(|h| h.type_.as_deref()), Some(Some("Socket")));
    assert_eq!(container.args.as_deref().map(|a| a[0].as_str()), Some("run"));
}

/// deploy/ runs the images `images/build` makes of this version, the tag
/// the binaries' `--version` and the images' labels carry.
#[test]
fn the_images_are_pinned_to_the_workspace_version() {
    let objects = manifests();
    let version = env!("CARGO_PKG_VERSION");
    let deployment: Deployment = find(&objects, "Deployment", "image-backup-coordinator");
    let daemonset: DaemonSet = find(&objects, "DaemonSet", "image-backup-agent");
    for (pod, binary) in [
        (deployment.spec.template.spec.unwrap(), "image-backup-coordinator"),
        (daemonset.spec.template.spec.unwrap(), "image-backup-agent"),
    ] {
        assert_eq!(pod.containers[0].image.as_deref(), Some(format!("ghcr.io/k8slab/{binary}:{version}").as_str()));
    }
    let coordinator = image_backup_coordinator::cli::Cli::command();
    let agent = image_backup_agent::cli::Cli::command();
    assert_eq!(coordinator.get_version(), Some(version));
    assert_eq!(agent.get_version(), Some(version));
    // A `docker build` that names no VERSION labels the images with this.
    let containerfile =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Containerfile")).unwrap();
    assert!(containerfile.lines().any(|l| l == format!("ARG VERSION={version}")), "Containerfile's ARG VERSION");
}

#[test]
fn pods_run_hardened_and_only_the_coordinator_writes_imagebackups() {
    let objects = manifests();
    let deployment: Deployment = find(&objects, "Deployment", "image-backup-coordinator");
    let spec = deployment.spec;
    assert_eq!(spec.replicas, Some(2), "two replicas elect a leader");
    // Both replicas ready (a rolling update and the PodDisruptionBudget
    // need that); the Service selects the leader by the label it sets.
    let probe = spec.template.spec.as_ref().unwrap().containers[0].readiness_probe.clone().unwrap();
    assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/healthz"));
    let service = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    assert_eq!(service["spec"]["selector"][image_backup_coordinator::leader::ROLE_LABEL], "leader");
    let pod = spec.template.spec.unwrap();
    let security = pod.security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".to_string()));
    let container = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(container.read_only_root_filesystem, Some(true));
    assert_eq!(container.allow_privilege_escalation, Some(false));
    assert_eq!(container.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));

    let daemonset: DaemonSet = find(&objects, "DaemonSet", "image-backup-agent");
    let pod = daemonset.spec.template.spec.unwrap();
    let seccomp = pod.security_context.and_then(|s| s.seccomp_profile).map(|p| p.type_);
    assert_eq!(seccomp, Some("RuntimeDefault".to_string()));
    let container = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(container.read_only_root_filesystem, Some(true));
    let token = pod.volumes.iter().flatten().find(|v| v.name == "agent-token").unwrap();
    let projected =
        token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(projected.audience.as_deref(), Some(image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE));

    // Every pod of the install is behind a NetworkPolicy.
    for name in ["image-backup-coordinator", "image-backup-agent"] {
        let policy: NetworkPolicy = find(&objects, "NetworkPolicy", name);
        let selected = policy.spec.unwrap().pod_selector.unwrap_or_default().match_labels.unwrap_or_default();
        assert_eq!(selected.get("app.kubernetes.io/name").map(String::as_str), Some(name));
    }
    let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].is_string());

    // The policy names the ServiceAccount the coordinator runs as, in the
    // namespace the install uses.
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomization.yaml"))
            .unwrap(),
    )
    .unwrap();
    let account = format!(
        "system:serviceaccount:{}:{}",
        kustomization["namespace"].as_str().unwrap(),
        pod_account(&objects, "Deployment", "image-backup-coordinator")
    );
    let policy: ValidatingAdmissionPolicy =
        find(&objects, "ValidatingAdmissionPolicy", "image-backup-imagebackup-writers");
    let spec = policy.spec.unwrap();
    let expression = &spec.validations.unwrap()[0].expression;
    assert!(expression.contains(&format!("'{account}'")), "{expression}");
    let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
    let resources: Vec<String> = rules.iter().flat_map(|r| r.resources.clone().unwrap_or_default()).collect();
    assert_eq!(resources, ["imagebackups", "imagebackups/status"]);
    let binding: ValidatingAdmissionPolicyBinding =
        find(&objects, "ValidatingAdmissionPolicyBinding", "image-backup-imagebackup-writers");
    assert_eq!(binding.spec.policy_name, "image-backup-imagebackup-writers");
}

fn pod_account(objects: &[Value], kind: &str, name: &str) -> String {
    let object = objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).unwrap();
    object["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap().to_string()
}
