//! Push plans against in-memory nodes: what a push would copy from a node,
//! decided with no containerd and no registry. The same rules run against
//! real containerd and registries in the `tests` crate's push tests.

use std::time::Duration;

use image_backup_oci::{
    ImageRef,
    index::{self, Child, LEFT_OUT_ANNOTATION, SOURCE_INDEX_ANNOTATION},
    registry::RegistryConfig,
};

use super::*;
use crate::store::{
    ContentStore,
    memory::MemoryStore,
    sample::{OCI_INDEX, SampleImage, SamplePlatform},
};

const KB: usize = 1 << 10;

fn pusher(store: &MemoryStore) -> Pusher<MemoryStore> {
    Pusher::new(store.clone(), RegistryConfig::default(), PushOptions::default())
}

/// Plans a push of `source` from `store`. The lease stays, so that a test
/// can see what it protects.
async fn plan_push(store: &MemoryStore, source: &str, scope: &Scope) -> Result<Plan, PushError> {
    let pusher = pusher(store);
    let record = pusher.resolve(&ImageRef::parse(source).unwrap()).await?;
    let lease = store.lease(Duration::from_secs(60)).await.unwrap();
    pusher.plan(&record.target, scope, &lease).await
}

fn index_plan(plan: &Plan) -> &IndexPlan {
    match &plan.kind {
        PlanKind::Index(index) => index,
        PlanKind::Image(_) => panic!("expected an index plan, got a single image's"),
    }
}

fn architectures<'a>(children: impl IntoIterator<Item = &'a Child>) -> Vec<String> {
    children.into_iter().map(|c| c.platform.parts().1.to_string()).collect()
}

fn digests<'a>(blobs: impl IntoIterator<Item = &'a Descriptor>) -> Vec<&'a str> {
    blobs.into_iter().map(|b| b.digest.as_str()).collect()
}

/// The config and layers of a platform, in the order a manifest lists them.
fn blobs_of(platform: &SamplePlatform) -> Vec<&str> {
    [&platform.config].into_iter().chain(&platform.layers).map(|b| b.digest()).collect()
}

fn part(manifests: &[&str], from_source: &[&str], finish: Finish) -> Scope {
    let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    Scope::Part { manifests: owned(manifests), from_source: owned(from_source), finish }
}

#[tokio::test]
async fn a_child_is_whole_only_with_its_manifest_config_and_every_layer() {
    let image = SampleImage::multi_platform(&[4 * KB, 2 * KB], &["amd64", "arm64", "s390x"], 1);
    let (amd64, arm64, s390x) = (image.platform("amd64"), image.platform("arm64"), image.platform("s390x"));
    /// What the node pulled, the blobs it lacks, which children are whole.
    type Node<'a> = (&'a str, &'a [&'a str], Vec<&'a str>, [bool; 3]);
    let cases: [Node; 5] = [
        ("every platform pulled", &[], vec![], [true, true, true]),
        ("a kubelet pull keeps its own platform", &["amd64"], vec![], [true, false, false]),
        ("a layer skipped because its snapshot existed", &["arm64"], vec![arm64.layers[0].digest()], [false; 3]),
        ("a config missing", &["amd64", "arm64"], vec![amd64.config.digest()], [false, true, false]),
        ("a manifest missing, its blobs held", &[], vec![s390x.manifest.digest()], [true, true, false]),
    ];
    for (case, pulled, dropped, expected) in cases {
        let store = MemoryStore::default();
        store.import(&image, "docker.io/library/multi:3", pulled, &dropped);
        let content = pusher(&store).index_content(image.root()).await.unwrap().expect("an index");
        let got: Vec<(String, bool)> =
            content.children.iter().map(|(child, whole)| (child.platform.to_string(), *whole)).collect();
        let expected: Vec<(String, bool)> =
            ["linux/amd64", "linux/arm64", "linux/s390x"].iter().map(|p| p.to_string()).zip(expected).collect();
        assert_eq!(got, expected, "{case}");
        assert!(store.protected().is_empty(), "{case}: telling what a node holds takes no lease");
    }

    let single = SampleImage::single(&[KB], 2);
    let store = MemoryStore::default();
    store.import(&single, "docker.io/library/one:1", &[], &[]);
    assert!(pusher(&store).index_content(single.root()).await.unwrap().is_none(), "a single image has no children");
}

