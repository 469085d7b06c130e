//! Deterministic names: the ImageBackup object for a source image, and the
//! backup reference it is copied to. Determinism is what makes creating an
//! ImageBackup idempotent across events, workloads and coordinator restarts.

use image_backup_agent::reference::{ImageRef, ParseRefError};
use sha2::{Digest, Sha256};

/// Longest object name the API server accepts (a DNS-1123 subdomain).
const MAX_NAME: usize = 253;
/// Hex digits of the source hash kept in a name: enough that two images whose
/// readable parts sanitize alike never share a name.
const HASH_HEX: usize = 12;

/// Name of the ImageBackup for a normalized source reference, e.g.
/// `docker-io-library-nginx-1-25-3f2a9c1b7d4e`: readable in `kubectl get
/// ib`, valid as a DNS-1123 subdomain, and unique through a hash of the whole
/// normalized reference.
pub fn image_backup_name(source: &ImageRef) -> String {
    let normalized = source.to_string();
    let hash = hex::encode(Sha256::digest(normalized.as_bytes()));
    // Dots are kept out too: a DNS-1123 subdomain's every dot-separated
    // label must start and end alphanumeric, which `-` runs cannot break.
    let mut readable = String::with_capacity(normalized.len());
    for c in normalized.split('@').next().unwrap_or_default().chars() {
        let c = if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' };
        if !(c == '-' && readable.ends_with('-')) {
            readable.push(c);
        }
    }
    let budget = MAX_NAME - HASH_HEX - 1;
    readable.truncate(budget);
    let readable = readable.trim_matches('-');
    if readable.is_empty() { hash[..HASH_HEX].to_string() } else { format!("{readable}-{}", &hash[..HASH_HEX]) }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn names_are_deterministic_readable_and_valid() {
        let a = image_backup_name(&r("nginx:1.25"));
        assert_eq!(a, image_backup_name(&r("docker.io/library/nginx:1.25")), "normalized first");
        assert!(a.starts_with("docker-io-library-nginx-1-25-"), "{a}");
        assert_ne!(a, image_backup_name(&r("nginx:1.26")));
        let long = format!("quay.io/{}/x:{}", "a".repeat(200), "t".repeat(100));
        let name = image_backup_name(&r(&long));
        assert!(name.len() <= MAX_NAME);
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert!(!name.contains("--"));
        assert!(
            name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn same_readable_name_from_different_references_does_not_collide() {
        assert_ne!(image_backup_name(&r("example.com/a-b:1")), image_backup_name(&r("example.com/a_b:1")));
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
