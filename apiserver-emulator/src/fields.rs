//! Field ownership for server-side apply, reduced to what decides an
//! apply's outcome: which manager owns which leaf field, conflicts with
//! other managers, transfer on force, and removal of the fields a manager
//! stops applying. `managedFields` itself is not rendered.
//!
//! Hand-written: the real algorithm lives in Go (structured-merge-diff);
//! no Rust crate implements it. Lists with a merge key on built-in kinds
//! (containers by name, ...) are maps keyed by that field, as their
//! `listType=map` schema makes them; every other list is one atomic leaf.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Value, json};

use super::errors::{ApiError, Cause};
use super::patch::merge_key;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Segment {
    Field(String),
    /// A list element by its key and the key's value as JSON: `[name="web"]`.
    Key(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FieldPath(Vec<Segment>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.0 {
            match segment {
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Key(key, value) => write!(f, "[{key}={value}]")?,
            }
        }
        Ok(())
    }
}

/// A manager as the real server tells them apart: name, operation and subresource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manager {
    pub name: String,
    pub apply: bool,
    pub status: bool,
    pub api_version: String,
    pub time: String,
}

impl Manager {
    /// How conflict messages name a manager (printManager in the apiserver).
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.name);
        if self.status {
            s.push_str(" with subresource \"status\"");
        }
        if !self.apply {
            s.push_str(&format!(" using {} at {}", self.api_version, self.time));
        }
        s
    }

    fn same(&self, other: &Manager) -> bool {
        self.name == other.name && self.apply == other.apply && self.status == other.status
    }
}

/// The leaves of an object that managers can own, with their values.
pub fn leaves(obj: &Value, keyed_lists: bool) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    let Some(top) = obj.as_object() else { return out };
    for (key, value) in top {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for field in ["labels", "annotations"] {
                    for (k, v) in value[field].as_object().into_iter().flatten() {
                        let path = vec![
                            Segment::Field("metadata".into()),
                            Segment::Field(field.into()),
                            Segment::Field(k.clone()),
                        ];
                        out.insert(FieldPath(path), v.clone());
                    }
                }
                for field in ["finalizers", "ownerReferences"] {
                    if let Some(v) = value.get(field).filter(|v| !v.is_null()) {
                        out.insert(
                            FieldPath(vec![Segment::Field("metadata".into()), Segment::Field(field.into())]),
                            v.clone(),
                        );
                    }
                }
            }
            _ => collect(value, vec![Segment::Field(key.clone())], keyed_lists, &mut out),
        }
    }
    out
}

fn collect(value: &Value, path: Vec<Segment>, keyed_lists: bool, out: &mut BTreeMap<FieldPath, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let mut p = path.clone();
                p.push(Segment::Field(k.clone()));
                collect(v, p, keyed_lists, out);
            }
        }
        Value::Array(items) => {
            let key = match path.last() {
                Some(Segment::Field(name)) if keyed_lists => merge_key(name),
                _ => None,
            };
            match key {
                Some(key) if items.iter().all(|i| i.get(key).is_some()) => {
                    for item in items {
                        let mut p = path.clone();
                        p.push(Segment::Key(key.to_string(), item[key].to_string()));
                        collect(item, p, keyed_lists, out);
                    }
                }
                _ => {
                    out.insert(FieldPath(path), value.clone());
                }
            }
        }
        _ => {
            out.insert(FieldPath(path), value.clone());
        }
    }
}

/// Removes one leaf from an object, and the keyed list element or map it
/// leaves empty (nobody owns an empty container).
fn remove(obj: &mut Value, path: &[Segment]) {
    let Some((first, rest)) = path.split_first() else { return };
    match first {
        Segment::Field(name) => {
            let Some(map) = obj.as_object_mut() else { return };
            if rest.is_empty() {
                map.remove(name);
                return;
            }
            if let Some(child) = map.get_mut(name) {
                remove(child, rest);
                let empty =
                    child.as_object().is_some_and(|m| m.is_empty()) || child.as_array().is_some_and(|a| a.is_empty());
                if empty {
                    map.remove(name);
                }
            }
        }
        Segment::Key(key, value) => {
            let Some(items) = obj.as_array_mut() else { return };
            if let Some(i) = items.iter().position(|item| item.get(key).map(Value::to_string).as_ref() == Some(value)) {
                remove(&mut items[i], rest);
                // Only the key left: the element goes.
                if items[i].as_object().is_some_and(|m| m.len() <= 1) {
                    items.remove(i);
                }
            }
        }
    }
}

