//! `Status` error bodies, worded exactly as kube-apiserver v1.26 words them
//! (see `transcripts/README.md`): clients such as kube-rs and the
//! controller match on `reason` and `code`, and people read `message`.

use serde_json::{Value, json};

use super::resources::ResourceType;

/// An API error: rendered as a `Status` object, or as the plain-text
/// `404 page not found` the real server gives for unknown paths.
#[derive(Debug, Clone)]
pub enum ApiError {
    Status {
        code: u16,
        reason: Option<&'static str>,
        message: String,
        details: Option<Value>,
        /// `metadata` of the Status (only an expired continue token sets it).
        metadata: Option<Value>,
    },
    PageNotFound,
}

pub type ApiResult<T> = Result<T, ApiError>;

/// One entry of `details.causes` in a 422.
#[derive(Debug, Clone)]
pub struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

impl Cause {
    pub fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), field: field.into() }
    }

    pub fn required(field: impl Into<String>, what: &str) -> Self {
        Self::new("FieldValueRequired", field, format!("Required value{}", suffix(what)))
    }

    pub fn invalid(field: impl Into<String>, value: &Value, what: &str) -> Self {
        Self::new("FieldValueInvalid", field, format!("Invalid value: {}{}", go_value(value), suffix(what)))
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let list = supported.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        Self::new(
            "FieldValueNotSupported",
            field,
            format!("Unsupported value: {}: supported values: {list}", go_value(value)),
        )
    }
}

fn suffix(what: &str) -> String {
    if what.is_empty() { String::new() } else { format!(": {what}") }
}

/// How Go's `%#v`-ish field error printing renders a value: strings quoted,
/// numbers bare.
pub fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// `deployments.apps`, or `configmaps` for the core group.
pub fn qualified_resource(rt: &ResourceType) -> String {
    if rt.group.is_empty() { rt.plural.clone() } else { format!("{}.{}", rt.plural, rt.group) }
}

/// `Deployment.apps`, or `Pod` for the core group.
pub fn qualified_kind(rt: &ResourceType) -> String {
    if rt.group.is_empty() { rt.kind.clone() } else { format!("{}.{}", rt.kind, rt.group) }
}

fn details(name: &str, group: &str, kind: &str) -> Value {
    let mut d = serde_json::Map::new();
    if !name.is_empty() {
        d.insert("name".into(), json!(name));
    }
    if !group.is_empty() {
        d.insert("group".into(), json!(group));
    }
    d.insert("kind".into(), json!(kind));
    Value::Object(d)
}

impl ApiError {
    pub(crate) fn status(
        code: u16,
        reason: Option<&'static str>,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Self {
        ApiError::Status { code, reason, message: message.into(), details, metadata: None }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::not_found_in(&rt.group, &rt.plural, name)
    }

