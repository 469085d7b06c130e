//! The API server emulator driven by a real `kube::Client`, kube-runtime's
//! watcher, controller and event recorder: the behaviour controllers depend
//! on, end to end, where the transcript replay checks single exchanges.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail};
use apiserver_emulator::{ApiServer, Options};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};

/// Bound for waiting on one watch event: generous for a loaded CI machine,
/// but a missing event fails the test instead of hanging it.
const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn next_within<S: futures::Stream + Unpin>(stream: &mut S) -> anyhow::Result<S::Item> {
    tokio::time::timeout(EVENT_WAIT, stream.next()).await.context("no watch event in time")?.context("watch ended")
}

fn api_status(err: &kube::Error) -> Option<(u16, String)> {
    match err {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

fn deployment_obj(name: &str, labels: Value, image: &str) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image}]}}},
    }))?)
}

/// A namespace of its own per test, and the typed Deployment API in it.
async fn deployments(server: &ApiServer, ns: &str) -> anyhow::Result<(kube::Client, Api<Deployment>)> {
    let client = server.client().await?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}}))?).await?;
    Ok((client.clone(), Api::namespaced(client, ns)))
}

fn image_backup_resource() -> ApiResource {
    ApiResource {
        group: "backup.k8slab.io".into(),
        version: "v1alpha1".into(),
        api_version: "backup.k8slab.io/v1alpha1".into(),
        kind: "ImageBackup".into(),
        plural: "imagebackups".into(),
    }
}

/// The ImageBackup CRD, as the project registers it (cluster-scoped, status subresource).
async fn register_image_backups(client: &kube::Client) -> anyhow::Result<Api<DynamicObject>> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = serde_json::from_value(json!({
        "metadata": {"name": "imagebackups.backup.k8slab.io"},
        "spec": {"group": "backup.k8slab.io", "scope": "Cluster",
            "names": {"plural": "imagebackups", "singular": "imagebackup", "kind": "ImageBackup", "shortNames": ["ib"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["source"], "properties": {
                        "source": {"type": "string"}, "digest": {"type": "string"}}},
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string", "enum": ["Pending", "Completed", "Failed"]}}}}}}}]},
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    Ok(Api::all_with(client.clone(), &image_backup_resource()))
}

#[tokio::test]
async fn list_then_watch_from_the_list_resource_version() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "lw").await?;
    api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1.25")?).await?;
    let list = api.list(&ListParams::default()).await?;
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.context("list has a resourceVersion")?;

    let mut events = api.watch(&WatchParams::default().timeout(30), &rv).await?.boxed();
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.26"}]}}}});
    let patched = api.patch("web", &PatchParams::default(), &Patch::Strategic(patch)).await?;
    assert_eq!(patched.metadata.generation, Some(2), "a spec change moves generation");
    match next_within(&mut events).await?? {
        WatchEvent::Modified(d) => assert_eq!(d.metadata.resource_version, patched.metadata.resource_version),
        other => bail!("expected MODIFIED, got {other:?}"),
    }
    api.delete("web", &DeleteParams::default()).await?;
    match next_within(&mut events).await?? {
        WatchEvent::Deleted(d) => assert_eq!(d.metadata.name.as_deref(), Some("web")),
        other => bail!("expected DELETED, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_is_a_conflict() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "conflict").await?;
    let created =
        api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1.25")?).await?;

    let mut first = created.clone();
    first.metadata.labels.get_or_insert_default().insert("writer".into(), "first".into());
    let replaced = api.replace("web", &PostParams::default(), &first).await?;
    assert!(replaced.metadata.resource_version > created.metadata.resource_version.clone());
    assert_eq!(replaced.metadata.generation, Some(1), "labels do not move generation");

    let mut second = created;
    second.metadata.labels.get_or_insert_default().insert("writer".into(), "second".into());
    let err = api.replace("web", &PostParams::default(), &second).await.expect_err("stale resourceVersion");
    assert_eq!(api_status(&err), Some((409, "Conflict".into())), "{err}");

    // Sending back what was read changes nothing: same resourceVersion.
    let current = api.get("web").await?;
    let again = api.replace("web", &PostParams::default(), &current).await?;
    assert_eq!(again.metadata.resource_version, current.metadata.resource_version);
    Ok(())
}

#[tokio::test]
async fn json_patch_with_a_failing_test_is_rejected_whole() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "jsonpatch").await?;
    let created =
        api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1.25")?).await?;
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/template/spec/containers/0/image", "value": "nginx:1.24"},
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "nginx:1.26"},
    ]))?;
    let err = api.patch("web", &PatchParams::default(), &Patch::<()>::Json(ops)).await.expect_err("test op fails");
    let kube::Error::Api(status) = &err else { bail!("not an API error: {err}") };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(status.message, "the server rejected our request due to an error in our request");
    let unchanged = api.get("web").await?;
    assert_eq!(unchanged.metadata.resource_version, created.metadata.resource_version);

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/template/spec/containers/0/image", "value": "nginx:1.25"},
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "nginx:1.26"},
    ]))?;
    let patched = api.patch("web", &PatchParams::default(), &Patch::<()>::Json(ops)).await?;
    let image = patched.spec.template.spec.map(|s| s.containers[0].image.clone());
    assert_eq!(image, Some(Some("nginx:1.26".into())));
    Ok(())
}

