//! Reading images out of a node's containerd: resolve the image record, hold
//! a lease so garbage collection keeps the blobs we are copying, and stream
//! blob content through the Content service.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use containerd_client::{
    services::v1::{
        AddResourceRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, GetImageRequest,
        InfoRequest, ListImagesRequest, PluginsRequest, ReadContentRequest, Resource, SubscribeRequest,
        UpdateRequest as UpdateContentRequest, content_client::ContentClient, events_client::EventsClient,
        images_client::ImagesClient, introspection_client::IntrospectionClient, leases_client::LeasesClient,
    },
    tonic::{self, Code, Request, metadata::MetadataValue, transport::Channel},
    types::Descriptor as CtrDescriptor,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tracing::debug;

use image_backup_oci::ImageRef;

/// Namespace the kubelet's CRI plugin keeps its images in.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Prefix of the labels containerd records where a blob can be found in a
/// registry (`containerd.io/distribution.source.<host>=<repo>,<repo>`); the
/// same labels drive containerd's own cross-repository mounts.
pub const DISTRIBUTION_SOURCE_LABEL: &str = "containerd.io/distribution.source.";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connecting to containerd at {path}: {error}")]
    Connect { path: String, error: tonic::transport::Error },
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    #[error("image {reference} not found in containerd namespace {namespace}")]
    ImageNotFound { reference: String, namespace: String },
    #[error("blob {digest} is not in containerd's content store (namespace {namespace})")]
    BlobNotFound { digest: String, namespace: String },
    #[error("containerd {call} for {subject}: {status}")]
    Call { call: &'static str, subject: String, status: Box<tonic::Status> },
    #[error("reading containerd content file {path}: {error}")]
    File { path: String, error: std::io::Error },
    #[error("containerd returned {got} bytes of {digest} at offset {offset}, expected {expected}")]
    ShortRead { digest: String, offset: u64, got: u64, expected: u64 },
}

/// A descriptor as containerd and the OCI spec give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl From<CtrDescriptor> for Descriptor {
    fn from(d: CtrDescriptor) -> Self {
        Self { media_type: d.media_type, digest: d.digest, size: u64::try_from(d.size).unwrap_or(0) }
    }
}

/// A change to containerd's image records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageEvent {
    Upserted(String),
    Deleted(String),
}

/// A containerd image record.
#[derive(Clone, Debug)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
}

/// Reads image content from one containerd namespace.
#[derive(Clone)]
pub struct ContentStore {
    channel: Channel,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    namespace_name: String,
    /// Bytes asked for per Read call. containerd streams each call's range in
    /// small messages; asking for large ranges keeps its read loop busy and
    /// the number of round trips low.
    window: u64,
    /// containerd's content directory, when this process can read it.
    direct_root: Option<PathBuf>,
}

/// How blob bytes are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadPath {
    /// Straight from containerd's content directory when it is mounted
    /// into this process's view (the agent DaemonSet mounts it read-only),
    /// else through the Content service.
    #[default]
    Auto,
    /// Always through the Content service.
    Grpc,
}

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Bytes read from a content file at once.
const DIRECT_READ_CHUNK: usize = 1 << 20;

/// Size of one Read call's range.
pub const DEFAULT_READ_WINDOW: u64 = 16 << 20;

impl ContentStore {
    /// Connects to containerd's socket. HTTP/2 flow-control windows are
    /// raised well above the 64 KiB protocol default: with the default, a
    /// fast local reader stalls on window updates and reads several times
    /// slower. The stream window bounds what one blob buffers (memory is
    /// streams in flight times this).
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ContainerdError> {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .connect_with_connector(tower_service(path.clone()))
            .await
            .map_err(|error| ContainerdError::Connect { path: path.display().to_string(), error })?;
        let namespace_value = namespace.parse().map_err(|_| ContainerdError::Namespace(namespace.to_string()))?;
        Ok(Self {
            channel,
            namespace: namespace_value,
            namespace_name: namespace.to_string(),
            window: DEFAULT_READ_WINDOW,
            direct_root: None,
        })
    }

