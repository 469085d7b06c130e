//! HTTP routing: URL paths and query parameters of the Kubernetes API onto
//! store operations, and the responses' framing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::auth::{ISSUER, TokenInfo, Tokens};
use super::errors::{ApiError, ApiResult, Cause};
use super::patch::{self, PatchType};
use super::resources::{ResourceType, version_info};
use super::selectors::{FieldSelector, LabelSelector, Selectors};
use super::store::{DeleteOptions, Store, Write, new_uid, parse_rv, str_field};
use super::watch;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Everything the request handlers share.
pub struct State {
    pub store: Store,
    pub tokens: Tokens,
    pub admin_token: String,
    pub bookmark_interval: Duration,
    pub server_address: String,
}

/// Query parameters (last value wins, as in Go's `url.Values.Get` for single ones).
pub struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let pairs = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes());
        Self(pairs.map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// Compact JSON plus one `\n`, as the real server writes it for real clients.
pub fn json_response(status: u16, body: &Value, warnings: &[String]) -> Response<Body> {
    let mut text = body.to_string();
    text.push('\n');
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private");
    for w in warnings {
        builder = builder.header("Warning", format!("299 - \"{}\"", w.replace('"', "\\\"")));
    }
    builder.body(full(text)).unwrap_or_else(|_| Response::new(full("")))
}

pub fn error_response(err: &ApiError) -> Response<Body> {
    match err {
        ApiError::PageNotFound => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header("X-Content-Type-Options", "nosniff")
            .body(full("404 page not found\n"))
            .unwrap_or_else(|_| Response::new(full(""))),
        status => json_response(status.code(), &status.to_status(), &[]),
    }
}

/// A resource URL after routing.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// What routing and the handlers need of a request.
struct ApiRequest {
    method: Method,
    query: Query,
    content_type: String,
    body: Bytes,
    /// The field manager the request writes as.
    manager: String,
}

/// Who made the request.
enum Caller {
    Admin,
    ServiceAccount(String),
}

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let content_type =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    // Field managers are named by `fieldManager`, else by the User-Agent up to its first `/`.
    let user_agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    let manager = query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| user_agent.split('/').next().unwrap_or(user_agent))
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(error_response(&ApiError::bad_request(format!("reading the request body: {e}")))),
    };
    let caller = match authenticate(&state, authorization.as_deref()) {
        Ok(c) => c,
        Err(e) => return Ok(error_response(&e)),
    };
    let request = ApiRequest { method, query, content_type, body, manager };
    let response = route(&state, &path, &request, &caller).await;
    Ok(response.unwrap_or_else(|e| error_response(&e)))
}

/// No header is the admin (tests need no credentials); the admin token is
/// the admin; an issued ServiceAccount token authenticates but is allowed
/// nothing (no RBAC is emulated); anything else is 401.
fn authenticate(state: &State, authorization: Option<&str>) -> ApiResult<Caller> {
    let Some(value) = authorization else { return Ok(Caller::Admin) };
    let token = value.strip_prefix("Bearer ").unwrap_or_default().trim();
    if token == state.admin_token {
        return Ok(Caller::Admin);
    }
    match state.tokens.lookup(token) {
        Some(info) if info.audiences.iter().any(|a| a == ISSUER) => Ok(Caller::ServiceAccount(info.username())),
        _ => Err(ApiError::unauthorized()),
    }
}

