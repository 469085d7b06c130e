//! Registry authentication: anonymous, Basic, and the Bearer token flow that
//! a `WWW-Authenticate` challenge starts (the distribution token spec).
//! Challenge parsing is the http-auth crate's.

use std::{collections::HashMap, fmt};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use reqwest::header::HeaderValue;
use serde::Deserialize;
use tokio::sync::RwLock;
use tracing::debug;

/// Registry credentials. Never printed: `Debug` redacts them, and no error
/// message includes them.
#[derive(Clone)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// An identity (refresh) token, exchanged for access tokens with OAuth2.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => {
                f.debug_struct("Basic").field("username", username).field("password", &"<redacted>").finish()
            }
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// What the registry asked for, learned from its first challenge.
#[derive(Clone, Debug, Default)]
enum Scheme {
    #[default]
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

pub(super) struct Auth {
    host: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// Hosts credentials may reach over plain HTTP.
    insecure: Vec<String>,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    scheme: Scheme,
    /// Bearer tokens by scope.
    tokens: HashMap<String, String>,
}

#[derive(Deserialize)]
struct TokenReply {
    token: Option<String>,
    access_token: Option<String>,
}

impl Auth {
    pub(super) fn new(
        host: &str,
        http: reqwest::Client,
        credentials: Option<Credentials>,
        insecure: Vec<String>,
    ) -> Self {
        Self { host: host.to_string(), http, credentials, insecure, state: RwLock::default() }
    }

    /// The `Authorization` the registry is known to want for `scope`, so
    /// that only the first request to a registry (or to a new scope) meets a
    /// challenge. The caller sends it to the registry's own origin only.
    pub(super) async fn authorization(&self, scope: &str) -> Option<HeaderValue> {
        let bearer = match &self.state.read().await.scheme {
            Scheme::Bearer { realm, service } => Some((realm.clone(), service.clone())),
            _ => None,
        };
        // A known token service gets asked for a new scope's token up front,
        // saving the challenge round trip; on failure the challenge path
        // reports the error.
        if let Some((realm, service)) = bearer {
            let missing = !self.state.read().await.tokens.contains_key(scope);
            if missing && let Ok(token) = self.fetch_token(&realm, service.as_deref(), scope).await {
                self.state.write().await.tokens.insert(scope.to_string(), token);
            }
        }
        let state = self.state.read().await;
        let value = match (&state.scheme, &self.credentials) {
            (Scheme::Basic, Some(Credentials::Basic { username, password })) => {
                format!("Basic {}", BASE64.encode(format!("{username}:{password}")))
            }
            (Scheme::Bearer { .. }, _) => format!("Bearer {}", state.tokens.get(scope)?),
            _ => return None,
        };
        let mut value = HeaderValue::from_str(&value).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Answers a 401: learns the scheme and, for Bearer, fetches a token for
    /// the scope. The error text is safe to show: it never holds secrets.
    pub(super) async fn answer(&self, challenge: Option<&HeaderValue>, scope: &str) -> Result<(), String> {
        let header = challenge
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| "401 without a WWW-Authenticate challenge".to_string())?;
        let challenges =
            http_auth::parse_challenges(header).map_err(|e| format!("unparsable challenge {header:?}: {e}"))?;
        let param = |c: &http_auth::ChallengeRef<'_>, name: &str| {
            c.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_unescaped())
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            let realm = param(bearer, "realm").ok_or_else(|| format!("bearer challenge without realm: {header:?}"))?;
            let service = param(bearer, "service");
            let token = self.fetch_token(&realm, service.as_deref(), scope).await?;
            let mut state = self.state.write().await;
            state.scheme = Scheme::Bearer { realm, service };
            state.tokens.insert(scope.to_string(), token);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic")) {
            if !matches!(self.credentials, Some(Credentials::Basic { .. })) {
                return Err(format!(
                    "registry asks for basic auth and no credentials are configured for {}",
                    self.host
                ));
            }
            // Concurrent requests may all meet the challenge; a refusal shows
            // as a second 401 on the retried request, not here.
            self.state.write().await.scheme = Scheme::Basic;
            return Ok(());
        }
        Err(format!("unsupported authentication challenge {header:?}"))
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, scope: &str) -> Result<String, String> {
        // The realm is whatever the registry's challenge named, on any host;
        // credentials go there only over TLS (or to a host listed insecure).
        if self.credentials.is_some() {
            let url = reqwest::Url::parse(realm).map_err(|e| format!("token realm {realm:?} is not a URL: {e}"))?;
            let authority = match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_string(),
                (None, _) => return Err(format!("token realm {realm:?} names no host")),
            };
            if url.scheme() != "https" && !self.insecure.contains(&authority) {
                return Err(format!(
                    "token realm {realm} is not https: credentials for {} are sent only over TLS (or to a host listed insecure)",
                    self.host
                ));
            }
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        for s in scope.split(' ') {
            query.push(("scope", s));
        }
        let request = match &self.credentials {
            Some(Credentials::IdentityToken(refresh)) => {
                let mut form = query.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh),
                    ("client_id", "image-backup"),
                ]);
                self.http.post(realm).form(&form)
            }
            Some(Credentials::Basic { username, password }) => {
                self.http.get(realm).query(&query).basic_auth(username, Some(password))
            }
            None => self.http.get(realm).query(&query),
        };
        debug!(realm, scope, "fetching registry token");
        let response =
            request.send().await.map_err(|e| format!("token request to {realm}: {}", super::error::error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = super::body::read_limited(response, super::body::MAX_ERROR_BODY).await.unwrap_or_default();
            let body: String = String::from_utf8_lossy(&body).chars().take(256).collect();
            return Err(format!("token server {realm} answered {status}: {}", body.trim()));
        }
        let body = super::body::read_limited(response, super::body::MAX_TOKEN_REPLY)
            .await
            .map_err(|e| format!("token server {realm}: {e}"))?;
        let reply: TokenReply =
            serde_json::from_slice(&body).map_err(|e| format!("token server {realm} sent an unreadable reply: {e}"))?;
        reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("token server {realm} sent no token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credentials::Basic { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = Credentials::IdentityToken("tok-secret".into());
        assert!(!format!("{t:?}").contains("tok-secret"));
    }
}
