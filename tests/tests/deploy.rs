//! The install manifests in deploy/: every object parses as its Kubernetes
//! type, every setting they pass is a flag the binaries read, RBAC grants
//! exactly what the coordinator uses, and the agent reaches every node's
//! containerd.

use std::collections::BTreeSet;

use clap::CommandFactory;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Container, PodSpec},
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
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ])
    );
    for object in &objects {
        let result = match object["kind"].as_str().unwrap() {
            "Deployment" => serde_json::from_value::<Deployment>(object.clone()).map(|_| ()),
            "DaemonSet" => serde_json::from_value::<DaemonSet>(object.clone()).map(|_| ()),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(object.clone()).map(|_| ()),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(object.clone()).map(|_| ()),
            "PodDisruptionBudget" => serde_json::from_value::<PodDisruptionBudget>(object.clone()).map(|_| ()),
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
            "/secrets:get",
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
            "authentication.k8s.io/tokenreviews:create",
            "authorization.k8s.io/subjectaccessreviews:create",
            "backup.k8slab.io/imagebackups/status:update",
            "backup.k8slab.io/imagebackups:create",
            "backup.k8slab.io/imagebackups:get",
            "backup.k8slab.io/imagebackups:list",
            "backup.k8slab.io/imagebackups:patch",
            "backup.k8slab.io/imagebackups:watch",
            "events.k8s.io/events:create",
        ]
    );
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