#[tokio::test]
async fn status_subresource_is_separate_from_the_main_resource() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client().await?;
    let backups = register_image_backups(&client).await?;
    let mut obj = DynamicObject::new("ib-nginx", &image_backup_resource());
    obj.data = json!({"spec": {"source": "docker.io/library/nginx:1.25"}, "status": {"phase": "Completed"}});
    let created = backups.create(&PostParams::default(), &obj).await?;
    assert!(created.data.get("status").is_none(), "status is dropped on create");
    assert_eq!(created.metadata.generation, Some(1));

    let with_status = backups
        .patch_status("ib-nginx", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Pending"}})))
        .await?;
    assert_eq!(with_status.data["status"]["phase"], "Pending");
    assert_eq!(with_status.metadata.generation, Some(1), "status writes keep generation");

    let ignored = backups
        .patch("ib-nginx", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}})))
        .await?;
    assert_eq!(ignored.data["status"]["phase"], "Pending", "status via the main resource is ignored");
    assert_eq!(ignored.metadata.resource_version, with_status.metadata.resource_version, "and stores nothing");

    let spec_ignored = backups
        .patch_status("ib-nginx", &PatchParams::default(), &Patch::Merge(json!({"spec": {"digest": "sha256:x"}})))
        .await?;
    assert!(spec_ignored.data["spec"].get("digest").is_none(), "spec via /status is ignored");

    let spec_changed = backups
        .patch("ib-nginx", &PatchParams::default(), &Patch::Merge(json!({"spec": {"digest": "sha256:x"}})))
        .await?;
    assert_eq!(spec_changed.metadata.generation, Some(2));

    let err = backups
        .patch_status("ib-nginx", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Exploded"}})))
        .await
        .expect_err("enum violation");
    assert_eq!(api_status(&err), Some((422, "Invalid".into())), "{err}");
    Ok(())
}

