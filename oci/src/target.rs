//! Where backups go and the reference each source image is copied to. The
//! mapping is deterministic, so the agent that pushes, the coordinator that
//! verifies and the patch that pins a workload all name the same place.

use crate::reference::{ImageRef, ParseRefError};

/// The tag every backup also gets, derived from the digest it names:
/// `backup-sha256-<hex>`. Nothing ever moves it, so the digest a workload is
/// pinned to stays tagged when the source tag moves on, and a registry's
/// cleanup of untagged manifests leaves it. Not `sha256-<hex>`, which the
/// OCI referrers tag schema uses.
pub fn digest_tag(digest: &str) -> String {
    format!("backup-{}", digest.replacen(':', "-", 1))
}

/// Where backups go: a registry host and a path prefix in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupTarget {
    /// Registry host as references name it (`backup.example.com:5000`).
    pub registry: String,
    /// Repository path prefix (`mirror`), possibly empty.
    pub prefix: String,
}

impl BackupTarget {
    fn root(&self) -> String {
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() { self.registry.clone() } else { format!("{}/{prefix}", self.registry) }
    }

    /// The backup reference of a source image. The source registry stays in
    /// the path, so images with the same name from two registries never
    /// collide: `nginx:1.25` becomes
    /// `<registry>/<prefix>/docker.io/library/nginx:1.25`. A source pinned
    /// only by digest keeps no tag; the digest pins every backup reference
    /// a workload gets anyway.
    pub fn reference_for(&self, source: &ImageRef) -> Result<ImageRef, ParseRefError> {
        // A port is not allowed in a repository path (`host:5000` would read
        // as a tag); `_` never occurs in host names, so `host_5000` cannot
        // collide with another registry's path.
        let host = source.registry().replace(':', "_");
        let mut target = format!("{}/{host}/{}", self.root(), source.repository());
        if let Some(tag) = source.tag() {
            target.push(':');
            target.push_str(tag);
        } else if let Some(digest) = source.digest() {
            target.push('@');
            target.push_str(digest);
        }
        ImageRef::parse(&target)
    }

    /// Whether an image already points into the backup registry under the
    /// prefix: such images are backups, never copied again.
    pub fn holds(&self, image: &ImageRef) -> bool {
        let root = self.root();
        let name = image.name();
        name.strip_prefix(&root).is_some_and(|rest| rest.starts_with('/'))
    }

    /// [`holds`](Self::holds) for a reference as a pod spec has it; one
    /// that does not parse is no backup.
    pub fn holds_reference(&self, reference: &str) -> bool {
        ImageRef::parse(reference).is_ok_and(|image| self.holds(&image))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digest_tag_is_a_valid_tag_of_its_own() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let tag = super::digest_tag(&digest);
        assert_eq!(tag, format!("backup-sha256-{}", "ab".repeat(32)));
        assert!(tag.len() <= 128 && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
    }

    use super::*;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn backup_reference_keeps_the_source_registry_in_the_path() {
        let target = BackupTarget { registry: "backup.local:5000".into(), prefix: "mirror/".into() };
        assert_eq!(
            target.reference_for(&r("nginx:1.25")).unwrap().to_string(),
            "backup.local:5000/mirror/docker.io/library/nginx:1.25"
        );
        assert_eq!(
            target.reference_for(&r("quay.io/org/app:v1")).unwrap().to_string(),
            "backup.local:5000/mirror/quay.io/org/app:v1"
        );
        assert_eq!(
            target.reference_for(&r("registry.local:5000/team/app:2")).unwrap().to_string(),
            "backup.local:5000/mirror/registry.local_5000/team/app:2"
        );
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let pinned = target.reference_for(&r(&format!("ghcr.io/o/a@{digest}"))).unwrap();
        assert_eq!(pinned.to_string(), format!("backup.local:5000/mirror/ghcr.io/o/a@{digest}"));
    }

    #[test]
    fn recognizes_its_own_backups() {
        let target = BackupTarget { registry: "backup.local:5000".into(), prefix: "mirror".into() };
        assert!(target.holds(&r("backup.local:5000/mirror/docker.io/library/nginx:1.25")));
        assert!(!target.holds(&r("backup.local:5000/mirrors/x:1")));
        assert!(!target.holds(&r("backup.local:5000/other/x:1")));
        assert!(!target.holds(&r("nginx:1.25")));
        let bare = BackupTarget { registry: "backup.local:5000".into(), prefix: String::new() };
        assert!(bare.holds(&r("backup.local:5000/docker.io/library/nginx:1.25")));
    }
}
