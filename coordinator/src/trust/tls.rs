//! The gRPC port's TLS. Either the certificate of a `kubernetes.io/tls`
//! Secret (what cert-manager writes), reloaded whenever the Secret changes;
//! or, for installs without one, a CA the coordinator makes once and keeps
//! in a Secret, and a serving certificate it issues itself from that CA and
//! renews before it expires. Either way the CA agents should trust is
//! published in a ConfigMap that the agent DaemonSet mounts.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::RwLock;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{info, warn};

/// The key agents read the CA from, in the ConfigMap and the Secrets.
pub const CA_KEY: &str = "ca.crt";
const CA_KEY_PRIVATE: &str = "ca.key";
const CA_NAME: &str = "image-backup coordinator CA";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// A self-issued serving certificate is renewed this long before it ends.
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, optionally
    /// `ca.crt`) in the coordinator's namespace.
    Secret(String),
    /// A CA kept in the Secret `ca_secret`; the certificate covers `names`
    /// (DNS names or IP addresses).
    OwnCa { ca_secret: String, names: Vec<String> },
}

/// TLS settings of the gRPC port.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub source: TlsSource,
    /// The ConfigMap of the CA agents trust.
    pub ca_config_map: String,
    pub namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading Secret {namespace}/{name}: {error}")]
    ReadSecret { namespace: String, name: String, error: kube::Error },
    #[error("Secret {namespace}/{name} has no {key}")]
    Missing { namespace: String, name: String, key: &'static str },
    #[error("Secret {namespace}/{name}: {error}")]
    Certificate { namespace: String, name: String, error: CertError },
    #[error("keeping the CA in Secret {namespace}/{name}: {error}")]
    WriteSecret { namespace: String, name: String, error: kube::Error },
    #[error("publishing the CA in ConfigMap {namespace}/{name}: {error}")]
    Publish { namespace: String, name: String, error: kube::Error },
    #[error("making a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the certificate made: {0}")]
    Issued(CertError),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate served right now; swapped on renewal or a new Secret.
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The port's TLS configuration, and the task that keeps its certificate
/// current (run it for as long as the port serves).
pub async fn serving(
    client: Client,
    settings: TlsSettings,
) -> Result<(Arc<ServerConfig>, impl std::future::Future<Output = ()> + Send + 'static), TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let published = Api::<ConfigMap>::namespaced(client, &settings.namespace);
    let (first, keeper) = match &settings.source {
        TlsSource::Secret(name) => {
            let secret = read(&secrets, &settings.namespace, name).await?;
            let (key, ca) = from_tls_secret(&secret, &settings.namespace, name)?;
            if let Some(ca) = ca {
                publish(&published, &settings, &ca).await?;
            }
            (key, Keeper::Secret { secrets, name: name.clone(), published: Box::new(published) })
        }
        TlsSource::OwnCa { ca_secret, names } => {
            let ca = own_ca(&secrets, &settings.namespace, ca_secret).await?;
            publish(&published, &settings, &ca.cert_pem).await?;
            let (key, renew_at) = ca.issue(names)?;
            (key, Keeper::OwnCa { ca, names: names.clone(), renew_at })
        }
    };
    let cert = Arc::new(ServingCert(RwLock::new(Arc::new(first))));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), keeper.run(cert, settings)))
}

/// What keeps the certificate current.
enum Keeper {
    Secret { secrets: Api<Secret>, name: String, published: Box<Api<ConfigMap>> },
    OwnCa { ca: OwnCa, names: Vec<String>, renew_at: SystemTime },
}

// === impl Keeper ===

impl Keeper {
    async fn run(self, cert: Arc<ServingCert>, settings: TlsSettings) {
        match self {
            Self::Secret { secrets, name, published } => {
                let namespace = settings.namespace.clone();
                // Backing off between failures also yields, so a watch that fails
                // at once (the API gone) never spins.
                let mut changes = std::pin::pin!(watcher::watch_object(secrets, &name).default_backoff().boxed());
                while let Some(event) = changes.next().await {
                    match event {
                        Ok(Some(secret)) => match from_tls_secret(&secret, &namespace, &name) {
                            Ok((key, ca)) => {
                                *cert.0.write() = Arc::new(key);
                                info!(secret = %name, "serving the certificate of the Secret as it is now");
                                if let Some(ca) = ca
                                    && let Err(e) = publish(&published, &settings, &ca).await
                                {
                                    warn!(error = %e, "the CA of the TLS Secret could not be published");
                                }
                            }
                            Err(e) => {
                                warn!(error = %e, "the TLS Secret changed but cannot be used; serving the certificate before it")
                            }
                        },
                        Ok(None) => warn!(secret = %name, "the TLS Secret was deleted; serving the certificate it had"),
                        Err(e) => warn!(secret = %name, error = %e, "watching the TLS Secret failed; retrying"),
                    }
                }
            }
            Self::OwnCa { ca, names, mut renew_at } => loop {
                let wait = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
                match ca.issue(&names) {
                    Ok((key, next)) => {
                        *cert.0.write() = Arc::new(key);
                        renew_at = next;
                        info!("serving certificate renewed");
                    }
                    Err(e) => {
                        warn!(error = %e, "renewing the serving certificate failed; trying again in an hour");
                        renew_at = SystemTime::now() + Duration::from_secs(3600);
                    }
                }
            },
        }
    }
}