#[tokio::test]
async fn label_selector_watch_reports_objects_leaving_and_entering() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "sel").await?;
    let created = api
        .create(&PostParams::default(), &deployment_obj("web", json!({"app": "web", "watch-me": "yes"}), "nginx:1")?)
        .await?;
    let rv = created.metadata.resource_version.clone().context("resourceVersion")?;
    let mut events = api.watch(&WatchParams::default().labels("watch-me=yes").timeout(30), &rv).await?.boxed();

    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"watch-me": null}}})))
        .await?;
    assert!(matches!(next_within(&mut events).await??, WatchEvent::Deleted(_)), "leaving the selector is DELETED");
    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"watch-me": "yes"}}})))
        .await?;
    assert!(matches!(next_within(&mut events).await??, WatchEvent::Added(_)), "entering it is ADDED");

    // A write that changes nothing emits nothing: the next event is the real change after it.
    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"watch-me": "yes"}}})))
        .await?;
    let changed = api
        .patch("web", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"touched": "1"}}})))
        .await?;
    match next_within(&mut events).await?? {
        WatchEvent::Modified(d) => assert_eq!(d.metadata.resource_version, changed.metadata.resource_version),
        other => bail!("expected MODIFIED, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn watch_from_an_expired_resource_version_gets_410() -> anyhow::Result<()> {
    // Emulator only: a history of 3 changes per type stands for a watch
    // cache that has moved on.
    let server = ApiServer::start_with(Options { watch_history: 3, ..Options::default() }).await?;
    let (_, api) = deployments(&server, "expired").await?;
    let created = api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1")?).await?;
    let old = created.metadata.resource_version.clone().context("resourceVersion")?;
    for i in 0..5 {
        let labels = json!({"metadata": {"labels": {"round": i.to_string()}}});
        api.patch("web", &PatchParams::default(), &Patch::Merge(labels)).await?;
    }
    let mut events = api.watch(&WatchParams::default().timeout(30), &old).await?.boxed();
    match next_within(&mut events).await?? {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(status.message.starts_with(&format!("too old resource version: {old} (")), "{}", status.message);
        }
        other => bail!("expected ERROR 410, got {other:?}"),
    }
    assert!(tokio::time::timeout(EVENT_WAIT, events.next()).await?.is_none(), "the stream ends after the error");
    Ok(())
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410() -> anyhow::Result<()> {
    // Emulator only: a short history, and no bookmarks (the interval is far
    // beyond the test), so a selector watcher that sees none of the changes
    // keeps the resourceVersion of its list until that expires.
    let options = Options { watch_history: 3, bookmark_interval: Duration::from_secs(3600) };
    let server = ApiServer::start_with(options).await?;
    let (_, api) = deployments(&server, "relist").await?;
    api.create(&PostParams::default(), &deployment_obj("watched", json!({"app": "watched"}), "nginx:1")?).await?;
    api.create(&PostParams::default(), &deployment_obj("busy", json!({"app": "busy"}), "nginx:1")?).await?;
    // A 1 s watch timeout makes the watcher resume from its resourceVersion soon.
    let config = watcher::Config::default().labels("app=watched").timeout(1);
    let mut stream = watcher::watcher(api.clone(), config).boxed();
    let mut saw = Vec::new();
    while !saw.contains(&"InitDone".to_string()) {
        saw.push(event_name(next_within(&mut stream).await?));
    }
    assert_eq!(saw, ["Init", "InitApply watched", "InitDone"]);

    for i in 0..5 {
        let labels = json!({"metadata": {"labels": {"round": i.to_string()}}});
        api.patch("busy", &PatchParams::default(), &Patch::Merge(labels)).await?;
    }
    let mut after = Vec::new();
    loop {
        let name = event_name(next_within(&mut stream).await?);
        let done = name == "InitDone";
        after.push(name);
        if done {
            break;
        }
    }
    assert!(after[0].contains("too old resource version") && after[0].ends_with("Expired"), "{after:?}");
    assert_eq!(after[1..], ["Init", "InitApply watched", "InitDone"], "{after:?}");

    // And it watches on from the new list.
    api.patch("watched", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}}))).await?;
    assert_eq!(event_name(next_within(&mut stream).await?), "Apply watched");
    Ok(())
}