#[tokio::test]
async fn a_single_platform_plan_pushes_config_and_layers_then_the_manifest_byte_for_byte() {
    let image = SampleImage::single(&[3 * KB, 1, 5 * KB], 3);
    let platform = &image.platforms[0];
    let store = MemoryStore::default();
    store.import(&image, "docker.io/library/app:1.0", &[], &[]);

    // A single image is pushed whole whatever part the scope names.
    for scope in [Scope::Whole, part(&["sha256:elsewhere"], &[], Finish::None)] {
        let plan = plan_push(&store, "app:1.0", &scope).await.unwrap();
        assert_eq!((&plan.root, &plan.bytes), (image.root(), &platform.manifest.bytes), "{scope:?}");
        let PlanKind::Image(manifest) = &plan.kind else { panic!("a single image's plan, for {scope:?}") };
        assert_eq!(manifest.bytes, platform.manifest.bytes);
        assert_eq!(digests(plan.node_blobs().into_iter().map(|b| &b.descriptor)), blobs_of(platform));
        let sizes: Vec<Option<u64>> = plan.node_blobs().iter().map(|b| b.held.as_ref().map(|i| i.size)).collect();
        assert_eq!(
            sizes,
            [Some(platform.config.bytes.len() as u64), Some(3 * KB as u64), Some(1), Some(5 * KB as u64)]
        );
        assert!(plan.missing().is_empty());
    }
    // The lease holds the root before it is read; blobs are taken when
    // pushed, not planned (a lease is a synced write in containerd).
    assert_eq!(store.protected(), [platform.manifest.digest()]);
}

#[tokio::test]
async fn an_index_pushed_whole_plans_every_child_the_node_holds_then_the_index() {
    let image = SampleImage::multi_platform(&[2 * KB, KB], &["amd64", "arm64", "s390x"], 4);
    let store = MemoryStore::default();
    store.import(&image, "docker.io/library/multi:3", &["amd64", "s390x"], &[]);

    let plan = plan_push(&store, "multi:3", &Scope::Whole).await.unwrap();
    assert_eq!(plan.bytes, image.index.as_ref().unwrap().bytes, "the index byte for byte");
    let index = index_plan(&plan);
    assert_eq!(architectures(&index.children), ["amd64", "arm64", "s390x"]);
    assert_eq!(architectures(index.from_node.iter().map(|(c, _)| c)), ["amd64", "s390x"]);
    for (child, manifest) in &index.from_node {
        let sample = image.platform(child.platform.parts().1);
        assert_eq!((&manifest.descriptor, &manifest.bytes), (&sample.manifest.descriptor, &sample.manifest.bytes));
    }
    assert!(index.from_source.is_empty());
    assert_eq!(index.finish, PlannedFinish::Index);
    let expected: Vec<&str> =
        [image.platform("amd64"), image.platform("s390x")].into_iter().flat_map(blobs_of).collect();
    assert_eq!(digests(plan.node_blobs().into_iter().map(|b| &b.descriptor)), expected);
}