async fn route(state: &Arc<State>, path: &str, req: &ApiRequest, caller: &Caller) -> ApiResult<Response<Body>> {
    let (method, query) = (&req.method, &req.query);
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let store = &state.store;
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => {
            // The real server indents /version whatever the client.
            let mut text = serde_json::to_string_pretty(&version_info()).unwrap_or_default();
            text.push('\n');
            let response = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(text))
                .unwrap_or_else(|_| Response::new(full("")));
            return Ok(response);
        }
        ["api"] => {
            let doc = json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": state.server_address}],
            });
            return Ok(json_response(200, &doc, &[]));
        }
        ["apis"] => return Ok(json_response(200, &group_list(store), &[])),
        ["apis", group] => {
            let groups = group_list(store);
            let found = groups["groups"].as_array().and_then(|gs| gs.iter().find(|g| g["name"] == *group)).cloned();
            return match found {
                Some(mut g) => {
                    g["kind"] = json!("APIGroup");
                    g["apiVersion"] = json!("v1");
                    Ok(json_response(200, &g, &[]))
                }
                None => Err(ApiError::PageNotFound),
            };
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::PageNotFound),
    };
    if rest.is_empty() {
        return resource_list(store, group, version).map(|doc| json_response(200, &doc, &[]));
    }
    let target = resolve(store, group, version, rest)?;
    if let Caller::ServiceAccount(user) = caller {
        let verb = match *method {
            Method::GET if target.name.is_some() => "get",
            Method::GET if query.flag("watch") => "watch",
            Method::GET => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            _ => "delete",
        };
        return Err(ApiError::forbidden(user, verb, &target.rt, target.namespace.as_deref()));
    }
    dispatch(state, target, req).await
}

