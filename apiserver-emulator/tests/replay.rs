//! The API server emulator held to what a real kube-apiserver v1.26 did:
//! the recorded HTTP exchanges of `transcripts/` (see its README) replayed
//! against a fresh emulator, in recording order, with the writes the
//! recording made without recording them, comparing what a client depends
//! on: status code, Status kind/reason/message/details, object fields, the
//! order of resourceVersions. `not_compared` and `status_only` list what is
//! not (fully) compared and why. The watch files (09, 10) are replayed by
//! scenario tests that perform the listed actions while the watches are open.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, bail};
use apiserver_emulator::ApiServer;
use serde_json::{Value, json};

struct Exchange {
    id: String,
    method: String,
    path: String,
    headers: Vec<String>,
    body: Option<String>,
    status: u16,
    response: String,
}

fn load_transcripts() -> anyhow::Result<Vec<Exchange>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("transcripts/transcripts.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).context("parsing a transcript line")?;
            let req = &v["request"];
            let resp = &v["response"];
            Ok(Exchange {
                id: v["id"].as_str().unwrap_or_default().to_string(),
                method: req["method"].as_str().unwrap_or_default().to_string(),
                path: req["path"].as_str().unwrap_or_default().to_string(),
                headers: req["headers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|h| h.as_str().map(str::to_string)).collect())
                    .unwrap_or_default(),
                body: req["body"].as_str().map(str::to_string),
                status: resp["status"].as_u64().unwrap_or(0) as u16,
                response: resp["body"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Exchanges that are not compared. Those the real server answered with a
/// 2xx are still sent (later exchanges depend on the state they made);
/// the others are not sent at all.
fn not_compared(id: &str) -> Option<&'static str> {
    Some(match id {
        // Five watches open for 70 s while unrecorded actions happen; the
        // behaviour (replay from RV, selector transitions, bookmarks, no event
        // for no-op writes) is covered by the kube-client tests below.
        // Watches open while actions happened that are listed, not recorded
        // as HTTP: replayed by the two replay_09_* scenario tests instead.
        "09.1" | "09.2" | "09.3" | "09.4" | "09.5" | "09.13" | "09.14" | "09.15" => "watch scenario",
        // Their starting state depends on those actions and on 10's
        // unrecorded changes; covered by the kube-client tests below.
        "09.6" | "09.7" | "09.8" | "09.11" => "watch state from unrecorded actions",
        // etcd compaction and an API server restart: replayed by
        // replay_10_compaction_and_restart, which performs them in between.
        "10.1" | "10.2" | "10.3" | "10.4" | "10.5" | "10.6" | "10.7" | "10.8" | "10.9" | "10.10" | "10.11"
        | "10.12" | "10.13" | "10.14" | "10.15" | "10.16" | "10.17" | "10.18" | "10.19" => "compaction / restart",
        // The real server caches a successful review for a few seconds; the
        // emulator invalidates a pod-bound token as soon as its Pod is gone.
        "12.19" => "TokenReview cache",
        // Pretty-printing for curl's User-Agent and ?pretty are not emulated.
        "15.12" | "15.13" => "pretty printing",
        _ => return None,
    })
}

/// Exchanges compared by status code and reason only: the emulator refuses
/// them for the same reason but words the message differently.
fn status_only(id: &str) -> bool {
    matches!(
        id, // serde_json and Go's encoding/json word a syntax error differently.
        "05.12"
    )
}

/// Fields the real server fills in and the emulator does not (admission
/// plugins, kubelet-less status, Event bookkeeping): ignored when checking
/// that the recorded object is in the emulator's.
const DEFAULTED: &[&str] = &[
    // ServiceAccount admission: the emulator names the account but mounts no token.
    "volumes",
    "volumeMounts",
    // DefaultTolerationSeconds admission.
    "tolerations",
    // Event fields the core API fills from eventTime or the source.
    "source",
    "firstTimestamp",
    "lastTimestamp",
    "deprecatedSource",
    "deprecatedFirstTimestamp",
    "deprecatedLastTimestamp",
    "reportingComponent",
    "reportingInstance",
    "reportingController",
    "eventTime",
];

/// Fields whose values are clock readings: present on both sides, never equal.
const VOLATILE: &[&str] = &["lastTransitionTime", "lastUpdateTime", "expirationTimestamp", "deletionTimestamp"];

/// Whether every field of `small` is in `big` with the same value (lists:
/// same length, element-wise); keys in `skip` are not looked at in `small`,
/// keys in VOLATILE only for presence.
fn contained(small: &Value, big: &Value, skip: &[&str]) -> bool {
    match (small, big) {
        (Value::Object(s), Value::Object(b)) => s.iter().all(|(k, v)| {
            skip.contains(&k.as_str())
                || (VOLATILE.contains(&k.as_str()) && b.contains_key(k))
                || b.get(k).is_some_and(|bv| contained(v, bv, skip))
        }),
        (Value::Array(s), Value::Array(b)) => s.len() == b.len() && s.iter().zip(b).all(|(x, y)| contained(x, y, skip)),
        _ => small == big,
    }
}

/// Digit runs masked: resourceVersions and counters in messages differ by
/// construction; uids and names are mapped before this.
fn mask_digits(s: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

struct Replayer {
    server: ApiServer,
    http: reqwest::Client,
    /// Recorded string -> emulator string (uids, generated names, tokens, continue tokens).
    subst: Vec<(String, String)>,
    /// Recorded object resourceVersion -> emulator one.
    rvs: BTreeMap<u64, u64>,
    /// Recorded collection resourceVersions -> emulator ones, for requests
    /// only: the recorded server's own writes (its leases) moved its counter
    /// where the emulator's did not, so several may map to one.
    rv_aliases: BTreeMap<u64, u64>,
    failures: Vec<String>,
    compared: Vec<String>,
}

impl Replayer {
    async fn new() -> anyhow::Result<Self> {
        Ok(Self {
            server: ApiServer::start().await?,
            http: reqwest::Client::builder().build()?,
            subst: Vec::new(),
            rvs: BTreeMap::new(),
            rv_aliases: BTreeMap::new(),
            failures: Vec::new(),
            compared: Vec::new(),
        })
    }

    fn learn_string(&mut self, recorded: &str, emulated: &str) {
        if !recorded.is_empty() && recorded != emulated && !self.subst.iter().any(|(r, _)| r == recorded) {
            self.subst.push((recorded.to_string(), emulated.to_string()));
        }
    }

    /// Records that recorded RV `rec` is emulator RV `emu`, checking that
    /// the two orders agree (a write moves the RV, a no-op keeps it).
    fn learn_rv(&mut self, id: &str, rec: &str, emu: &str) {
        let (Ok(rec), Ok(emu)) = (rec.parse::<u64>(), emu.parse::<u64>()) else { return };
        if let Some(known) = self.rvs.get(&rec) {
            if *known != emu {
                self.failures.push(format!("{id}: recorded resourceVersion {rec} was {known}, now {emu}"));
            }
            return;
        }
        for (r, e) in &self.rvs {
            if (*r < rec) != (*e < emu) || *e == emu {
                self.failures
                    .push(format!("{id}: resourceVersion order differs: recorded {r} vs {rec}, emulator {e} vs {emu}"));
                break;
            }
        }
        self.rvs.insert(rec, emu);
    }

    fn learn_object(&mut self, id: &str, rec: &Value, emu: &Value) {
        let (rm, em) = (&rec["metadata"], &emu["metadata"]);
        if let (Some(r), Some(e)) = (rm["name"].as_str(), em["name"].as_str()) {
            self.learn_string(r, e);
        }
        if let (Some(r), Some(e)) = (rm["uid"].as_str(), em["uid"].as_str()) {
            self.learn_string(r, e);
        }
        if let (Some(r), Some(e)) = (rm["resourceVersion"].as_str(), em["resourceVersion"].as_str())
            && rec["kind"].as_str().is_none_or(|k| !k.ends_with("List"))
        {
            self.learn_rv(id, r, e);
        }
        if let (Some(r), Some(e)) = (rm["continue"].as_str(), em["continue"].as_str()) {
            self.learn_string(r, e);
        }
        if let (Some(r), Some(e)) = (rec["status"]["token"].as_str(), emu["status"]["token"].as_str()) {
            self.learn_string(r, e);
        }
        // A deletion's Status is the only place the uid of an unrecorded setup
        // object shows; a refused generateName create names a random object.
        for field in ["uid", "name"] {
            if let (Some(r), Some(e)) = (rec["details"][field].as_str(), emu["details"][field].as_str()) {
                self.learn_string(r, e);
            }
        }
        if let (Some(ri), Some(ei)) = (rec["items"].as_array(), emu["items"].as_array()) {
            for r in ri {
                let name = self.to_emu(r["metadata"]["name"].as_str().unwrap_or_default());
                let found = ei.iter().find(|e| {
                    e["metadata"]["name"] == name.as_str() && e["metadata"]["namespace"] == r["metadata"]["namespace"]
                });
                if let Some(e) = found {
                    self.learn_object(id, r, e);
                }
            }
        }
    }

    fn to_emu(&self, s: &str) -> String {
        self.subst.iter().fold(s.to_string(), |acc, (r, e)| acc.replace(r, e))
    }

    fn to_recorded(&self, s: &str) -> String {
        self.subst.iter().fold(s.to_string(), |acc, (r, e)| acc.replace(e, r))
    }

    /// Recorded resourceVersions in a request (body fields, query, JSON-patch
    /// tests of /metadata/resourceVersion) become the emulator's; unknown
    /// ones (stale, future, bogus) stay as they are, which keeps their meaning.
    fn rewrite_rvs(&self, text: &str) -> String {
        self.map_rvs(text, |rv| self.rvs.get(&rv).or_else(|| self.rv_aliases.get(&rv)).copied())
    }

    fn alias_rv(&mut self, recorded: u64, emulated: u64) {
        self.rv_aliases.insert(recorded, emulated);
    }

    /// The reverse, for comparing emulator bodies with recorded ones.
    fn unrewrite_rvs(&self, text: &str) -> String {
        self.map_rvs(text, |rv| self.rvs.iter().find(|(_, e)| **e == rv).map(|(r, _)| *r))
    }

    fn map_rvs(&self, text: &str, map: impl Fn(u64) -> Option<u64>) -> String {
        let mut out = text.to_string();
        for prefix in ["\"resourceVersion\":\"", "resourceVersion=", "\"/metadata/resourceVersion\",\"value\":\""] {
            let mut result = String::new();
            let mut rest = out.as_str();
            while let Some(pos) = rest.find(prefix) {
                let (head, tail) = rest.split_at(pos + prefix.len());
                result.push_str(head);
                let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
                match digits.parse::<u64>().ok().and_then(&map) {
                    Some(emu) => result.push_str(&emu.to_string()),
                    None => result.push_str(&digits),
                }
                rest = &tail[digits.len()..];
            }
            result.push_str(rest);
            out = result;
        }
        out
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[String],
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{}", self.server.url(), self.rewrite_rvs(&self.to_emu(path)));
        let mut req = self.http.request(method.parse()?, url);
        for h in headers {
            let Some((name, value)) = h.split_once(": ") else { continue };
            match name.to_ascii_lowercase().as_str() {
                "content-type" | "accept" | "user-agent" => req = req.header(name, value),
                // The admin token is redacted: the emulator takes no header as admin.
                "authorization" if value != "Bearer <TOKEN>" => req = req.header(name, self.to_emu(value)),
                _ => {}
            }
        }
        if let Some(b) = body {
            req = req.body(self.rewrite_rvs(&self.to_emu(b)));
        }
        let resp = req.send().await.context("sending a replayed request")?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.context("reading a replayed response")?))
    }

    /// Sends `ex`; learns the name/uid/resourceVersion mapping from the answer
    /// when `learn`, and compares it with the recorded one when `compare`.
    async fn replay(&mut self, ex: &Exchange, learn: bool, compare: bool) -> anyhow::Result<()> {
        let (status, body) = self.send(&ex.method, &ex.path, &ex.headers, ex.body.as_deref()).await?;
        let is_watch = ex.path.contains("watch=");
        let (rec, emu): (Value, Value) = if is_watch {
            (Value::Null, Value::Null)
        } else {
            (
                serde_json::from_str(&ex.response).unwrap_or(Value::Null),
                serde_json::from_str(&body).unwrap_or(Value::Null),
            )
        };
        // Excluded exchanges may have run on a state that differs: learn nothing from them.
        if learn && !is_watch {
            self.learn_object(&ex.id, &rec, &emu);
        }
        if !compare {
            return Ok(());
        }
        self.compared.push(ex.id.clone());
        let before = self.failures.len();
        if status != ex.status {
            self.failures.push(format!("{}: status {status}, recorded {} (body {body})", ex.id, ex.status));
            return Ok(());
        }
        if is_watch {
            self.compare_watch(&ex.id, &ex.response, &body);
        } else if rec.is_null() {
            if body.trim() != ex.response.trim() {
                self.failures.push(format!("{}: body {body:?}, recorded {:?}", ex.id, ex.response));
            }
        } else if status_only(&ex.id) {
            if emu["reason"] != rec["reason"] {
                self.failures.push(format!("{}: reason {}, recorded {}", ex.id, emu["reason"], rec["reason"]));
            }
        } else {
            self.compare(&ex.id, &rec, &emu);
        }
        if self.failures.len() > before {
            self.failures.push(format!("{}:   emulator body: {}", ex.id, body.trim()));
        }
        Ok(())
    }

    fn fail(&mut self, id: &str, what: &str, emu: &Value, rec: &Value) {
        self.failures.push(format!("{id}: {what}: emulator {emu}, recorded {rec}"));
    }

    fn compare(&mut self, id: &str, rec: &Value, emu: &Value) {
        let kind = rec["kind"].as_str().unwrap_or_default();
        if emu["kind"] != rec["kind"] || emu["apiVersion"] != rec["apiVersion"] {
            self.fail(
                id,
                "kind/apiVersion",
                &json!([emu["kind"], emu["apiVersion"]]),
                &json!([rec["kind"], rec["apiVersion"]]),
            );
            return;
        }
        match kind {
            "Status" => self.compare_status(id, rec, emu),
            "APIResourceList" | "APIGroupList" | "APIGroup" | "APIVersions" => self.compare_discovery(id, rec, emu),
            "" if rec["gitVersion"].is_string() => {
                if emu["gitVersion"] != rec["gitVersion"] {
                    self.fail(id, "gitVersion", &emu["gitVersion"], &rec["gitVersion"]);
                }
            }
            k if k.ends_with("List") => self.compare_list(id, rec, emu),
            _ => self.compare_object(id, rec, emu),
        }
    }

    fn normalized(&self, v: &Value) -> Value {
        serde_json::from_str(&self.unrewrite_rvs(&self.to_recorded(&v.to_string()))).unwrap_or(Value::Null)
    }

    fn to_emu_value(&self, v: &Value) -> Value {
        serde_json::from_str(&self.to_emu(&v.to_string())).unwrap_or(Value::Null)
    }

    fn compare_status(&mut self, id: &str, rec: &Value, emu: &Value) {
        let emu = self.normalized(emu);
        for field in ["status", "reason", "code"] {
            if emu[field] != rec[field] {
                self.fail(id, field, &emu[field], &rec[field]);
            }
        }
        let (em, rm) = (
            mask_digits(emu["message"].as_str().unwrap_or_default()),
            mask_digits(rec["message"].as_str().unwrap_or_default()),
        );
        if em != rm {
            self.fail(id, "message", &emu["message"], &rec["message"]);
        }
        let mut ed = emu["details"].clone();
        let mut rd = rec["details"].clone();
        for d in [&mut ed, &mut rd] {
            if let Some(causes) = d["causes"].as_array_mut() {
                for c in causes {
                    c["message"] = json!(mask_digits(c["message"].as_str().unwrap_or_default()));
                }
            }
        }
        if ed != rd {
            self.fail(id, "details", &ed, &rd);
        }
        if emu["metadata"]["continue"].is_string() != rec["metadata"]["continue"].is_string() {
            self.fail(id, "metadata.continue", &emu["metadata"], &rec["metadata"]);
        }
    }

    fn compare_discovery(&mut self, id: &str, rec: &Value, emu: &Value) {
        if let Some(resources) = emu["resources"].as_array() {
            if emu["groupVersion"] != rec["groupVersion"] {
                self.fail(id, "groupVersion", &emu["groupVersion"], &rec["groupVersion"]);
            }
            for r in resources {
                let recorded = rec["resources"].as_array().and_then(|a| a.iter().find(|x| x["name"] == r["name"]));
                match recorded {
                    Some(x) if contained(r, x, &[]) => {}
                    other => self.fail(id, "resource", r, other.unwrap_or(&Value::Null)),
                }
            }
        }
        if let Some(groups) = emu["groups"].as_array() {
            for g in groups {
                let recorded = rec["groups"].as_array().and_then(|a| a.iter().find(|x| x["name"] == g["name"]));
                if !recorded.is_some_and(|x| contained(g, x, &[])) {
                    self.fail(id, "group", g, recorded.unwrap_or(&Value::Null));
                }
            }
        }
        if rec["kind"] == "APIGroup" && !contained(emu, rec, &[]) {
            self.fail(id, "APIGroup", emu, rec);
        }
        if rec["kind"] == "APIVersions" && emu["versions"] != rec["versions"] {
            self.fail(id, "versions", &emu["versions"], &rec["versions"]);
        }
    }

    fn compare_list(&mut self, id: &str, rec: &Value, emu: &Value) {
        let emu = self.normalized(emu);
        let names = |v: &Value| -> Vec<String> {
            v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| {
                            format!(
                                "{}/{}",
                                i["metadata"]["namespace"].as_str().unwrap_or_default(),
                                i["metadata"]["name"].as_str().unwrap_or_default()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        // Generated names differ, so the emulator's order is checked on its
        // own names, and the sets compared.
        let raw = names(&self.to_emu_value(&emu));
        let mut sorted = raw.clone();
        sorted.sort();
        // resourceVersion=0 lists come from the watch cache, unsorted.
        if raw != sorted && id != "04.23" && id != "04.24" {
            self.fail(id, "items not sorted by namespace/name", &json!(raw), &json!(sorted));
        }
        let (mut en, mut rn) = (names(&emu), names(rec));
        en.sort();
        rn.sort();
        if en != rn {
            self.fail(id, "items", &json!(en), &json!(rn));
            return;
        }
        for key in ["continue", "remainingItemCount"] {
            let (e, r) = (&emu["metadata"][key], &rec["metadata"][key]);
            let same = if key == "continue" { e.is_null() == r.is_null() && (r != "" || e == "") } else { e == r };
            if !same {
                self.fail(id, &format!("metadata.{key}"), e, r);
            }
        }
        if let (Some(ei), Some(ri)) = (emu["items"].as_array(), rec["items"].as_array()) {
            for r in ri {
                if let Some(e) = ei.iter().find(|e| {
                    e["metadata"]["name"] == r["metadata"]["name"]
                        && e["metadata"]["namespace"] == r["metadata"]["namespace"]
                }) {
                    if e.get("kind").is_some() != r.get("kind").is_some() {
                        self.fail(id, "item kind presence", &e["kind"], &r["kind"]);
                    }
                    self.compare_object(id, r, e);
                }
            }
        }
    }

    fn compare_object(&mut self, id: &str, rec: &Value, emu: &Value) {
        let emu = self.normalized(emu);
        let (em, rm) = (&emu["metadata"], &rec["metadata"]);
        for field in
            ["name", "namespace", "labels", "annotations", "finalizers", "generation", "deletionGracePeriodSeconds"]
        {
            if em[field] != rm[field] {
                self.fail(id, &format!("metadata.{field}"), &em[field], &rm[field]);
            }
        }
        if em["deletionTimestamp"].is_null() != rm["deletionTimestamp"].is_null() {
            self.fail(id, "metadata.deletionTimestamp presence", &em["deletionTimestamp"], &rm["deletionTimestamp"]);
        }
        let custom = rec["apiVersion"].as_str().is_some_and(|a| a.starts_with("backup.k8slab.io"));
        let top_keys: BTreeSet<&String> = emu
            .as_object()
            .into_iter()
            .flatten()
            .chain(rec.as_object().into_iter().flatten())
            .map(|(k, _)| k)
            .collect();
        for key in top_keys {
            if matches!(key.as_str(), "metadata" | "kind" | "apiVersion") {
                continue;
            }
            let (e, r) = (&emu[key.as_str()], &rec[key.as_str()]);
            if e.is_null() != r.is_null() && !(custom || DEFAULTED.contains(&key.as_str())) {
                self.fail(id, &format!("{key} presence"), e, r);
                continue;
            }
            let same = if custom { e == r } else { contained(e, r, &[]) && contained(r, e, DEFAULTED) };
            if !(same || e.is_null() && DEFAULTED.contains(&key.as_str())) {
                self.fail(id, key, e, r);
            }
        }
    }

    /// Watch bodies: the same sequence of events (type, namespace/name,
    /// labels); BOOKMARKs, whose timing differs by design, are checked for
    /// the resourceVersion they carry: the newest change of the type.
    fn compare_watch(&mut self, id: &str, recorded: &str, emulated: &str) {
        self.compare_watch_events(id, recorded, emulated, true);
    }

    /// The initial ADDED events of a watch from resourceVersion 0 come from
    /// the watch cache, in no particular order: compared as a set.
    fn compare_watch_unordered(&mut self, id: &str, recorded: &str, emulated: &str) {
        self.compare_watch_events(id, recorded, emulated, false);
    }

    fn compare_watch_events(&mut self, id: &str, recorded: &str, emulated: &str, ordered: bool) {
        if !self.compared.iter().any(|c| c == id) {
            self.compared.push(id.to_string());
        }
        let parse = |text: &str| -> Vec<Value> {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| e["type"].is_string())
                .collect()
        };
        let signature = |e: &Value| {
            if e["type"] == "ERROR" {
                let o = &e["object"];
                return format!(
                    "ERROR {} {} {}",
                    o["reason"],
                    o["code"],
                    mask_digits(o["message"].as_str().unwrap_or_default())
                );
            }
            let m = &e["object"]["metadata"];
            format!(
                "{} {}/{} {}",
                e["type"].as_str().unwrap_or_default(),
                m["namespace"].as_str().unwrap_or_default(),
                m["name"].as_str().unwrap_or_default(),
                m["labels"]
            )
        };
        let (emu, rec) = (parse(&self.to_recorded(emulated)), parse(recorded));
        let (emu_events, rec_events): (Vec<&Value>, Vec<&Value>) = (
            emu.iter().filter(|e| e["type"] != "BOOKMARK").collect(),
            rec.iter().filter(|e| e["type"] != "BOOKMARK").collect(),
        );
        let (mut e, mut r): (Vec<String>, Vec<String>) =
            (emu_events.iter().map(|e| signature(e)).collect(), rec_events.iter().map(|e| signature(e)).collect());
        if !ordered {
            e.sort();
            r.sort();
        }
        if e != r {
            self.fail(id, "watch events", &json!(e), &json!(r));
            return;
        }
        for (em, rm) in emu_events.iter().zip(&rec_events).filter(|_| ordered) {
            let rv = |v: &Value| v["object"]["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
            self.learn_rv(id, &rv(rm), &rv(em));
        }
        let recorded_marks: BTreeSet<u64> = rec
            .iter()
            .filter(|e| e["type"] == "BOOKMARK")
            .filter_map(|e| e["object"]["metadata"]["resourceVersion"].as_str()?.parse().ok())
            .collect();
        for mark in emu.iter().filter(|e| e["type"] == "BOOKMARK") {
            let emu_rv: u64 =
                mark["object"]["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
            let as_recorded = self.rvs.iter().find(|(_, e)| **e == emu_rv).map(|(r, _)| *r);
            if !as_recorded.is_some_and(|r| recorded_marks.contains(&r)) {
                self.fail(id, "BOOKMARK resourceVersion", &json!(emu_rv), &json!(recorded_marks));
            }
        }
    }

    /// Creates an object the recording made without showing it.
    async fn setup(&mut self, path: &str, body: Value) -> anyhow::Result<Value> {
        let headers = vec!["Content-Type: application/json".to_string()];
        let (status, text) = self.send("POST", path, &headers, Some(&body.to_string())).await?;
        if status != 201 {
            bail!("setup POST {path} failed: {status} {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

/// The recorded object `ns/name` in the LIST response of exchange `id`,
/// reduced to what a client would have sent to create it.
fn recorded_item(all: &[Exchange], id: &str, ns: &str, name: &str) -> anyhow::Result<(Value, Value)> {
    let ex = all.iter().find(|e| e.id == id).context("exchange missing")?;
    let list: Value = serde_json::from_str(&ex.response)?;
    let item = list["items"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["metadata"]["name"] == name && i["metadata"]["namespace"] == ns))
        .cloned()
        .with_context(|| format!("{ns}/{name} not in {id}"))?;
    let mut spec = item["spec"].clone();
    strip_defaults(&mut spec);
    let create = json!({
        "metadata": {"name": name, "namespace": ns, "labels": item["metadata"]["labels"]},
        "spec": spec,
    });
    Ok((create, item))
}

fn strip_defaults(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !DEFAULTED.contains(&k.as_str()));
            m.values_mut().for_each(strip_defaults);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_defaults),
        _ => {}
    }
}

fn deployment(name: &str, labels: Value) -> Value {
    let app = labels["app"].clone();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "image": "docker.io/library/nginx:1.25"}]}}},
    })
}