    pub fn not_found_in(group: &str, plural: &str, name: &str) -> Self {
        let qualified = if group.is_empty() { plural.to_string() } else { format!("{plural}.{group}") };
        Self::status(
            404,
            Some("NotFound"),
            format!("{qualified} \"{name}\" not found"),
            Some(details(name, group, plural)),
        )
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::status(
            409,
            Some("AlreadyExists"),
            format!("{} \"{name}\" already exists", qualified_resource(rt)),
            Some(details(name, &rt.group, &rt.plural)),
        )
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self::status(
            409,
            Some("Conflict"),
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
                 changes to the latest version and try again",
                qualified_resource(rt)
            ),
            Some(details(name, &rt.group, &rt.plural)),
        )
    }

    /// A failed DeleteOptions precondition: this message names the Kind, not the resource.
    pub fn precondition_failed(rt: &ResourceType, name: &str, what: &str, wanted: &str, actual: &str) -> Self {
        let consequence = if what == "UID" { "deleted and then recreated" } else { "modified" };
        Self::status(
            409,
            Some("Conflict"),
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the {what} in the precondition ({wanted}) does not \
                 match the {what} in record ({actual}). The object might have been {consequence}",
                qualified_kind(rt)
            ),
            Some(details(name, &rt.group, &rt.kind)),
        )
    }

    /// 422 with causes, `details.kind` the Kind: schema and field validation.
    pub fn invalid(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        Self::invalid_as(&qualified_kind(rt), &rt.group, &rt.kind, name, causes)
    }

    /// 422 where the server names the resource instead of the Kind
    /// (the missing-resourceVersion check of an update).
    pub fn invalid_resource(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        Self::invalid_as(&qualified_resource(rt), &rt.group, &rt.plural, name, causes)
    }

    pub fn invalid_as(qualified: &str, group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        // The message lists each distinct error once, the causes all of them (11.16).
        let mut listed: Vec<String> = Vec::new();
        for c in &causes {
            let line = format!("{}: {}", c.field, c.message);
            if !listed.contains(&line) {
                listed.push(line);
            }
        }
        let summary = if listed.len() == 1 { listed[0].clone() } else { format!("[{}]", listed.join(", ")) };
        let mut d = details(name, group, kind);
        d["causes"] =
            causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
        Self::status(422, Some("Invalid"), format!("{qualified} \"{name}\" is invalid: {summary}"), Some(d))
    }

    /// The generic 422 of a JSON patch that cannot be applied (failed `test`,
    /// missing path, unknown op): the real server says nothing more.
    pub fn patch_rejected() -> Self {
        Self::status(
            422,
            Some("Invalid"),
            "the server rejected our request due to an error in our request",
            Some(json!({})),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::status(400, Some("BadRequest"), message, None)
    }

    /// 500 without a reason, as the server answers an unparsable resourceVersion.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(500, None, message, None)
    }

    pub fn unsupported_patch_type() -> Self {
        Self::status(415, Some("UnsupportedMediaType"), "415: Unsupported Media Type", Some(json!({})))
    }

    pub fn strategic_merge_on_custom_resource() -> Self {
        Self::status(
            415,
            Some("UnsupportedMediaType"),
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            None,
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::status(
            405,
            Some("MethodNotAllowed"),
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        )
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::status(410, Some("Expired"), message, None)
    }

    /// 504, as for a read at a resourceVersion the server has not reached.
    pub fn status_timeout(message: impl Into<String>) -> Self {
        Self::status(504, Some("Timeout"), message, Some(json!({"retryAfterSeconds": 1})))
    }

    pub fn unauthorized() -> Self {
        Self::status(401, Some("Unauthorized"), "Unauthorized", None)
    }

    pub fn forbidden(user: &str, verb: &str, rt: &ResourceType, namespace: Option<&str>) -> Self {
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        Self::status(
            403,
            Some("Forbidden"),
            format!(
                "{} is forbidden: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{}\"{scope}",
                qualified_resource(rt),
                rt.plural,
                rt.group
            ),
            Some(json!({"kind": rt.plural})),
        )
    }

    /// A refusal by an admission plugin: `<resource> "<name>" is forbidden: <why>`.
    pub fn forbidden_by_admission(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::status(
            403,
            Some("Forbidden"),
            format!("{} \"{name}\" is forbidden: {why}", qualified_resource(rt)),
            Some(details(name, &rt.group, &rt.plural)),
        )
    }

    /// A decode failure of a request body ("cannot be handled as a <Kind>").
    pub fn undecodable(rt: &ResourceType, why: &str) -> Self {
        Self::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {why}",
            rt.kind, rt.version, rt.kind
        ))
    }

    pub fn with_metadata(mut self, meta: Value) -> Self {
        if let ApiError::Status { metadata, .. } = &mut self {
            *metadata = Some(meta);
        }
        self
    }

    pub fn code(&self) -> u16 {
        match self {
            ApiError::Status { code, .. } => *code,
            ApiError::PageNotFound => 404,
        }
    }

    /// The `Status` object (also used inside a watch ERROR event).
    pub fn to_status(&self) -> Value {
        match self {
            ApiError::Status { code, reason, message, details, metadata } => {
                let mut s = serde_json::Map::new();
                s.insert("kind".into(), json!("Status"));
                s.insert("apiVersion".into(), json!("v1"));
                s.insert("metadata".into(), metadata.clone().unwrap_or_else(|| json!({})));
                s.insert("status".into(), json!("Failure"));
                s.insert("message".into(), json!(message));
                if let Some(r) = reason {
                    s.insert("reason".into(), json!(r));
                }
                if let Some(d) = details {
                    s.insert("details".into(), d.clone());
                }
                s.insert("code".into(), json!(code));
                Value::Object(s)
            }
            ApiError::PageNotFound => json!({"kind": "Status", "apiVersion": "v1", "code": 404}),
        }
    }
}
