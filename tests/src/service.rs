//! A Service in front of coordinator replicas, as kube-proxy makes one:
//! each new connection goes to a replica whose /readyz answers 200 now, so
//! agents reach whichever replica leads.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

pub struct Service {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// A replica: where it serves gRPC, and its readiness URL.
#[derive(Clone)]
pub struct Endpoint {
    pub grpc: SocketAddr,
    pub readyz: String,
}

impl Service {
    pub async fn start(endpoints: Vec<Endpoint>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(1)).build()?;
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (endpoints, http) = (endpoints.clone(), http.clone());
                tokio::spawn(async move {
                    for endpoint in &endpoints {
                        let ready = http.get(&endpoint.readyz).send().await.is_ok_and(|r| r.status().is_success());
                        if ready && let Ok(outbound) = TcpStream::connect(endpoint.grpc).await {
                            let (mut inbound, mut outbound) = (inbound, outbound);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                    // No ready endpoint: the connection is refused.
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}