/// The APIGroupList of `/apis`: one entry per group, preferring its first version.
fn group_list(store: &Store) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in store.types().iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) if !versions.contains(&t.version) => versions.push(t.version.clone()),
            Some(_) => {}
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    let entries: Vec<Value> = groups
        .iter()
        .map(|(g, versions)| {
            let vs: Vec<Value> =
                versions.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": entries})
}

fn resource_list(store: &Store, group: &str, version: &str) -> ApiResult<Value> {
    let types: Vec<ResourceType> =
        store.types().into_iter().filter(|t| t.group == group && t.version == version).collect();
    if types.is_empty() {
        return Err(ApiError::PageNotFound);
    }
    let resources: Vec<Value> = types.iter().flat_map(ResourceType::discovery_entries).collect();
    if group.is_empty() {
        // /api/v1 carries no apiVersion on the real server.
        return Ok(json!({"kind": "APIResourceList", "groupVersion": version, "resources": resources}));
    }
    let group_version = format!("{group}/{version}");
    Ok(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}

fn resolve(store: &Store, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let owned = |s: Option<&&str>| s.map(|s| s.to_string());
    // `/namespaces/<ns>/<resource>/...` unless it is the Namespace object itself.
    let namespaced_path = rest.len() >= 3 && rest[0] == "namespaces" && !(rest.len() == 3 && rest[2] == "status");
    let (namespace, plural, name, sub, extra) = if namespaced_path {
        (Some(rest[1].to_string()), rest[2], owned(rest.get(3)), owned(rest.get(4)), rest.len() > 5)
    } else {
        (None, rest[0], owned(rest.get(1)), owned(rest.get(2)), rest.len() > 3)
    };
    let rt = store.resolve(group, version, plural).ok_or(ApiError::PageNotFound)?;
    if extra || (namespace.is_some() && !rt.namespaced) || (namespace.is_none() && rt.namespaced && name.is_some()) {
        return Err(ApiError::PageNotFound);
    }
    match sub.as_deref() {
        None => {}
        Some("status") if rt.status_subresource => {}
        Some("token") if rt.plural == "serviceaccounts" => {}
        Some(_) => return Err(ApiError::PageNotFound),
    }
    Ok(Target { rt, namespace, name, subresource: sub })
}

fn parse_json(body: &Bytes, rt: &ResourceType) -> ApiResult<Value> {
    serde_json::from_slice(body).map_err(|e| ApiError::undecodable(rt, &e.to_string()))
}

fn selectors(query: &Query, rt: &ResourceType) -> ApiResult<Selectors> {
    Ok(Selectors {
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or_default())?,
        fields: FieldSelector::parse(query.get("fieldSelector").unwrap_or_default(), rt)?,
    })
}

async fn dispatch(state: &Arc<State>, target: Target, req: &ApiRequest) -> ApiResult<Response<Body>> {
    let (method, query, body) = (&req.method, &req.query, &req.body);
    let store = &state.store;
    let Target { rt, namespace, name, subresource } = target;
    let ns = namespace.clone().unwrap_or_default();
    let status_write = subresource.as_deref() == Some("status");
    let dry_run = query.get("dryRun") == Some("All");
    if rt.create_only && *method != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    match (method.clone(), name) {
        (Method::GET, Some(name)) => store.get(&rt, &ns, &name).map(|o| json_response(200, &o, &[])),
        (Method::GET, None) if query.flag("watch") => {
            let sel = selectors(query, &rt)?;
            watch::serve(state.clone(), rt, namespace, sel, query)
        }
        (Method::GET, None) => list(store, &rt, namespace.as_deref(), query).map(|l| json_response(200, &l, &[])),
        (Method::POST, None) if rt.plural == "tokenreviews" => token_review(state, &rt, body),
        (Method::POST, None) if rt.plural == "subjectaccessreviews" => access_review(state, &rt, body),
        (Method::POST, None) if rt.namespaced && namespace.is_none() => Err(ApiError::method_not_allowed()),
        (Method::POST, None) => {
            let obj = parse_json(body, &rt)?;
            // Strict: what pruning would drop (and warn about) is an error instead.
            if query.get("fieldValidation") == Some("Strict") {
                let warnings = super::validation::validate(&rt, &mut obj.clone(), None)?;
                if !warnings.is_empty() {
                    return Err(ApiError::undecodable(&rt, &format!("strict decoding error: {}", warnings.join(", "))));
                }
            }
            let write = Write { dry_run, ..Write::by(&req.manager) };
            let (created, warnings) = store.create(&rt, namespace.as_deref(), obj, &write)?;
            Ok(json_response(201, &created, &warnings))
        }
        (Method::POST, Some(name)) if subresource.as_deref() == Some("token") => {
            token_request(state, &rt, &ns, &name, body)
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_json(body, &rt)?;
            let write = Write { status: status_write, put: true, dry_run, ..Write::by(&req.manager) };
            let (updated, warnings) = store.update(&rt, &ns, &name, &write, |_| Ok(obj))?;
            Ok(json_response(200, &updated, &warnings))
        }
        (Method::PATCH, Some(name)) => patch(store, &rt, &ns, &name, status_write, req),
        (Method::DELETE, Some(name)) => delete(store, &rt, &ns, &name, query, body),
        (Method::DELETE, None) => delete_collection(store, &rt, namespace.as_deref(), query),
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// LIST with selectors, pagination and the resourceVersion semantics of the
/// README (see mod.rs for where this differs from the real server).
fn list(store: &Store, rt: &ResourceType, ns: Option<&str>, query: &Query) -> ApiResult<Value> {
    let sel = selectors(query, rt)?;
    let rv = query.get("resourceVersion").filter(|s| !s.is_empty());
    let rv_match = query.get("resourceVersionMatch").filter(|s| !s.is_empty());
    if rv_match.is_some() && rv.is_none() {
        return Err(ApiError::invalid_as(
            "ListOptions.meta.k8s.io",
            "meta.k8s.io",
            "ListOptions",
            "",
            vec![Cause::new(
                "FieldValueForbidden",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )],
        ));
    }
    let requested = rv.map(parse_rv).transpose()?;
    let from_cache = requested == Some(0);
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0 && !from_cache);
    let (mut items, current, last_of_type) = store.list(rt, ns, &sel);
    let key_of = |o: &Value| {
        let name = str_field(o, "name");
        if rt.namespaced { format!("{}/{name}", str_field(o, "namespace")) } else { name.to_string() }
    };
    // Which state to read: an exact one (resourceVersionMatch=Exact, or the
    // legacy limit + resourceVersion, or the snapshot a continue token was
    // issued at), or the newest (everything else).
    let mut snapshot = None;
    if let Some(n) = requested.filter(|n| *n > 0) {
        let exact = rv_match == Some("Exact") || (rv_match.is_none() && limit.is_some());
        if exact && n > current {
            return Err(ApiError::status_timeout(format!("Too large resource version: {n}, current: {current}")));
        }
        if exact {
            snapshot = Some(n);
        }
    }
    let mut start = String::new();
    if let Some(token) = query.get("continue").filter(|s| !s.is_empty()) {
        let decoded = B64URL
            .decode(token.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .ok_or_else(|| ApiError::bad_request("continue key is not valid: illegal base64 data"))?;
        start = decoded["start"].as_str().unwrap_or_default().to_string();
        let token_rv = decoded["rv"].as_u64().unwrap_or(0);
        if store.list_at(rt, ns, &sel, token_rv).is_none() {
            let fresh = continue_token(-1, &start);
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a \
                 new list without the continue parameter, or use the continue token in this response to retrieve \
                 the remainder of the results. Continuing with the provided token results in an inconsistent list \
                 - objects that were created, modified, or deleted between the time the first chunk was returned \
                 and now may show up in the list.",
            )
            .with_metadata(json!({"continue": fresh})));
        }
        snapshot = Some(token_rv);
    }
    let collection_rv = match snapshot {
        Some(n) => {
            items = store
                .list_at(rt, ns, &sel, n)
                .ok_or_else(|| ApiError::expired("The resourceVersion for the provided list is too old."))?;
            n
        }
        None if from_cache => last_of_type,
        None => current,
    };
    let mut items: Vec<Value> = items.into_iter().filter(|o| key_of(o) >= start).collect();
    let mut list_meta = json!({"resourceVersion": collection_rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().map(key_of).unwrap_or_default();
        list_meta["continue"] = json!(continue_token(collection_rv as i64, &format!("{last}\u{0}")));
        list_meta["remainingItemCount"] = json!(remaining);
    } else if rt.custom {
        list_meta["continue"] = json!("");
    }
    if !rt.custom {
        for item in &mut items {
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
        }
    }
    Ok(json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": list_meta, "items": items}))
}

/// The continue token format of the real server (base64 of JSON).
fn continue_token(rv: i64, start: &str) -> String {
    B64URL.encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).to_string())
}

fn patch(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    status_write: bool,
    req: &ApiRequest,
) -> ApiResult<Response<Body>> {
    let (query, body) = (&req.query, &req.body);
    let patch_type = PatchType::from_content_type(&req.content_type).ok_or_else(ApiError::unsupported_patch_type)?;
    if patch_type == PatchType::Strategic && rt.custom {
        return Err(ApiError::strategic_merge_on_custom_resource());
    }
    let dry_run = query.get("dryRun") == Some("All");
    let mut write = Write { status: status_write, dry_run, ..Write::by(&req.manager) };
    if patch_type == PatchType::Apply {
        if query.get("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::invalid_as(
                "PatchOptions.meta.k8s.io",
                "meta.k8s.io",
                "PatchOptions",
                "",
                vec![Cause::required("fieldManager", "is required for apply patch")],
            ));
        }
        write.apply = Some((applied_config(rt, status_write, body)?, query.flag("force")));
    }
    let result = store.update(rt, ns, name, &write, |current| {
        let mut patched = patch::apply(patch_type, current, body, !rt.custom)?;
        if patch_type == PatchType::Apply {
            // Apply carries no resourceVersion of its own: it is not a precondition.
            if let Some(m) = patched["metadata"].as_object_mut() {
                m.insert("resourceVersion".into(), current["metadata"]["resourceVersion"].clone());
            }
        }
        Ok(patched)
    });
    match result {
        Ok((obj, warnings)) => Ok(json_response(200, &obj, &warnings)),
        Err(ApiError::Status { code: 404, .. }) if patch_type == PatchType::Apply && !status_write => {
            let mut obj = patch::apply(PatchType::Apply, &Value::Null, body, !rt.custom)?;
            let body_name = str_field(&obj, "name");
            if !body_name.is_empty() && body_name != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            match obj.get_mut("metadata").and_then(Value::as_object_mut) {
                Some(meta) => {
                    meta.insert("name".into(), json!(name));
                }
                None => obj["metadata"] = json!({"name": name}),
            }
            let (created, warnings) = store.create(rt, rt.namespaced.then_some(ns), obj, &write)?;
            Ok(json_response(201, &created, &warnings))
        }
        Err(e) => Err(e),
    }
}

