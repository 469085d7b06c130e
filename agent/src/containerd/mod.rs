//! A node's containerd as its [`ContentStore`]: resolve image records, hold
//! a lease so garbage collection keeps the blobs we are copying, and stream
//! blob content through the Content service or from its content directory.

mod read;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use containerd_client::{
    services::v1::{
        AddResourceRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, GetImageRequest,
        InfoRequest, ListImagesRequest, PluginsRequest, Resource, SubscribeRequest,
        UpdateRequest as UpdateContentRequest, content_client::ContentClient, events_client::EventsClient,
        images_client::ImagesClient, introspection_client::IntrospectionClient, leases_client::LeasesClient,
    },
    tonic::{self, Code, Request, metadata::MetadataValue, transport::Channel},
    types::Descriptor as CtrDescriptor,
};
use futures::{Stream, StreamExt};
use tracing::debug;

use crate::store::{
    BlobInfo, ContentStore, Descriptor, ImageEvent, ImageRecord, Lease, StoreError, distribution_source_key,
    distribution_sources,
};

/// Namespace the kubelet's CRI plugin keeps its images in.
pub const K8S_NAMESPACE: &str = "k8s.io";

impl From<CtrDescriptor> for Descriptor {
    fn from(d: CtrDescriptor) -> Self {
        Self { media_type: d.media_type, digest: d.digest, size: u64::try_from(d.size).unwrap_or(0) }
    }
}

/// Reads image content from one containerd namespace.
#[derive(Clone)]
pub struct ContainerdStore {
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

/// Size of one Read call's range.
pub const DEFAULT_READ_WINDOW: u64 = 16 << 20;

// === impl ContainerdStore ===

impl ContainerdStore {
    /// Connects to containerd's socket. HTTP/2 flow-control windows are
    /// raised well above the 64 KiB protocol default: with the default, a
    /// fast local reader stalls on window updates and reads several times
    /// slower. The stream window bounds what one blob buffers (memory is
    /// streams in flight times this).
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, StoreError> {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .connect_with_connector(tower_service(path.clone()))
            .await
            .map_err(|error| StoreError::Connect { path: path.display().to_string(), error })?;
        let namespace_value = namespace.parse().map_err(|_| StoreError::Namespace(namespace.to_string()))?;
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

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert("containerd-namespace", self.namespace.clone());
        request
    }
}

impl ContentStore for ContainerdStore {
    type Lease = ContainerdLease;

    fn namespace(&self) -> &str {
        &self.namespace_name
    }

    async fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
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

    /// Image records created, updated and deleted in this namespace, as
    /// containerd publishes them (the kubelet pulling or removing images).
    async fn image_events(
        &self,
    ) -> Result<impl Stream<Item = Result<ImageEvent, StoreError>> + Send + 'static, StoreError> {
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

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
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

    async fn info(&self, digest: &str) -> Result<Option<BlobInfo>, StoreError> {
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

    /// Labels the blob the way containerd labels content it pulled.
    async fn add_distribution_source(
        &self,
        digest: &str,
        host: &str,
        repository: &str,
        existing: Option<&str>,
    ) -> Result<(), StoreError> {
        let key = distribution_source_key(host);
        let Some(value) = distribution_sources(&key, existing, repository) else { return Ok(()) };
        let info = containerd_client::services::v1::Info {
            digest: digest.to_string(),
            labels: HashMap::from([(key.clone(), value)]),
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

    /// Streams a blob in read windows, or from the content directory. The
    /// stream never holds more than one message or chunk, so memory stays
    /// flat whatever the blob size.
    fn read(&self, digest: &str, size: u64) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        self.read_blob(digest, size)
    }

    /// Holds a containerd lease until released, so garbage collection
    /// cannot remove the blobs being pushed even if the kubelet deletes the
    /// image meanwhile. A lease never released still expires by its
    /// `containerd.io/gc.expire` label.
    async fn lease(&self, expire: Duration) -> Result<ContainerdLease, StoreError> {
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
        Ok(ContainerdLease { store: self.clone(), id })
    }
}

/// A containerd lease protecting the blobs added to it.
pub struct ContainerdLease {
    store: ContainerdStore,
    id: String,
}

// === impl ContainerdLease ===

impl Lease for ContainerdLease {
    fn id(&self) -> &str {
        &self.id
    }

    async fn protect(&self, digest: &str) -> Result<(), StoreError> {
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

    async fn release(self) -> Result<(), StoreError> {
        let mut leases = LeasesClient::new(self.store.channel.clone());
        leases
            .delete(self.store.request(DeleteLeaseRequest { id: self.id.clone(), sync: false }))
            .await
            .map_err(|status| call_error("Leases.Delete", &self.id, status))?;
        Ok(())
    }
}

fn call_error(call: &'static str, subject: &str, status: tonic::Status) -> StoreError {
    StoreError::Call { call, subject: subject.to_string(), status: Box::new(status) }
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