    /// Chooses how blob bytes are read. With `Auto`, containerd is asked
    /// where its content plugin keeps blobs, and that directory is used if
    /// this process can read it: containerd's gRPC Read sends 32 KiB
    /// messages, and serving and decoding them costs both processes more
    /// CPU than the registry upload itself on a busy node. Everything else
    /// (namespaces, existence, labels, leases) still goes through the API,
    /// and every byte is still checked against its digest.
    pub async fn with_read_path(mut self, path: ReadPath) -> Self {
        self.direct_root = match path {
            ReadPath::Grpc => None,
            ReadPath::Auto => self.content_root().await,
        };
        match &self.direct_root {
            Some(root) => debug!(root = %root.display(), "reading blobs from containerd's content directory"),
            None => debug!("reading blobs through containerd's Content service"),
        }
        self
    }

    /// Whether blobs are read from the content directory.
    pub fn reads_directly(&self) -> bool {
        self.direct_root.is_some()
    }

    async fn content_root(&self) -> Option<PathBuf> {
        let mut introspection = IntrospectionClient::new(self.channel.clone());
        let request = PluginsRequest { filters: vec!["type==io.containerd.content.v1,id==content".into()] };
        let plugins = match introspection.plugins(self.request(request)).await {
            Ok(reply) => reply.into_inner().plugins,
            Err(status) => {
                debug!(%status, "containerd introspection failed; reading through the Content service");
                return None;
            }
        };
        let root = PathBuf::from(plugins.into_iter().next()?.exports.get("root")?);
        root.is_dir().then_some(root)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace_name
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert("containerd-namespace", self.namespace.clone());
        request
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, ContainerdError> {
        let mut images = ImagesClient::new(self.channel.clone());
        match images.get(self.request(GetImageRequest { name: name.to_string() })).await {
            Ok(reply) => Ok(reply
                .into_inner()
                .image
                .and_then(|image| image.target.map(|target| ImageRecord { name: image.name, target: target.into() }))),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_error("Images.Get", name, status)),
        }
    }

    /// One image record by name, if containerd has it.
    pub async fn image(&self, name: &str) -> Result<Option<ImageRecord>, ContainerdError> {
        self.get_image(name).await
    }