/// The part of an applied configuration a write can take: status only for
/// `/status`, everything but status for the main resource of a type with a
/// status subresource.
fn applied_config(rt: &ResourceType, status_write: bool, body: &Bytes) -> ApiResult<Value> {
    let mut applied = patch::apply(PatchType::Apply, &Value::Null, body, !rt.custom)?;
    if let Some(m) = applied.as_object_mut() {
        if status_write {
            m.retain(|k, _| k == "status");
        } else if rt.status_subresource {
            m.remove("status");
        }
    }
    Ok(applied)
}

fn delete(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    query: &Query,
    body: &Bytes,
) -> ApiResult<Response<Body>> {
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("decoding DeleteOptions: {e}")))?
    };
    let grace = query
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok())
        .or_else(|| options["gracePeriodSeconds"].as_i64());
    let dry_run =
        query.get("dryRun") == Some("All") || options["dryRun"].as_array().is_some_and(|d| d.contains(&json!("All")));
    let opts = DeleteOptions {
        dry_run,
        grace_period_seconds: grace,
        precondition_uid: options["preconditions"]["uid"].as_str().map(str::to_string),
        precondition_rv: options["preconditions"]["resourceVersion"].as_str().map(str::to_string),
        propagation_policy: query
            .get("propagationPolicy")
            .map(str::to_string)
            .or_else(|| options["propagationPolicy"].as_str().map(str::to_string)),
    };
    let (obj, gone) = store.delete(rt, ns, name, &opts)?;
    if gone && rt.plural != "pods" {
        let mut details = json!({"name": name, "kind": rt.plural, "uid": str_field(&obj, "uid")});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        let status =
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details});
        return Ok(json_response(200, &status, &[]));
    }
    Ok(json_response(200, &obj, &[]))
}