/// Who owns what in one object.
#[derive(Debug, Clone, Default)]
pub struct Ownership(Vec<(Manager, BTreeSet<FieldPath>)>);

impl Ownership {
    /// The creator owns everything it created.
    pub fn created(manager: Manager, obj: &Value, keyed_lists: bool) -> Self {
        let all = leaves(obj, keyed_lists).into_keys().collect();
        Self(vec![(manager, all)])
    }

    /// The set of `manager` (a new write replaces its entry, as the
    /// entry's time moves).
    fn take(&mut self, manager: &Manager) -> BTreeSet<FieldPath> {
        match self.0.iter().position(|(m, _)| m.same(manager)) {
            Some(i) => self.0.remove(i).1,
            None => BTreeSet::new(),
        }
    }

    /// A non-apply write: the writer takes every leaf it changed.
    pub fn updated(&mut self, manager: Manager, old: &Value, new: &Value, keyed_lists: bool) {
        let (before, after) = (leaves(old, keyed_lists), leaves(new, keyed_lists));
        let changed: BTreeSet<FieldPath> =
            after.iter().filter(|(p, v)| before.get(*p) != Some(*v)).map(|(p, _)| p.clone()).collect();
        let mut mine = self.take(&manager);
        for (_, owned) in self.0.iter_mut() {
            owned.retain(|p| !changed.contains(p));
        }
        mine.extend(changed);
        self.0.push((manager, mine));
        self.forget_missing(&after);
    }

    /// An apply of `applied` by `manager` onto `merged` (the object with the
    /// configuration merged in): checks conflicts, removes what the manager
    /// stopped applying and nobody else owns, and records the new ownership.
    pub fn applied(
        &mut self,
        manager: Manager,
        current: &Value,
        applied: &Value,
        merged: &mut Value,
        force: bool,
        keyed_lists: bool,
    ) -> Result<(), ApiError> {
        let before = leaves(current, keyed_lists);
        let wanted = leaves(applied, keyed_lists);
        let mut conflicts: Vec<(Manager, FieldPath)> = Vec::new();
        for (path, value) in &wanted {
            if before.get(path).is_none_or(|v| v == value) {
                continue;
            }
            for (other, owned) in &self.0 {
                if !other.same(&manager) && owned.contains(path) {
                    conflicts.push((other.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflict_error(&conflicts));
        }
        let previously = self.take(&manager);
        for path in previously.iter().filter(|p| !wanted.contains_key(*p)) {
            if !self.0.iter().any(|(_, owned)| owned.contains(path)) {
                remove(merged, &path.0);
            }
        }
        // Forced: the fields change hands.
        for (other, path) in &conflicts {
            if let Some((_, owned)) = self.0.iter_mut().find(|(m, _)| m.same(other)) {
                owned.remove(path);
            }
        }
        self.0.push((manager, wanted.into_keys().collect()));
        let after = leaves(merged, keyed_lists);
        self.forget_missing(&after);
        Ok(())
    }

    fn forget_missing(&mut self, present: &BTreeMap<FieldPath, Value>) {
        for (_, owned) in self.0.iter_mut() {
            owned.retain(|p| present.contains_key(p));
        }
        self.0.retain(|(_, owned)| !owned.is_empty());
    }
}

/// 409 with one FieldManagerConflict cause per conflict, worded as the
/// apiserver words them.
fn conflict_error(conflicts: &[(Manager, FieldPath)]) -> ApiError {
    let causes: Vec<Cause> = conflicts
        .iter()
        .map(|(m, p)| Cause::new("FieldManagerConflict", p.to_string(), format!("conflict with {}", m.describe())))
        .collect();
    let message = if let [(m, p)] = conflicts {
        format!("Apply failed with 1 conflict: conflict with {}: {p}", m.describe())
    } else {
        let mut by_manager: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (m, p) in conflicts {
            by_manager.entry(m.describe()).or_default().push(format!("- {p}"));
        }
        let lines: Vec<String> = by_manager
            .into_iter()
            .flat_map(|(m, paths)| std::iter::once(format!("conflicts with {m}:")).chain(paths))
            .collect();
        format!("Apply failed with {} conflicts: {}", conflicts.len(), lines.join("\n"))
    };
    let details = json!({"causes": causes.iter().map(|c: &Cause| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>()});
    ApiError::Status { code: 409, reason: Some("Conflict"), message, details: Some(details), metadata: None }
}
