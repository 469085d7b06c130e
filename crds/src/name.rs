//! The name of the ImageBackup for a source image. Determinism is what
//! makes creating an ImageBackup idempotent across events, workloads and
//! coordinator restarts: whoever comes first creates it, the rest join it.

use image_backup_oci::ImageRef;
use sha2::{Digest, Sha256};

/// Longest object name the API server accepts (a DNS-1123 subdomain).
const MAX_NAME: usize = 253;
/// Hex digits of the source hash kept in a name: 128 bits, so that no one
/// can make up an image whose ImageBackup would be another's (a birthday
/// search over 48 bits took an afternoon); the coordinator still compares
/// `spec.source` before it uses one.
const HASH_HEX: usize = 32;

/// Name of the ImageBackup for a normalized source reference, e.g.
/// `docker-io-library-nginx-1-25-3f2a9c1b7d4e…` (32 hex digits): readable in `kubectl get
/// ib`, valid as a DNS-1123 subdomain, and unique through a hash of the whole
/// normalized reference.
pub fn name_for(source: &ImageRef) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn names_are_deterministic_readable_and_valid() {
        let a = name_for(&r("nginx:1.25"));
        assert_eq!(a, name_for(&r("docker.io/library/nginx:1.25")), "normalized first");
        assert!(a.starts_with("docker-io-library-nginx-1-25-"), "{a}");
        assert_ne!(a, name_for(&r("nginx:1.26")));
        let long = format!("quay.io/{}/x:{}", "a".repeat(200), "t".repeat(100));
        let name = name_for(&r(&long));
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
        assert_ne!(name_for(&r("example.com/a-b:1")), name_for(&r("example.com/a_b:1")));
    }

    #[test]
    fn names_carry_128_bits_of_the_normalized_reference() {
        let hash = hex::encode(Sha256::digest(b"docker.io/library/nginx:1.25"));
        assert_eq!(name_for(&r("nginx:1.25")), format!("docker-io-library-nginx-1-25-{}", &hash[..32]));
    }
}
