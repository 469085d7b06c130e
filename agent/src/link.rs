//! How the agent reaches the coordinator: over TLS, trusting the CA the
//! coordinator publishes (a ConfigMap the DaemonSet mounts), and proving
//! which pod it is with the ServiceAccount token the kubelet projects into
//! it. Both files are read again for every session, so a rotated token or
//! CA is picked up without a restart.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

/// Where the coordinator is and how to trust it.
#[derive(Clone, Debug)]
pub struct CoordinatorLink {
    endpoint: String,
    tls: Option<LinkTls>,
    token_file: Option<PathBuf>,
}

/// The coordinator's CA, and the name its certificate must carry when it
/// is not the endpoint's host.
#[derive(Clone, Debug)]
pub struct LinkTls {
    pub ca_file: PathBuf,
    pub server_name: Option<String>,
}

/// A token to open a session with, and when to open the next one.
pub struct SessionToken {
    pub authorization: AsciiMetadataValue,
    /// Renew the session this long from now: the kubelet has rotated the
    /// token by then, and the coordinator ends sessions whose token expired.
    pub renew_in: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the coordinator URL {0} is plain http: use https, or set --plaintext to send tokens unencrypted")]
    PlainUrl(String),
    #[error("--plaintext needs an http:// coordinator URL, not {0}")]
    TlsUrl(String),
    #[error("reading the coordinator's CA from {path}: {error}")]
    Ca { path: PathBuf, error: std::io::Error },
    #[error("reading the agent's token from {path}: {error}")]
    Token { path: PathBuf, error: std::io::Error },
    #[error("the agent's token in {0} is not a token")]
    BadToken(PathBuf),
    #[error("connecting to coordinator {endpoint}: {error}")]
    Connect { endpoint: String, error: tonic::transport::Error },
}

// === impl CoordinatorLink ===

impl CoordinatorLink {
    /// `tls` `None` is plain text, which only an `http://` URL may use; an
    /// `https://` URL needs the CA.
    pub fn new(endpoint: String, tls: Option<LinkTls>, token_file: Option<PathBuf>) -> Result<Self, LinkError> {
        match (&tls, endpoint.starts_with("http://")) {
            (Some(_), true) => return Err(LinkError::PlainUrl(endpoint)),
            (None, false) => return Err(LinkError::TlsUrl(endpoint)),
            _ => {}
        }
        Ok(Self { endpoint, tls, token_file })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn connect(&self) -> Result<Channel, LinkError> {
        let connect = |error| LinkError::Connect { endpoint: self.endpoint.clone(), error };
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(connect)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20));
        if let Some(tls) = &self.tls {
            let ca = tokio::fs::read(&tls.ca_file)
                .await
                .map_err(|error| LinkError::Ca { path: tls.ca_file.clone(), error })?;
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(connect)?;
        }
        endpoint.connect().await.map_err(connect)
    }

    /// The current token, if the agent has one configured.
    pub async fn token(&self) -> Result<Option<SessionToken>, LinkError> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let token =
            tokio::fs::read_to_string(path).await.map_err(|error| LinkError::Token { path: path.clone(), error })?;
        let token = token.trim();
        let authorization: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| LinkError::BadToken(path.clone()))?;
        Ok(Some(SessionToken { authorization, renew_in: renew_in(token, SystemTime::now()) }))
    }
}

/// When to renew: at 85% of the token's life (the kubelet rotates at 80%),
/// from its `iat` and `exp` claims, read without checking the signature
/// (the coordinator checks the token; this only schedules).
fn renew_in(token: &str, now: SystemTime) -> Option<Duration> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let payload = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    let claim = |name| claims.get(name).and_then(serde_json::Value::as_u64);
    let (issued, expires) = (claim("iat")?, claim("exp")?);
    let renew_at = std::time::UNIX_EPOCH + Duration::from_secs(issued + (expires.saturating_sub(issued)) * 85 / 100);
    Some(renew_at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_and_plain_text_follow_the_url() {
        let tls = || Some(LinkTls { ca_file: "/ca.crt".into(), server_name: None });
        assert!(CoordinatorLink::new("https://coordinator:50051".into(), tls(), None).is_ok());
        assert!(CoordinatorLink::new("http://127.0.0.1:50051".into(), None, None).is_ok());
        assert!(matches!(CoordinatorLink::new("http://c:1".into(), tls(), None), Err(LinkError::PlainUrl(_))));
        assert!(matches!(CoordinatorLink::new("https://c:1".into(), None, None), Err(LinkError::TlsUrl(_))));
    }

    #[test]
    fn sessions_renew_at_85_percent_of_the_token_life() {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let token = format!("h.{}.s", URL_SAFE_NO_PAD.encode(r#"{"iat":1000,"exp":4600}"#));
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(renew_in(&token, now), Some(Duration::from_secs(3060)));
        assert_eq!(renew_in(&token, now + Duration::from_secs(4000)), Some(Duration::ZERO));
        assert_eq!(renew_in("opaque", now), None);
    }
}
