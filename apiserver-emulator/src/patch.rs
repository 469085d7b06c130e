//! PATCH bodies: JSON merge patch and JSON patch through the `json-patch`
//! crate; strategic merge patch for built-in kinds written here.

use serde_json::{Map, Value};

use super::errors::{ApiError, ApiResult};

/// The patch types of the `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    /// `None` for anything that is not a patch type (the server's 415).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" => Some(Self::Apply),
            _ => None,
        }
    }
}

fn decode_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("error decoding patch: {e}"))
}

/// Applies `body` to `current` (for apply patches `current` may be `Null`:
/// create). `builtin`: the object is of a built-in kind, whose lists have
/// merge keys that an apply patch respects (containers by name).
pub fn apply(patch_type: PatchType, current: &Value, body: &[u8], builtin: bool) -> ApiResult<Value> {
    match patch_type {
        PatchType::Merge => {
            let patch: Value = serde_json::from_slice(body).map_err(decode_error)?;
            let mut doc = current.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::Json => {
            let ops: Value = serde_json::from_slice(body).map_err(decode_error)?;
            if !ops.is_array() {
                return Err(decode_error("json: cannot unmarshal object into Go value of type []handlers.jsonPatchOp"));
            }
            // An unknown op, a failed test or a missing path all get the same
            // generic 422 from the real server: the body names no operation.
            let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|_| ApiError::patch_rejected())?;
            let mut doc = current.clone();
            json_patch::patch(&mut doc, &patch).map_err(|_| ApiError::patch_rejected())?;
            Ok(doc)
        }
        PatchType::Strategic => {
            let patch: Value = serde_json::from_slice(body).map_err(decode_error)?;
            let mut doc = current.clone();
            strategic_merge(&mut doc, &patch, "");
            Ok(doc)
        }
        PatchType::Apply => {
            // Server-side apply without field ownership: the applied
            // configuration is merged into the object, lists by their keys
            // where the kind has them (see mod.rs).
            let patch: Value = serde_yaml::from_slice(body).map_err(decode_error)?;
            if !patch.is_object() {
                return Err(decode_error("apply patch must be an object"));
            }
            let mut doc = if current.is_null() { Value::Object(Map::new()) } else { current.clone() };
            if builtin {
                strategic_merge(&mut doc, &patch, "");
            } else {
                json_patch::merge(&mut doc, &patch);
            }
            Ok(doc)
        }
    }
}

/// The patch merge key of the lists of built-in kinds that strategic merge
/// merges instead of replacing (from the Go struct tags of core/v1).
pub fn merge_key(list_field: &str) -> Option<&'static str> {
    match list_field {
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets" => {
            Some("name")
        }
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "conditions" => Some("type"),
        "hostAliases" => Some("ip"),
        _ => None,
    }
}

/// Strategic merge patch (hand-written: no Rust crate implements it, and the
/// emulator only needs the merge keys of pod templates). Maps merge like a
/// merge patch; lists with a merge key merge element-wise by that key, with
/// `$patch: delete` removing an element and unknown keys added at the front
/// (as observed on the real server, 07.15); other lists are replaced.
fn strategic_merge(doc: &mut Value, patch: &Value, field: &str) {
    match patch {
        Value::Object(patch_map) => {
            if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut replacement = patch_map.clone();
                replacement.remove("$patch");
                *doc = Value::Object(replacement);
                return;
            }
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            let Some(target) = doc.as_object_mut() else { return };
            for (key, value) in patch_map {
                if key.starts_with('$') {
                    continue;
                }
                if value.is_null() {
                    target.remove(key);
                } else {
                    let entry = target.entry(key.clone()).or_insert(Value::Null);
                    strategic_merge(entry, value, key);
                }
            }
        }
        Value::Array(items) => match (merge_key(field), doc.as_array_mut()) {
            (Some(key), Some(existing)) => {
                let mut added = Vec::new();
                for item in items {
                    let Some(wanted) = item.get(key) else { continue };
                    let position = existing.iter().position(|e| e.get(key) == Some(wanted));
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (position, delete) {
                        (Some(i), true) => {
                            existing.remove(i);
                        }
                        (Some(i), false) => strategic_merge(&mut existing[i], item, ""),
                        (None, true) => {}
                        (None, false) => {
                            let mut fresh = Value::Null;
                            strategic_merge(&mut fresh, item, "");
                            added.push(fresh);
                        }
                    }
                }
                existing.splice(0..0, added);
            }
            _ => {
                let mut fresh = Vec::with_capacity(items.len());
                for item in items {
                    let mut v = Value::Null;
                    strategic_merge(&mut v, item, "");
                    fresh.push(v);
                }
                *doc = Value::Array(fresh);
            }
        },
        other => *doc = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strategic_merges_containers_by_name() {
        let doc =
            json!({"spec": {"containers": [{"name": "api", "image": "a:1"}, {"name": "sidecar", "image": "s:1"}]}});
        let patched = apply(
            PatchType::Strategic,
            &doc,
            br#"{"spec":{"containers":[{"name":"sidecar","image":"s:2"},{"name":"new","image":"n:1"}]}}"#,
            true,
        )
        .expect("applies");
        assert_eq!(
            patched["spec"]["containers"],
            json!([{"name": "new", "image": "n:1"}, {"name": "api", "image": "a:1"}, {"name": "sidecar", "image": "s:2"}])
        );
        let deleted = apply(
            PatchType::Strategic,
            &patched,
            br#"{"spec":{"containers":[{"name":"new","$patch":"delete"}]}}"#,
            true,
        )
        .expect("applies");
        assert_eq!(deleted["spec"]["containers"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn json_patch_failures_are_the_generic_422() {
        let doc = json!({"a": 1});
        let err = apply(PatchType::Json, &doc, br#"[{"op":"test","path":"/a","value":2}]"#, true).expect_err("fails");
        assert_eq!(err.code(), 422);
        let err = apply(PatchType::Json, &doc, br#"{"op":"test"}"#, true).expect_err("fails");
        assert_eq!(err.code(), 400);
    }
}
