//! Test harness for image-backup: real containerd and real registries (the
//! Debian `containerd` and `docker-registry` packages) started on temporary
//! sockets, ports and directories, test images built as OCI content, and a
//! fault-injecting proxy that counts what reaches a registry.
//!
//! Every instance owns its directories, sockets and ports, so tests run in
//! parallel, and stops only the processes it started (on drop).

pub mod cluster;
pub mod containerd;
pub mod identity;
pub mod image;
pub mod install;
pub mod node;
pub mod one_node;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod rollouts;
pub mod run;
pub mod service;
pub mod session;
pub mod tcp_proxy;
pub mod token;

pub use containerd::Containerd;
pub use image::{MediaTypes, TestImage};
pub use proxy::{Faults, Proxy};
pub use registry::{Registry, RegistryAuth};
pub use token::TokenServer;

/// Installs a test log subscriber once; `RUST_LOG` tunes it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The client settings of a kubeconfig file (its current context).
pub async fn kube_config(path: impl AsRef<std::path::Path>) -> anyhow::Result<kube::Config> {
    let path = path.as_ref();
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)
}
