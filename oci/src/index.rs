//! An index's children, and the reduced index: the same index with only the
//! children the cluster holds, saying what it left out. Built from the
//! source index's own JSON so that every field it carries stays as it was,
//! and carrying that JSON, so that anyone can prove it is a reduction of the
//! source index without the source: the carried bytes hash to the source
//! digest (which the kubelet reported), and every child is one of theirs.

use std::collections::HashSet;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use oci_spec::image::{Descriptor, ImageIndex};
use serde_json::{Map, Value};

use crate::media::{PlatformName, sha256_digest};

/// Annotation of a reduced index: the digest of the index it was made from.
pub const SOURCE_INDEX_ANNOTATION: &str = "io.k8slab.image-backup.source-index";
/// Annotation of a reduced index: the source index's own bytes, base64.
pub const SOURCE_INDEX_BYTES_ANNOTATION: &str = "io.k8slab.image-backup.source-index.bytes";
/// Annotation of a reduced index: the platforms of the source index it left
/// out, comma-separated (`linux/arm64,unknown/unknown`).
pub const LEFT_OUT_ANNOTATION: &str = "io.k8slab.image-backup.left-out";

/// How buildx marks an attestation entry (`unknown/unknown`), and the value.
const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
const ATTESTATION: &str = "attestation-manifest";

/// A child manifest of an index.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    pub platform: PlatformName,
    pub descriptor: Descriptor,
    /// A buildx attestation entry: containerd never pulls one, so no node
    /// holds it.
    pub attestation: bool,
}

impl Child {
    pub fn digest(&self) -> &str {
        self.descriptor.digest().as_ref()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not an image index: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("a reduced index needs at least one child of the source index")]
    Empty,
}

/// Why an index is not a reduction of a source index.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReduced {
    #[error("it is not an image index: {0}")]
    Parse(String),
    #[error("it names {named:?} as its source index, not {index}")]
    OtherSource { named: Option<String>, index: String },
    #[error("it does not carry the source index's own bytes")]
    NoSourceBytes,
    #[error("the source index it carries hashes to {got}, not {index}")]
    SourceDigest { got: String, index: String },
    #[error("it has no child")]
    Empty,
    #[error("its media type {got:?} is not the source index's {index:?}")]
    MediaType { got: Option<String>, index: Option<String> },
    #[error("its child {digest} is not a child of the source index, descriptor for descriptor")]
    ForeignChild { digest: String },
}

/// The child manifests of an index, each with its platform. Entries without
/// a platform read `unknown/unknown`, as buildx labels them.
pub fn children(bytes: &[u8]) -> Result<Vec<Child>, IndexError> {
    let index: ImageIndex = serde_json::from_slice(bytes)?;
    Ok(index
        .manifests()
        .iter()
        .map(|child| Child {
            platform: PlatformName::of(child.platform().as_ref()),
            attestation: child
                .annotations()
                .as_ref()
                .and_then(|a| a.get(REFERENCE_TYPE_ANNOTATION))
                .is_some_and(|t| t == ATTESTATION),
            descriptor: child.clone(),
        })
        .collect())
}

/// The index `bytes` (digest `source_digest`) with only the children in
/// `keep`, annotated with the source digest and the platforms left out.
/// Deterministic: the same source and `keep` always give the same bytes, so
/// a repeated attempt pushes the same digest.
pub fn reduced(bytes: &[u8], source_digest: &str, keep: &HashSet<&str>) -> Result<Vec<u8>, IndexError> {
    let mut index: Map<String, Value> = serde_json::from_slice(bytes)?;
    let left_out: Vec<String> = children(bytes)?
        .into_iter()
        .filter(|c| !keep.contains(c.digest()))
        .map(|c| if c.attestation { format!("{} (attestation)", c.platform) } else { c.platform.to_string() })
        .collect();
    let Some(Value::Array(manifests)) = index.get_mut("manifests") else { return Err(IndexError::Empty) };
    manifests.retain(|m| m.get("digest").and_then(Value::as_str).is_some_and(|d| keep.contains(d)));
    if manifests.is_empty() {
        return Err(IndexError::Empty);
    }
    let annotations = index.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
    // `null` or anything else where a map belongs: the annotations that say
    // what this index is must be there.
    if !annotations.is_object() {
        *annotations = Value::Object(Map::new());
    }
    if let Value::Object(annotations) = annotations {
        annotations.insert(SOURCE_INDEX_ANNOTATION.into(), Value::String(source_digest.into()));
        annotations.insert(LEFT_OUT_ANNOTATION.into(), Value::String(left_out.join(",")));
        annotations.insert(SOURCE_INDEX_BYTES_ANNOTATION.into(), Value::String(BASE64.encode(bytes)));
    }
    Ok(serde_json::to_vec(&index)?)
}

