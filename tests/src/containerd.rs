//! A real containerd (the Debian package) on its own root, state and socket.

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use containerd_client::{
    services::v1::{
        CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, Image,
        UpdateImageRequest, WriteAction, WriteContentRequest, content_client::ContentClient,
        images_client::ImagesClient, leases_client::LeasesClient,
    },
    tonic::{Request, transport::Channel},
    types::Descriptor,
};
use tempfile::TempDir;

use crate::{image::Blob, process::Daemon};

pub const NAMESPACE: &str = "k8s.io";

pub struct Containerd {
    dir: TempDir,
    /// Held for its Drop, which stops the process.
    _daemon: Daemon,
    channel: Channel,
}

impl Containerd {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ctrd").tempdir_in("/tmp")?;
        let root = dir.path();
        let socket = root.join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
# Only the metadata, content, images and leases services are needed; the
# CRI plugin and snapshotters would touch the host.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#,
            root = root.display(),
            socket = socket.display()
        );
        std::fs::write(root.join("config.toml"), config)?;
        let mut command = Command::new("containerd");
        command.arg("--config").arg(root.join("config.toml"));
        let mut daemon = Daemon::spawn("containerd", command, &root.join("containerd.log"))?;
        let probe = socket.clone();
        daemon.wait_until(Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&probe).is_ok())?;
        let channel = containerd_client::connect(&socket).await.context("connecting to test containerd")?;
        Ok(Self { dir, _daemon: daemon, channel })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// Where containerd keeps a blob's bytes on disk.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        self.dir.path().join("root/io.containerd.content.v1.content/blobs").join(algorithm).join(hex)
    }

    fn request<T>(&self, message: T, lease: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert("containerd-namespace", NAMESPACE.parse().expect("static namespace"));
        if let Some(lease) = lease {
            md.insert("containerd-lease", lease.parse().expect("lease ids are ASCII"));
        }
        request
    }

    /// Stores blobs and image records the way a kubelet pull leaves them:
    /// content written under a lease with the `containerd.io/gc.ref.*`
    /// labels that tie an index to its manifests and a manifest to its
    /// config and layers, then the image records.
    pub async fn import(&self, blobs: &[&Blob], names: &[String], target: &Blob) -> anyhow::Result<()> {
        let lease_id = format!("test-import-{:x}", rand::random::<u64>());
        let mut leases = LeasesClient::new(self.channel.clone());
        leases.create(self.request(CreateLeaseRequest { id: lease_id.clone(), labels: HashMap::new() }, None)).await?;
        for blob in blobs {
            self.write_blob(blob, &lease_id).await.with_context(|| format!("writing {}", blob.digest))?;
        }
        let mut images = ImagesClient::new(self.channel.clone());
        for name in names {
            let image = Image {
                name: name.clone(),
                target: Some(Descriptor {
                    media_type: target.media_type.clone(),
                    digest: target.digest.clone(),
                    size: target.data.len() as i64,
                    annotations: HashMap::new(),
                }),
                ..Default::default()
            };
            let created = images
                .create(self.request(CreateImageRequest { image: Some(image.clone()), source_date_epoch: None }, None))
                .await;
            match created {
                Ok(_) => {}
                // A re-pull of a tag that moved points the record at the new
                // content, as the kubelet's pull does.
                Err(status) if status.code() == containerd_client::tonic::Code::AlreadyExists => {
                    images
                        .update(self.request(
                            UpdateImageRequest { image: Some(image), update_mask: None, source_date_epoch: None },
                            None,
                        ))
                        .await
                        .with_context(|| format!("updating image {name}"))?;
                }
                Err(status) => return Err(status).with_context(|| format!("creating image {name}")),
            }
        }
        leases.delete(self.request(DeleteLeaseRequest { id: lease_id, sync: false }, None)).await?;
        Ok(())
    }

    async fn write_blob(&self, blob: &Blob, lease: &str) -> anyhow::Result<()> {
        const CHUNK: usize = 1 << 20;
        let reference = format!("test-{}", blob.digest);
        let total = blob.data.len() as i64;
        let data = blob.data.clone();
        let digest = blob.digest.clone();
        let labels = blob.gc_labels.clone();
        let requests = async_stream_requests(reference, total, digest, labels, data, CHUNK);
        let mut content = ContentClient::new(self.channel.clone());
        let mut replies = content.write(self.request(requests, Some(lease))).await?.into_inner();
        while let Some(reply) = replies.message().await? {
            if reply.action == WriteAction::Commit as i32 {
                return Ok(());
            }
        }
        bail!("containerd closed the write of {} without committing it", blob.digest)
    }

    /// Forgets every image whose target is `digest`, and the content only
    /// they held (a node whose image GC removed it).
    pub async fn forget(&self, digest: &str) -> anyhow::Result<()> {
        use containerd_client::services::v1::{DeleteImageRequest, ListImagesRequest};
        let mut images = ImagesClient::new(self.channel.clone());
        let filter = format!("target.digest=={digest}");
        let listed = images.list(self.request(ListImagesRequest { filters: vec![filter] }, None)).await?.into_inner();
        for image in listed.images {
            let request = DeleteImageRequest { name: image.name, sync: true, target: None };
            images.delete(self.request(request, None)).await?;
        }
        Ok(())
    }

    /// Removes a blob from the content store (a node whose GC took it).
    pub async fn delete_blob(&self, digest: &str) -> anyhow::Result<()> {
        let mut content = ContentClient::new(self.channel.clone());
        content
            .delete(
                self.request(
                    containerd_client::services::v1::DeleteContentRequest { digest: digest.to_string() },
                    None,
                ),
            )
            .await?;
        Ok(())
    }

    /// The labels containerd holds for a blob.
    pub async fn labels(&self, digest: &str) -> anyhow::Result<HashMap<String, String>> {
        let mut content = ContentClient::new(self.channel.clone());
        let info = content
            .info(self.request(containerd_client::services::v1::InfoRequest { digest: digest.to_string() }, None))
            .await?
            .into_inner();
        Ok(info.info.map(|i| i.labels).unwrap_or_default())
    }
}

/// The Write stream for one blob, built lazily so a large blob is never
/// held twice in memory.
fn async_stream_requests(
    reference: String,
    total: i64,
    digest: String,
    labels: HashMap<String, String>,
    data: bytes::Bytes,
    chunk: usize,
) -> impl futures::Stream<Item = WriteContentRequest> + Send + 'static {
    use futures::StreamExt;
    let len = data.len();
    let ranges = (0..len.div_ceil(chunk)).map(move |i| (i * chunk, ((i + 1) * chunk).min(len)));
    let (write_ref, write_digest) = (reference.clone(), digest.clone());
    let writes = futures::stream::iter(ranges).map(move |(start, end)| WriteContentRequest {
        action: WriteAction::Write as i32,
        r#ref: write_ref.clone(),
        total,
        expected: write_digest.clone(),
        offset: start as i64,
        data: data.slice(start..end).to_vec(),
        labels: HashMap::new(),
    });
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference,
        total,
        expected: digest,
        offset: len as i64,
        data: Vec::new(),
        labels,
    };
    writes.chain(futures::stream::once(async move { commit }))
}