/// Unrecorded writes the recording made before exchange `id`.
async fn unrecorded_setup(r: &mut Replayer, all: &[Exchange], id: &str) -> anyhow::Result<()> {
    match id {
        // 04: "Setup (not shown)": demo/api and other/web before pod-a ...
        "04.1" => {
            for (ns, name) in [("demo", "api"), ("other", "web")] {
                let (body, recorded) = recorded_item(all, "04.3", ns, name)?;
                let created = r.setup(&format!("/apis/apps/v1/namespaces/{ns}/deployments"), body).await?;
                r.learn_object("setup", &recorded, &created);
            }
        }
        // ... and the Pods pod-b and pod-unscheduled right after it.
        "04.2" => {
            for (list, name) in [("04.15", "pod-b"), ("04.16", "pod-unscheduled")] {
                let (body, recorded) = recorded_item(all, list, "demo", name)?;
                let created = r.setup("/api/v1/namespaces/demo/pods", body).await?;
                r.learn_object("setup", &recorded, &created);
            }
        }
        // 11: the objects deleted there.
        "11.1" => {
            r.setup("/apis/apps/v1/namespaces/demo/deployments", deployment("to-delete", json!({"app": "to-delete"})))
                .await?;
            r.setup(
                "/api/v1/namespaces/demo/configmaps",
                json!({"metadata": {"name": "to-delete"}, "data": {"k": "v"}}),
            )
            .await?;
        }
        // The recorded uid and resourceVersion of `precond` appear in
        // 11.9-11.11 and are mapped to the emulator's.
        "11.9" => {
            let precond = r
                .setup("/apis/apps/v1/namespaces/demo/deployments", deployment("precond", json!({"app": "precond"})))
                .await?;
            r.learn_string(
                "f23b310b-1021-42f9-9f01-a9c2d8112718",
                precond["metadata"]["uid"].as_str().unwrap_or_default(),
            );
            r.learn_rv("setup", "286", precond["metadata"]["resourceVersion"].as_str().unwrap_or_default());
        }
        // fg-delete as 11.20 shows it.
        "11.20" => {
            let ex = all.iter().find(|e| e.id == "11.20").context("11.20 missing")?;
            let recorded: Value = serde_json::from_str(&ex.response)?;
            let mut spec = recorded["spec"].clone();
            strip_defaults(&mut spec);
            let body =
                json!({"metadata": {"name": "fg-delete", "labels": recorded["metadata"]["labels"]}, "spec": spec});
            r.setup("/apis/apps/v1/namespaces/demo/deployments", body).await?;
        }
        // 12: "A TokenRequest bound to agent-pod-b was made (not shown)".
        "12.21" => {
            let headers = vec!["Content-Type: application/json".to_string()];
            let (_, pod) = r.send("GET", "/api/v1/namespaces/demo/pods/agent-pod-b", &headers, None).await?;
            let pod: Value = serde_json::from_str(&pod)?;
            let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "audiences": ["image-backup"], "expirationSeconds": 3600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-pod-b", "uid": pod["metadata"]["uid"]}}});
            let (status, text) = r
                .send(
                    "POST",
                    "/api/v1/namespaces/demo/serviceaccounts/image-backup-agent/token",
                    &headers,
                    Some(&request.to_string()),
                )
                .await?;
            if status != 201 {
                bail!("TokenRequest for agent-pod-b: {status} {text}");
            }
            let answer: Value = serde_json::from_str(&text)?;
            r.learn_string("<SA_TOKEN_4>", answer["status"]["token"].as_str().unwrap_or_default());
        }
        _ => {}
    }
    Ok(())
}