/// Checks that `bytes` is a reduction of the index whose digest is
/// `source_digest`, from nothing but itself: the source index it carries
/// hashes to `source_digest`, and each of its children is a child of that
/// index with the very same descriptor (digest, size, media type, platform,
/// annotations). Whoever pushed it, nothing else can pass: a made-up child,
/// or a made-up source index, changes a digest.
pub fn check_reduced(bytes: &[u8], source_digest: &str) -> Result<(), NotReduced> {
    let parse = |bytes: &[u8]| {
        serde_json::from_slice::<Map<String, Value>>(bytes).map_err(|e| NotReduced::Parse(e.to_string()))
    };
    let index = parse(bytes)?;
    let annotation = |key: &str| index.get("annotations").and_then(|a| a.get(key)).and_then(Value::as_str);
    let named = annotation(SOURCE_INDEX_ANNOTATION);
    if named != Some(source_digest) {
        let named = named.map(str::to_string);
        return Err(NotReduced::OtherSource { named, index: source_digest.to_string() });
    }
    let carried = annotation(SOURCE_INDEX_BYTES_ANNOTATION)
        .and_then(|encoded| BASE64.decode(encoded).ok())
        .ok_or(NotReduced::NoSourceBytes)?;
    let got = sha256_digest(&carried);
    if got != source_digest {
        return Err(NotReduced::SourceDigest { got, index: source_digest.to_string() });
    }
    let source = parse(&carried)?;
    let media_type = |index: &Map<String, Value>| index.get("mediaType").and_then(Value::as_str).map(str::to_string);
    if media_type(&index) != media_type(&source) {
        return Err(NotReduced::MediaType { got: media_type(&index), index: media_type(&source) });
    }
    let manifests = |index: &Map<String, Value>| -> Vec<Value> {
        index.get("manifests").and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let (kept, of_source) = (manifests(&index), manifests(&source));
    if kept.is_empty() {
        return Err(NotReduced::Empty);
    }
    match kept.iter().find(|child| !of_source.contains(child)) {
        Some(child) => {
            let digest = child.get("digest").and_then(Value::as_str).unwrap_or("(no digest)").to_string();
            Err(NotReduced::ForeignChild { digest })
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":10,"platform":{"os":"linux","architecture":"amd64"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":10,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","size":10,"platform":{"os":"unknown","architecture":"unknown"},
         "annotations":{"vnd.docker.reference.digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","vnd.docker.reference.type":"attestation-manifest"}}
    ],"annotations":{"org.opencontainers.image.source":"https://example.com/x"}}"#;

    #[test]
    fn names_children_by_platform_and_marks_attestations() {
        let children = children(INDEX).unwrap();
        let names: Vec<String> = children.iter().map(|c| c.platform.to_string()).collect();
        assert_eq!(names, ["linux/amd64", "linux/arm64/v8", "unknown/unknown"]);
        assert_eq!(children.iter().map(|c| c.attestation).collect::<Vec<_>>(), [false, false, true]);
        assert!(super::children(b"{").is_err());
    }

    #[test]
    fn a_reduced_index_keeps_its_fields_and_says_what_it_left_out() {
        let amd64 = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let keep = HashSet::from([amd64]);
        let bytes = reduced(INDEX, "sha256:source", &keep).unwrap();
        assert_eq!(bytes, reduced(INDEX, "sha256:source", &keep).unwrap(), "same input, same digest");
        let index: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(index["manifests"][0]["digest"], amd64);
        assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
        let annotations = &index["annotations"];
        assert_eq!(annotations["org.opencontainers.image.source"], "https://example.com/x");
        assert_eq!(annotations[SOURCE_INDEX_ANNOTATION], "sha256:source");
        assert_eq!(annotations[LEFT_OUT_ANNOTATION], "linux/arm64/v8,unknown/unknown (attestation)");
        assert!(matches!(reduced(INDEX, "sha256:source", &HashSet::new()), Err(IndexError::Empty)));
        let null = String::from_utf8_lossy(INDEX).replace(r#""annotations":{"org"#, r#""annotations":null,"x":{"org"#);
        let bytes = reduced(null.as_bytes(), "sha256:source", &keep).unwrap();
        let index: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(index["annotations"][SOURCE_INDEX_ANNOTATION], "sha256:source", "null annotations replaced");
    }

    const AMD64: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// The reduction of INDEX to its amd64 child, as JSON to tamper with.
    fn reduction() -> (String, Map<String, Value>) {
        let source = sha256_digest(INDEX);
        let bytes = reduced(INDEX, &source, &HashSet::from([AMD64])).unwrap();
        (source, serde_json::from_slice(&bytes).unwrap())
    }

    fn check(index: &Map<String, Value>, source: &str) -> Result<(), NotReduced> {
        check_reduced(&serde_json::to_vec(index).unwrap(), source)
    }

    #[test]
    fn a_reduced_index_proves_itself_a_reduction_of_its_source() {
        let (source, index) = reduction();
        assert_eq!(check(&index, &source), Ok(()));
        let carried = BASE64.decode(index["annotations"][SOURCE_INDEX_BYTES_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(carried, INDEX, "the source index byte for byte");
    }

    #[test]
    fn a_forged_reduced_index_is_refused_with_the_reason() {
        let (source, index) = reduction();
        let other = sha256_digest(b"another index");
        assert!(matches!(check(&index, &other), Err(NotReduced::OtherSource { .. })), "another source's");

        let tampered = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut forged = index.clone();
            edit(&mut forged);
            check(&forged, &source).unwrap_err()
        };
        fn annotations(index: &mut Map<String, Value>) -> &mut Map<String, Value> {
            index.get_mut("annotations").and_then(Value::as_object_mut).unwrap()
        }
        // A child of the forger's own, or a source child with another size
        // or platform: not the source's descriptor.
        let own = |index: &mut Map<String, Value>| {
            index["manifests"][0]["digest"] = Value::from(sha256_digest(b"the forger's image"));
        };
        assert!(matches!(tampered(&own), NotReduced::ForeignChild { .. }));
        assert!(matches!(tampered(&|i| i["manifests"][0]["size"] = Value::from(11)), NotReduced::ForeignChild { .. }));
        let platform = |i: &mut Map<String, Value>| i["manifests"][0]["platform"]["architecture"] = "arm64".into();
        assert!(matches!(tampered(&platform), NotReduced::ForeignChild { .. }));
        // A source index of the forger's own making, carried or missing.
        let own_source = |i: &mut Map<String, Value>| {
            let made_up = String::from_utf8_lossy(INDEX).replace(AMD64, &sha256_digest(b"own"));
            annotations(i).insert(SOURCE_INDEX_BYTES_ANNOTATION.into(), BASE64.encode(made_up).into());
        };
        assert!(matches!(tampered(&own_source), NotReduced::SourceDigest { .. }));
        let no_source = |i: &mut Map<String, Value>| {
            annotations(i).remove(SOURCE_INDEX_BYTES_ANNOTATION);
        };
        assert_eq!(tampered(&no_source), NotReduced::NoSourceBytes);
        assert_eq!(tampered(&|i| i["manifests"] = Value::Array(vec![])), NotReduced::Empty);
        let manifest =
            |i: &mut Map<String, Value>| i["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        assert!(matches!(tampered(&manifest), NotReduced::MediaType { .. }));
        assert!(matches!(check_reduced(b"{", &source), Err(NotReduced::Parse(_))));
    }
}
