//! The push engine against a real containerd and real registries: what a
//! user checks is what lands in the registry, byte for byte.

use std::{sync::Arc, time::Duration};

use image_backup_agent::{
    containerd::{ContainerdStore, ReadPath},
    progress::Progress,
    push::{Finish, PushError, PushOptions, PushReport, Pusher, Scope, SourceAccess},
    store::ContentStore,
};
use image_backup_oci::{
    ImageRef,
    registry::{RegistryConfig, RetryPolicy},
};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage, containerd::NAMESPACE,
    image::PlatformImage, init_tracing,
};

const KB: usize = 1 << 10;
const MB: usize = 1 << 20;

fn insecure(hosts: &[String]) -> RegistryConfig {
    RegistryConfig {
        insecure_hosts: hosts.to_vec(),
        retry: RetryPolicy {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(500),
            max_elapsed: Duration::from_secs(20),
        },
        ..RegistryConfig::default()
    }
}

async fn pusher(containerd: &Containerd, config: RegistryConfig) -> Pusher {
    pusher_reading(containerd, config, ReadPath::Auto).await
}

async fn pusher_reading(containerd: &Containerd, config: RegistryConfig, read: ReadPath) -> Pusher {
    let store = ContainerdStore::connect(&containerd.socket(), NAMESPACE).await.expect("connect to containerd");
    let store = store.with_read_path(read).await;
    // The harness's containerd runs on this machine, so `Auto` must find
    // its content directory; `Grpc` must not use it.
    assert_eq!(store.reads_directly(), read == ReadPath::Auto);
    Pusher::new(store, config, PushOptions::default())
}

async fn push(pusher: &Pusher, source: &str, target: &str) -> Result<PushReport, PushError> {
    push_part(pusher, source, target, Scope::Whole).await
}

async fn push_part(pusher: &Pusher, source: &str, target: &str, scope: Scope) -> Result<PushReport, PushError> {
    let (source, target) = (ImageRef::parse(source).unwrap(), ImageRef::parse(target).unwrap());
    pusher.push(&source, &target, &scope, SourceAccess::default(), Progress::new()).await
}

/// Every blob and manifest of the platform image, read back from the
/// registry, has the bytes and digest it had in containerd.
async fn assert_platform_in_registry(registry: &Registry, repository: &str, image: &PlatformImage) {
    for blob in image.layers.iter().chain([&image.config]) {
        let got = registry.blob(repository, &blob.digest).await.unwrap().unwrap_or_else(|| {
            panic!("{repository} lacks blob {}", blob.digest);
        });
        assert_eq!(image_backup_tests::image::sha256(&got), blob.digest);
        assert_eq!(got.len() as u64, blob.size());
    }
    let manifest = registry.manifest(repository, &image.manifest.digest).await.unwrap().expect("manifest by digest");
    assert_eq!(manifest.bytes, image.manifest.data, "manifest must be stored byte for byte");
    assert_eq!(manifest.digest, image.manifest.digest);
    assert_eq!(manifest.media_type, image.manifest.media_type);
}

#[tokio::test]
async fn push_lands_byte_for_byte_and_a_second_push_uploads_nothing() {
    push_lands_and_second_push_uploads_nothing(ReadPath::Auto).await;
}

#[tokio::test]
async fn push_through_the_content_service_lands_byte_for_byte() {
    push_lands_and_second_push_uploads_nothing(ReadPath::Grpc).await;
}

