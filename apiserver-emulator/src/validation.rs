//! Per-type validation and defaulting the controller can run into: object
//! names, Lease MicroTime, Event rules, CRD structural schemas (pruning,
//! types, required, minimum, enum). Only the rules the transcripts show are
//! here; the real server validates much more (see mod.rs for the list).

use serde_json::{Map, Value, json};

use super::errors::{ApiError, ApiResult, Cause};
use super::resources::ResourceType;

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' \
                             or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex \
                             used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and \
                         must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used \
                         for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

/// A DNS-1123 label's regex: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn matches_label_regex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label(s: &str) -> bool {
    s.len() <= 63 && matches_label_regex(s)
}

/// As the server's IsDNS1123Subdomain: at most 253 characters matching its
/// regex, which limits the length of no dot-separated part (a 70-character
/// name without dots is valid).
pub fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(matches_label_regex)
}

/// `metadata.name` must be a DNS subdomain.
fn name_causes(rt: &ResourceType, name: &str, generate_name: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !is_subdomain(name) {
        causes.push(Cause::invalid("metadata.name", &json!(name), SUBDOMAIN_MSG));
    }
    // events.k8s.io checks generateName on its own (14.8): `web.` is
    // refused; a trailing `-` is allowed (the server masks it).
    let masked = generate_name.strip_suffix('-').map(|g| format!("{g}a")).unwrap_or_else(|| generate_name.to_string());
    if rt.is_events_k8s_io() && !generate_name.is_empty() && !is_subdomain(&masked) {
        causes.push(Cause::invalid("metadata.generateName", &json!(generate_name), SUBDOMAIN_MSG));
    }
    causes
}

/// What the server fills in on create that controllers read back.
pub fn defaults_on_create(rt: &ResourceType, obj: &mut Value) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => {
            let name = obj["metadata"]["name"].clone();
            if !obj["metadata"]["labels"].is_object() {
                obj["metadata"]["labels"] = json!({});
            }
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        ("apps", "deployments") => {
            obj["status"] = json!({});
        }
        ("apps", "daemonsets") => {
            obj["status"] = json!({
                "currentNumberScheduled": 0,
                "numberMisscheduled": 0,
                "desiredNumberScheduled": 0,
                "numberReady": 0,
            });
            template_generation(rt, obj, 1);
        }
        ("", "pods") => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        _ => {}
    }
}

fn default(obj: &mut Value, key: &str, value: Value) {
    if let Some(m) = obj.as_object_mut()
        && m.get(key).is_none_or(Value::is_null)
    {
        m.insert(key.to_string(), value);
    }
}

/// `obj[key]` without inserting a null when it is missing (as `IndexMut` would).
fn child<'a>(obj: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    obj.get_mut(key).filter(|v| !v.is_null())
}

