//! Whether another controller manages a workload. Such a workload is put
//! back by its manager after a patch (an operator reconciles it, Argo CD or
//! Flux syncs it), and the two would then fight, restarting pods each time:
//! it is backed up, but not moved unless opted in.

use super::workload::Workload;

/// Labels and annotations GitOps tools put on what they manage, and who
/// each means.
const MARKERS: &[(&str, &str)] = &[
    ("argocd.argoproj.io/tracking-id", "Argo CD"),
    ("argocd.argoproj.io/instance", "Argo CD"),
    ("kustomize.toolkit.fluxcd.io/name", "Flux"),
    ("helm.toolkit.fluxcd.io/name", "Flux"),
    ("meta.helm.sh/release-name", "Helm"),
];

/// Who manages `workload`, in words, if anyone but its own kind's
/// controller does: an owner reference, a known GitOps marker, or one of
/// `extra` (label or annotation keys the install names, such as Argo CD's
/// `app.kubernetes.io/instance` label tracking).
pub fn manager(workload: &Workload, extra: &[String]) -> Option<String> {
    let meta = workload.metadata();
    if let Some(owner) = meta.owner_references.iter().flatten().next() {
        return Some(format!("owned by {} {}", owner.kind, owner.name));
    }
    let labels = meta.labels.iter().flatten();
    let annotations = meta.annotations.iter().flatten();
    let keys: Vec<&String> = labels.chain(annotations).map(|(k, _)| k).collect();
    let known = MARKERS.iter().find(|(marker, _)| keys.iter().any(|k| k == marker));
    if let Some((marker, tool)) = known {
        return Some(format!("managed by {tool} ({marker})"));
    }
    let helm = meta.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/managed-by"));
    if helm.is_some_and(|v| v.eq_ignore_ascii_case("helm")) {
        return Some("managed by Helm (app.kubernetes.io/managed-by)".into());
    }
    extra.iter().find(|marker| keys.contains(marker)).map(|marker| format!("managed by another tool ({marker})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::workload::tests::deployment;
    use serde_json::json;

    fn with_meta(meta: serde_json::Value) -> Workload {
        let Workload::Deployment(d) = deployment(json!(null)) else { unreachable!() };
        let mut value = serde_json::to_value(d).unwrap();
        for (k, v) in meta.as_object().unwrap() {
            value["metadata"][k] = v.clone();
        }
        Workload::Deployment(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn names_the_manager() {
        let owned = with_meta(
            json!({ "ownerReferences": [{ "apiVersion": "example.com/v1", "kind": "Database", "name": "pg", "uid": "1", "controller": true }] }),
        );
        assert_eq!(manager(&owned, &[]).as_deref(), Some("owned by Database pg"));
        let argo =
            with_meta(json!({ "annotations": { "argocd.argoproj.io/tracking-id": "shop:apps/Deployment:shop/web" } }));
        assert_eq!(manager(&argo, &[]).as_deref(), Some("managed by Argo CD (argocd.argoproj.io/tracking-id)"));
        let flux = with_meta(json!({ "labels": { "kustomize.toolkit.fluxcd.io/name": "apps" } }));
        assert!(manager(&flux, &[]).unwrap().contains("Flux"));
        let helm = with_meta(json!({ "labels": { "app.kubernetes.io/managed-by": "Helm" } }));
        assert!(manager(&helm, &[]).unwrap().contains("Helm"));
        let instance = with_meta(json!({ "labels": { "app.kubernetes.io/instance": "shop" } }));
        assert_eq!(manager(&instance, &[]), None, "a common label alone is not a manager");
        let extra = ["app.kubernetes.io/instance".to_string()];
        assert!(manager(&instance, &extra).unwrap().contains("app.kubernetes.io/instance"));
        assert_eq!(manager(&deployment(json!(null)), &[]), None);
    }
}
