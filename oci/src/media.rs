//! Media types and indexes, on oci-spec's types. Only what copying needs
//! beyond them lives here: telling an index from a manifest when containerd
//! recorded no media type, and naming platforms.

use std::fmt;

use oci_spec::image::{MediaType, Platform, ToDockerV2S2};

/// `sha256:<hex>` of `bytes`: the digest content is addressed by.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Whether a media type names a multi-platform index (OCI or Docker list).
pub fn is_index(media_type: &str) -> bool {
    MediaType::from(media_type) == MediaType::ImageIndex
        || MediaType::ImageIndex.to_docker_v2s2().is_ok_and(|docker| docker == media_type)
}

/// The media type of a manifest or index: the declared one, else the
/// document's own `mediaType` field, else its shape. containerd leaves the
/// type empty for an image created from a bare digest.
pub fn media_type_of(declared: &str, bytes: &[u8]) -> String {
    if !declared.is_empty() {
        return declared.to_string();
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe { media_type: Some(declared), .. }) => declared,
        Ok(Probe { manifests: Some(_), .. }) => MediaType::ImageIndex.to_string(),
        _ => MediaType::ImageManifest.to_string(),
    }
}

/// An index entry's platform as people write it: `linux/arm64/v8`.
/// Entries without a platform (buildx attestations among them) read
/// `unknown/unknown`, as buildx itself labels them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlatformName(String);

impl PlatformName {
    pub fn of(platform: Option<&Platform>) -> Self {
        match platform {
            None => Self("unknown/unknown".into()),
            Some(p) => {
                let mut name = format!("{}/{}", p.os(), p.architecture());
                if let Some(variant) = p.variant().as_deref().filter(|v| !v.is_empty()) {
                    name.push('/');
                    name.push_str(variant);
                }
                Self(name)
            }
        }
    }

    /// The parts: os, architecture, and the variant (empty when none).
    pub fn parts(&self) -> (&str, &str, &str) {
        let mut parts = self.0.splitn(3, '/');
        (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
    }

    /// A name as written (`linux/arm64/v8`), e.g. read back from status.
    pub fn parse(name: &str) -> Self {
        Self(name.into())
    }
}

impl fmt::Display for PlatformName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<(&str, &str, &str)> for PlatformName {
    fn from((os, architecture, variant): (&str, &str, &str)) -> Self {
        if variant.is_empty() {
            Self(format!("{os}/{architecture}"))
        } else {
            Self(format!("{os}/{architecture}/{variant}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_indexes_from_manifests() {
        assert!(is_index("application/vnd.oci.image.index.v1+json"));
        assert!(is_index("application/vnd.docker.distribution.manifest.list.v2+json"));
        assert!(!is_index("application/vnd.oci.image.manifest.v1+json"));
        assert!(!is_index("application/vnd.docker.distribution.manifest.v2+json"));
        assert!(!is_index(""));
    }

    #[test]
    fn media_type_comes_from_the_declaration_then_the_document() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(media_type_of("", docker), "application/vnd.docker.distribution.manifest.list.v2+json");
        assert_eq!(
            media_type_of("", br#"{"schemaVersion":2,"manifests":[]}"#),
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            media_type_of("", br#"{"schemaVersion":2,"layers":[]}"#),
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(media_type_of("application/x-declared", docker), "application/x-declared");
    }
}
