//! Admission of the real server's default plugins that tests run into.
//! They run before validation: a Pod refused here gets the 403 even when
//! it is invalid too, as on the real server.

use serde_json::{Value, json};

use super::errors::{ApiError, ApiResult};
use super::resources::ResourceType;

/// The ServiceAccount plugin on Pod creation: the Pod runs as
/// `spec.serviceAccountName` (or the deprecated `spec.serviceAccount`, else
/// `default`), which must exist in its namespace. Without the
/// controller-manager nobody creates `default`, so a test cluster must.
/// `name` is what the client asked for (name, else generateName), since the
/// real server refuses before it generates a name.
pub fn service_account(
    rt: &ResourceType,
    namespace: &str,
    name: &str,
    pod: &mut Value,
    exists: impl Fn(&str) -> bool,
) -> ApiResult<()> {
    if !(rt.group.is_empty() && rt.plural == "pods") || is_mirror(pod) {
        return Ok(());
    }
    let spec = &pod["spec"];
    let named = |field: &str| spec[field].as_str().filter(|s| !s.is_empty()).map(str::to_string);
    let account = named("serviceAccountName").or_else(|| named("serviceAccount")).unwrap_or_else(|| "default".into());
    if !exists(&account) {
        return Err(ApiError::forbidden_by_admission(
            rt,
            name,
            &format!("error looking up service account {namespace}/{account}: serviceaccount \"{account}\" not found"),
        ));
    }
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("serviceAccountName".into(), json!(account));
        spec.insert("serviceAccount".into(), json!(account));
    }
    Ok(())
}

/// A kubelet's static Pod mirrored into the API runs as no ServiceAccount.
fn is_mirror(pod: &Value) -> bool {
    pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string()
}