async fn push_lands_and_second_push_uploads_nothing(read: ReadPath) {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy = Proxy::start(&registry.host(), Faults::default()).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[3 * MB, 700 * KB, 1, 5 * MB + 17], 1);
    image.import(&containerd, "docker.io/library/app:1.0", &[], &[]).await.unwrap();

    let pusher = pusher_reading(&containerd, insecure(&[proxy.host()]), read).await;
    let target = format!("{}/backup/docker.io/library/app:1.0", proxy.host());
    let report = push(&pusher, "app:1.0", &target).await.expect("push");

    assert_eq!(report.digest.as_deref(), Some(image.digest()));
    assert_eq!(report.pinned, Some(format!("{}/backup/docker.io/library/app@{}", proxy.host(), image.digest())));
    assert_eq!(report.blobs_uploaded, 5);
    assert_eq!(proxy.uploads(), 5, "4 layers and a config");
    assert_platform_in_registry(&registry, "backup/docker.io/library/app", &image.platforms[0]).await;
    let tagged = registry.manifest("backup/docker.io/library/app", "1.0").await.unwrap().expect("tag");
    assert_eq!(tagged.digest, image.digest());

    // Pushing again, by digest this time, finds everything in place.
    let again =
        push(&pusher, &format!("docker.io/library/app@{}", image.digest()), &target).await.expect("second push");
    assert_eq!(again.digest.as_deref(), Some(image.digest()));
    assert_eq!((again.blobs_uploaded, again.bytes_uploaded), (0, 0));
    assert_eq!(proxy.uploads(), 5, "the second push uploads nothing");

    // A new tag in the same repository: every blob is found in place.
    let retag =
        push(&pusher, "app:1.0", &format!("{}/backup/docker.io/library/app:stable", proxy.host())).await.unwrap();
    assert_eq!((retag.blobs_uploaded, retag.blobs_existing, retag.bytes_uploaded), (0, 5, 0));
    assert_eq!(proxy.uploads(), 5);
    assert_eq!(
        registry.manifest("backup/docker.io/library/app", "stable").await.unwrap().unwrap().digest,
        image.digest()
    );
}

#[tokio::test]
async fn push_to_a_second_repository_mounts_instead_of_uploading() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy = Proxy::start(&registry.host(), Faults::default()).await.unwrap();
    let image = TestImage::single(MediaTypes::Docker, &[2 * MB, MB], 2);
    image.import(&containerd, "quay.io/team/tool:v2", &[], &[]).await.unwrap();
    let pusher = pusher(&containerd, insecure(&[proxy.host()])).await;

    push(&pusher, "quay.io/team/tool:v2", &format!("{}/first/tool:v2", proxy.host())).await.unwrap();
    assert_eq!(proxy.uploads(), 3);
    // The location is remembered where containerd's own pushes look for it.
    let labels = containerd.labels(&image.platforms[0].layers[0].digest).await.unwrap();
    assert_eq!(
        labels.get(&format!("containerd.io/distribution.source.{}", proxy.host())).map(String::as_str),
        Some("first/tool")
    );

    // A fresh pusher (a new process) still mounts, from containerd's labels.
    let fresh = self::pusher(&containerd, insecure(&[proxy.host()])).await;
    let report = push(&fresh, "quay.io/team/tool:v2", &format!("{}/second/tool:v2", proxy.host())).await.unwrap();
    assert_eq!((report.blobs_mounted, report.blobs_uploaded), (3, 0));
    assert_eq!(proxy.mounts(), 3);
    assert_eq!(proxy.uploads(), 3, "nothing uploaded for the second repository");
    assert_platform_in_registry(&registry, "second/tool", &image.platforms[0]).await;
}

#[tokio::test]
async fn a_registry_that_fails_requests_still_gets_a_complete_image() {
    faulty_registry_gets_a_complete_image(ReadPath::Auto).await;
}

#[tokio::test]
async fn a_registry_that_fails_requests_still_gets_a_complete_image_through_the_content_service() {
    faulty_registry_gets_a_complete_image(ReadPath::Grpc).await;
}

async fn faulty_registry_gets_a_complete_image(read: ReadPath) {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let faults =
        Faults { unavailable_every: Some(4), throttle_every: Some(7), drop_upload_every: Some(2), ..Faults::default() };
    let proxy = Proxy::start(&registry.host(), faults).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[4 * MB, 2 * MB, 3 * MB, MB], 3);
    image.import(&containerd, "docker.io/library/flaky:1", &[], &[]).await.unwrap();
    let pusher = pusher_reading(&containerd, insecure(&[proxy.host()]), read).await;

    let report = push(&pusher, "flaky:1", &format!("{}/flaky:1", proxy.host())).await.expect("push through faults");
    assert!(proxy.faults() >= 4, "the proxy injected faults ({})", proxy.faults());
    assert_eq!(report.digest.as_deref(), Some(image.digest()));
    assert_platform_in_registry(&registry, "flaky", &image.platforms[0]).await;
    assert_eq!(registry.manifest("flaky", "1").await.unwrap().expect("tag").digest, image.digest());
}

