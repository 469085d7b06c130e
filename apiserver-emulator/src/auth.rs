//! ServiceAccount tokens and their review.
//!
//! Tokens look like the real ones (a JWT whose claims a client may decode)
//! but are checked by lookup, not by signature: the emulator is the only
//! issuer and verifier, so keys would add nothing.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use rand::Rng;
use serde_json::{Value, json};

/// The issuer, and so the default audience, of the recorded API server.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub namespace: String,
    pub service_account: String,
    pub sa_uid: String,
    pub audiences: Vec<String>,
    pub expires: i64,
    /// (pod name, pod uid) for pod-bound tokens.
    pub pod: Option<(String, String)>,
}

impl TokenInfo {
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

#[derive(Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, TokenInfo>>,
}

impl Tokens {
    pub fn issue(&self, info: TokenInfo) -> String {
        let now = jiff::Timestamp::now().as_second();
        let mut claims = json!({
            "aud": info.audiences,
            "exp": info.expires,
            "iat": now,
            "iss": ISSUER,
            "nbf": now,
            "sub": info.username(),
            "kubernetes.io": {
                "namespace": info.namespace,
                "serviceaccount": {"name": info.service_account, "uid": info.sa_uid},
            },
        });
        if let Some((pod, uid)) = &info.pod {
            claims["kubernetes.io"]["pod"] = json!({"name": pod, "uid": uid});
        }
        let header = json!({"alg": "RS256", "kid": "emulator"});
        let signature: [u8; 32] = rand::rng().random();
        let token = format!(
            "{}.{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string()),
            B64URL.encode(signature)
        );
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), info);
        token
    }

    pub fn lookup(&self, token: &str) -> Option<TokenInfo> {
        let info = self.issued.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()?;
        (info.expires > jiff::Timestamp::now().as_second()).then_some(info)
    }

    /// The `status` of a TokenReview, as the real server fills it.
    /// `pod_alive(namespace, name, uid)` tells whether a bound Pod still exists.
    pub fn review(&self, token: &str, audiences: &[String], pod_alive: impl Fn(&str, &str, &str) -> bool) -> Value {
        let Some(info) = self.lookup(token) else {
            return json!({"user": {}, "error": "invalid bearer token"});
        };
        // The real server caches successful reviews for a few seconds (12.19);
        // the emulator invalidates at once, as it does after that (12.22).
        if let Some((pod, uid)) = &info.pod
            && !pod_alive(&info.namespace, pod, uid)
        {
            return json!({"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"});
        }
        let wanted: Vec<String> = if audiences.is_empty() { vec![ISSUER.to_string()] } else { audiences.to_vec() };
        let matched: Vec<&String> = wanted.iter().filter(|a| info.audiences.contains(a)).collect();
        if matched.is_empty() {
            let quote = |v: &[String]| v.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(" ");
            return json!({
                "user": {},
                "error": format!(
                    "[invalid bearer token, token audiences [{}] is invalid for the target audiences [{}]]",
                    quote(&info.audiences),
                    quote(&wanted)
                ),
            });
        }
        let mut user = json!({
            "username": info.username(),
            "uid": info.sa_uid,
            "groups": [
                "system:serviceaccounts",
                format!("system:serviceaccounts:{}", info.namespace),
                "system:authenticated",
            ],
        });
        if let Some((pod, uid)) = &info.pod {
            user["extra"] = json!({
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uid],
            });
        }
        json!({"authenticated": true, "user": user, "audiences": matched})
    }
}
