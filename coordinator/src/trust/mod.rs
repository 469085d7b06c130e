//! Who may talk to the coordinator, and how privately.
//!
//! - [`agents`]: an agent proves with its pod-bound ServiceAccount token
//!   which pod it is, and so which node it may speak for (as the kubelet's
//!   node authorizer binds a kubelet to its node).
//! - [`readers`]: a person or tool reading jobs proves who it is with a
//!   token, and the cluster's RBAC decides (a SubjectAccessReview).
//! - [`tls`]: the gRPC port's certificate, from a Secret or from a CA the
//!   coordinator makes and keeps in one.

pub mod agents;
pub mod listener;
pub mod readers;
pub mod tls;

use tonic::metadata::MetadataMap;

/// The bearer token of a gRPC call, if it has one.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `exp` claim of a JWT, read without checking the signature: only for
/// a token the API server has just accepted, to know when to ask again.
pub fn token_expiry(token: &str) -> Option<std::time::SystemTime> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    let exp = u64::try_from(claims.get("exp")?.as_i64()?).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header_only() {
        let mut metadata = MetadataMap::new();
        assert_eq!(bearer(&metadata), None);
        metadata.insert("authorization", "Basic dXNlcjpwYXNz".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), None);
        metadata.insert("authorization", "bearer abc.def".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), Some("abc.def"));
        metadata.insert("authorization", "Bearer ".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), None);
    }

    #[test]
    fn expiry_comes_from_the_exp_claim() {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let token = format!("h.{}.s", URL_SAFE_NO_PAD.encode(r#"{"exp":1900000000,"sub":"x"}"#));
        assert_eq!(token_expiry(&token), Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000)));
        assert_eq!(token_expiry("not-a-jwt"), None);
    }
}