#[tokio::test]
async fn a_registry_that_never_recovers_gives_up_naming_what_failed() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy =
        Proxy::start(&registry.host(), Faults { unavailable_every: Some(1), ..Faults::default() }).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[64 * KB], 4);
    image.import(&containerd, "docker.io/library/down:1", &[], &[]).await.unwrap();
    let mut config = insecure(&[proxy.host()]);
    config.retry.max_elapsed = Duration::from_millis(600);
    let pusher = pusher(&containerd, config).await;

    let err = push(&pusher, "down:1", &format!("{}/down:1", proxy.host())).await.unwrap_err();
    let text = err.to_string();
    assert!(err.retryable(), "an outage is worth another attempt later: {text}");
    for needle in [proxy.host().as_str(), "down", "503", "gave up after"] {
        assert!(text.contains(needle), "error {text:?} should name {needle:?}");
    }
    assert!(registry.tags("down").await.unwrap().is_empty());
}

#[tokio::test]
async fn partial_multi_platform_index_reports_missing_platforms_and_pushes_no_index() {
    init_tracing();
    let node_a = Containerd::start().await.unwrap();
    let node_b = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::multi_platform(MediaTypes::Oci, &[MB, 300 * KB], &["amd64", "arm64", "s390x"], 5);
    image.import(&node_a, "docker.io/library/multi:3", &["amd64"], &[]).await.unwrap();
    image.import(&node_b, "docker.io/library/multi:3", &["arm64", "s390x"], &[]).await.unwrap();
    let target = format!("{}/mirror/multi:3", registry.host());

    let first = pusher(&node_a, insecure(&[registry.host()])).await;
    let err = push(&first, "multi:3", &target).await.unwrap_err();
    match &err {
        PushError::IncompleteIndex { digest, missing, pushed } => {
            assert_eq!(digest, image.digest());
            let missing: Vec<String> = missing.iter().map(|m| m.platform.to_string()).collect();
            assert_eq!(missing, ["linux/arm64", "linux/s390x"]);
            assert_eq!(pushed.len(), 1);
            assert_eq!(pushed[0].digest, image.platform("amd64").manifest.digest);
        }
        other => panic!("expected an incomplete index, got {other}"),
    }
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    assert!(
        registry.manifest("mirror/multi", image.digest()).await.unwrap().is_none(),
        "no index without its children"
    );
    assert!(registry.tags("mirror/multi").await.unwrap().is_empty(), "no tag");
    assert_platform_in_registry(&registry, "mirror/multi", image.platform("amd64")).await;

    // The node holding the other platforms completes the index.
    let second = pusher(&node_b, insecure(&[registry.host()])).await;
    let report = push(&second, "multi:3", &target).await.expect("complete index");
    assert_eq!(report.digest.as_deref(), Some(image.digest()));
    let index = registry.manifest("mirror/multi", "3").await.unwrap().expect("tagged index");
    assert_eq!(index.bytes, image.index.as_ref().unwrap().data);
    for arch in ["amd64", "arm64", "s390x"] {
        assert_platform_in_registry(&registry, "mirror/multi", image.platform(arch)).await;
    }
}