/// Replays, in recording order, every exchange up to the end of the files
/// in `files`, comparing those of `files` (except the ones excluded above).
async fn replay_files(files: &[&str]) -> anyhow::Result<()> {
    let all = load_transcripts()?;
    let r = replay_through(&all, files).await?;
    if !r.failures.is_empty() {
        bail!("{} mismatches:\n{}", r.failures.len(), r.failures.join("\n"));
    }
    eprintln!("compared: {}", r.compared.join(" "));
    Ok(())
}

async fn replay_through(all: &[Exchange], files: &[&str]) -> anyhow::Result<Replayer> {
    let in_files = |id: &str| files.iter().any(|f| id.starts_with(&format!("{f}.")));
    let last = all.iter().rposition(|e| in_files(&e.id)).context("no such file")?;
    let mut r = Replayer::new().await?;
    for ex in &all[..=last] {
        unrecorded_setup(&mut r, all, &ex.id).await?;
        match not_compared(&ex.id) {
            Some(_) if (200..300).contains(&ex.status) && !ex.path.contains("watch") => {
                r.replay(ex, false, false).await?
            }
            Some(_) => {}
            None => r.replay(ex, true, in_files(&ex.id)).await?,
        }
    }
    Ok(r)
}

/// Opens the watches of `ids` (their recorded paths, from `start_rv`, with
/// `timeoutSeconds` cut to `seconds`), runs `actions` while they are open,
/// and returns each watch's body once its timeout has ended it.
async fn watch_during(
    r: &mut Replayer,
    all: &[Exchange],
    ids: &[&str],
    start_rv: u64,
    seconds: u64,
    actions: &[(&str, &str, &str, Value, Option<&str>)],
) -> anyhow::Result<Vec<String>> {
    let mut watches = Vec::new();
    let mut opened = Vec::new();
    for id in ids {
        let ex = all.iter().find(|e| e.id == *id).context("exchange missing")?;
        let (base, query) = ex.path.split_once('?').context("a watch has a query")?;
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some(("timeoutSeconds", _)) => format!("timeoutSeconds={seconds}"),
                Some(("resourceVersion", _)) => format!("resourceVersion={start_rv}"),
                _ => p.to_string(),
            })
            .collect();
        let url = format!("{}{base}?{}", r.server.url(), query.join("&"));
        let http = r.http.clone();
        let (open_tx, open_rx) = tokio::sync::oneshot::channel();
        watches.push(tokio::spawn(async move {
            let response = http.get(url).send().await?;
            // Headers are sent once the watch is subscribed: from here on
            // changes reach it live, as the recorded actions reached theirs.
            let _ = open_tx.send(());
            response.text().await
        }));
        opened.push(open_rx);
    }
    for open in opened {
        open.await.context("a watch did not open")?;
    }
    for (method, path, content_type, body, recorded_rv) in actions {
        let headers = vec![format!("Content-Type: {content_type}")];
        let body = (!body.is_null()).then(|| body.to_string());
        let (status, text) = r.send(method, path, &headers, body.as_deref()).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: {status} {text}");
        }
        if let Some(rec) = recorded_rv {
            let answer: Value = serde_json::from_str(&text)?;
            r.learn_rv("action", rec, answer["metadata"]["resourceVersion"].as_str().unwrap_or_default());
        }
    }
    let mut bodies = Vec::new();
    for w in watches {
        bodies.push(w.await??);
    }
    Ok(bodies)
}

