//! Image references, normalized the way the kubelet and containerd's CRI
//! plugin do it (`nginx` is `docker.io/library/nginx:latest`). Parsing is
//! oci-spec's distribution reference grammar; this module only adds the names
//! the push engine needs.

use std::fmt;

use oci_spec::distribution::Reference;

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef(Reference);

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ParseRefError {
    input: String,
    reason: oci_spec::distribution::ParseError,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ParseRefError> {
        Reference::try_from(input.trim()).map(Self).map_err(|reason| ParseRefError { input: input.to_string(), reason })
    }

    /// Registry host as written in references (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        self.0.registry()
    }

    /// Host to contact for the registry API (`index.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        self.0.resolve_registry()
    }

    pub fn repository(&self) -> &str {
        self.0.repository()
    }

    pub fn tag(&self) -> Option<&str> {
        self.0.tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.0.digest()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    /// `registry/repository:tag` when a tag is present.
    pub fn tagged_name(&self) -> Option<String> {
        self.tag().map(|tag| format!("{}:{tag}", self.name()))
    }

    /// `registry/repository@digest` pinned to the given digest.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalizes_like_the_kubelet() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        assert_eq!(r.api_host(), "index.docker.io");
        let r = ImageRef::parse("bitnami/redis:7").unwrap();
        assert_eq!(r.to_string(), "docker.io/bitnami/redis:7");
        let r = ImageRef::parse(&format!("quay.io/a/b:1@{DIGEST}")).unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag(), r.digest()), ("quay.io", "a/b", Some("1"), Some(DIGEST)));
        assert_eq!(r.pinned(DIGEST), format!("quay.io/a/b@{DIGEST}"));
        let r = ImageRef::parse("127.0.0.1:5000/backup/docker.io/library/nginx:1.25").unwrap();
        assert_eq!((r.registry(), r.repository()), ("127.0.0.1:5000", "backup/docker.io/library/nginx"));
    }

    #[test]
    fn rejects_garbage_with_the_input_in_the_error() {
        let err = ImageRef::parse("Nginx::1").unwrap_err();
        assert!(err.to_string().contains("Nginx::1"), "{err}");
    }
}