#[tokio::test]
async fn an_index_in_parts_from_two_nodes_then_reduced_to_what_the_nodes_hold() {
    init_tracing();
    let (node_a, node_b, node_c) =
        (Containerd::start().await.unwrap(), Containerd::start().await.unwrap(), Containerd::start().await.unwrap());
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::multi_platform(MediaTypes::Oci, &[MB, 300 * KB], &["amd64", "arm64", "s390x"], 11);
    let (amd64, arm64, s390x) = (image.platform("amd64"), image.platform("arm64"), image.platform("s390x"));
    image.import(&node_a, "docker.io/library/parts:3", &["amd64"], &[]).await.unwrap();
    image.import(&node_b, "docker.io/library/parts:3", &["arm64"], &[]).await.unwrap();
    // containerd skipped a layer whose snapshot existed: not whole there.
    image.import(&node_c, "docker.io/library/parts:3", &["arm64"], &[&arm64.layers[0].digest]).await.unwrap();
    let target = format!("{}/mirror/parts:3", registry.host());
    let (a, b, c) = (
        pusher(&node_a, insecure(&[registry.host()])).await,
        pusher(&node_b, insecure(&[registry.host()])).await,
        pusher(&node_c, insecure(&[registry.host()])).await,
    );

    let root = |pusher: &Pusher| {
        let pusher = pusher.clone();
        async move {
            let record = pusher.store().resolve(&ImageRef::parse("parts:3").unwrap()).await.unwrap();
            let content = pusher.index_content(&record.target).await.unwrap().expect("an index");
            content.children.iter().map(|(child, whole)| (child.platform.to_string(), *whole)).collect::<Vec<_>>()
        }
    };
    let held =
        |arch: &str| [("linux/amd64", arch == "amd64"), ("linux/arm64", arch == "arm64"), ("linux/s390x", false)];
    let as_owned = |list: [(&str, bool); 3]| list.map(|(p, w)| (p.to_string(), w)).to_vec();
    assert_eq!(root(&a).await, as_owned(held("amd64")));
    assert_eq!(root(&b).await, as_owned(held("arm64")));
    assert_eq!(root(&c).await, as_owned(held("none")), "a child missing a layer is not whole");

    let part = |manifests: &[&str], finish| Scope::Part {
        from_source: Vec::new(),
        manifests: manifests.iter().map(|m| m.to_string()).collect(),
        finish,
    };
    let err = push_part(&c, "parts:3", &target, part(&[&arm64.manifest.digest], Finish::None)).await.unwrap_err();
    assert!(matches!(err, PushError::NotHeld { .. }) && err.retryable(), "{err}");

    let first = push_part(&a, "parts:3", &target, part(&[&amd64.manifest.digest], Finish::None)).await.unwrap();
    assert_eq!((first.pinned, first.digest), (None, None), "children only, no index");
    assert_eq!(first.manifests.iter().map(|m| m.digest.as_str()).collect::<Vec<_>>(), [amd64.manifest.digest.as_str()]);
    assert!(registry.tags("mirror/parts").await.unwrap().is_empty(), "no tag before the index");

    let err = push_part(&b, "parts:3", &target, part(&[&arm64.manifest.digest], Finish::Index)).await.unwrap_err();
    match &err {
        PushError::IncompleteIndex { missing, pushed, .. } => {
            assert_eq!(missing.iter().map(|m| m.digest.as_str()).collect::<Vec<_>>(), [s390x.manifest.digest.as_str()]);
            assert_eq!(pushed.len(), 1);
        }
        other => panic!("expected an incomplete index, got {other}"),
    }
    assert!(registry.manifest("mirror/parts", image.digest()).await.unwrap().is_none(), "no index without s390x");

    let keep = vec![amd64.manifest.digest.clone(), arm64.manifest.digest.clone()];
    let reduced = push_part(&b, "parts:3", &target, part(&[], Finish::Reduced { keep })).await.unwrap();
    let digest = reduced.digest.expect("a reduced index pushed");
    assert_ne!(digest, image.digest());
    assert_eq!(reduced.pinned, Some(format!("{}/mirror/parts@{digest}", registry.host())));
    let tagged = registry.manifest("mirror/parts", "3").await.unwrap().expect("the tag names the reduced index");
    assert_eq!(tagged.digest, digest);
    let index: serde_json::Value = serde_json::from_slice(&tagged.bytes).unwrap();
    let children: Vec<&str> =
        index["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    assert_eq!(children, [amd64.manifest.digest.as_str(), arm64.manifest.digest.as_str()]);
    assert_eq!(index["annotations"][image_backup_oci::index::SOURCE_INDEX_ANNOTATION], image.digest());
    assert_eq!(index["annotations"][image_backup_oci::index::LEFT_OUT_ANNOTATION], "linux/s390x");
    assert_platform_in_registry(&registry, "mirror/parts", amd64).await;
    assert_platform_in_registry(&registry, "mirror/parts", arm64).await;
}

#[tokio::test]
async fn docker_manifest_list_with_every_platform_present_pushes_whole() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::multi_platform(MediaTypes::Docker, &[200 * KB], &["amd64", "arm64"], 6);
    image.import(&containerd, "ghcr.io/org/both:latest", &["amd64", "arm64"], &[]).await.unwrap();
    let pusher = pusher(&containerd, insecure(&[registry.host()])).await;
    let report =
        push(&pusher, "ghcr.io/org/both", &format!("{}/ghcr.io/org/both:latest", registry.host())).await.unwrap();
    assert_eq!(report.manifests.len(), 2, "both platforms from this node");

    let index = registry.manifest("ghcr.io/org/both", "latest").await.unwrap().unwrap();
    assert_eq!(
        (index.digest.as_str(), index.media_type.as_str()),
        (image.digest(), "application/vnd.docker.distribution.manifest.list.v2+json")
    );
}

#[tokio::test]
async fn a_blob_missing_from_containerd_fails_clearly_and_leaves_no_tag() {
    missing_blob_fails_clearly(ReadPath::Auto).await;
}