fn event_name(item: Result<watcher::Event<Deployment>, watcher::Error>) -> String {
    match item {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(d)) => format!("InitApply {}", d.metadata.name.unwrap_or_default()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(d)) => format!("Apply {}", d.metadata.name.unwrap_or_default()),
        Ok(watcher::Event::Delete(d)) => format!("Delete {}", d.metadata.name.unwrap_or_default()),
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test]
async fn token_review_authenticates_issued_tokens() -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::TokenReview;
    let server = ApiServer::start().await?;
    let reviews: Api<TokenReview> = Api::all(server.client().await?);
    let review = |token: &str, audiences: Vec<&str>| -> anyhow::Result<TokenReview> {
        Ok(serde_json::from_value(json!({"spec": {"token": token, "audiences": audiences}}))?)
    };
    let token = server.issue_token_for("demo", "image-backup-agent", &["image-backup"]);
    let answer = reviews.create(&PostParams::default(), &review(&token, vec!["image-backup"])?).await?;
    let status = answer.status.context("review status")?;
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.context("user")?;
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:demo:image-backup-agent"));
    assert_eq!(
        user.groups,
        Some(vec![
            "system:serviceaccounts".into(),
            "system:serviceaccounts:demo".into(),
            "system:authenticated".into()
        ])
    );

    let wrong_audience = reviews.create(&PostParams::default(), &review(&token, vec!["other"])?).await?;
    assert_eq!(wrong_audience.status.as_ref().and_then(|s| s.authenticated), None);
    let bogus = reviews.create(&PostParams::default(), &review("bogus", vec![])?).await?;
    assert_eq!(bogus.status.and_then(|s| s.error).as_deref(), Some("invalid bearer token"));

    // A token with the API audience authenticates to the API, but may do nothing there.
    let api_token = server.issue_token("demo", "image-backup-agent");
    let answer = reviews.create(&PostParams::default(), &review(&api_token, vec![])?).await?;
    assert_eq!(answer.status.and_then(|s| s.audiences), Some(vec![server.token_issuer().to_string()]));
    Ok(())
}

#[tokio::test]
async fn lease_renewal_follows_optimistic_concurrency() -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let server = ApiServer::start().await?;
    let leases: Api<Lease> = Api::namespaced(server.client().await?, "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "image-backup-coordinator"},
        "spec": {"holderIdentity": "coordinator-0", "leaseDurationSeconds": 15,
            "acquireTime": "2026-11-25T19:01:32.353154Z", "renewTime": "2026-11-25T19:01:32.353154Z"},
    }))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    let mut renewed = serde_json::to_value(&created)?;
    renewed["spec"]["renewTime"] = json!("2026-11-25T19:01:42.353154Z");
    let renewed: Lease = serde_json::from_value(renewed)?;
    let after = leases.replace("image-backup-coordinator", &PostParams::default(), &renewed).await?;
    assert!(after.metadata.resource_version != created.metadata.resource_version);
    let mut takeover = created;
    if let Some(spec) = takeover.spec.as_mut() {
        spec.holder_identity = Some("coordinator-1".into());
    }
    let err = leases.replace("image-backup-coordinator", &PostParams::default(), &takeover).await.expect_err("stale");
    assert_eq!(api_status(&err), Some((409, "Conflict".into())), "{err}");

    // k8s-openapi writes MicroTime with 6 fractional digits, as the server requires.
    let read = leases.get("image-backup-coordinator").await?;
    let raw = serde_json::to_value(&read)?;
    let renew = raw["spec"]["renewTime"].as_str().unwrap_or_default().to_string();
    assert_eq!(renew.len(), "2026-11-25T19:01:32.353154Z".len(), "{renew}");
    Ok(())
}

#[tokio::test]
async fn discovery_finds_builtin_and_registered_types() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client().await?;
    register_image_backups(&client).await?;
    let discovery = kube::discovery::Discovery::new(client.clone()).run().await?;
    let mut found = BTreeSet::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            found.insert(format!("{}/{} {:?}", resource.group, resource.plural, caps.scope));
        }
    }
    for expected in [
        "apps/deployments Namespaced",
        "apps/daemonsets Namespaced",
        "/pods Namespaced",
        "coordination.k8s.io/leases Namespaced",
        "events.k8s.io/events Namespaced",
        "backup.k8slab.io/imagebackups Cluster",
    ] {
        assert!(found.contains(expected), "{expected} missing from {found:?}");
    }
    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, "v1.26.0");
    Ok(())
}