/// The defaults of a PodSpec (k8s.io/kubernetes pkg/apis/core/v1/defaults.go).
fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "securityContext", json!({}));
    default(spec, "schedulerName", json!("default-scheduler"));
    for list in ["initContainers", "containers"] {
        let Some(containers) = child(spec, list).and_then(Value::as_array_mut) else { continue };
        for c in containers {
            default(c, "resources", json!({}));
            default(c, "terminationMessagePath", json!("/dev/termination-log"));
            default(c, "terminationMessagePolicy", json!("File"));
            let image = c["image"].as_str().unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or_default();
            let latest = !image.contains('@') && (!last.contains(':') || last.ends_with(":latest"));
            default(c, "imagePullPolicy", json!(if latest { "Always" } else { "IfNotPresent" }));
            for port in child(c, "ports").and_then(Value::as_array_mut).into_iter().flatten() {
                default(port, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_rolling(strategy: &mut Value, unavailable: Value, surge: Value) {
    default(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        default(strategy, "rollingUpdate", json!({}));
        if let Some(rolling) = child(strategy, "rollingUpdate") {
            default(rolling, "maxUnavailable", unavailable);
            default(rolling, "maxSurge", surge);
        }
    }
}

/// Defaults the real server applies on every write of a built-in kind.
/// Without them a client that sends back what it read (PUT) would look like
/// it changed the spec, and generation would move when it must not.
pub fn apply_defaults(rt: &ResourceType, obj: &mut Value) {
    let kind = (rt.group.as_str(), rt.plural.as_str());
    let Some(spec) = child(obj, "spec") else { return };
    match kind {
        ("apps", "deployments") => {
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            default(spec, "strategy", json!({}));
            if let Some(strategy) = child(spec, "strategy") {
                default_rolling(strategy, json!("25%"), json!("25%"));
            }
            if let Some(template) = child(spec, "template") {
                default_template(template);
            }
        }
        ("apps", "daemonsets") => {
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "updateStrategy", json!({}));
            if let Some(strategy) = child(spec, "updateStrategy") {
                default_rolling(strategy, json!(1), json!(0));
            }
            if let Some(template) = child(spec, "template") {
                default_template(template);
            }
        }
        ("", "pods") => {
            default_pod_spec(spec);
            default(spec, "enableServiceLinks", json!(true));
            default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
            default(spec, "priority", json!(0));
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            default(spec, "conversion", json!({"strategy": "None"}));
            // A false bool is omitted from the stored v1 object.
            if spec["preserveUnknownFields"] == false
                && let Some(m) = spec.as_object_mut()
            {
                m.remove("preserveUnknownFields");
            }
        }
        _ => {}
    }
}

fn default_template(template: &mut Value) {
    default(template, "metadata", json!({}));
    if let Some(meta) = child(template, "metadata")
        && let Some(m) = meta.as_object_mut()
    {
        // Go serializes the zero creationTimestamp of an embedded ObjectMeta as null.
        m.entry("creationTimestamp").or_insert(Value::Null);
    }
    if let Some(spec) = child(template, "spec") {
        default_pod_spec(spec);
    }
}

/// DaemonSets record their template's generation in an annotation (the
/// registry strategy does it, not a controller).
pub fn template_generation(rt: &ResourceType, obj: &mut Value, generation: i64) {
    if rt.group != "apps" || rt.plural != "daemonsets" {
        return;
    }
    if !obj["metadata"]["annotations"].is_object() {
        obj["metadata"]["annotations"] = json!({});
    }
    obj["metadata"]["annotations"]["deprecated.daemonset.template.generation"] = json!(generation.to_string());
}

/// Validates (and for CRs prunes) an object about to be stored; `old` is
/// `None` on create. Returns warnings (`unknown field "spec.x"`). All field errors
/// are collected into one 422, as the server does.
pub fn validate(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) -> ApiResult<Vec<String>> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let generate_name = obj["metadata"]["generateName"].as_str().unwrap_or_default().to_string();
    let mut causes = if old.is_none() { name_causes(rt, &name, &generate_name) } else { Vec::new() };
    let mut warnings = Vec::new();
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("coordination.k8s.io", "leases") => causes.extend(lease_causes(rt, obj)?),
        ("" | "events.k8s.io", "events") => causes.extend(event_causes(rt, obj)?),
        ("apps", "deployments") | ("apps", "daemonsets") => {
            causes.extend(container_causes(&obj["spec"]["template"]["spec"], "spec.template.spec"))
        }
        ("", "pods") => causes.extend(container_causes(&obj["spec"], "spec")),
        ("", "secrets") => fold_string_data(obj),
        ("apiextensions.k8s.io", "customresourcedefinitions") => causes.extend(crd_causes(obj)),
        _ if rt.custom => {
            let (w, c) = custom_causes(rt, obj);
            warnings = w;
            causes.extend(c);
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(warnings)
    } else if rt.plural == "events" {
        // Both Event APIs report errors as the core kind (no group).
        Err(ApiError::invalid_as("Event", "", "Event", &name, causes))
    } else {
        Err(ApiError::invalid(rt, &name, causes))
    }
}

/// A Secret's `stringData` is write-only: the server merges it into `data`
/// (base64, overriding keys there) on every write and never stores it.
fn fold_string_data(obj: &mut Value) {
    use base64::Engine as _;
    let Some(Value::Object(strings)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else { return };
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default();
        obj["data"][key] = Value::String(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// What the emulator needs of a CRD to serve it: a name derived from the
/// served names, a scope, and at least one served version.
fn crd_causes(crd: &Value) -> Vec<Cause> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    if name != format!("{plural}.{group}") {
        causes.push(Cause::invalid("metadata.name", &json!(name), "must be spec.names.plural+\".\"+spec.group"));
    }
    if spec["names"]["kind"].as_str().unwrap_or_default().is_empty() {
        causes.push(Cause::required("spec.names.kind", ""));
    }
    if !matches!(spec["scope"].as_str(), Some("Cluster" | "Namespaced")) {
        causes.push(Cause::not_supported("spec.scope", &spec["scope"], &["Cluster", "Namespaced"]));
    }
    let versions = spec["versions"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !versions.iter().any(|v| v["served"].as_bool() == Some(true)) {
        causes.push(Cause::invalid("spec.versions", &json!(versions.len()), "must have at least one served version"));
    }
    causes
}

/// Container names must be DNS labels (02.12).
fn container_causes(pod_spec: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in pod_spec[list].as_array().into_iter().flatten().enumerate() {
            let cname = c["name"].as_str().unwrap_or_default();
            if !is_label(cname) {
                causes.push(Cause::invalid(format!("{path}.{list}[{i}].name"), &json!(cname), LABEL_MSG));
            }
        }
    }
    causes
}

/// A MicroTime must have exactly 6 fractional digits (Go's layout
/// `2006-01-02T15:04:05.000000Z07:00`); anything else is a decode error (400).
pub fn check_micro_time(rt: &ResourceType, value: &Value) -> ApiResult<()> {
    let Some(s) = value.as_str() else { return Ok(()) };
    let ok = s.len() >= 27
        && s.as_bytes().get(19) == Some(&b'.')
        && s[20..26].bytes().all(|b| b.is_ascii_digit())
        && (s[26..] == *"Z" || s[26..].starts_with('+') || s[26..].starts_with('-'))
        && jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%S%.f%:z", s.replace('Z', "+00:00")).is_ok();
    if ok {
        return Ok(());
    }
    let got = s.get(19..).unwrap_or_default();
    Err(ApiError::undecodable(
        rt,
        &format!("parsing time {s:?} as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse {:?} as \".000000\"", got),
    ))
}

fn lease_causes(rt: &ResourceType, obj: &Value) -> ApiResult<Vec<Cause>> {
    let spec = &obj["spec"];
    check_micro_time(rt, &spec["acquireTime"])?;
    check_micro_time(rt, &spec["renewTime"])?;
    if let Some(d) = spec["leaseDurationSeconds"].as_i64()
        && d <= 0
    {
        return Ok(vec![Cause::invalid("spec.leaseDurationSeconds", &json!(d), "must be greater than 0")]);
    }
    Ok(Vec::new())
}

const NAME_PART_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
                             and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', \
                             regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// Event validation of v1.26 (ValidateEventCreate), in its order and words.
/// Events are stored in core/v1 form; events.k8s.io adds its own rules.
/// The real server names some fields the core way whatever the API
/// (`involvedObject.namespace`), others the way of the API used.
fn event_causes(rt: &ResourceType, stored: &Value) -> ApiResult<Vec<Cause>> {
    check_micro_time(rt, &stored["eventTime"])?;
    let new_api = rt.is_events_k8s_io();
    let ns = stored["metadata"]["namespace"].as_str().unwrap_or_default();
    let involved_ns = stored["involvedObject"]["namespace"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    // Events about cluster-scoped objects belong in `default`.
    let expected_ns = if involved_ns.is_empty() { "default" } else { involved_ns };
    if expected_ns != ns {
        causes.push(Cause::invalid("involvedObject.namespace", &json!(involved_ns), "does not match event.namespace"));
    }
    let has_event_time = stored["eventTime"].is_string();
    if new_api && !has_event_time {
        causes.push(Cause::required("eventTime", ""));
    }
    let empty = |field: &str| stored[field].as_str().unwrap_or_default().is_empty();
    if has_event_time {
        let reporting = if new_api { "reportingController" } else { "reportingComponent" };
        if empty("reportingComponent") {
            causes.push(Cause::required(reporting, ""));
            causes.push(Cause::invalid(reporting, &json!(""), "name part must be non-empty"));
            causes.push(Cause::invalid(reporting, &json!(""), NAME_PART_MSG));
        }
        for field in ["reportingInstance", "action", "reason"] {
            if empty(field) {
                causes.push(Cause::required(field, ""));
            }
        }
    }
    let kind = stored["type"].as_str().unwrap_or_default();
    if new_api && kind != "Normal" && kind != "Warning" {
        // Sic: the server prints the empty string as the value.
        causes.push(Cause::invalid("type", &json!(""), &format!("has invalid value: {kind}")));
    }
    if stored["message"].as_str().is_some_and(|m| m.len() > 1024) {
        causes.push(Cause::invalid("message", &json!(""), "can have at most 1024 characters"));
    }
    Ok(causes)
}

/// The events.k8s.io/v1 field names of a stored core/v1 Event.
pub fn core_event_to_events_v1(core: &Value) -> Value {
    let Some(src) = core.as_object() else { return core.clone() };
    let mut out = Map::new();
    for (key, value) in src {
        let renamed = match key.as_str() {
            "involvedObject" => "regarding",
            "message" => "note",
            "reportingComponent" => "reportingController",
            "firstTimestamp" => "deprecatedFirstTimestamp",
            "lastTimestamp" => "deprecatedLastTimestamp",
            "count" => "deprecatedCount",
            "source" => "deprecatedSource",
            other => other,
        };
        out.insert(renamed.to_string(), value.clone());
    }
    Value::Object(out)
}

/// The stored core/v1 form of an events.k8s.io/v1 Event.
pub fn events_v1_to_core_event(event: &Value) -> Value {
    let Some(src) = event.as_object() else { return event.clone() };
    let mut out = Map::new();
    for (key, value) in src {
        let renamed = match key.as_str() {
            "regarding" => "involvedObject",
            "note" => "message",
            "reportingController" => "reportingComponent",
            "deprecatedFirstTimestamp" => "firstTimestamp",
            "deprecatedLastTimestamp" => "lastTimestamp",
            "deprecatedCount" => "count",
            "deprecatedSource" => "source",
            other => other,
        };
        out.insert(renamed.to_string(), value.clone());
    }
    Value::Object(out)
}

/// Structural-schema handling of a custom resource: prune unknown fields
/// (with a warning per pruned field), then check types, required fields,
/// minimum and enum. Causes are sorted by field, as the server reports them.
fn custom_causes(rt: &ResourceType, obj: &mut Value) -> (Vec<String>, Vec<Cause>) {
    let Some(schema) = &rt.schema else { return (Vec::new(), Vec::new()) };
    let mut warnings = Vec::new();
    let mut causes = Vec::new();
    if let Some(top) = obj.as_object_mut() {
        let props = &schema["properties"];
        let keys: Vec<String> = top.keys().cloned().collect();
        for key in keys {
            if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            let Some(sub) = props.get(&key) else {
                if !schema["x-kubernetes-preserve-unknown-fields"].as_bool().unwrap_or(false) {
                    top.remove(&key);
                    warnings.push(format!("unknown field \"{key}\""));
                }
                continue;
            };
            if let Some(value) = top.get_mut(&key) {
                walk(sub, value, &key, &mut warnings, &mut causes);
            }
        }
        if let Some(required) = schema["required"].as_array() {
            for r in required.iter().filter_map(Value::as_str) {
                if !top.contains_key(r) {
                    causes.push(Cause::required(r, ""));
                }
            }
        }
    }
    causes.sort_by(|a, b| a.field.cmp(&b.field));
    (warnings, causes)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(schema: &Value, value: &mut Value, path: &str, warnings: &mut Vec<String>, causes: &mut Vec<Cause>) {
    if value.is_null() && schema["nullable"].as_bool().unwrap_or(false) {
        return;
    }
    if let Some(want) = schema["type"].as_str() {
        let have = type_name(value);
        let fits = have == want || (want == "number" && have == "integer");
        if !fits {
            let message = format!("Invalid value: \"{have}\": {path} in body must be of type {want}: \"{have}\"");
            causes.push(Cause::new("FieldValueTypeInvalid", path, message));
            return;
        }
    }
    if let (Some(min), Some(v)) = (schema["minimum"].as_f64(), value.as_f64())
        && v < min
    {
        let message = format!("Invalid value: {value}: {path} in body should be greater than or equal to {min}");
        causes.push(Cause::new("FieldValueInvalid", path, message));
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
        causes.push(Cause::not_supported(path, value, &names));
    }
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool().unwrap_or(false);
            if let Some(props) = schema["properties"].as_object() {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    let child = format!("{path}.{key}");
                    match props.get(&key) {
                        Some(sub) => {
                            if let Some(v) = map.get_mut(&key) {
                                walk(sub, v, &child, warnings, causes);
                            }
                        }
                        None if !preserve => {
                            map.remove(&key);
                            warnings.push(format!("unknown field \"{child}\""));
                        }
                        None => {}
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                for (key, v) in map.iter_mut() {
                    walk(extra, v, &format!("{path}.{key}"), warnings, causes);
                }
            }
            if let Some(required) = schema["required"].as_array() {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        causes.push(Cause::required(format!("{path}.{r}"), ""));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), warnings, causes);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_subdomains_of_any_part_length_up_to_253() {
        let long = format!("registry-example-team-{}", "a".repeat(60));
        assert!(is_subdomain(&long), "a part longer than a label's 63");
        assert!(is_subdomain("a.b-c.d"));
        assert!(!is_subdomain(&"a".repeat(254)));
        for bad in ["", "-a", "a-", "a..b", "A", "a_b"] {
            assert!(!is_subdomain(bad), "{bad:?}");
        }
        assert!(!is_label(&"a".repeat(64)), "a label stays at 63");
    }
}