#[tokio::test]
async fn a_blob_missing_from_containerd_fails_clearly_through_the_content_service() {
    missing_blob_fails_clearly(ReadPath::Grpc).await;
}

async fn missing_blob_fails_clearly(read: ReadPath) {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[MB, MB], 7);
    let missing = image.platforms[0].layers[1].digest.clone();
    image.import(&containerd, "docker.io/library/holey:1", &[], &[&missing]).await.unwrap();
    let pusher = pusher_reading(&containerd, insecure(&[registry.host()]), read).await;

    let err = push(&pusher, "holey:1", &format!("{}/holey:1", registry.host())).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&missing) && text.contains("not in containerd"), "{text}");
    assert!(!err.retryable());
    assert!(registry.tags("holey").await.unwrap().is_empty(), "no tag for a partial copy");
    assert!(registry.manifest("holey", image.digest()).await.unwrap().is_none(), "no manifest either");
}

#[tokio::test]
async fn an_image_containerd_does_not_hold_is_a_clear_error() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let pusher = pusher(&containerd, insecure(&[registry.host()])).await;
    let err = push(&pusher, "nginx:1.25", &format!("{}/nginx:1.25", registry.host())).await.unwrap_err();
    assert!(err.to_string().contains("docker.io/library/nginx:1.25 not found in containerd namespace k8s.io"), "{err}");
}

/// The node holds the same content under another repository's name only
/// (another tenant pulled it): asked for this source at that digest, the
/// agent publishes nothing, since only the record the kubelet made for the
/// source counts.
#[tokio::test]
async fn only_the_record_of_the_named_source_is_published() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[64 << 10], 9);
    image.import(&containerd, "registry.tenant-b.example/private/app:1", &[], &[]).await.unwrap();
    let pusher = pusher(&containerd, insecure(&[registry.host()])).await;
    let source = format!("docker.io/library/app:1@{}", image.digest());
    let err = push(&pusher, &source, &format!("{}/app:1", registry.host())).await.unwrap_err();
    assert!(err.to_string().contains("not found in containerd namespace k8s.io"), "{err}");
    assert!(registry.tags("app").await.unwrap_or_default().is_empty(), "nothing published");
    // Under its own name, it is.
    push(
        &pusher,
        &format!("registry.tenant-b.example/private/app:1@{}", image.digest()),
        &format!("{}/app:1", registry.host()),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn tls_registry_with_basic_auth_from_a_docker_config() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::TlsBasic { username: "backup".into(), password: "s3cr3t-pw".into() })
        .await
        .unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[MB], 8);
    image.import(&containerd, "docker.io/library/secure:1", &[], &[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write_config = |user: &str, pass: &str| {
        let path = dir.path().join(format!("{user}-config.json"));
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{pass}"));
        std::fs::write(&path, serde_json::json!({ "auths": { registry.host(): { "auth": auth } } }).to_string())
            .unwrap();
        path
    };
    let target = format!("{}/secure:1", registry.host());
    let config = |docker_config, ca: bool| RegistryConfig {
        ca_bundle: ca.then(|| registry.ca_path()),
        docker_config,
        ..insecure(&[])
    };

    // Without the CA: a clear TLS error, no endless retries.
    let err =
        push(&pusher(&containerd, config(Some(write_config("backup", "s3cr3t-pw")), false)).await, "secure:1", &target)
            .await
            .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("certificate") && text.contains(&registry.host()), "{text}");
    assert!(!text.contains("gave up"), "TLS trust is not retried: {text}");

    // Wrong password: refused, and the password never shows.
    let err =
        push(&pusher(&containerd, config(Some(write_config("backup", "wrong-pw")), true)).await, "secure:1", &target)
            .await
            .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("refused") && text.contains("secure"), "{text}");
    assert!(!text.contains("wrong-pw") && !format!("{err:?}").contains("wrong-pw"));

    // No credentials at all.
    let err = push(&pusher(&containerd, config(None, true)).await, "secure:1", &target).await.unwrap_err();
    assert!(err.to_string().contains("no credentials"), "{err}");

    // The right ones.
    let report =
        push(&pusher(&containerd, config(Some(write_config("backup", "s3cr3t-pw")), true)).await, "secure:1", &target)
            .await
            .expect("push with CA and credentials");
    assert_eq!(report.digest.as_deref(), Some(image.digest()));
    assert_platform_in_registry(&registry, "secure", &image.platforms[0]).await;
}

