//! The object store: what etcd plus the registry layer of kube-apiserver do.
//!
//! Objects are kept per (group, resource) and then (namespace, name): one
//! stored form per object whatever version it is read through (as etcd keeps
//! one storage version), and sorted like etcd keys so LIST order matches.
//! One global resourceVersion counter orders every write, as etcd's revision
//! does, and a bounded history of changes per resource type serves watches
//! from a resourceVersion, as the watch cache (one per type) does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::admission;
use super::errors::{ApiError, ApiResult, Cause};
use super::fields::{Manager, Ownership};
use super::resources::{Generation, ResourceType, builtin_types, types_from_crd};
use super::selectors::Selectors;
use super::validation;

/// (group, resource) of the storage type.
pub type TypeKey = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as the watch cache keeps it: the new state and the previous
/// one (selector watches need both to turn a MODIFIED into ADDED/DELETED).
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub type_key: TypeKey,
    pub change: ChangeType,
    /// Stored form; for DELETED the last state with the deletion's resourceVersion.
    pub object: Value,
    pub prev: Option<Value>,
}

/// How a write is made: by whom (field ownership), to which part, with
/// which verb.
#[derive(Debug, Clone, Default)]
pub struct Write {
    /// `fieldManager`, or the User-Agent up to its first `/`.
    pub manager: String,
    /// For server-side apply: the applied configuration and `force`.
    pub apply: Option<(Value, bool)>,
    /// To the `/status` subresource.
    pub status: bool,
    /// PUT (a missing resourceVersion matters), not PATCH.
    pub put: bool,
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
}

impl Write {
    pub fn by(manager: &str) -> Self {
        Self { manager: manager.to_string(), ..Self::default() }
    }

    fn manager(&self, rt: &ResourceType) -> Manager {
        Manager {
            name: self.manager.clone(),
            apply: self.apply.is_some(),
            status: self.status,
            api_version: rt.api_version(),
            time: now_time(),
        }
    }
}

/// An object's identity across its versions: type, namespace, name.
type ObjectKey = (TypeKey, String, String);

/// DeleteOptions that matter here.
#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    /// `dryRun=All`: answer as if, change nothing.
    pub dry_run: bool,
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub propagation_policy: Option<String>,
}

/// What a watch starts from, computed atomically with its subscription.
pub struct WatchStart {
    pub initial: Vec<Arc<Change>>,
    pub receiver: broadcast::Receiver<Arc<Change>>,
    /// Changes with rv <= this are already covered by `initial`.
    pub start_rv: u64,
}

pub(crate) struct Inner {
    rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<TypeKey, BTreeMap<(String, String), Value>>,
    history: HashMap<TypeKey, VecDeque<Arc<Change>>>,
    history_limit: usize,
    /// Per type: every change with rv > this is still in `history`.
    history_floor: HashMap<TypeKey, u64>,
    /// Like etcd's compacted revision: exact reads of older states are gone
    /// even where the history could still rebuild them.
    compacted: u64,
    last_change: HashMap<TypeKey, u64>,
    /// Field ownership per object, for server-side apply.
    owners: HashMap<ObjectKey, Ownership>,
    /// Live watches. Sent to under the lock, so they see changes in
    /// resourceVersion order, and subscribed to under the lock, so a new
    /// watch misses nothing between its start state and its first live event.
    tx: broadcast::Sender<Arc<Change>>,
}

pub struct Store {
    inner: Mutex<Inner>,
}

pub fn now_time() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn now_time_after(seconds: i64) -> String {
    let later = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_secs(seconds));
    later.unwrap_or_else(|_| jiff::Timestamp::now()).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn new_uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// The 5 characters generateName appends (the real alphabet has no vowels).
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj["metadata"].as_object_mut() {
        Some(m) => m,
        None => unreachable!("metadata was just made an object"),
    }
}

pub fn str_field<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

/// What generation tracks: everything but metadata, and but status where
/// status is a subresource (a CR without one bumps generation on status too).
fn spec_part(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        if rt.status_subresource {
            m.remove("status");
        }
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

/// The object without the fields a no-op write is allowed to differ in.
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
        m.remove("generation");
    }
    o
}