/// The collection resourceVersion of the emulator now: where the recorded
/// watches started ("Starting point ... returned collection resourceVersion").
async fn current_rv(r: &Replayer) -> anyhow::Result<u64> {
    let (_, list) = r.send("GET", "/apis/apps/v1/namespaces/demo/deployments", &[], None).await?;
    let list: Value = serde_json::from_str(&list)?;
    list["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).context("collection resourceVersion")
}

/// A write the recording made while watches were open (listed, not
/// recorded as HTTP): method, path, content type, body, recorded resourceVersion.
type Action = (&'static str, &'static str, &'static str, Value, Option<&'static str>);

const MERGE: &str = "application/merge-patch+json";
const JSON: &str = "application/json";

/// The actions listed under 09.1, in order, with their recorded resourceVersions.
fn actions_09(all: &[Exchange]) -> anyhow::Result<Vec<Action>> {
    let (merge, json) = (MERGE, JSON);
    let watched = all.iter().find(|e| e.id == "09.1").context("09.1")?;
    let added: Value = serde_json::from_str(watched.response.lines().next().unwrap_or_default())?;
    let mut spec = added["object"]["spec"].clone();
    strip_defaults(&mut spec);
    let deployment =
        json!({"metadata": {"name": "watched", "labels": added["object"]["metadata"]["labels"]}, "spec": spec});
    let backup = json!({"apiVersion": "backup.k8slab.io/v1alpha1", "kind": "ImageBackup", "metadata": {"name": "ib-watched"},
        "spec": {"source": "docker.io/library/nginx:1.26"}});
    let deployments = "/apis/apps/v1/namespaces/demo/deployments";
    let backups = "/apis/backup.k8slab.io/v1alpha1/imagebackups";
    Ok(vec![
        ("POST", deployments, json, deployment, Some("336")),
        ("POST", backups, json, backup, Some("337")),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/watched",
            merge,
            json!({"spec": {"template": {"spec": {"containers": [{"name": "watched", "image": "docker.io/library/nginx:1.26"}]}}}}),
            Some("338"),
        ),
        (
            "PATCH",
            "/apis/backup.k8slab.io/v1alpha1/imagebackups/ib-watched/status",
            merge,
            json!({"status": {"phase": "Pushing", "node": "node-a"}}),
            Some("339"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/watched/status",
            merge,
            json!({"status": {"observedGeneration": 2, "replicas": 2}}),
            Some("340"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/watched",
            merge,
            json!({"metadata": {"labels": {"watch-me": null}}}),
            Some("342"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/watched",
            merge,
            json!({"metadata": {"labels": {"watch-me": "yes"}}}),
            Some("343"),
        ),
        // Status through the main resource: ignored, no event.
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/watched",
            merge,
            json!({"status": {"replicas": 7}}),
            Some("343"),
        ),
        ("DELETE", "/apis/apps/v1/namespaces/demo/deployments/watched", json, Value::Null, None),
        ("DELETE", "/apis/backup.k8slab.io/v1alpha1/imagebackups/ib-watched", json, Value::Null, None),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/web",
            merge,
            json!({"metadata": {"labels": {"touched": "during-watch"}}}),
            Some("346"),
        ),
    ])
}

#[tokio::test]
async fn replay_09_watch_streams_during_the_recorded_actions() -> anyhow::Result<()> {
    let all = load_transcripts()?;
    let mut r = replay_through(&all, &["15"]).await?;
    let start = current_rv(&r).await?;
    let ids = ["09.1", "09.2", "09.3", "09.4", "09.5"];
    // The actions take milliseconds; 5 s of watch leave room for a loaded
    // machine, and for BOOKMARKs (every second) after the last change.
    let bodies = watch_during(&mut r, &all, &ids, start, 5, &actions_09(&all)?).await?;
    for (id, body) in ids.iter().zip(&bodies) {
        let ex = all.iter().find(|e| e.id == *id).context("exchange")?;
        r.compare_watch(id, &ex.response, body);
    }
    // Then, with nothing happening: the current objects as ADDED events
    // (09.6 resourceVersion=0, 09.7 none, 09.8 a CR), and silence from a
    // future resourceVersion (09.11).
    for (id, from) in [("09.6", 0), ("09.7", 0), ("09.8", 0), ("09.11", current_rv(&r).await? + 1000)] {
        let ex = all.iter().find(|e| e.id == id).context("exchange")?;
        let path = if from == 0 {
            ex.path.clone()
        } else {
            ex.path.replace("resourceVersion=1354", &format!("resourceVersion={from}"))
        };
        let url = format!(
            "{}{}",
            r.server.url(),
            path.replace("timeoutSeconds=5", "timeoutSeconds=1").replace("timeoutSeconds=3", "timeoutSeconds=1")
        );
        let body = r.http.get(url).send().await?.text().await?;
        r.compare_watch_unordered(id, &ex.response, &body);
    }
    if !r.failures.is_empty() {
        bail!("{} mismatches:\n{}", r.failures.len(), r.failures.join("\n"));
    }
    eprintln!("compared: {}", r.compared.join(" "));
    Ok(())
}

/// 10: etcd compaction while the API server runs (part A), then a restart
/// that empties its watch cache (part B), through the emulator's
/// `compact` and `restart_watch_cache`.
#[tokio::test]
async fn replay_10_compaction_and_restart() -> anyhow::Result<()> {
    let all = load_transcripts()?;
    let ex = |id: &str| all.iter().find(|e| e.id == id).context("exchange missing");
    let mut r = replay_through(&all, &["15"]).await?;
    watch_during(&mut r, &all, &[], 0, 0, &actions_09(&all)?).await?;

    r.replay(ex("10.1")?, true, true).await?;
    let old = current_rv(&r).await?;
    r.alias_rv(357, old);
    r.replay(ex("10.2")?, true, true).await?;
    // "Changes made after OLD (not recorded as HTTP)", as 10.3 shows them.
    let probe_added: Value = serde_json::from_str(ex("10.3")?.response.lines().next().unwrap_or_default())?;
    let mut spec = probe_added["object"]["spec"].clone();
    strip_defaults(&mut spec);
    let probe = json!({"metadata": {"name": "compaction-probe", "labels": {"app": "compaction-probe"}}, "spec": spec});
    let path = "/apis/apps/v1/namespaces/demo/deployments/compaction-probe";
    let mut changes: Vec<Action> = vec![("POST", "/apis/apps/v1/namespaces/demo/deployments", JSON, probe, None)];
    for step in ["0", "1", "2"] {
        changes.push(("PATCH", path, MERGE, json!({"metadata": {"labels": {"step": step}}}), None));
    }
    changes.push((
        "PATCH",
        "/apis/apps/v1/namespaces/demo/deployments/web",
        MERGE,
        json!({"metadata": {"labels": {"compaction": "before"}}}),
        None,
    ));
    changes.push(("DELETE", path, JSON, Value::Null, None));
    watch_during(&mut r, &all, &[], 0, 0, &changes).await?;
    r.server.compact();

    // Part A: the watch cache still holds OLD, so the watch replays (10.3);
    // exact reads of OLD are gone (10.4-10.11).
    let replayed = watch_during(&mut r, &all, &["10.3"], old, 1, &[]).await?;
    r.compare_watch("10.3", &ex("10.3")?.response, &replayed[0]);
    for id in ["10.4", "10.5", "10.6", "10.7", "10.8", "10.9", "10.10", "10.11"] {
        r.replay(ex(id)?, true, true).await?;
    }

    // Part B: after the restart every watch from OLD is a 410 (10.12-10.14);
    // a client relists (10.15) and watches from there (10.16).
    r.server.restart_watch_cache();
    for id in ["10.12", "10.13", "10.14", "10.15"] {
        r.replay(ex(id)?, true, true).await?;
    }
    let fresh = current_rv(&r).await?;
    let touch: Action = (
        "PATCH",
        "/apis/apps/v1/namespaces/demo/deployments/web",
        MERGE,
        json!({"metadata": {"labels": {"compaction": "after-restart"}}}),
        Some("369"),
    );
    let watched = watch_during(&mut r, &all, &["10.16"], fresh, 3, &[touch]).await?;
    r.compare_watch("10.16", &ex("10.16")?.response, &watched[0]);
    // 09.14, recorded right after: from before that change, it is replayed,
    // and no BOOKMARK follows (no change while live).
    let replayed = watch_during(&mut r, &all, &["09.14"], fresh, 2, &[]).await?;
    r.compare_watch("09.14", &ex("09.14")?.response, &replayed[0]);
    for id in ["10.17", "10.18", "10.19"] {
        r.replay(ex(id)?, true, true).await?;
    }
    if !r.failures.is_empty() {
        bail!("{} mismatches:\n{}", r.failures.len(), r.failures.join("\n"));
    }
    eprintln!("compared: {}", r.compared.join(" "));
    Ok(())
}

#[tokio::test]
async fn replay_09_13_to_15_bookmarks_only_after_a_live_change() -> anyhow::Result<()> {
    let all = load_transcripts()?;
    let mut r = replay_through(&all, &["15"]).await?;
    // 09.13: nothing happens: no BOOKMARK at all.
    let start = current_rv(&r).await?;
    let quiet = watch_during(&mut r, &all, &["09.13"], start, 2, &[]).await?;
    // 09.15: a Deployment in another namespace changes: no event, but
    // BOOKMARKs with that change's resourceVersion.
    let start = current_rv(&r).await?;
    let patch = json!({"metadata": {"labels": {"bookmark-probe": "1"}}});
    let actions = [(
        "PATCH",
        "/apis/apps/v1/namespaces/other/deployments/web",
        "application/merge-patch+json",
        patch,
        Some("375"),
    )];
    let probed = watch_during(&mut r, &all, &["09.15"], start, 3, &actions).await?;
    for (id, body) in [("09.13", &quiet[0]), ("09.15", &probed[0])] {
        let ex = all.iter().find(|e| e.id == id).context("exchange")?;
        r.compare_watch(id, &ex.response, body);
    }
    if !probed[0].contains("BOOKMARK") {
        r.failures.push(format!("09.15: no BOOKMARK in {}", probed[0]));
    }
    if !r.failures.is_empty() {
        bail!("{} mismatches:\n{}", r.failures.len(), r.failures.join("\n"));
    }
    eprintln!("compared: {}", r.compared.join(" "));
    Ok(())
}

#[tokio::test]
async fn replay_00_setup() -> anyhow::Result<()> {
    replay_files(&["00"]).await
}

#[tokio::test]
async fn replay_01_get_missing() -> anyhow::Result<()> {
    replay_files(&["01"]).await
}

#[tokio::test]
async fn replay_02_create() -> anyhow::Result<()> {
    replay_files(&["02"]).await
}

#[tokio::test]
async fn replay_03_put_stale_rv() -> anyhow::Result<()> {
    replay_files(&["03"]).await
}

#[tokio::test]
async fn replay_04_list_selectors() -> anyhow::Result<()> {
    replay_files(&["04"]).await
}

#[tokio::test]
async fn replay_05_06_merge_json_patch_status() -> anyhow::Result<()> {
    // 05.17-05.20 were recorded after 06.
    replay_files(&["05", "06"]).await
}

#[tokio::test]
async fn replay_07_strategic_merge_and_apply() -> anyhow::Result<()> {
    replay_files(&["07"]).await
}

#[tokio::test]
async fn replay_08_custom_resource() -> anyhow::Result<()> {
    replay_files(&["08"]).await
}

#[tokio::test]
async fn replay_11_delete() -> anyhow::Result<()> {
    replay_files(&["11"]).await
}

#[tokio::test]
async fn replay_12_tokenreview() -> anyhow::Result<()> {
    replay_files(&["12"]).await
}

#[tokio::test]
async fn replay_13_lease() -> anyhow::Result<()> {
    replay_files(&["13"]).await
}

#[tokio::test]
async fn replay_14_events() -> anyhow::Result<()> {
    replay_files(&["14"]).await
}

#[tokio::test]
async fn replay_15_discovery() -> anyhow::Result<()> {
    replay_files(&["15"]).await
}

#[tokio::test]
async fn replay_09_10_watch_framing_and_errors() -> anyhow::Result<()> {
    // Only 09.9, 09.10, 09.12 (initial ADDED events, bad resourceVersion,
    // watch=1) are compared here, see `not_compared`.
    replay_files(&["09", "10"]).await
}