    /// Image records created, updated and deleted in this namespace, as
    /// containerd publishes them (the kubelet pulling or removing images).
    pub async fn image_events(
        &self,
    ) -> Result<impl Stream<Item = Result<ImageEvent, ContainerdError>> + Send + 'static + use<>, ContainerdError> {
        use prost::Message;
        let filter = format!("topic~=\"^/images/\",namespace=={}", self.namespace_name);
        let mut events = EventsClient::new(self.channel.clone());
        let stream = events
            .subscribe(SubscribeRequest { filters: vec![filter.clone()] })
            .await
            .map_err(|status| call_error("Events.Subscribe", &filter, status))?
            .into_inner();
        Ok(stream.filter_map(|item| async move {
            let envelope = match item {
                Ok(envelope) => envelope,
                Err(status) => return Some(Err(call_error("Events.Subscribe", "stream", status))),
            };
            let payload = envelope.event?.value;
            let event = match envelope.topic.as_str() {
                "/images/create" => containerd_client::services::v1::ImageCreate::decode(payload.as_slice())
                    .ok()
                    .map(|e| ImageEvent::Upserted(e.name)),
                "/images/update" => containerd_client::services::v1::ImageUpdate::decode(payload.as_slice())
                    .ok()
                    .map(|e| ImageEvent::Upserted(e.name)),
                "/images/delete" => containerd_client::services::v1::ImageDelete::decode(payload.as_slice())
                    .ok()
                    .map(|e| ImageEvent::Deleted(e.name)),
                _ => None,
            };
            event.map(Ok)
        }))
    }

    /// Every image record in the namespace.
    pub async fn list_images(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        let mut images = ImagesClient::new(self.channel.clone());
        let reply = images
            .list(self.request(ListImagesRequest { filters: Vec::new() }))
            .await
            .map_err(|status| call_error("Images.List", "every image", status))?;
        Ok(reply
            .into_inner()
            .images
            .into_iter()
            .filter_map(|image| image.target.map(|t| ImageRecord { name: image.name, target: t.into() }))
            .collect())
    }

    /// Finds the image the kubelet ran under `reference`. The CRI plugin
    /// records a pulled image under its tag and under `name@digest`; only
    /// those records count, never another repository's with the same
    /// digest: an agent publishes only what its node pulled as the source
    /// it was asked for, so no assignment can make it publish an image
    /// another tenant pulled, under this source's name.
    pub async fn resolve(&self, reference: &ImageRef) -> Result<ImageRecord, ContainerdError> {
        let mut names = vec![reference.to_string()];
        if let Some(digest) = reference.digest() {
            names.push(reference.pinned(digest));
        } else if let Some(tagged) = reference.tagged_name() {
            names.push(tagged);
        }
        for name in names {
            if let Some(record) = self.get_image(&name).await?
                && reference.digest().is_none_or(|d| d == record.target.digest)
            {
                return Ok(record);
            }
        }
        Err(ContainerdError::ImageNotFound { reference: reference.to_string(), namespace: self.namespace_name.clone() })
    }

    /// Size and labels of a blob, or `None` when containerd does not hold it.
    pub async fn info(&self, digest: &str) -> Result<Option<BlobInfo>, ContainerdError> {
        let mut content = ContentClient::new(self.channel.clone());
        match content.info(self.request(InfoRequest { digest: digest.to_string() })).await {
            Ok(reply) => Ok(reply
                .into_inner()
                .info
                .map(|info| BlobInfo { size: u64::try_from(info.size).unwrap_or(0), labels: info.labels })),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(call_error("Content.Info", digest, status)),
        }
    }

    /// Records that `repository` on `host` holds the blob, the way containerd
    /// labels content it pulled, so that later pushes can mount from there.
    pub async fn add_distribution_source(
        &self,
        digest: &str,
        host: &str,
        repository: &str,
        existing: Option<&str>,
    ) -> Result<(), ContainerdError> {
        let key = format!("{DISTRIBUTION_SOURCE_LABEL}{host}");
        let mut repos: Vec<&str> = existing.map(|e| e.split(',').collect()).unwrap_or_default();
        if repos.contains(&repository) {
            return Ok(());
        }
        repos.push(repository);
        // containerd refuses labels whose key and value exceed 4 KiB together.
        while key.len() + repos.join(",").len() > 4000 && repos.len() > 1 {
            repos.remove(0);
        }
        let info = containerd_client::services::v1::Info {
            digest: digest.to_string(),
            labels: HashMap::from([(key.clone(), repos.join(","))]),
            ..Default::default()
        };
        let mut content = ContentClient::new(self.channel.clone());
        content
            .update(self.request(UpdateContentRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths: vec![format!("labels.{key}")] }),
            }))
            .await
            .map_err(|status| call_error("Content.Update", digest, status))?;
        Ok(())
    }

    /// Reads a whole blob into memory; for manifests and configs only.
    pub async fn read_all(&self, digest: &str, size: u64) -> Result<Bytes, ContainerdError> {
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut stream = std::pin::pin!(self.read(digest, size));
        while let Some(chunk) = stream.try_next().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.into())
    }

    /// Streams `size` bytes of a blob in read windows. The stream never holds
    /// more than one containerd message, so memory stays flat whatever the
    /// blob size.
    pub fn read(
        &self,
        digest: &str,
        size: u64,
    ) -> impl Stream<Item = Result<Bytes, ContainerdError>> + Send + 'static + use<> {
        let store = self.clone();
        let digest = digest.to_string();
        if let Some(root) = &self.direct_root {
            return self.read_direct(root.clone(), digest, size).left_stream();
        }
        let window = store.window.max(1);
        let offsets = (0..size.div_ceil(window)).map(move |i| i * window);
        futures::stream::iter(offsets)
            .map(move |offset| {
                let store = store.clone();
                let digest = digest.clone();
                let len = window.min(size - offset);
                async move { store.read_window(digest, offset, len).await }
            })
            // One window at a time: a second Read in flight would fill its
            // HTTP/2 stream window while nobody consumes it, and with several
            // blobs at once those idle buffers can take the whole connection
            // window and stall every read. Within a window, flow control
            // already keeps containerd streaming ahead of the consumer.
            .then(|window| window)
            .try_flatten()
            .right_stream()
    }

    /// Streams a blob from the content directory, after containerd confirmed
    /// (Info, in this namespace) that the namespace owns it.
    fn read_direct(
        &self,
        root: PathBuf,
        digest: String,
        size: u64,
    ) -> impl Stream<Item = Result<Bytes, ContainerdError>> + Send + 'static + use<> {
        let store = self.clone();
        async_stream::try_stream! {
            let namespace = store.namespace_name.clone();
            let not_found = || ContainerdError::BlobNotFound { digest: digest.clone(), namespace: namespace.clone() };
            store.info(&digest).await?.ok_or_else(not_found)?;
            let (algorithm, hex) = digest.split_once(':').ok_or_else(not_found)?;
            let path = root.join("blobs").join(algorithm).join(hex);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|error| ContainerdError::File { path: path.display().to_string(), error })?;
            let mut chunks = tokio_util::io::ReaderStream::with_capacity(file, DIRECT_READ_CHUNK);
            let mut got = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|error| ContainerdError::File { path: path.display().to_string(), error })?;
                got += chunk.len() as u64;
                yield chunk;
            }
            if got != size {
                Err(ContainerdError::ShortRead { digest: digest.clone(), offset: 0, got, expected: size })?;
            }
        }
    }
}