pub fn parse_rv(rv: &str) -> ApiResult<u64> {
    rv.parse::<u64>().map_err(|_| ApiError::internal(format!("strconv.ParseUint: parsing {rv:?}: invalid syntax")))
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        // Large enough that a watcher only lags when a test floods the
        // server; a lagging watcher is ended with 410 like a slow real one.
        let (tx, _) = broadcast::channel(4096);
        let store = Self {
            inner: Mutex::new(Inner {
                rv: 1,
                types: builtin_types(),
                objects: BTreeMap::new(),
                history: HashMap::new(),
                history_limit: history_limit.max(1),
                history_floor: HashMap::new(),
                compacted: 0,
                last_change: HashMap::new(),
                owners: HashMap::new(),
                tx,
            }),
        };
        // The namespaces every cluster starts with.
        if let Some(namespaces) = store.resolve("", "v1", "namespaces") {
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                if let Err(e) = store.create(&namespaces, None, body, &Write::by("kube-apiserver")) {
                    tracing::warn!("creating namespace {name}: {e:?}");
                }
            }
        }
        store
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write
        // is applied at its end), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The served type for a URL's group/version/resource.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock().types.iter().find(|t| t.group == group && t.version == version && t.plural == plural).cloned()
    }

    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
        let inner = self.lock();
        inner.get(rt, ns, name).map(|o| view(rt, o)).ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// The objects of a LIST or of a watch's initial state, in key order.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> (Vec<Value>, u64, u64) {
        let inner = self.lock();
        let items = inner.list(rt, ns, sel);
        let last = inner.last_change.get(&rt.storage()).copied().unwrap_or(inner.rv);
        (items, inner.rv, last)
    }

    /// The objects as they were at resourceVersion `rv`, rebuilt by undoing
    /// the changes after it (what etcd serves for an exact read). `None`
    /// when the history no longer reaches back that far (etcd: compacted).
    pub fn list_at(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors, rv: u64) -> Option<Vec<Value>> {
        let inner = self.lock();
        let key = rt.storage();
        if rv < inner.floor(&key) || rv < inner.compacted {
            return None;
        }
        let mut objects: BTreeMap<(String, String), Value> = inner.objects.get(&key).cloned().unwrap_or_default();
        for change in inner.history.get(&key).into_iter().flatten().rev().take_while(|c| c.rv > rv) {
            let id = (
                if rt.namespaced { str_field(&change.object, "namespace").to_string() } else { String::new() },
                str_field(&change.object, "name").to_string(),
            );
            match &change.prev {
                // An update or a deletion: the previous state comes back.
                Some(prev) if change.change != ChangeType::Added => objects.insert(id, prev.clone()),
                _ => objects.remove(&id),
            };
        }
        Some(
            objects
                .iter()
                .filter(|((o_ns, _), _)| ns.is_none_or(|n| o_ns == n))
                .map(|(_, o)| view(rt, o))
                .filter(|o| sel.matches(o))
                .collect(),
        )
    }

    /// etcd compaction at the current revision: exact LISTs and continue
    /// tokens from before it get 410; watches still replay from the history,
    /// as from a real watch cache (10.3).
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.compacted = inner.rv;
    }

    /// What an API server restart does to watches: the history starts over
    /// at the current revision, so watches from before it get 410 (10.12).
    pub fn drop_history(&self) {
        let mut inner = self.lock();
        let rv = inner.rv;
        let keys: Vec<TypeKey> = inner.types.iter().map(ResourceType::storage).collect();
        inner.history.clear();
        for key in keys {
            inner.history_floor.insert(key, rv);
        }
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        body: Value,
        write: &Write,
    ) -> ApiResult<(Value, Vec<String>)> {
        let mut inner = self.lock();
        let (obj, warnings) = inner.create(rt, ns, body)?;
        if write.dry_run {
            return Ok((view(rt, &obj), warnings));
        }
        if rt.plural == "customresourcedefinitions" {
            inner.register_crd(&obj);
        }
        let change = inner.commit(rt, ChangeType::Added, obj, None);
        // A create owns all it stored, defaults included; an apply that
        // creates owns what it applied.
        let owned = match &write.apply {
            Some((applied, _)) => applied,
            None => &change.object,
        };
        let ownership = Ownership::created(write.manager(rt), owned, !rt.custom);
        inner.owners.insert(object_key(rt, &change.object), ownership);
        if rt.plural == "customresourcedefinitions" {
            inner.establish_crd(rt, &change.object);
        }
        Ok((view(rt, &change.object), warnings))
    }

    /// Update through `f`, which gets the current object (as `rt` shows it)
    /// and returns the wanted object: PUT ignores it, PATCH applies to it.
    /// The lock is held throughout, so patches never interleave.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        write: &Write,
        f: impl FnOnce(&Value) -> ApiResult<Value>,
    ) -> ApiResult<(Value, Vec<String>)> {
        let mut inner = self.lock();
        let current = inner.get(rt, ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
        let wanted = to_storage(rt, f(&view(rt, &current))?);
        let (result, warnings) = inner.update(rt, current, wanted, write)?;
        Ok((view(rt, &result), warnings))
    }

    /// DELETE: the object as last stored, and whether it is gone (`false`:
    /// it stays, terminating, until its finalizers or its kubelet let it go).
    pub fn delete(&self, rt: &ResourceType, ns: &str, name: &str, opts: &DeleteOptions) -> ApiResult<(Value, bool)> {
        let (obj, gone) = self.lock().delete(rt, ns, name, opts)?;
        Ok((view(rt, &obj), gone))
    }

    /// Subscribes a watch. `from`: `None` for "current state first",
    /// `Some(n)` to replay the changes after `n`.
    pub fn watch(&self, rt: &ResourceType, ns: Option<&str>, from: Option<u64>) -> ApiResult<WatchStart> {
        let inner = self.lock();
        let receiver = inner.tx.subscribe();
        let key = rt.storage();
        let in_scope = |c: &Change| c.type_key == key && ns.is_none_or(|n| str_field(&c.object, "namespace") == n);
        let initial = match from {
            None => inner
                .list(rt, ns, &Selectors::default())
                .into_iter()
                .map(|o| {
                    Arc::new(Change {
                        rv: 0,
                        type_key: key.clone(),
                        change: ChangeType::Added,
                        object: to_storage(rt, o),
                        prev: None,
                    })
                })
                .collect(),
            Some(n) if n < inner.floor(&key) => {
                return Err(ApiError::expired(format!("too old resource version: {n} ({})", inner.floor(&key) + 1)));
            }
            Some(n) => {
                inner.history.get(&key).into_iter().flatten().filter(|c| c.rv > n && in_scope(c)).cloned().collect()
            }
        };
        Ok(WatchStart { initial, receiver, start_rv: inner.rv })
    }
}