#[tokio::test]
async fn watch_without_resource_version_starts_with_the_current_objects_and_bookmarks() -> anyhow::Result<()> {
    let server =
        ApiServer::start_with(Options { bookmark_interval: Duration::from_millis(100), ..Options::default() }).await?;
    let (_, api) = deployments(&server, "initial").await?;
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &deployment_obj(name, json!({"app": name}), "nginx:1")?).await?;
    }
    let mut events = api.watch(&WatchParams::default().timeout(30), "0").await?.boxed();
    let mut names = Vec::new();
    for _ in 0..2 {
        match next_within(&mut events).await?? {
            WatchEvent::Added(d) => names.push(d.metadata.name.unwrap_or_default()),
            other => bail!("expected ADDED, got {other:?}"),
        }
    }
    assert_eq!(names, ["a", "b"]);
    // Bookmarks come only once the type changed while the watch is live.
    let changed =
        api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}}))).await?;
    assert!(matches!(next_within(&mut events).await??, WatchEvent::Modified(_)));
    match next_within(&mut events).await?? {
        WatchEvent::Bookmark(b) => assert_eq!(Some(b.metadata.resource_version), changed.metadata.resource_version),
        other => bail!("expected BOOKMARK, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn finalizers_keep_a_deleted_object_until_removed() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client().await?;
    let backups = register_image_backups(&client).await?;
    let mut obj = DynamicObject::new("ib-final", &image_backup_resource());
    obj.metadata.finalizers = Some(vec!["backup.k8slab.io/cleanup".into()]);
    obj.data = json!({"spec": {"source": "docker.io/library/postgres:16"}});
    backups.create(&PostParams::default(), &obj).await?;
    let deleted = backups.delete("ib-final", &DeleteParams::default()).await?;
    let kept = deleted.left().context("the object stays while it has finalizers")?;
    assert!(kept.metadata.deletion_timestamp.is_some());
    assert_eq!(kept.metadata.generation, Some(2), "setting deletionTimestamp moves generation");
    backups
        .patch("ib-final", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await?;
    let err = backups.get("ib-final").await.expect_err("gone with the last finalizer");
    assert_eq!(api_status(&err), Some((404, "NotFound".into())), "{err}");
    Ok(())
}

#[tokio::test]
async fn kube_runtime_recorder_publishes_and_updates_events() -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = ApiServer::start().await?;
    let (client, api) = deployments(&server, "events").await?;
    let deployment =
        api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1")?).await?;
    let reporter = Reporter { controller: "image-backup-coordinator".into(), instance: Some("coordinator-0".into()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let event = Event {
        type_: EventType::Normal,
        reason: "BackupStarted".into(),
        note: Some("copying docker.io/library/nginx:1".into()),
        action: "Backup".into(),
        secondary: None,
    };
    let reference = deployment.object_ref(&());
    // The first publish creates the Event, the second patches its series.
    recorder.publish(&event, &reference).await?;
    recorder.publish(&event, &reference).await?;
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "events");
    let listed = events.list(&ListParams::default().fields("regarding.name=web")).await?;
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(listed.items[0].reporting_controller.as_deref(), Some("image-backup-coordinator"));

    // The same Event through core/v1, with the core field names.
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "events");
    let listed = core.list(&ListParams::default().fields("involvedObject.name=web")).await?;
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].message.as_deref(), Some("copying docker.io/library/nginx:1"));

    // Events about a cluster-scoped object go to `default`.
    let backups = register_image_backups(&client).await?;
    let mut obj = DynamicObject::new("ib-nginx", &image_backup_resource());
    obj.data = json!({"spec": {"source": "docker.io/library/nginx:1"}});
    let backup = backups.create(&PostParams::default(), &obj).await?;
    recorder.publish(&event, &backup.object_ref(&image_backup_resource())).await?;
    let in_default: Api<K8sEvent> = Api::namespaced(client, "default");
    assert_eq!(in_default.list(&ListParams::default().fields("regarding.name=ib-nginx")).await?.items.len(), 1);
    Ok(())
}

