//! Registry credentials go only where they belong, against real HTTP
//! servers: a registry that sends uploads to a `Location` on another host
//! and port, or names a token realm there, and a listener there that
//! records every request. The registry client (the agent's pushes, the
//! coordinator's checks) sends credentials to the registry itself, and to
//! the realm its challenge named only over TLS or to a host listed
//! insecure; the `Location` host gets the bytes, never the credentials.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use image_backup_oci::registry::{Registry, RegistryConfig};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-password";
const TOKEN: &str = "registry-issued-token";
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// What a listener received: method, path and Authorization header.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// Serves `answer` on a loopback port and records every request.
async fn listen(
    answer: impl Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let (record, answer) = (seen.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (record, answer) = (record.clone(), answer.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let authorization =
                        request.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
                    let path = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    record.lock().unwrap().push((request.method().to_string(), path, authorization));
                    let response = answer(&request);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, seen)
}

fn reply(status: StatusCode, headers: &[(&str, String)], body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// A docker config with the registry's credentials.
fn docker_config(dir: &tempfile::TempDir, registry: &str) -> std::path::PathBuf {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let path = dir.path().join("config.json");
    std::fs::write(&path, format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    path
}

fn carries_secret(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|(method, path, authorization)| authorization.as_ref().map(|a| format!("{method} {path}: {a}")))
        .collect()
}

#[tokio::test]
async fn an_upload_location_on_another_host_never_gets_the_credentials() {
    // The other host: takes the upload, as storage behind a registry would.
    let (trap, trap_seen) = listen(|_| reply(StatusCode::CREATED, &[], "")).await;
    let location = format!("http://localhost:{}/uploads/1?state=x", trap.port());
    let (registry, registry_seen) = listen(move |request| {
        let basic = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.starts_with("Basic "));
        if !basic {
            return reply(StatusCode::UNAUTHORIZED, &[("www-authenticate", "Basic realm=\"fake\"".into())], "");
        }
        match request.method().as_str() {
            "POST" => reply(StatusCode::ACCEPTED, &[("location", location.clone())], ""),
            _ => reply(StatusCode::NOT_FOUND, &[], ""),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let host = registry.to_string();
    let config = RegistryConfig {
        insecure_hosts: vec![host.clone(), format!("localhost:{}", trap.port())],
        docker_config: Some(docker_config(&dir, &host)),
        ..RegistryConfig::default()
    };
    let client = Registry::new(&host, &config).unwrap();
    assert!(!client.blob_exists("team/app", DIGEST).await.unwrap());
    let upload = client.start_upload("team/app", DIGEST).await.unwrap();
    assert!(upload.starts_with(&format!("http://localhost:{}/uploads/1", trap.port())), "{upload}");
    client.finish_upload("team/app", &upload, DIGEST, 5, reqwest::Body::from("bytes")).await.unwrap();

    assert!(!carries_secret(&registry_seen).is_empty(), "the registry itself gets the credentials");
    assert_eq!(trap_seen.lock().unwrap().len(), 1, "the upload reached the other host");
    assert_eq!(carries_secret(&trap_seen), Vec::<String>::new(), "the other host saw credentials");
}

#[tokio::test]
async fn a_plain_http_location_on_a_host_not_listed_insecure_is_refused() {
    let (trap, trap_seen) = listen(|_| reply(StatusCode::CREATED, &[], "")).await;
    let location = format!("http://localhost:{}/uploads/1", trap.port());
    let (registry, _) = listen(move |_| reply(StatusCode::ACCEPTED, &[("location", location.clone())], "")).await;
    let host = registry.to_string();
    let config = RegistryConfig { insecure_hosts: vec![host.clone()], ..RegistryConfig::default() };
    let error = Registry::new(&host, &config).unwrap().start_upload("team/app", DIGEST).await.unwrap_err();
    assert!(error.to_string().contains("is plain http on localhost"), "{error}");
    assert!(trap_seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn credentials_reach_a_token_realm_only_over_tls_or_listed_insecure() {
    // The realm the registry names is another host and port.
    let (realm, realm_seen) = listen(|_| reply(StatusCode::OK, &[], &format!(r#"{{"token":"{TOKEN}"}}"#))).await;
    let (trap, trap_seen) = listen(|_| reply(StatusCode::CREATED, &[], "")).await;
    let challenge = format!("Bearer realm=\"http://localhost:{}/token\",service=\"fake\"", realm.port());
    let location = format!("http://localhost:{}/uploads/1", trap.port());
    let (registry, registry_seen) = listen(move |request| {
        let bearer =
            request.headers().get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"));
        match (bearer, request.method().as_str()) {
            (false, _) => reply(StatusCode::UNAUTHORIZED, &[("www-authenticate", challenge.clone())], ""),
            (true, "POST") => reply(StatusCode::ACCEPTED, &[("location", location.clone())], ""),
            (true, _) => reply(StatusCode::NOT_FOUND, &[], ""),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let host = registry.to_string();
    let realm_host = format!("localhost:{}", realm.port());
    let trap_host = format!("localhost:{}", trap.port());

    // A realm over plain HTTP that nobody listed insecure: no credentials.
    let config = RegistryConfig {
        insecure_hosts: vec![host.clone(), trap_host.clone()],
        docker_config: Some(docker_config(&dir, &host)),
        ..RegistryConfig::default()
    };
    let error = Registry::new(&host, &config).unwrap().blob_exists("team/app", DIGEST).await.unwrap_err();
    assert!(error.to_string().contains("is not https"), "{error}");
    assert!(realm_seen.lock().unwrap().is_empty(), "the realm was asked: {:?}", realm_seen.lock().unwrap());

    // Listed insecure, the realm the registry named gets them; the token it
    // gives goes to the registry, and neither reaches the upload's host.
    let config = RegistryConfig {
        insecure_hosts: vec![host.clone(), trap_host, realm_host],
        docker_config: Some(docker_config(&dir, &host)),
        ..RegistryConfig::default()
    };
    let client = Registry::new(&host, &config).unwrap();
    assert!(!client.blob_exists("team/app", DIGEST).await.unwrap());
    let upload = client.start_upload("team/app", DIGEST).await.unwrap();
    client.finish_upload("team/app", &upload, DIGEST, 5, reqwest::Body::from("bytes")).await.unwrap();
    assert!(carries_secret(&realm_seen).iter().all(|a| a.contains("Basic ")), "{:?}", realm_seen.lock().unwrap());
    assert!(!carries_secret(&realm_seen).is_empty());
    assert!(carries_secret(&registry_seen).iter().any(|a| a.contains(TOKEN)));
    assert!(
        carries_secret(&registry_seen).iter().all(|a| !a.contains("Basic ")),
        "a Bearer registry never gets the password"
    );
    assert_eq!(trap_seen.lock().unwrap().len(), 1);
    assert_eq!(carries_secret(&trap_seen), Vec::<String>::new());
}