#[tokio::test]
async fn progress_counts_every_byte_once() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy =
        Proxy::start(&registry.host(), Faults { drop_upload_every: Some(3), ..Faults::default() }).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[2 * MB, 3 * MB, MB], 9);
    image.import(&containerd, "docker.io/library/counted:1", &[], &[]).await.unwrap();
    let pusher = pusher(&containerd, insecure(&[proxy.host()])).await;
    let progress = Arc::new(Progress::default());
    pusher
        .push(
            &ImageRef::parse("counted:1").unwrap(),
            &ImageRef::parse(&format!("{}/counted:1", proxy.host())).unwrap(),
            &Scope::Whole,
            SourceAccess::default(),
            progress.clone(),
        )
        .await
        .unwrap();
    let s = progress.snapshot();
    let blobs = image.platforms[0].total_size() - image.platforms[0].manifest.size();
    assert_eq!((s.bytes_done, s.bytes_total, s.blobs_done, s.blobs_total), (blobs, blobs, 4, 4));
}

#[tokio::test]
async fn bearer_token_flow_with_credentials_from_a_docker_config() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let tokens = image_backup_tests::TokenServer::start("robot", "t0ken-pw").await.unwrap();
    let registry = Registry::start(RegistryAuth::Token {
        realm: tokens.realm(),
        cert_pem: tokens.cert_pem().to_string(),
        username: "robot".into(),
        password: "t0ken-pw".into(),
    })
    .await
    .unwrap();
    let image = TestImage::single(MediaTypes::Docker, &[MB, 10 * KB], 10);
    image.import(&containerd, "registry.k8s.io/pause:3.9", &[], &[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let docker_config = |password: &str| {
        let path = dir.path().join(format!("{password}.json"));
        let config = serde_json::json!({ "auths": { registry.host(): { "username": "robot", "password": password } } });
        std::fs::write(&path, config.to_string()).unwrap();
        path
    };
    let config = |password: &str| RegistryConfig {
        docker_config: Some(docker_config(password)),
        // The token server speaks plain HTTP: credentials go there only
        // because it is listed.
        ..insecure(&[registry.host(), tokens.host()])
    };
    let target = format!("{}/mirror/registry.k8s.io/pause:3.9", registry.host());

    let err =
        push(&pusher(&containerd, config("not-it")).await, "registry.k8s.io/pause:3.9", &target).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("token server") && text.contains("401"), "{text}");
    assert!(!text.contains("not-it"), "the password never shows: {text}");

    let pusher = pusher(&containerd, config("t0ken-pw")).await;
    let report = push(&pusher, "registry.k8s.io/pause:3.9", &target).await.expect("push with a bearer token");
    assert_eq!(report.digest.as_deref(), Some(image.digest()));
    assert_platform_in_registry(&registry, "mirror/registry.k8s.io/pause", &image.platforms[0]).await;
    // A second repository needs a token for a new scope, mount included.
    let second =
        push(&pusher, "registry.k8s.io/pause:3.9", &format!("{}/other/pause:3.9", registry.host())).await.unwrap();
    assert_eq!((second.blobs_mounted, second.blobs_uploaded), (3, 0), "two layers and the config");
}

#[tokio::test]
async fn corrupt_content_fails_with_both_digests_and_uploads_nothing_for_it() {
    for read in [ReadPath::Auto, ReadPath::Grpc] {
        init_tracing();
        let containerd = Containerd::start().await.unwrap();
        let registry = Registry::start(RegistryAuth::None).await.unwrap();
        let image = TestImage::single(MediaTypes::Oci, &[2 * MB], 11);
        let layer = image.platforms[0].layers[0].digest.clone();
        image.import(&containerd, "docker.io/library/rotten:1", &[], &[]).await.unwrap();
        // Bit rot on the node's disk: same size, different bytes.
        let path = containerd.blob_path(&layer);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[MB] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let actual = image_backup_tests::image::sha256(&bytes);

        let pusher = pusher_reading(&containerd, insecure(&[registry.host()]), read).await;
        let err = push(&pusher, "rotten:1", &format!("{}/rotten:1", registry.host())).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, PushError::DigestMismatch { .. }), "{read:?}: {text}");
        assert!(text.contains(&layer) && text.contains(&actual), "{read:?}: both digests in {text}");
        assert!(!err.retryable());
        assert!(registry.blob("rotten", &layer).await.unwrap().is_none(), "{read:?}: the corrupt layer never lands");
        assert!(registry.tags("rotten").await.unwrap().is_empty());
    }
}
