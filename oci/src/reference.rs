//! Image references, normalized the way the kubelet and containerd's CRI
//! plugin do it (`nginx` is `docker.io/library/nginx:latest`), following the
//! distribution reference grammar.
//!
//! Parsed here rather than with oci-spec's `Reference`: that one compiles a
//! Unicode-aware regular expression on first use, about 30 ms of a fresh
//! agent process's start (a tenth of a small push), while the grammar is
//! small, fixed and checked piece by piece below.

use std::fmt;

/// The longest repository name (domain included) registries accept.
const NAME_MAX: usize = 255;
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ParseRefError {
    input: String,
    reason: &'static str,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ParseRefError> {
        let fail = |reason| ParseRefError { input: input.to_string(), reason };
        let text = input;
        if text.is_empty() {
            return Err(fail("empty"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(check_digest(digest).map_err(fail)?)),
            None => (text, None),
        };
        // A tag follows the last ':' after the last '/'; an earlier ':'
        // belongs to the registry's port.
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(fail("tag must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"));
        }
        let (registry, path) = split_registry(name);
        if let Some(registry) = registry
            && !is_registry(registry)
        {
            return Err(fail("registry must be a host name or address, with an optional port"));
        }
        if path.is_empty() || !path.split('/').all(is_path_component) {
            return Err(fail("repository must be lowercase components of [a-z0-9] joined by '.', '_', '__' or '-'"));
        }
        let registry = match registry {
            None | Some(DOCKER_HUB_LEGACY) => DOCKER_HUB,
            Some(registry) => registry,
        };
        if registry == DOCKER_HUB && path.len() == 64 && path.bytes().all(|b| b.is_ascii_hexdigit()) {
            // docker refuses it: it reads as an image ID.
            return Err(fail("repository cannot be 64 hexadecimal characters"));
        }
        let repository =
            if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
        if registry.len() + 1 + repository.len() > NAME_MAX {
            return Err(fail("name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(Self { registry: registry.to_string(), repository, tag, digest })
    }

    /// Registry host as written in references (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Host to contact for the registry API (`index.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_LEGACY } else { &self.registry }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
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
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// The registry part, if the first component names one: it has a '.' or a
/// ':', is `localhost`, or has capitals (which no repository may), as
/// docker's `splitDockerDomain` decides.
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

/// `host[:port]`, the host a DNS name, an IPv4 address or `[IPv6]`.
fn is_registry(registry: &str) -> bool {
    let (host, port) = if let Some(v6) = registry.strip_prefix('[') {
        let Some((address, after)) = v6.split_once(']') else { return false };
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        match after.strip_prefix(':') {
            Some(port) => (None, Some(port)),
            None if after.is_empty() => (None, None),
            None => return false,
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = host.is_none_or(|h| {
        h.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
    });
    port_ok && host_ok
}

/// `[a-z0-9]+` runs joined by one of `.`, `_`, `__` or any number of `-`.
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let valid = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !valid {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `sha256:<64 lowercase hex>`: what containerd and the kubelet write,
/// and the one algorithm the push engine checks blobs with.
fn check_digest(digest: &str) -> Result<String, &'static str> {
    let hex = digest.strip_prefix("sha256:").ok_or("only sha256 digests are supported")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err("a sha256 digest is 64 lowercase hexadecimal characters");
    }
    Ok(digest.to_string())
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
        for bad in [
            "",
            "nginx:",
            "nginx:-x",
            "UPPER",
            "a//b",
            "a/b/",
            "a..b",
            "-a",
            "a-",
            "a___b",
            "host:port/x",
            "nginx@sha256:abc",
            "nginx@md5:0123456789abcdef0123456789abcdef",
            "nginx@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            " nginx",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[1.2.3.4]:5000/x",
            "reg-.io/x",
            "a_b.io/x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn parses_the_distribution_grammar() {
        for (input, expected) in [
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/a/b:v1.2_x-y", "localhost:5000/a/b:v1.2_x-y"),
            ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/team/app", "docker.io/team/app:latest"),
            ("ghcr.io/o/r", "ghcr.io/o/r:latest"),
            ("a-b__c---e/f.g", "docker.io/a-b__c---e/f.g:latest"),
            ("[::1]:5000/app:1", "[::1]:5000/app:1"),
            ("Registry.Example/app", "Registry.Example/app:latest"),
            ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
        ] {
            assert_eq!(ImageRef::parse(input).unwrap().to_string(), expected, "{input}");
        }
        let pinned = ImageRef::parse(&format!("app@{DIGEST}")).unwrap();
        assert_eq!((pinned.tag(), pinned.digest()), (None, Some(DIGEST)), "a digest alone implies no tag");
        assert_eq!(pinned.to_string(), format!("docker.io/library/app@{DIGEST}"));
        assert_eq!(ImageRef::parse("quay.io/x").unwrap().api_host(), "quay.io");
    }
}