#[tokio::test]
async fn part_of_an_index_is_planned_as_the_coordinator_asks_or_refused() {
    let image = SampleImage::multi_platform(&[2 * KB, KB], &["amd64", "arm64", "s390x"], 5);
    let (amd64, arm64, s390x) = (image.platform("amd64"), image.platform("arm64"), image.platform("s390x"));
    let store = MemoryStore::default();
    // arm64's first layer was skipped: its manifest is here, not whole.
    store.import(&image, "docker.io/library/parts:3", &["amd64", "arm64"], &[arm64.layers[0].digest()]);
    let (amd64, arm64, s390x) = (amd64.manifest.digest(), arm64.manifest.digest(), s390x.manifest.digest());
    let unknown = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    /// Children from this node and from the source, or the error's text.
    type Expected<'a> = Result<(&'a [&'a str], &'a [&'a str], PlannedFinish), String>;
    let cases: [(Scope, Expected); 6] = [
        (part(&[amd64], &[], Finish::None), Ok((&["amd64"], &[], PlannedFinish::None))),
        (part(&[amd64], &[s390x], Finish::Index), Ok((&["amd64"], &["s390x"], PlannedFinish::Index))),
        (part(&[], &[s390x, arm64], Finish::None), Ok((&[], &["s390x", "arm64"], PlannedFinish::None))),
        (
            part(&[amd64, arm64], &[], Finish::Index),
            Err(format!("manifest {arm64} of index {} is not whole in this node's containerd", image.digest())),
        ),
        (
            part(&[unknown], &[], Finish::None),
            Err(format!("manifest {unknown} is not a child of index {}", image.digest())),
        ),
        (
            part(&[amd64], &[unknown], Finish::None),
            Err(format!("manifest {unknown} is not a child of index {}", image.digest())),
        ),
    ];
    for (scope, expected) in cases {
        let got = plan_push(&store, "parts:3", &scope).await.map(|plan| {
            let index = index_plan(&plan).clone();
            (architectures(index.from_node.iter().map(|(c, _)| c)), architectures(&index.from_source), index.finish)
        });
        match (got, expected) {
            (Ok(got), Ok((node, source, finish))) => {
                let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                assert_eq!(got, (owned(node), owned(source), finish), "{scope:?}");
            }
            (Err(got), Err(text)) => {
                assert_eq!(got.to_string(), text);
                // The node may hold the child by the next plan; a child the
                // index lacks is a plan made for another index.
                assert_eq!(got.retryable(), matches!(got, PushError::NotHeld { .. }), "{got}");
            }
            (got, expected) => panic!("{scope:?}: got {got:?}, expected {expected:?}"),
        }
    }
}

#[tokio::test]
async fn a_reduced_index_keeps_the_given_children_and_those_pushed_now() {
    let image = SampleImage::multi_platform(&[KB], &["amd64", "arm64", "s390x", "ppc64le"], 6);
    let digest = |arch| image.platform(arch).manifest.digest().to_string();
    let store = MemoryStore::default();
    store.import(&image, "docker.io/library/parts:4", &["arm64"], &[]);

    let cases: [(Scope, [&str; 2], &str); 3] = [
        (
            part(&[&digest("arm64")], &[], Finish::Reduced { keep: vec![digest("amd64")] }),
            ["amd64", "arm64"],
            "linux/s390x,linux/ppc64le",
        ),
        (
            part(&[], &[&digest("s390x")], Finish::Reduced { keep: vec![digest("arm64")] }),
            ["arm64", "s390x"],
            "linux/amd64,linux/ppc64le",
        ),
        (
            part(&[], &[], Finish::Reduced { keep: vec![digest("ppc64le"), digest("amd64")] }),
            ["amd64", "ppc64le"],
            "linux/arm64,linux/s390x",
        ),
    ];
    for (scope, kept, left_out) in cases {
        let plan = plan_push(&store, "parts:4", &scope).await.unwrap();
        let PlannedFinish::Reduced { descriptor, bytes, kept: kept_children } = &index_plan(&plan).finish else {
            panic!("{scope:?}: a reduced index is planned");
        };
        assert_eq!(architectures(kept_children), kept, "{scope:?}");
        assert_eq!(
            (descriptor.media_type.as_str(), descriptor.digest.clone(), descriptor.size),
            (OCI_INDEX, image_backup_oci::media::sha256_digest(bytes), bytes.len() as u64)
        );
        let reduced: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let children: Vec<&str> =
            reduced["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
        assert_eq!(children, kept.map(&digest), "the source index's order");
        assert_eq!(reduced["annotations"][SOURCE_INDEX_ANNOTATION], image.digest());
        assert_eq!(reduced["annotations"][LEFT_OUT_ANNOTATION], left_out);
        index::check_reduced(bytes, image.digest()).expect("anyone can check it against the source digest");
        // A repeated attempt pushes the same digest.
        let again = plan_push(&store, "parts:4", &scope).await.unwrap();
        assert_eq!(index_plan(&again).finish, index_plan(&plan).finish);
    }

    let err = plan_push(&store, "parts:4", &part(&[], &[], Finish::Reduced { keep: Vec::new() })).await.unwrap_err();
    assert!(matches!(err, PushError::Reduce { .. }) && !err.retryable(), "{err}");
}

#[tokio::test]
async fn a_layer_the_node_dropped_is_planned_missing_and_fails_the_push_without_a_source() {
    let image = SampleImage::single(&[2 * KB, 3 * KB, KB], 7);
    let platform = &image.platforms[0];
    let layers: Vec<&str> = platform.layers.iter().map(|l| l.digest()).collect();
    let cases: [(&str, Vec<&str>); 3] = [
        ("every blob held", vec![]),
        ("a layer whose snapshot existed", vec![layers[1]]),
        ("discard_unpacked_layers: every compressed layer gone", layers.clone()),
    ];
    for (case, dropped) in cases {
        let store = MemoryStore::default();
        store.import(&image, "docker.io/library/holey:1", &[], &dropped);
        let plan = plan_push(&store, "holey:1", &Scope::Whole).await.unwrap();
        assert_eq!(digests(plan.missing()), dropped, "{case}");
        // The config and the manifest are never dropped: the plan has them.
        assert_eq!(plan.node_blobs()[0].descriptor, platform.config.descriptor, "{case}");
    }

    let err = pusher(&MemoryStore::default()).missing_blob(layers[0]);
    assert_eq!(
        err.to_string(),
        format!(
            "reading blob {} from containerd: blob {} is not in containerd's content store (namespace k8s.io)",
            layers[0], layers[0]
        )
    );
    assert!(!err.retryable(), "the node will not get it back by itself");
}

#[tokio::test]
async fn only_the_record_of_the_named_source_is_published() {
    let image = SampleImage::single(&[KB], 8);
    let other = SampleImage::single(&[KB], 9);
    let store = MemoryStore::default();
    // Another tenant pulled the image; the kubelet recorded it by tag and
    // by digest, under that tenant's name only.
    store.import(&image, "registry.tenant-b.example/private/app:1", &[], &[]);
    store.set_image(&format!("registry.tenant-b.example/private/app@{}", image.digest()), image.root().clone());
    store.import(&other, "docker.io/library/app:1", &[], &[]);

    let (d, o) = (image.digest(), other.digest());
    let cases: [(String, Option<String>); 6] = [
        (format!("docker.io/library/app:1@{d}"), None),
        (format!("docker.io/library/app@{d}"), None),
        (
            format!("registry.tenant-b.example/private/app:1@{d}"),
            Some(format!("registry.tenant-b.example/private/app@{d}")),
        ),
        ("registry.tenant-b.example/private/app:1".into(), Some("registry.tenant-b.example/private/app:1".into())),
        // The tag names another digest now, and no record has this one.
        (format!("registry.tenant-b.example/private/app:1@{o}"), None),
        ("app:1".into(), Some("docker.io/library/app:1".into())),
    ];
    for (source, expected) in cases {
        let source = ImageRef::parse(&source).unwrap();
        let got = pusher(&store).resolve(&source).await;
        match (got, expected) {
            (Ok(record), Some(name)) => assert_eq!(record.name, name, "{source}"),
            (Err(err), None) => assert_eq!(
                err.to_string(),
                format!(
                    "reading image {source} from containerd: image {source} not found in containerd namespace k8s.io"
                )
            ),
            (got, expected) => panic!("{source}: got {got:?}, expected {expected:?}"),
        }
    }
}

#[tokio::test]
async fn a_manifest_that_is_not_what_its_descriptor_says_is_refused() {
    let image = SampleImage::single(&[KB], 10);
    let manifest = &image.platforms[0].manifest;
    let same_length = vec![b'x'; manifest.bytes.len()];
    type Expected = fn(&PushError) -> bool;
    let cases: [(&str, Vec<u8>, Expected); 2] = [
        ("other bytes", same_length, |e| matches!(e, PushError::DigestMismatch { .. })),
        ("a byte more", [&manifest.bytes[..], b" "].concat(), |e| {
            matches!(e, PushError::Store { error: StoreError::ShortRead { .. }, .. })
        }),
    ];
    for (case, bytes, expected) in cases {
        let store = MemoryStore::default();
        store.import(&image, "docker.io/library/corrupt:1", &[], &[]);
        store.add_blob_as(manifest.digest(), bytes);
        let err = plan_push(&store, "corrupt:1", &Scope::Whole).await.unwrap_err();
        assert!(expected(&err), "{case}: {err}");
        assert!(err.to_string().contains(manifest.digest()), "{case}: {err}");
    }
}

#[tokio::test]
async fn a_record_without_a_media_type_is_read_by_its_bytes() {
    let image = SampleImage::multi_platform(&[KB], &["amd64", "arm64"], 11);
    let store = MemoryStore::default();
    store.import(&image, "docker.io/library/bare:1", &["arm64"], &[]);
    // containerd leaves the type empty for an image created from a digest.
    store.set_image("docker.io/library/bare:1", Descriptor { media_type: String::new(), ..image.root().clone() });
    let plan = plan_push(&store, "bare:1", &Scope::Whole).await.unwrap();
    assert_eq!(plan.root.media_type, OCI_INDEX);
    assert_eq!(architectures(index_plan(&plan).from_node.iter().map(|(c, _)| c)), ["arm64"]);
}

#[test]
fn foreign_layers_are_not_pushed() {
    let blob = |digit: char, urls: Option<&str>| {
        let mut d = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", digit.to_string().repeat(64)),
            "size": 1,
        });
        if let Some(url) = urls {
            d["urls"] = serde_json::json!([url]);
        }
        d
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "c".repeat(64)), "size": 2 },
        "layers": [blob('1', None), blob('2', Some("https://example.com/layer")), blob('3', None)],
    });
    let descriptor = Descriptor { media_type: String::new(), digest: "sha256:m".into(), size: 0 };
    let blobs = manifest_blobs(&descriptor, &serde_json::to_vec(&manifest).unwrap()).unwrap();
    let got: Vec<String> = blobs.iter().map(|b| b.digest[7..8].to_string()).collect();
    assert_eq!(got, ["c", "1", "3"]);
}
