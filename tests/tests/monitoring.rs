//! The optional monitoring component (deploy/components/monitoring): every
//! metric its rules read is one the coordinator exports (or one of the few
//! that Prometheus and kube-state-metrics provide), every rule a recording
//! rule reads is recorded, every alert says how bad and what to do, and the
//! ServiceMonitor scrapes a port the coordinator's Service has.

use std::collections::BTreeSet;

use image_backup_tests::{
    cluster::{ApiServerKind, cluster, coordinator_config, prepare},
    run::start_coordinator,
};
use serde::Deserialize;
use serde_json::Value;

/// Read by the rules, exported by others: Prometheus's own and
/// kube-state-metrics'.
const EXTERNAL: &[&str] = &["up", "kube_daemonset_status_desired_number_scheduled"];

fn component(file: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/components/monitoring").join(file);
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn the_rules_read_only_metrics_the_coordinator_exports() {
    let (_cluster, client) = cluster(ApiServerKind::Emulator).await.unwrap();
    prepare(&client, &[]).await;
    let coordinator = start_coordinator(&client, &client, coordinator_config("127.0.0.1:1")).await;
    let text = reqwest::get(&coordinator.metrics_url).await.unwrap().text().await.unwrap();
    let exported = sample_names(&text);
    assert!(exported.contains("image_backup_jobs"), "{text}");

    let rules = component("rules.yaml");
    let mut recorded = BTreeSet::new();
    let mut selected = Vec::new();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            selected.extend(selectors(rule["expr"].as_str().unwrap()));
            if let Some(name) = rule["record"].as_str() {
                recorded.insert(name.to_string());
            } else {
                let alert = rule["alert"].as_str().unwrap();
                assert!(rule["labels"]["severity"].is_string(), "{alert} has a severity");
                for key in ["summary", "description"] {
                    assert!(rule["annotations"][key].is_string(), "{alert} has a {key}");
                }
            }
        }
    }
    let read: BTreeSet<&str> = selected.iter().map(|(name, _)| name.as_str()).collect();
    for &name in &read {
        let known = exported.contains(name) || recorded.contains(name) || EXTERNAL.contains(&name);
        assert!(known, "the rules read {name}, which nothing exports; the coordinator exports {exported:?}");
    }
    // And every value they match on the coordinator's metrics is one it
    // exports (known values are exported at zero from the start).
    let samples = sample_labels(&text);
    for (name, matchers) in selected.iter().filter(|(name, _)| name.starts_with("image_backup_")) {
        for (label, op, value) in matchers {
            let values: Vec<&str> = if op == "=~" { value.split('|').collect() } else { vec![value] };
            for value in values {
                let known = samples.contains(&(name.clone(), label.clone(), value.to_string()));
                assert!(known, "the rules match {name}{{{label}{op}\"{value}\"}}, which the coordinator never exports");
            }
        }
    }
    // Each of the coordinator's metrics a team needs an alert on is read.
    for name in [
        "image_backup_jobs",
        "image_backup_connected_agents",
        "image_backup_workloads_restored_total",
        "image_backup_backup_verifications_total",
    ] {
        assert!(read.contains(name), "no rule reads {name}");
    }
}

#[test]
fn the_service_monitor_scrapes_the_coordinators_metrics_port() {
    let monitor = component("service-monitor.yaml");
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.yaml"))
            .unwrap();
    let service = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|o| o["kind"] == "Service")
        .unwrap();
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    for (key, value) in selector {
        assert_eq!(&service["metadata"]["labels"][key], value, "the Service has the label {key}");
    }
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == port), "the Service has a port {port}");
    assert_eq!(monitor["metadata"]["namespace"], "image-backup");
    assert_eq!(monitor["spec"]["namespaceSelector"]["matchNames"][0], "image-backup");
}

/// The names samples of the exposition can have: a family's name, and for
/// counters and histograms the suffixed names Prometheus stores.
fn sample_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// A label matcher: label, operator, value.
type Matcher = (String, String, String);

/// The series selectors of a PromQL expression: each metric name (an
/// identifier that is not a function, aggregation, keyword, label name or
/// duration) with the label matchers that follow it.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    const KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const OPERATORS: &[&str] = &["and", "or", "unless", "bool", "offset"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // Skips from an opening bracket to just past its closing one (label
    // matchers, ranges and grouping lists do not nest).
    let skip_to =
        |i: usize, close: char| chars[i..].iter().position(|&c| c == close).map_or(chars.len(), |n| i + n + 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c == '"' {
            i = skip_to(i + 1, '"');
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect::<String>().trim_start().to_string();
            // A function's or an aggregation's name: a call follows, or a
            // grouping (`sum by (kind) (...)`).
            let called = rest.starts_with('(') || rest.starts_with("by ") || rest.starts_with("without ");
            if KEYWORDS.contains(&word.as_str()) {
                // Its label list, when it has one.
                let open = chars[i..].iter().position(|c| !c.is_whitespace()).map(|n| i + n);
                if let Some(open) = open.filter(|&o| chars[o] == '(') {
                    i = skip_to(open, ')');
                }
            } else if !called && !OPERATORS.contains(&word.as_str()) {
                let mut matchers = Vec::new();
                if chars.get(i) == Some(&'{') {
                    let end = skip_to(i, '}');
                    let inside: String = chars[i + 1..end - 1].iter().collect();
                    matchers = inside.split(',').filter_map(matcher).collect();
                    i = end;
                }
                names.push((word, matchers));
            }
        } else {
            i += 1;
        }
    }
    names
}

/// `label="value"`, `label=~"a|b"` and the negated forms.
fn matcher(text: &str) -> Option<Matcher> {
    let op_at = text.find(['=', '!'])?;
    let label = text[..op_at].trim();
    let rest = &text[op_at..];
    let op_len = if rest.starts_with("=~") || rest.starts_with("!=") || rest.starts_with("!~") { 2 } else { 1 };
    let value = rest[op_len..].trim().trim_matches('"');
    Some((label.to_string(), rest[..op_len].to_string(), value.to_string()))
}

/// `(name, label, value)` of every sample in the exposition.
fn sample_labels(text: &str) -> BTreeSet<(String, String, String)> {
    let mut labels = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else { continue };
        let Some((inside, _)) = rest.split_once('}') else { continue };
        for pair in inside.split(',') {
            if let Some((label, value)) = pair.split_once('=') {
                labels.insert((name.to_string(), label.to_string(), value.trim_matches('"').to_string()));
            }
        }
    }
    labels
}

#[test]
fn metric_names_skip_functions_labels_and_durations() {
    let expr = "histogram_quantile(0.99, sum by (kind, le) (rate(a_bucket{x=\"y\"}[5m]))) - on() b > 0 and c:d";
    let names: Vec<String> = selectors(expr).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["a_bucket", "b", "c:d"]);
    let with_matchers = selectors("sum(m{phase=~\"A|B\", kind=\"X\"})");
    let matchers = vec![("phase".into(), "=~".into(), "A|B".into()), ("kind".into(), "=".into(), "X".into())];
    assert_eq!(with_matchers, [("m".to_string(), matchers)]);
}
