//! How to reach registries: which hosts speak plain HTTP, which extra CA to
//! trust, where credentials come from, and how long to keep retrying.

use std::{path::PathBuf, time::Duration};

use super::Credentials;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Total backoff time after which a failing call gives up.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    /// Hosts (`host:port`) reached over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// PEM bundle trusted in addition to the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// docker `config.json` holding credentials.
    pub docker_config: Option<PathBuf>,
    pub retry: RetryPolicy,
}

impl RegistryConfig {
    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure_hosts.iter().any(|h| h == host)
    }

    pub(super) fn http_client(&self, plain_http: bool) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("image-backup/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // A silent peer mid-upload is a dropped connection, retried.
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(16)
            .tcp_nodelay(true)
            // Uploads stream at disk speed; HTTP/1.1 avoids HTTP/2 window
            // stalls and every registry speaks it.
            .http1_only()
            // Loading the system roots costs tens of milliseconds, a large
            // part of a push that finds everything in place.
            .tls_built_in_root_certs(!plain_http);
        if let Some(path) = &self.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| format!("reading CA bundle {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("CA bundle {} holds no usable PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("CA bundle {} holds no certificate", path.display()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map_err(|e| format!("building HTTP client: {e}"))
    }

    /// Credentials for `host` from the docker config file, if it has any.
    /// The error text never holds the secret itself.
    pub(super) fn credentials_for(&self, host: &str) -> Result<Option<Credentials>, String> {
        let Some(path) = &self.docker_config else {
            return Ok(None);
        };
        let text = std::fs::read(path).map_err(|e| format!("reading docker config {}: {e}", path.display()))?;
        own_config_credentials(&text, host).map_err(|e| format!("docker config {}: {e}", path.display()))
    }
}

/// Credentials for `host` in the operator's own docker `config.json`, read
/// whole as docker reads it: its credential helpers are the operator's
/// choice (a config from anyone else goes through [`super::docker_config`],
/// which runs none). The error text never holds the secret itself.
fn own_config_credentials(config: &[u8], host: &str) -> Result<Option<Credentials>, String> {
    for key in super::docker_config::keys_for(host) {
        match docker_credential::get_credential_from_reader(config, &key) {
            Ok(docker_credential::DockerCredential::UsernamePassword(username, password)) => {
                return Ok(Some(Credentials::Basic { username, password }));
            }
            Ok(docker_credential::DockerCredential::IdentityToken(token)) => {
                return Ok(Some(Credentials::IdentityToken(token)));
            }
            Err(docker_credential::CredentialRetrievalError::NoCredentialConfigured) => continue,
            Err(e) => return Err(format!("entry for {key}: {e}")),
        }
    }
    Ok(None)
}
