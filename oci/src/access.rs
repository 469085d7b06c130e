//! Registry access flags, shared by both binaries: the agent pushes and the
//! coordinator verifies in the same backup registry, so they must read the
//! same settings the same way (every flag also from the environment).

use std::path::PathBuf;

use clap::Args;

use crate::registry::{RegistryConfig, RetryPolicy};

/// How to reach registries.
#[derive(Args, Debug, Clone)]
pub struct RegistryAccess {
    /// Registry hosts (host:port) reached over plain HTTP; comma-separated.
    #[arg(long = "insecure-registry", env = "IMAGE_BACKUP_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure: Vec<String>,
    /// Extra CA bundle (PEM) trusted for registry TLS.
    #[arg(long = "registry-ca", env = "IMAGE_BACKUP_REGISTRY_CA")]
    pub ca_bundle: Option<PathBuf>,
    /// docker config.json with registry credentials.
    #[arg(long = "docker-config", env = "IMAGE_BACKUP_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
}

impl RegistryAccess {
    pub fn config(&self, retry: RetryPolicy) -> RegistryConfig {
        RegistryConfig {
            insecure_hosts: self.insecure.iter().filter(|h| !h.is_empty()).cloned().collect(),
            ca_bundle: self.ca_bundle.clone(),
            docker_config: self.docker_config.clone(),
            retry,
        }
    }
}
