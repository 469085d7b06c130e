//! A real OCI distribution registry (Debian `docker-registry`) on a free
//! port: plain HTTP, or TLS with htpasswd basic auth.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tempfile::TempDir;

use crate::process::{Daemon, free_port};

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Clone, Debug)]
pub enum RegistryAuth {
    /// Plain HTTP, anyone may push.
    None,
    /// TLS with a CA of the harness's own, and htpasswd basic auth.
    TlsBasic { username: String, password: String },
    /// Plain HTTP with the Bearer token flow against a token server.
    Token { realm: String, cert_pem: String, username: String, password: String },
}

pub struct Registry {
    dir: TempDir,
    /// Held for its Drop, which stops the process.
    daemon: Option<Daemon>,
    port: u16,
    auth: RegistryAuth,
    http: reqwest::Client,
}

/// A manifest as the registry serves it.
#[derive(Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

impl Registry {
    pub async fn start(auth: RegistryAuth) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("registry").tempdir()?;
        let port = free_port()?;
        let mut http = reqwest::Client::builder();
        let mut extra = String::new();
        if let RegistryAuth::TlsBasic { username, password } = &auth {
            let (ca, cert, key) = tls_files()?;
            std::fs::write(dir.path().join("ca.pem"), &ca)?;
            std::fs::write(dir.path().join("cert.pem"), cert)?;
            std::fs::write(dir.path().join("key.pem"), key)?;
            let hash = bcrypt::hash(password, 4)?;
            std::fs::write(dir.path().join("htpasswd"), format!("{username}:{hash}\n"))?;
            extra = format!(
                "  tls:\n    certificate: {d}/cert.pem\n    key: {d}/key.pem\nauth:\n  htpasswd:\n    realm: image-backup-test\n    path: {d}/htpasswd\n",
                d = dir.path().display()
            );
            http = http
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
                .tls_built_in_root_certs(false);
        }
        if let RegistryAuth::Token { realm, cert_pem, .. } = &auth {
            std::fs::write(dir.path().join("token-signer.pem"), cert_pem)?;
            extra = format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}/token-signer.pem\n",
                crate::token::SERVICE,
                crate::token::ISSUER,
                dir.path().display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: image-backup-test\n{extra}",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let daemon = serve(dir.path(), port)?;
        Ok(Self { dir, daemon: Some(daemon), port, auth, http: http.build()? })
    }

    /// What a registry's cleanup of untagged manifests does: stops the
    /// registry, runs its garbage collector with `--delete-untagged`, and
    /// starts it again on the same port. The collector's report.
    pub fn collect_untagged(&mut self) -> anyhow::Result<String> {
        self.daemon = None;
        let output = Command::new("docker-registry")
            .args(["garbage-collect", "--delete-untagged"])
            .arg(self.dir.path().join("config.yml"))
            .output()
            .context("running docker-registry garbage-collect")?;
        let report = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!("garbage-collect failed: {}{report}", String::from_utf8_lossy(&output.stderr));
        }
        self.daemon = Some(serve(self.dir.path(), self.port)?);
        Ok(report)
    }

    /// `127.0.0.1:PORT`, as references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// PEM of the CA that signed the registry's certificate (TLS only).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Where the registry keeps its data; emptied by `clear`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn base(&self) -> String {
        match self.auth {
            RegistryAuth::None | RegistryAuth::Token { .. } => format!("http://{}", self.host()),
            RegistryAuth::TlsBasic { .. } => format!("https://{}", self.host()),
        }
    }

    /// Basic credentials on a request to a registry that wants them.
    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            RegistryAuth::TlsBasic { username, password } => request.basic_auth(username, Some(password)),
            _ => request,
        }
    }

    /// Sends a read request, answering the registry's auth challenge the
    /// way a user's client would.
    async fn read(&self, url: String, accept: Option<&str>) -> anyhow::Result<reqwest::Response> {
        let build = |token: Option<&str>| {
            let mut request = self.http.get(url.clone());
            if let Some(accept) = accept {
                request = request.header(reqwest::header::ACCEPT, accept);
            }
            match (&self.auth, token) {
                (RegistryAuth::TlsBasic { username, password }, _) => request.basic_auth(username, Some(password)),
                (_, Some(token)) => request.bearer_auth(token),
                _ => request,
            }
        };
        let response = build(None).send().await?;
        let RegistryAuth::Token { realm, username, password, .. } = &self.auth else {
            return Ok(response);
        };
        if response.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        // Tests read any repository: ask for pull on the one in the URL.
        let repository = url.split("/v2/").nth(1).and_then(|rest| {
            ["/blobs/", "/manifests/", "/tags/"].iter().find_map(|m| rest.split_once(m).map(|(r, _)| r.to_string()))
        });
        let scope = format!("repository:{}:pull", repository.unwrap_or_default());
        let token: serde_json::Value = self
            .http
            .get(realm)
            .query(&[("service", crate::token::SERVICE), ("scope", scope.as_str())])
            .basic_auth(username, Some(password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = token["token"].as_str().context("token server reply without token")?;
        Ok(build(Some(token)).send().await?)
    }

    /// The blob's bytes, or `None` when the repository lacks it.
    pub async fn blob(&self, repository: &str, digest: &str) -> anyhow::Result<Option<Bytes>> {
        let response = self.read(format!("{}/v2/{repository}/blobs/{digest}", self.base()), None).await?;
        match response.status() {
            reqwest::StatusCode::OK => Ok(Some(response.bytes().await?)),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            status => bail!("GET blob {digest} in {repository}: {status}"),
        }
    }

    pub async fn manifest(&self, repository: &str, reference: &str) -> anyhow::Result<Option<Manifest>> {
        let response =
            self.read(format!("{}/v2/{repository}/manifests/{reference}", self.base()), Some(MANIFEST_ACCEPT)).await?;
        match response.status() {
            reqwest::StatusCode::OK => {
                let header = |name: &str| {
                    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                };
                let (media_type, digest) = (header("content-type"), header("docker-content-digest"));
                Ok(Some(Manifest { bytes: response.bytes().await?, media_type, digest }))
            }
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            status => bail!("GET manifest {reference} in {repository}: {status}"),
        }
    }

    /// Deletes a manifest by digest, and with it every tag that names it,
    /// as someone cleaning up a registry by hand would (plain HTTP only).
    pub async fn delete_manifest(&self, repository: &str, digest: &str) -> anyhow::Result<()> {
        let url = format!("{}/v2/{repository}/manifests/{digest}", self.base());
        let response = self.http.delete(url).send().await?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            bail!("DELETE manifest {digest} in {repository}: {}", response.status());
        }
        Ok(())
    }

    /// Tags of a repository (empty when it does not exist).
    pub async fn tags(&self, repository: &str) -> anyhow::Result<Vec<String>> {
        let response = self.read(format!("{}/v2/{repository}/tags/list", self.base()), None).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let body: serde_json::Value = response.error_for_status()?.json().await?;
        Ok(body["tags"]
            .as_array()
            .map(|tags| tags.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// Puts an image into the registry the way `docker push` leaves it:
    /// every blob, the child manifests, then the root under `tag`.
    /// Written with plain HTTP calls so the code under test never sets up
    /// its own sources.
    pub async fn push(&self, repository: &str, tag: &str, image: &crate::TestImage) -> anyhow::Result<()> {
        let base = self.base();
        for platform in image.platforms.iter().chain(&image.attestations) {
            for blob in platform.layers.iter().chain([&platform.config]) {
                let started =
                    self.authed(self.http.post(format!("{base}/v2/{repository}/blobs/uploads/"))).send().await?;
                let location = started
                    .error_for_status()?
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .context("upload without Location")?
                    .to_string();
                let url = if location.starts_with('/') { format!("{base}{location}") } else { location };
                let separator = if url.contains('?') { '&' } else { '?' };
                self.authed(self.http.put(format!("{url}{separator}digest={}", blob.digest)))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(blob.data.clone())
                    .send()
                    .await?
                    .error_for_status()
                    .with_context(|| format!("uploading {}", blob.digest))?;
            }
            if image.index.is_some() {
                self.put_manifest(repository, &platform.manifest.digest, &platform.manifest).await?;
            }
        }
        self.put_manifest(repository, tag, image.root()).await
    }

    /// Stores a manifest as is under `reference`.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: &crate::image::Blob,
    ) -> anyhow::Result<()> {
        self.authed(self.http.put(format!("{}/v2/{repository}/manifests/{reference}", self.base())))
            .header(reqwest::header::CONTENT_TYPE, &manifest.media_type)
            .body(manifest.data.clone())
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("putting manifest {reference} in {repository}"))?;
        Ok(())
    }

    /// Empties the registry's storage (between benchmark runs).
    pub fn clear(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("clearing {}", data.display()))?;
        }
        Ok(())
    }
}

/// A CA, and a certificate it signed for 127.0.0.1 and localhost.
fn tls_files() -> anyhow::Result<(String, String, String)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "image-backup test CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// Starts `docker-registry serve` on the config in `dir`.
fn serve(dir: &std::path::Path, port: u16) -> anyhow::Result<Daemon> {
    let mut command = Command::new("docker-registry");
    command.arg("serve").arg(dir.join("config.yml"));
    let mut daemon = Daemon::spawn("docker-registry", command, &dir.join("registry.log"))?;
    daemon.wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())?;
    Ok(daemon)
}