#[tokio::test]
async fn paginated_and_exact_lists_read_a_consistent_snapshot() -> anyhow::Result<()> {
    // Emulator only for the last part: a short history stands for etcd compaction.
    let server = ApiServer::start_with(Options { watch_history: 8, ..Options::default() }).await?;
    let (_, api) = deployments(&server, "pages").await?;
    for name in ["a", "b", "c"] {
        api.create(&PostParams::default(), &deployment_obj(name, json!({"app": name}), "nginx:1")?).await?;
    }
    let first = api.list(&ListParams::default().limit(2)).await?;
    let names = |l: &kube::core::ObjectList<Deployment>| -> Vec<String> {
        l.items.iter().map(|d| d.metadata.name.clone().unwrap_or_default()).collect()
    };
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first.metadata.remaining_item_count, Some(1));
    let token = first.metadata.continue_.clone().context("a continue token")?;
    let snapshot_rv = first.metadata.resource_version.clone().context("resourceVersion")?;

    // Changes after the first page do not show in the next ones.
    api.delete("c", &DeleteParams::default()).await?;
    api.create(&PostParams::default(), &deployment_obj("d", json!({"app": "d"}), "nginx:1")?).await?;
    let second = api.list(&ListParams::default().limit(2).continue_token(&token)).await?;
    assert_eq!(names(&second), ["c"]);
    assert_eq!(second.metadata.continue_, None);
    assert_eq!(second.metadata.resource_version.as_deref(), Some(snapshot_rv.as_str()));

    let exact = ListParams::default().at(&snapshot_rv).matching(kube::api::VersionMatch::Exact);
    assert_eq!(names(&api.list(&exact).await?), ["a", "b", "c"]);
    assert_eq!(names(&api.list(&ListParams::default()).await?), ["a", "b", "d"]);

    for i in 0..8 {
        let labels = json!({"metadata": {"labels": {"round": i.to_string()}}});
        api.patch("a", &PatchParams::default(), &Patch::Merge(labels)).await?;
    }
    let err = api.list(&exact).await.expect_err("the snapshot is gone");
    assert_eq!(api_status(&err), Some((410, "Expired".into())), "{err}");
    let err = api.list(&ListParams::default().limit(2).continue_token(&token)).await.expect_err("so is the token's");
    assert_eq!(api_status(&err), Some((410, "Expired".into())), "{err}");
    Ok(())
}

#[tokio::test]
async fn server_side_apply_tracks_field_ownership() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "ssa").await?;
    let created = api
        .create(
            &PostParams { field_manager: Some("kubectl-create".into()), ..PostParams::default() },
            &deployment_obj("web", json!({"app": "web"}), "nginx:1.25")?,
        )
        .await?;
    let apply = |image: &str, annotations: Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "annotations": annotations},
            "spec": {"template": {"spec": {"containers": [{"name": "main", "image": image}]}}}})
    };
    let coordinator = PatchParams::apply("image-backup-coordinator");

    // The image belongs to the creator: changing it without force conflicts.
    let err = api
        .patch(
            "web",
            &coordinator,
            &Patch::Apply(apply("backup/nginx:1.25", json!({"backup.k8slab.io/state": "applied"}))),
        )
        .await
        .expect_err("conflict");
    let kube::Error::Api(status) = &err else { bail!("not an API error: {err}") };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.starts_with("Apply failed with 1 conflict: conflict with \"kubectl-create\" using apps/v1 at ")
            && status.message.ends_with(": .spec.template.spec.containers[name=\"main\"].image"),
        "{}",
        status.message
    );

    // Forced, it takes the field; the container's other fields stay.
    let forced = api
        .patch(
            "web",
            &coordinator.clone().force(),
            &Patch::Apply(apply("backup/nginx:1.25", json!({"backup.k8slab.io/state": "applied"}))),
        )
        .await?;
    let container = &forced.spec.template.spec.as_ref().context("pod spec")?.containers[0];
    assert_eq!(container.image.as_deref(), Some("backup/nginx:1.25"));
    assert_eq!(forced.metadata.generation, Some(created.metadata.generation.unwrap_or(0) + 1));

    // Applying the same again is no conflict, and a field the manager
    // stops applying (its annotation) is removed.
    let pruned = api.patch("web", &coordinator, &Patch::Apply(apply("backup/nginx:1.25", json!({})))).await?;
    assert!(pruned.metadata.annotations.unwrap_or_default().is_empty(), "the dropped annotation is gone");

    // The creator changing the image back is an update: it takes the field
    // again, and the coordinator's next apply conflicts with it.
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "nginx:1.26"}]}}}});
    api.patch(
        "web",
        &PatchParams { field_manager: Some("kubectl-edit".into()), ..PatchParams::default() },
        &Patch::Strategic(patch),
    )
    .await?;
    let err = api
        .patch("web", &coordinator, &Patch::Apply(apply("backup/nginx:1.25", json!({}))))
        .await
        .expect_err("conflict");
    assert!(err.to_string().contains("conflict with \"kubectl-edit\""), "{err}");
    Ok(())
}