/// The object as a type shows it: kind/apiVersion of the URL's type, and the
/// events.k8s.io field names for Events read through that group.
pub fn view(rt: &ResourceType, stored: &Value) -> Value {
    let mut obj = if rt.is_events_k8s_io() { validation::core_event_to_events_v1(stored) } else { stored.clone() };
    if let Some(m) = obj.as_object_mut() {
        m.insert("kind".into(), json!(rt.kind));
        m.insert("apiVersion".into(), json!(rt.api_version()));
    }
    obj
}

/// The stored form of an object received through `rt`.
pub fn to_storage(rt: &ResourceType, obj: Value) -> Value {
    if rt.is_events_k8s_io() {
        let mut core = validation::events_v1_to_core_event(&obj);
        core["kind"] = json!("Event");
        core["apiVersion"] = json!("v1");
        core
    } else {
        obj
    }
}

impl Inner {
    fn floor(&self, key: &TypeKey) -> u64 {
        self.history_floor.get(key).copied().unwrap_or(0)
    }

    fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        let ns = if rt.namespaced { ns } else { "" };
        self.objects.get(&rt.storage())?.get(&(ns.to_string(), name.to_string()))
    }

    fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> Vec<Value> {
        let Some(objects) = self.objects.get(&rt.storage()) else { return Vec::new() };
        objects
            .iter()
            .filter(|((o_ns, _), _)| ns.is_none_or(|n| o_ns == n))
            .map(|(_, o)| view(rt, o))
            .filter(|o| sel.matches(o))
            .collect()
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.exists(&(String::new(), "namespaces".to_string()), "", ns)
    }

    fn exists(&self, key: &TypeKey, ns: &str, name: &str) -> bool {
        self.objects.get(key).is_some_and(|m| m.contains_key(&(ns.to_string(), name.to_string())))
    }

    /// Records a write: next resourceVersion, history, last change per type.
    fn commit(&mut self, rt: &ResourceType, change: ChangeType, mut obj: Value, prev: Option<Value>) -> Arc<Change> {
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let key = rt.storage();
        let ns = if rt.namespaced { str_field(&obj, "namespace").to_string() } else { String::new() };
        let name = str_field(&obj, "name").to_string();
        let bucket = self.objects.entry(key.clone()).or_default();
        if change == ChangeType::Deleted {
            self.owners.remove(&(key.clone(), ns.clone(), name.clone()));
            bucket.remove(&(ns, name));
        } else {
            bucket.insert((ns, name), obj.clone());
        }
        self.last_change.insert(key.clone(), rv);
        let change = Arc::new(Change { rv, type_key: key, change, object: obj, prev });
        // No receivers is fine: nobody watches.
        let _ = self.tx.send(change.clone());
        let history = self.history.entry(change.type_key.clone()).or_default();
        history.push_back(change.clone());
        while history.len() > self.history_limit {
            if let Some(old) = history.pop_front() {
                self.history_floor.insert(old.type_key.clone(), old.rv);
            }
        }
        change
    }

    fn create(&mut self, rt: &ResourceType, ns: Option<&str>, body: Value) -> ApiResult<(Value, Vec<String>)> {
        let mut obj = to_storage(rt, body);
        if !obj.is_object() {
            return Err(ApiError::bad_request(format!("Object '{}' is missing in '{obj}'", "Kind")));
        }
        check_type_meta(rt, &obj)?;
        let meta_map = meta_mut(&mut obj);
        if rt.namespaced {
            let url_ns = ns.unwrap_or_default();
            match meta_map.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta_map.insert("namespace".into(), json!(url_ns));
                }
            }
        } else {
            meta_map.remove("namespace");
        }
        // System fields are the server's, whatever the client sent.
        for field in ["uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"]
        {
            meta_map.remove(field);
        }
        meta_map.remove("managedFields");
        let name = meta_map.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let generate = meta_map.get("generateName").and_then(Value::as_str).unwrap_or_default().to_string();
        // Admission (namespace lifecycle, ServiceAccount) runs before name
        // generation and validation, storage (AlreadyExists) after them.
        let ns_name = ns.unwrap_or_default();
        if rt.namespaced && !self.namespace_exists(ns_name) {
            return Err(ApiError::not_found_in("", "namespaces", ns_name));
        }
        let asked = [&name, &generate].into_iter().find(|n| !n.is_empty()).map_or("Unknown", String::as_str);
        admission::service_account(rt, ns_name, asked, &mut obj, |account| {
            self.exists(&(String::new(), "serviceaccounts".into()), ns_name, account)
        })?;
        let name = if !name.is_empty() {
            name
        } else if !generate.is_empty() {
            format!("{generate}{}", name_suffix())
        } else {
            return Err(ApiError::invalid(
                rt,
                "",
                vec![Cause::required("metadata.name", "name or generateName is required")],
            ));
        };
        meta_mut(&mut obj).insert("name".into(), json!(name));
        if rt.status_subresource
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        validation::defaults_on_create(rt, &mut obj);
        validation::apply_defaults(rt, &mut obj);
        let warnings = validation::validate(rt, &mut obj, None)?;
        if self.get(rt, ns.unwrap_or_default(), &name).is_some() {
            return Err(ApiError::already_exists(rt, &name));
        }
        let meta_map = meta_mut(&mut obj);
        meta_map.insert("uid".into(), json!(new_uid()));
        meta_map.insert("creationTimestamp".into(), json!(now_time()));
        if rt.generation != Generation::None {
            meta_map.insert("generation".into(), json!(1));
        }
        if rt.plural == "customresourcedefinitions" {
            obj["status"] = json!({
                "conditions": null,
                "acceptedNames": {"plural": "", "kind": ""},
                "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter()
                    .filter(|v| v["storage"].as_bool().unwrap_or(false)).map(|v| v["name"].clone()).collect::<Vec<_>>())
                    .unwrap_or_default(),
            });
        }
        Ok((obj, warnings))
    }

    /// Serves the types of a CRD. Its name is `<plural>.<group>` (checked on
    /// create), so a second CRD for the same types is an AlreadyExists before
    /// this is reached.
    fn register_crd(&mut self, crd: &Value) {
        self.types.extend(types_from_crd(crd));
    }

    /// What the CRD controllers of the real server write within
    /// milliseconds of the create (00.4): accepted names, Established.
    fn establish_crd(&mut self, rt: &ResourceType, crd: &Value) {
        let mut next = crd.clone();
        let now = now_time();
        let condition = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
        next["status"]["conditions"] = json!([
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ]);
        next["status"]["acceptedNames"] = crd["spec"]["names"].clone();
        self.commit(rt, ChangeType::Modified, next, Some(crd.clone()));
    }

    /// Stops serving a CRD's types; its objects go, with DELETED events
    /// for whoever still watches them.
    fn unregister_crd(&mut self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or_default().to_string();
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default().to_string();
        let key = (group, plural);
        if let Some(rt) = self.types.iter().find(|t| t.custom && t.storage() == key).cloned() {
            let objects: Vec<Value> = self.objects.get(&key).into_iter().flat_map(|m| m.values().cloned()).collect();
            for obj in objects {
                self.commit(&rt, ChangeType::Deleted, obj.clone(), Some(obj));
            }
        }
        self.types.retain(|t| !(t.custom && t.storage() == key));
        self.objects.remove(&key);
    }

    fn update(
        &mut self,
        rt: &ResourceType,
        current: Value,
        mut wanted: Value,
        write: &Write,
    ) -> ApiResult<(Value, Vec<String>)> {
        let (status_write, is_put) = (write.status, write.put);
        let name = str_field(&current, "name").to_string();
        if !wanted.is_object() {
            return Err(ApiError::bad_request("the body of the request must be an object"));
        }
        check_type_meta(rt, &wanted)?;
        let wanted_name = str_field(&wanted, "name");
        if !wanted_name.is_empty() && wanted_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({wanted_name}) does not match the name on the URL ({name})"
            )));
        }
        if rt.namespaced {
            let wanted_ns = str_field(&wanted, "namespace");
            if !wanted_ns.is_empty() && wanted_ns != str_field(&current, "namespace") {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        match meta(&wanted)["resourceVersion"].as_str().filter(|s| !s.is_empty()) {
            Some(rv) => {
                parse_rv(rv)?;
                if rv != str_field(&current, "resourceVersion") {
                    return Err(ApiError::conflict(rt, &name));
                }
            }
            None if is_put && rt.update_requires_rv => {
                return Err(ApiError::invalid_resource(
                    rt,
                    &name,
                    vec![Cause::new(
                        "FieldValueInvalid",
                        "metadata.resourceVersion",
                        "Invalid value: 0x0: must be specified for an update",
                    )],
                ));
            }
            None => {}
        }

        let mut next = if status_write {
            // /status writes change status only; spec and metadata are the stored ones.
            let mut next = current.clone();
            match wanted.get("status") {
                Some(s) if !s.is_null() => next["status"] = s.clone(),
                _ => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            next
        } else {
            if rt.status_subresource
                && let Some(m) = wanted.as_object_mut()
            {
                match current.get("status") {
                    Some(s) => m.insert("status".into(), s.clone()),
                    None => m.remove("status"),
                };
            }
            wanted
        };
        // Fields only the server sets keep their stored values.
        let current_meta = meta(&current).clone();
        let next_meta = meta_mut(&mut next);
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "namespace",
            "name",
            "managedFields",
        ] {
            match current_meta.get(field) {
                Some(v) => next_meta.insert(field.into(), v.clone()),
                None => next_meta.remove(field),
            };
        }
        if current_meta.get("deletionTimestamp").is_some() {
            let old: Vec<&Value> =
                current_meta["finalizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
            let added: Vec<String> = next_meta
                .get("finalizers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter(|f| !old.contains(f)).filter_map(|f| f.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if !added.is_empty() {
                let quoted = added.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ");
                let message = format!(
                    "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers \
                     []string{{{quoted}}}"
                );
                let cause = Cause::new("FieldValueForbidden", "metadata.finalizers", message);
                return Err(ApiError::invalid(rt, &name, vec![cause.clone(), cause]));
            }
        }
        if !status_write {
            validation::apply_defaults(rt, &mut next);
        }
        let key = object_key(rt, &current);
        let mut ownership = self.owners.get(&key).cloned().unwrap_or_default();
        let manager = write.manager(rt);
        match &write.apply {
            Some((applied, force)) => {
                ownership.applied(manager, &current, applied, &mut next, *force, !rt.custom)?;
            }
            None => ownership.updated(manager, &current, &next, !rt.custom),
        }
        let warnings = validation::validate(rt, &mut next, Some(&current))?;
        if write.dry_run {
            return Ok((next, warnings));
        }
        // Ownership can change on a write that changes nothing else (an
        // apply taking shared ownership); the real server would also bump
        // the resourceVersion for the managedFields it stores.
        self.owners.insert(key, ownership);

        if comparable(&next) == comparable(&current) {
            return Ok((current, warnings));
        }
        let spec_changed = spec_part(rt, &next) != spec_part(rt, &current);
        let annotations_changed = meta(&next)["annotations"] != meta(&current)["annotations"];
        let bump = match rt.generation {
            Generation::None => false,
            Generation::Spec => spec_changed,
            Generation::SpecAndAnnotations => spec_changed || annotations_changed,
        };
        if bump && !status_write {
            let generation = meta(&current)["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut next).insert("generation".into(), json!(generation));
            if next["spec"]["template"] != current["spec"]["template"] {
                validation::template_generation(rt, &mut next, generation);
            }
        }
        let finalizers_left = meta(&next)["finalizers"].as_array().is_some_and(|a| !a.is_empty());
        if meta(&next)["deletionTimestamp"].is_string() && !finalizers_left {
            // The last finalizer is gone: the object goes, and the response
            // shows it at its previous resourceVersion (11.18).
            let shown = next.clone();
            self.commit(rt, ChangeType::Deleted, next, Some(current));
            return Ok((shown, warnings));
        }
        let change = self.commit(rt, ChangeType::Modified, next, Some(current));
        Ok((change.object.clone(), warnings))
    }

    fn delete(&mut self, rt: &ResourceType, ns: &str, name: &str, opts: &DeleteOptions) -> ApiResult<(Value, bool)> {
        let current = self.get(rt, ns, name).cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(uid) = &opts.precondition_uid
            && uid != str_field(&current, "uid")
        {
            return Err(ApiError::precondition_failed(rt, name, "UID", uid, str_field(&current, "uid")));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv != str_field(&current, "resourceVersion")
        {
            let actual = str_field(&current, "resourceVersion");
            return Err(ApiError::precondition_failed(rt, name, "ResourceVersion", rv, actual));
        }
        if opts.dry_run {
            let stays = meta(&current)["finalizers"].as_array().is_some_and(|f| !f.is_empty());
            return Ok((current, !stays));
        }
        let mut finalizers: Vec<Value> = meta(&current)["finalizers"].as_array().cloned().unwrap_or_default();
        if meta(&current)["deletionTimestamp"].is_string() && rt.plural != "pods" {
            return Ok((current, false));
        }
        // Without a garbage collector nothing removes this finalizer, as on
        // the recorded control plane (11.20).
        if opts.propagation_policy.as_deref() == Some("Foreground") && rt.plural != "pods" {
            finalizers.push(json!("foregroundDeletion"));
        }
        if !finalizers.is_empty() {
            let mut next = current.clone();
            let m = meta_mut(&mut next);
            m.insert("deletionTimestamp".into(), json!(now_time()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            m.insert("finalizers".into(), Value::Array(finalizers));
            if rt.generation != Generation::None {
                let generation = meta(&current)["generation"].as_i64().unwrap_or(0) + 1;
                meta_mut(&mut next).insert("generation".into(), json!(generation));
            }
            let change = self.commit(rt, ChangeType::Modified, next, Some(current));
            return Ok((change.object.clone(), false));
        }
        // A Pod on a node waits for its kubelet to confirm; none runs here,
        // so it stays terminating until deleted again with grace 0 (11.7, 11.8).
        let on_node = !current["spec"]["nodeName"].as_str().unwrap_or_default().is_empty();
        if rt.plural == "pods" && on_node && opts.grace_period_seconds != Some(0) {
            let grace = opts
                .grace_period_seconds
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            if meta(&current)["deletionTimestamp"].is_string() {
                return Ok((current, false));
            }
            let mut next = current.clone();
            let m = meta_mut(&mut next);
            m.insert("deletionTimestamp".into(), json!(now_time_after(grace)));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            let change = self.commit(rt, ChangeType::Modified, next, Some(current));
            return Ok((change.object.clone(), false));
        }
        let mut gone = current.clone();
        if rt.plural == "pods" {
            let m = meta_mut(&mut gone);
            m.insert("deletionTimestamp".into(), json!(now_time()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        if rt.plural == "namespaces" {
            // Deviation: the namespace and its content go at once (the real
            // server needs the namespace controller for that).
            self.delete_namespace_content(name);
        }
        if rt.plural == "customresourcedefinitions" {
            self.unregister_crd(&current);
        }
        let change = self.commit(rt, ChangeType::Deleted, gone, Some(current));
        Ok((change.object.clone(), true))
    }

    fn delete_namespace_content(&mut self, ns: &str) {
        let mut doomed = Vec::new();
        for (key, objects) in &self.objects {
            let Some(rt) = self.types.iter().find(|t| t.storage() == *key && t.namespaced).cloned() else { continue };
            for ((o_ns, _), obj) in objects {
                if o_ns == ns {
                    doomed.push((rt.clone(), obj.clone()));
                }
            }
        }
        for (rt, obj) in doomed {
            self.commit(&rt, ChangeType::Deleted, obj.clone(), Some(obj));
        }
    }
}

fn object_key(rt: &ResourceType, obj: &Value) -> ObjectKey {
    let ns = if rt.namespaced { str_field(obj, "namespace").to_string() } else { String::new() };
    (rt.storage(), ns, str_field(obj, "name").to_string())
}

fn check_type_meta(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    if obj.get("metadata").is_some_and(|m| !m.is_object() && !m.is_null()) {
        return Err(ApiError::undecodable(rt, "json: cannot unmarshal metadata: not an object"));
    }
    if let Some(api_version) = obj["apiVersion"].as_str()
        && api_version != rt.api_version()
        && !rt.is_events_k8s_io()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    if let Some(kind) = obj["kind"].as_str()
        && kind != rt.kind
    {
        // The server names the object by the Kind it was sent as (08.20).
        let qualified = if rt.group.is_empty() { kind.to_string() } else { format!("{kind}.{}", rt.group) };
        let cause = Cause::invalid("kind", &json!(kind), &format!("must be {}", rt.kind));
        return Err(ApiError::invalid_as(&qualified, &rt.group, kind, str_field(obj, "name"), vec![cause]));
    }
    Ok(())
}