async fn read(secrets: &Api<Secret>, namespace: &str, name: &str) -> Result<Secret, TlsError> {
    secrets.get(name).await.map_err(|error| TlsError::ReadSecret {
        namespace: namespace.into(),
        name: name.into(),
        error,
    })
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|value| value.0.as_slice()).filter(|value| !value.is_empty())
}

/// The serving key of a `kubernetes.io/tls` Secret, and its CA if it has one.
fn from_tls_secret(secret: &Secret, namespace: &str, name: &str) -> Result<(CertifiedKey, Option<String>), TlsError> {
    let missing = |key| TlsError::Missing { namespace: namespace.into(), name: name.into(), key };
    let chain = data(secret, "tls.crt").ok_or_else(|| missing("tls.crt"))?;
    let key = data(secret, "tls.key").ok_or_else(|| missing("tls.key"))?;
    let certified = certified_key(chain, key).map_err(|error| TlsError::Certificate {
        namespace: namespace.into(),
        name: name.into(),
        error,
    })?;
    let ca = data(secret, CA_KEY).map(|ca| String::from_utf8_lossy(ca).into_owned());
    Ok((certified, ca))
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} is not valid PEM")]
    Pem(&'static str),
    #[error("the private key cannot sign: {0}")]
    Key(rustls::Error),
}

fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::Pem("the certificate chain"))?;
    if chain.is_empty() {
        return Err(CertError::Pem("the certificate chain"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| CertError::Pem("the private key"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Key)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Makes the ConfigMap agents trust hold `ca`.
async fn publish(config_maps: &Api<ConfigMap>, settings: &TlsSettings, ca: &str) -> Result<(), TlsError> {
    let config_map = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some(settings.ca_config_map.clone()), ..Default::default() },
        data: Some(BTreeMap::from([(CA_KEY.to_string(), ca.to_string())])),
        ..ConfigMap::default()
    };
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": config_map.metadata,
        "data": config_map.data,
    });
    config_maps
        .patch(&settings.ca_config_map, &PatchParams::apply(crate::MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
        .map_err(|error| TlsError::Publish {
            namespace: settings.namespace.clone(),
            name: settings.ca_config_map.clone(),
            error,
        })
}

/// The coordinator's own CA.
struct OwnCa {
    cert_pem: String,
    key: KeyPair,
}

/// The CA's certificate parameters. The same every time, so that a CA read
/// back from its Secret issues certificates that chain to the certificate
/// stored beside its key (rcgen then needs no certificate parser).
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// The CA in `name`, made and stored there if there is none yet. Two
/// coordinators starting together both try; the one whose create loses
/// reads the winner's.
async fn own_ca(secrets: &Api<Secret>, namespace: &str, name: &str) -> Result<OwnCa, TlsError> {
    let invalid =
        |what| TlsError::Certificate { namespace: namespace.into(), name: name.into(), error: CertError::Pem(what) };
    let stored = match secrets.get_opt(name).await {
        Ok(Some(secret)) => Some(secret),
        Ok(None) => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = ca_params()?;
            params.not_before = SystemTime::now().into();
            params.not_after = (SystemTime::now() + CA_VALIDITY).into();
            let cert = params.self_signed(&key)?;
            let secret = Secret {
                metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([
                    (CA_KEY.to_string(), ByteString(cert.pem().into_bytes())),
                    (CA_KEY_PRIVATE.to_string(), ByteString(key.serialize_pem().into_bytes())),
                ])),
                ..Secret::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(secret = %name, "made the coordinator's CA");
                    return Ok(OwnCa { cert_pem: cert.pem(), key });
                }
                Err(kube::Error::Api(status)) if status.code == 409 => None,
                Err(error) => {
                    return Err(TlsError::WriteSecret { namespace: namespace.into(), name: name.into(), error });
                }
            }
        }
        Err(error) => return Err(TlsError::ReadSecret { namespace: namespace.into(), name: name.into(), error }),
    };
    let secret = match stored {
        Some(secret) => secret,
        None => read(secrets, namespace, name).await?,
    };
    let cert_pem = data(&secret, CA_KEY).ok_or_else(|| TlsError::Missing {
        namespace: namespace.into(),
        name: name.into(),
        key: CA_KEY,
    })?;
    let key_pem = data(&secret, CA_KEY_PRIVATE).ok_or_else(|| TlsError::Missing {
        namespace: namespace.into(),
        name: name.into(),
        key: CA_KEY_PRIVATE,
    })?;
    let key = KeyPair::from_pem(std::str::from_utf8(key_pem).map_err(|_| invalid("ca.key"))?)
        .map_err(|_| invalid("ca.key"))?;
    Ok(OwnCa { cert_pem: String::from_utf8_lossy(cert_pem).into_owned(), key })
}

// === impl OwnCa ===

impl OwnCa {
    /// A serving certificate for `names`, and when to renew it.
    fn issue(&self, names: &[String]) -> Result<(CertifiedKey, SystemTime), TlsError> {
        let issuer = Issuer::new(ca_params()?, &self.key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().map_or("image-backup-coordinator", String::as_str));
        let now = SystemTime::now();
        // Clocks of agents may be a little behind.
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + LEAF_VALIDITY).into();
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;
        let chain = format!("{}{}", cert.pem(), self.cert_pem);
        let certified = certified_key(chain.as_bytes(), key.serialize_pem().as_bytes()).map_err(TlsError::Issued)?;
        Ok((certified, now + LEAF_VALIDITY - LEAF_RENEW_BEFORE))
    }
}