fn delete_collection(store: &Store, rt: &ResourceType, ns: Option<&str>, query: &Query) -> ApiResult<Response<Body>> {
    let sel = selectors(query, rt)?;
    let (items, _, _) = store.list(rt, ns, &sel);
    let mut deleted = Vec::new();
    for item in items {
        let (obj, _) =
            store.delete(rt, str_field(&item, "namespace"), str_field(&item, "name"), &DeleteOptions::default())?;
        deleted.push(obj);
    }
    let mut meta = json!({"resourceVersion": store.current_rv().to_string()});
    if rt.custom {
        meta["continue"] = json!("");
    }
    let list = json!({"kind": rt.list_kind(), "apiVersion": rt.api_version(), "metadata": meta, "items": deleted});
    Ok(json_response(200, &list, &[]))
}

fn token_review(state: &State, rt: &ResourceType, body: &Bytes) -> ApiResult<Response<Body>> {
    let review = parse_json(body, rt)?;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::bad_request("token is required for TokenReview in authentication"));
    }
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": state.tokens.review(token, &audiences, |ns, pod, uid| pod_alive(state, ns, pod, uid)),
    });
    Ok(json_response(201, &answer, &[]))
}

fn access_review(state: &State, rt: &ResourceType, body: &Bytes) -> ApiResult<Response<Body>> {
    let review = parse_json(body, rt)?;
    let spec = &review["spec"];
    if spec["user"].as_str().unwrap_or_default().is_empty() && spec["groups"].as_array().is_none_or(Vec::is_empty) {
        return Err(ApiError::invalid_as(
            "SubjectAccessReview.authorization.k8s.io",
            "authorization.k8s.io",
            "SubjectAccessReview",
            "",
            vec![Cause::invalid(
                "spec.user,spec.groups",
                &json!(null),
                "at least one of user or group must be specified",
            )],
        ));
    }
    let answer = json!({
        "kind": "SubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": super::rbac::review(&state.store, spec),
    });
    Ok(json_response(201, &answer, &[]))
}