impl ContentStore {
    /// One Read call for `len` bytes at `offset`, checked to deliver exactly
    /// that many: a short read would otherwise surface only as a digest
    /// mismatch far from its cause.
    async fn read_window(
        self,
        digest: String,
        offset: u64,
        len: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, ContainerdError>> + Send + 'static + use<>, ContainerdError> {
        let mut content = ContentClient::new(self.channel.clone());
        let request = ReadContentRequest {
            digest: digest.clone(),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            size: i64::try_from(len).unwrap_or(i64::MAX),
        };
        let namespace = self.namespace_name.clone();
        let mut messages = match content.read(self.request(request)).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Err(read_error(status, digest, namespace)),
        };
        Ok(async_stream::try_stream! {
            let mut got = 0u64;
            while let Some(message) = messages
                .message()
                .await
                .map_err(|status| read_error(status, digest.clone(), namespace.clone()))?
            {
                got += message.data.len() as u64;
                yield Bytes::from(message.data);
            }
            if got != len {
                Err(ContainerdError::ShortRead { digest: digest.clone(), offset, got, expected: len })?;
            }
        })
    }

    /// Holds a containerd lease until dropped or released, so garbage
    /// collection cannot remove the blobs being pushed even if the kubelet
    /// deletes the image meanwhile.
    pub async fn lease(&self, expire: Duration) -> Result<Lease, ContainerdError> {
        let id = format!("image-backup-{:016x}", rand::random::<u64>());
        let expire_at = std::time::SystemTime::now() + expire;
        let expire_label = humantime::format_rfc3339_seconds(expire_at).to_string();
        let mut leases = LeasesClient::new(self.channel.clone());
        leases
            .create(self.request(CreateLeaseRequest {
                id: id.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire_label)]),
            }))
            .await
            .map_err(|status| call_error("Leases.Create", &id, status))?;
        debug!(lease = %id, "holding containerd lease");
        Ok(Lease { store: self.clone(), id })
    }
}

/// A containerd lease protecting the blobs added to it.
pub struct Lease {
    store: ContentStore,
    id: String,
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Adds a blob to the lease; containerd keeps it while the lease lives.
    pub async fn protect(&self, digest: &str) -> Result<(), ContainerdError> {
        let mut leases = LeasesClient::new(self.store.channel.clone());
        leases
            .add_resource(self.store.request(AddResourceRequest {
                id: self.id.clone(),
                resource: Some(Resource { id: digest.to_string(), r#type: "content".to_string() }),
            }))
            .await
            .map_err(|status| call_error("Leases.AddResource", digest, status))?;
        Ok(())
    }

    /// Deletes the lease. A lease that could not be deleted still expires by
    /// its `containerd.io/gc.expire` label.
    pub async fn release(self) -> Result<(), ContainerdError> {
        let mut leases = LeasesClient::new(self.store.channel.clone());
        leases
            .delete(self.store.request(DeleteLeaseRequest { id: self.id.clone(), sync: false }))
            .await
            .map_err(|status| call_error("Leases.Delete", &self.id, status))?;
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct BlobInfo {
    pub size: u64,
    pub labels: HashMap<String, String>,
}

fn read_error(status: tonic::Status, digest: String, namespace: String) -> ContainerdError {
    if status.code() == Code::NotFound {
        ContainerdError::BlobNotFound { digest, namespace }
    } else {
        call_error("Content.Read", &digest, status)
    }
}

fn call_error(call: &'static str, subject: &str, status: tonic::Status) -> ContainerdError {
    ContainerdError::Call { call, subject: subject.to_string(), status: Box::new(status) }
}

/// A Unix-socket connector for tonic. Our own because containerd-client's
/// `connect` fixes the HTTP/2 window sizes, and large windows are what make
/// reads through the Content service fast (see `connect`).
fn tower_service(
    path: std::path::PathBuf,
) -> impl tower_service::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    })
}