#[tokio::test]
async fn concurrent_writers_with_the_same_resource_version_one_wins() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "race").await?;
    let created = api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1")?).await?;
    let writers = (0..8).map(|i| {
        let (api, mut mine) = (api.clone(), created.clone());
        mine.metadata.labels.get_or_insert_default().insert("writer".into(), i.to_string());
        tokio::spawn(async move { api.replace("web", &PostParams::default(), &mine).await })
    });
    let mut won = 0;
    for writer in writers.collect::<Vec<_>>() {
        match writer.await? {
            Ok(_) => won += 1,
            Err(err) => assert_eq!(api_status(&err), Some((409, "Conflict".into())), "{err}"),
        }
    }
    assert_eq!(won, 1, "optimistic concurrency lets exactly one writer through");
    Ok(())
}

#[tokio::test]
async fn dry_run_writes_store_nothing() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (_, api) = deployments(&server, "dry").await?;
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let answer = api.create(&dry, &deployment_obj("web", json!({"app": "web"}), "nginx:1")?).await?;
    assert_eq!(answer.metadata.name.as_deref(), Some("web"));
    assert_eq!(api_status(&api.get("web").await.expect_err("not stored")), Some((404, "NotFound".into())));

    let created = api.create(&PostParams::default(), &deployment_obj("web", json!({"app": "web"}), "nginx:1")?).await?;
    let labels = Patch::Merge(json!({"metadata": {"labels": {"dry": "run"}}}));
    let answer = api.patch("web", &PatchParams::default().dry_run(), &labels).await?;
    assert_eq!(answer.metadata.labels.unwrap_or_default().get("dry").map(String::as_str), Some("run"));
    let stored = api.get("web").await?;
    assert_eq!(stored.metadata.resource_version, created.metadata.resource_version);
    assert!(!stored.metadata.labels.unwrap_or_default().contains_key("dry"));

    api.delete("web", &DeleteParams { dry_run: true, ..DeleteParams::default() }).await?;
    assert!(api.get("web").await.is_ok(), "still there");
    Ok(())
}