fn token_request(state: &State, sa_type: &ResourceType, ns: &str, sa: &str, body: &Bytes) -> ApiResult<Response<Body>> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("decoding TokenRequest: {e}")))?;
    let account = state.store.get(sa_type, ns, sa)?;
    let spec = &request["spec"];
    let seconds = spec["expirationSeconds"].as_i64().unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::invalid_as(
            "TokenRequest.authentication.k8s.io",
            "authentication.k8s.io",
            "TokenRequest",
            "",
            vec![Cause::invalid(
                "spec.expirationSeconds",
                &json!(seconds),
                "may not specify a duration less than 10 minutes",
            )],
        ));
    }
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![ISSUER.to_string()]);
    let bound = &spec["boundObjectRef"];
    let pod = (bound["kind"] == "Pod").then(|| {
        (bound["name"].as_str().unwrap_or_default().to_string(), bound["uid"].as_str().unwrap_or_default().to_string())
    });
    if let Some((name, uid)) = &pod {
        bound_pod(state, ns, sa, name, uid)?;
    }
    let expires = jiff::Timestamp::now().as_second() + seconds;
    let token = state.tokens.issue(TokenInfo {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        sa_uid: str_field(&account, "uid").to_string(),
        audiences: audiences.clone(),
        expires,
        pod,
    });
    let expiration =
        jiff::Timestamp::from_second(expires).map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    let answer = json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": sa, "namespace": ns, "creationTimestamp": super::store::now_time()},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": spec["boundObjectRef"]},
        "status": {"token": token, "expirationTimestamp": expiration},
    });
    Ok(json_response(201, &answer, &[]))
}

/// Whether the Pod a token is bound to still exists (in any namespace
/// bound tokens name their own namespace's Pod; the uid makes it unique).
/// What the real server checks of the pod a token is bound to.
fn bound_pod(state: &State, namespace: &str, sa: &str, name: &str, uid: &str) -> ApiResult<()> {
    let pods = state.store.resolve("", "v1", "pods").ok_or(ApiError::PageNotFound)?;
    let pod = state.store.get(&pods, namespace, name)?;
    if !uid.is_empty() && str_field(&pod, "uid") != uid {
        return Err(ApiError::status(
            409,
            Some("Conflict"),
            format!(
                "the UID in the bound object reference ({uid}) does not match the UID in record. The object might have been deleted and then recreated"
            ),
            None,
        ));
    }
    if pod["spec"]["serviceAccountName"].as_str().unwrap_or("default") != sa {
        return Err(ApiError::bad_request(format!(
            "cannot bind token for serviceaccount {sa:?} to pod running with different serviceaccount name."
        )));
    }
    Ok(())
}

fn pod_alive(state: &State, namespace: &str, pod: &str, uid: &str) -> bool {
    let Some(pods) = state.store.resolve("", "v1", "pods") else { return false };
    state.store.get(&pods, namespace, pod).is_ok_and(|p| str_field(&p, "uid") == uid)
}

/// Mints a token for `ns/sa` (the ServiceAccount need not exist).
pub fn issue_token(state: &State, ns: &str, sa: &str, audiences: &[&str]) -> String {
    let sa_type = state.store.resolve("", "v1", "serviceaccounts");
    let uid = sa_type
        .and_then(|t| state.store.get(&t, ns, sa).ok())
        .map(|o| str_field(&o, "uid").to_string())
        .unwrap_or_else(new_uid);
    let audiences =
        if audiences.is_empty() { vec![ISSUER.to_string()] } else { audiences.iter().map(|a| a.to_string()).collect() };
    state.tokens.issue(TokenInfo {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        sa_uid: uid,
        audiences,
        expires: jiff::Timestamp::now().as_second() + 3600,
        pod: None,
    })
}
