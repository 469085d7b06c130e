//! A registry token server (the distribution token spec): checks basic
//! credentials and hands out ES256-signed JWTs that grant what was asked,
//! so the registry's Bearer challenge flow runs for real.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair},
};
use serde_json::json;

pub const ISSUER: &str = "image-backup-test-issuer";
pub const SERVICE: &str = "image-backup-test-registry";

pub struct TokenServer {
    addr: SocketAddr,
    cert_pem: String,
    task: tokio::task::JoinHandle<()>,
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    username: String,
    password: String,
}

impl TokenServer {
    pub async fn start(username: &str, password: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec!["token-signer".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "image-backup test token signer");
        let cert = params.self_signed(&key)?;
        let signing =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &SystemRandom::new())
                .map_err(|e| anyhow::anyhow!("loading signing key: {e}"))?;
        let signer = Arc::new(Signer {
            key: signing,
            cert_der: cert.der().to_vec(),
            username: username.into(),
            password: password.into(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let signer = signer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let signer = signer.clone();
                        async move { Ok::<_, std::convert::Infallible>(signer.answer(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, cert_pem: cert.pem(), task })
    }

    /// `host:port`, to list as insecure: it speaks plain HTTP.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate the registry trusts for token signatures.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Signer {
    fn answer(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let authorized = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .is_some_and(|decoded| decoded == format!("{}:{}", self.username, self.password).as_bytes());
        if !authorized {
            return reply(StatusCode::UNAUTHORIZED, json!({ "details": "incorrect username or password" }));
        }
        let query = request.uri().query().unwrap_or_default();
        let access: Vec<_> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == "scope")
            .filter_map(|(_, scope)| {
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(json!({ "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>() }))
            })
            .collect();
        match self.sign(access) {
            Ok(token) => reply(StatusCode::OK, json!({ "token": token, "expires_in": 300 })),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "details": e })),
        }
    }

    fn sign(&self, access: Vec<serde_json::Value>) -> Result<String, String> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
        let header = json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let claims = json!({
            "iss": ISSUER,
            "sub": self.username,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{:x}", rand::random::<u64>()),
            "access": access,
        });
        let signing_input = format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(claims.to_string()));
        let signature =
            self.key.sign(&SystemRandom::new(), signing_input.as_bytes()).map_err(|e| format!("signing: {e}"))?;
        Ok(format!("{signing_input}.{}", B64URL.encode(signature.as_ref())))
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}
