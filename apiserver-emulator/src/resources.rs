//! The resource types the emulator serves: the built-in ones a controller of
//! this project touches, plus whatever CustomResourceDefinitions register.
//! Each type carries the rules in which the real server differs per type
//! (generation, status subresource, update preconditions, field selectors).

use serde_json::{Value, json};

/// When `metadata.generation` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// The type has no generation (Pods, Namespaces, Leases, ...).
    None,
    /// +1 on any change outside metadata and status (CRs, DaemonSets).
    Spec,
    /// Also +1 on annotation changes (Deployments).
    SpecAndAnnotations,
}

#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Writes to the main resource keep the stored status; `/status` writes only change status.
    pub status_subresource: bool,
    /// Custom resource: no strategic merge patch, items keep kind/apiVersion in lists.
    pub custom: bool,
    /// PUT without `metadata.resourceVersion` is a 422 (CRs, Leases) instead of an unconditional update.
    pub update_requires_rv: bool,
    pub generation: Generation,
    /// Field selector labels beyond metadata.name / metadata.namespace.
    pub extra_field_labels: Vec<&'static str>,
    /// Served but never stored (TokenReview): only POST.
    pub create_only: bool,
    /// openAPIV3Schema of a CRD version, for validation and pruning.
    pub schema: Option<Value>,
}

impl ResourceType {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: Vec::new(),
            status_subresource: false,
            custom: false,
            update_requires_rv: false,
            generation: Generation::None,
            extra_field_labels: Vec::new(),
            create_only: false,
            schema: None,
        }
    }

    fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    fn with_generation(mut self, generation: Generation) -> Self {
        self.generation = generation;
        self
    }

    fn with_short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Where objects of this type live in the store: events.k8s.io Events are
    /// core Events seen through another schema, as in the real server.
    pub fn storage(&self) -> (String, String) {
        if self.group == "events.k8s.io" {
            (String::new(), "events".into())
        } else {
            (self.group.clone(), self.plural.clone())
        }
    }

    pub fn is_events_k8s_io(&self) -> bool {
        self.group == "events.k8s.io"
    }

    /// The APIResource entries of discovery for this type (main + status).
    pub fn discovery_entries(&self) -> Vec<Value> {
        let verbs: Vec<&str> = if self.create_only {
            vec!["create"]
        } else if self.custom {
            // The order the apiextensions server lists them in.
            vec!["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]
        } else if self.plural == "namespaces" {
            vec!["create", "delete", "get", "list", "patch", "update", "watch"]
        } else {
            vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        };
        let mut main = json!({
            "name": self.plural,
            // Built-in types leave it empty in v1.26 discovery; CRDs fill it.
            "singularName": if self.custom { self.singular.as_str() } else { "" },
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        let mut out = vec![main];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// The built-in types served from start.
pub fn builtin_types() -> Vec<ResourceType> {
    let mut pods = ResourceType::builtin("", "v1", "pods", "Pod", true).with_status().with_short_names(&["po"]);
    pods.extra_field_labels = vec![
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ];
    let mut events = ResourceType::builtin("", "v1", "events", "Event", true).with_short_names(&["ev"]);
    events.extra_field_labels = vec![
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ];
    let mut new_events =
        ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true).with_short_names(&["ev"]);
    new_events.extra_field_labels = vec![
        "regarding.kind",
        "regarding.namespace",
        "regarding.name",
        "regarding.uid",
        "regarding.apiVersion",
        "regarding.resourceVersion",
        "regarding.fieldPath",
        "reason",
        "reportingController",
        "type",
    ];
    let mut leases = ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true);
    leases.update_requires_rv = true;
    let mut token_reviews = ResourceType::builtin("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", false);
    token_reviews.create_only = true;
    let mut access_reviews =
        ResourceType::builtin("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", false);
    access_reviews.create_only = true;
    vec![
        ResourceType::builtin("", "v1", "namespaces", "Namespace", false).with_status().with_short_names(&["ns"]),
        pods,
        ResourceType::builtin("", "v1", "configmaps", "ConfigMap", true).with_short_names(&["cm"]),
        ResourceType::builtin("", "v1", "secrets", "Secret", true),
        ResourceType::builtin("", "v1", "serviceaccounts", "ServiceAccount", true).with_short_names(&["sa"]),
        ResourceType::builtin("", "v1", "nodes", "Node", false).with_status().with_short_names(&["no"]),
        events,
        ResourceType::builtin("apps", "v1", "deployments", "Deployment", true)
            .with_status()
            .with_generation(Generation::SpecAndAnnotations)
            .with_short_names(&["deploy"]),
        ResourceType::builtin("apps", "v1", "daemonsets", "DaemonSet", true)
            .with_status()
            .with_generation(Generation::Spec)
            .with_short_names(&["ds"]),
        ResourceType::builtin("apps", "v1", "replicasets", "ReplicaSet", true)
            .with_status()
            .with_generation(Generation::Spec)
            .with_short_names(&["rs"]),
        ResourceType::builtin("apps", "v1", "controllerrevisions", "ControllerRevision", true),
        ResourceType::builtin("apps", "v1", "statefulsets", "StatefulSet", true)
            .with_status()
            .with_generation(Generation::Spec)
            .with_short_names(&["sts"]),
        ResourceType::builtin("batch", "v1", "jobs", "Job", true).with_status().with_generation(Generation::Spec),
        ResourceType::builtin("batch", "v1", "cronjobs", "CronJob", true)
            .with_status()
            .with_generation(Generation::Spec)
            .with_short_names(&["cj"]),
        new_events,
        leases,
        token_reviews,
        access_reviews,
        ResourceType::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        ResourceType::builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
        ResourceType::builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
        ResourceType::builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .with_status()
        .with_generation(Generation::Spec)
        .with_short_names(&["crd", "crds"]),
    ]
}

/// The types a CRD serves (one per served version).
pub fn types_from_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let kind = str_of(&names["kind"]);
    let plural = str_of(&names["plural"]);
    let singular = names["singular"].as_str().map(str::to_string).unwrap_or_else(|| kind.to_lowercase());
    let short_names: Vec<String> = names["shortNames"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(false))
        .map(|v| ResourceType {
            group: str_of(&spec["group"]),
            version: str_of(&v["name"]),
            plural: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            short_names: short_names.clone(),
            status_subresource: v["subresources"]["status"].is_object(),
            custom: true,
            update_requires_rv: true,
            generation: Generation::Spec,
            extra_field_labels: Vec::new(),
            create_only: false,
            schema: v["schema"]["openAPIV3Schema"].as_object().map(|o| Value::Object(o.clone())),
        })
        .collect()
}

/// `/version`, as the recorded v1.26.0 server answers it.
pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "26",
        "gitVersion": "v1.26.0",
        "gitCommit": "b46a3f887ca979b1a5d14fd39cb1af43e7e5d12d",
        "gitTreeState": "clean",
        "buildDate": "2022-12-08T19:51:45Z",
        "goVersion": "go1.19.4",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}