#[tokio::test]
async fn kube_runtime_controller_reconciles_against_the_emulator() -> anyhow::Result<()> {
    use std::sync::Arc;

    use kube::runtime::controller::{Action, Controller};

    let server = ApiServer::start().await?;
    let client = server.client().await?;
    let backups = register_image_backups(&client).await?;

    // A reconciler that marks every ImageBackup Pending through /status.
    async fn reconcile(obj: Arc<DynamicObject>, api: Arc<Api<DynamicObject>>) -> Result<Action, kube::Error> {
        if obj.data["status"]["phase"].is_null() {
            let status = Patch::Merge(json!({"status": {"phase": "Pending"}}));
            api.patch_status(&obj.metadata.name.clone().unwrap_or_default(), &PatchParams::default(), &status).await?;
        }
        Ok(Action::await_change())
    }
    let controller = Controller::new_with(backups.clone(), watcher::Config::default(), image_backup_resource())
        .run(reconcile, |_, _, _| Action::await_change(), Arc::new(backups.clone()))
        .for_each(|_| async {});
    let running = tokio::spawn(controller);

    let mut events = backups.watch(&WatchParams::default().timeout(30), "0").await?.boxed();
    let mut obj = DynamicObject::new("ib-reconciled", &image_backup_resource());
    obj.data = json!({"spec": {"source": "docker.io/library/nginx:1"}});
    backups.create(&PostParams::default(), &obj).await?;
    loop {
        match next_within(&mut events).await?? {
            WatchEvent::Modified(o) if o.data["status"]["phase"] == "Pending" => break,
            WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Bookmark(_) => continue,
            other => bail!("unexpected {other:?}"),
        }
    }
    running.abort();
    Ok(())
}

#[tokio::test]
async fn pods_need_their_service_account() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let server = ApiServer::start().await?;
    let (client, _) = deployments(&server, "shop").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod = |name: &str| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}}))?)
    };
    // What kube-apiserver v1.26 answers when no controller-manager made `default`.
    let err = pods.create(&PostParams::default(), &pod("web-0")?).await.expect_err("no ServiceAccount");
    let kube::Error::Api(status) = &err else { bail!("not an API error: {err}") };
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "pods \"web-0\" is forbidden: error looking up service account shop/default: serviceaccount \"default\" not found"
    );
    // Admission runs before name generation and validation.
    let mut generated = pod("")?;
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web-".into());
    let err = pods.create(&PostParams::default(), &generated).await.expect_err("no ServiceAccount");
    assert!(err.to_string().contains("pods \"web-\" is forbidden"), "{err}");
    generated.metadata.generate_name = None;
    let err = pods.create(&PostParams::default(), &generated).await.expect_err("no ServiceAccount");
    assert!(err.to_string().contains("pods \"Unknown\" is forbidden"), "{err}");

    let accounts: Api<ServiceAccount> = Api::namespaced(client, "shop");
    accounts.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "default"}}))?).await?;
    let created = pods.create(&PostParams::default(), &pod("web-0")?).await?;
    let spec = created.spec.context("pod spec")?;
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));

    // A named account must exist too.
    let mut agent = pod("agent-0")?;
    agent.spec.get_or_insert_default().service_account_name = Some("image-backup-agent".into());
    let err = pods.create(&PostParams::default(), &agent).await.expect_err("no such ServiceAccount");
    assert!(err.to_string().contains("error looking up service account shop/image-backup-agent"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_missing_namespace_comes_before_a_missing_name() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let server = ApiServer::start().await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(server.client().await?, "nowhere");
    let nameless: ConfigMap = serde_json::from_value(json!({"metadata": {}, "data": {"k": "v"}}))?;
    let err = config_maps.create(&PostParams::default(), &nameless).await.expect_err("no namespace");
    let kube::Error::Api(status) = &err else { bail!("not an API error: {err}") };
    assert_eq!((status.code, status.message.as_str()), (404, "namespaces \"nowhere\" not found"));
    Ok(())
}

#[tokio::test]
async fn a_secrets_string_data_is_stored_as_data() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let (client, _) = deployments(&server, "secrets").await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "secrets");
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "pull"},
        "data": {"kept": "a2VwdA==", "both": "b2xk"},
        "stringData": {"both": "new", "plain": "text"},
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let stored = secrets.get("pull").await?;
    let data: BTreeSet<(String, Vec<u8>)> =
        stored.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let expected = [("both", "new"), ("kept", "kept"), ("plain", "text")];
    assert_eq!(data, expected.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect());
    assert_eq!(stored.string_data, None, "stringData is never stored");
    Ok(())
}
