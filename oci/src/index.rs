//! An index's children, and the reduced index: the same index with only the
//! children the cluster holds, saying what it left out. Built from the
//! source index's own JSON so that every field it carries stays as it was.

use std::collections::HashSet;

use oci_spec::image::{Descriptor, ImageIndex};
use serde_json::{Map, Value};

use crate::media::PlatformName;

/// Annotation of a reduced index: the digest of the index it was made from.
pub const SOURCE_INDEX_ANNOTATION: &str = "io.k8slab.image-backup.source-index";
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
    }
    Ok(serde_json::to_vec(&index)?)
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
}
