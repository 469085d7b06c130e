//! A reverse proxy in front of a registry that counts the requests that
//! matter to a pusher (uploads, mounts, manifest PUTs, reads) and injects faults:
//! 503s, 429s with Retry-After, and connections dropped mid-upload.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;

/// Which requests to break. Counts start at 1; `Some(3)` breaks every third.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Answer 503 to every Nth request.
    pub unavailable_every: Option<u64>,
    /// Answer 429 with `Retry-After: 1` to every Nth request.
    pub throttle_every: Option<u64>,
    /// Drop the connection in the middle of every Nth blob upload body.
    pub drop_upload_every: Option<u64>,
    /// Hold every blob upload until this is cleared: a copy stays in the
    /// middle for as long as a test needs.
    pub hold_uploads: bool,
    /// Answer 403 to every blob read (GET …/blobs/sha256:…): a registry
    /// that serves manifests, but not layers, to these credentials.
    pub refuse_blob_reads: bool,
    /// Answer 403 to every blob upload start (POST …/blobs/uploads/): a
    /// registry whose policy refuses these pushes.
    pub refuse_uploads: bool,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Blob uploads the registry completed (PUT …/blobs/uploads/… → 201).
    pub uploads: AtomicU64,
    pub upload_bytes: AtomicU64,
    /// Mount requests the registry completed (POST ?mount= → 201).
    pub mounts: AtomicU64,
    pub manifest_puts: AtomicU64,
    pub faults: AtomicU64,
    /// Blob uploads being held now.
    pub held: AtomicU64,
    /// What was read (GET …/blobs/… and …/manifests/… → 200), by the last
    /// path segment: a digest or a tag.
    pub reads: std::sync::Mutex<Vec<String>>,
}

pub struct Proxy {
    port: u16,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
    state: Arc<State>,
}

struct State {
    upstream: String,
    faults: std::sync::RwLock<Faults>,
    counters: Arc<Counters>,
    client: reqwest::Client,
    upload_puts: AtomicU64,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl Proxy {
    /// Proxies `127.0.0.1:PORT` to the plain-HTTP registry at `upstream_host`.
    pub async fn start(upstream_host: &str, faults: Faults) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let state = Arc::new(State {
            upstream: format!("http://{upstream_host}"),
            faults: std::sync::RwLock::new(faults),
            counters: counters.clone(),
            client: reqwest::Client::builder().http1_only().build()?,
            upload_puts: AtomicU64::new(0),
        });
        let shared_state = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { port, counters, task, state: shared_state })
    }

    /// Changes the faults from the next request on (a registry recovering,
    /// or starting to fail).
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.write().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn uploads(&self) -> u64 {
        self.counters.uploads.load(Relaxed)
    }

    /// Blob uploads held now (see [`Faults::hold_uploads`]).
    pub fn held(&self) -> u64 {
        self.counters.held.load(Relaxed)
    }

    pub fn mounts(&self) -> u64 {
        self.counters.mounts.load(Relaxed)
    }

    pub fn faults(&self) -> u64 {
        self.counters.faults.load(Relaxed)
    }

    /// Blobs and manifests read through the proxy, by digest or tag.
    pub fn reads(&self) -> Vec<String> {
        self.counters.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(status: StatusCode, headers: &[(&str, &str)], body: &'static str) -> Response<Body> {
    let mut response = Response::builder().status(status);
    for (k, v) in headers {
        response = response.header(*k, *v);
    }
    response
        .body(http_body_util::Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed())
        .expect("static response")
}

async fn handle(state: Arc<State>, request: Request<hyper::body::Incoming>) -> Result<Response<Body>, std::io::Error> {
    let n = state.counters.requests.fetch_add(1, Relaxed) + 1;
    let faults = state.faults.read().unwrap_or_else(|p| p.into_inner()).clone();
    let hits = |every: Option<u64>| every.is_some_and(|k| k > 0 && n.is_multiple_of(k));
    if hits(faults.unavailable_every) {
        state.counters.faults.fetch_add(1, Relaxed);
        return Ok(full(
            StatusCode::SERVICE_UNAVAILABLE,
            &[],
            "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"injected fault\"}]}",
        ));
    }
    if hits(faults.throttle_every) {
        state.counters.faults.fetch_add(1, Relaxed);
        return Ok(full(
            StatusCode::TOO_MANY_REQUESTS,
            &[("retry-after", "1")],
            "{\"errors\":[{\"code\":\"TOOMANYREQUESTS\"}]}",
        ));
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    if faults.refuse_blob_reads && method == hyper::Method::GET && path.contains("/blobs/sha256:") {
        state.counters.faults.fetch_add(1, Relaxed);
        return Ok(full(
            StatusCode::FORBIDDEN,
            &[],
            "{\"errors\":[{\"code\":\"DENIED\",\"message\":\"injected fault: no layers for these credentials\"}]}",
        ));
    }
    if faults.refuse_uploads && method == hyper::Method::POST && path.contains("/blobs/uploads/") {
        state.counters.faults.fetch_add(1, Relaxed);
        return Ok(full(
            StatusCode::FORBIDDEN,
            &[],
            "{\"errors\":[{\"code\":\"DENIED\",\"message\":\"injected fault: pushes refused by policy\"}]}",
        ));
    }
    let is_upload_put = method == hyper::Method::PUT && path.contains("/blobs/uploads/");
    if is_upload_put && faults.hold_uploads {
        state.counters.held.fetch_add(1, Relaxed);
        while state.faults.read().unwrap_or_else(|p| p.into_inner()).hold_uploads {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        state.counters.held.fetch_sub(1, Relaxed);
    }
    let drop_this = is_upload_put && {
        let k = state.upload_puts.fetch_add(1, Relaxed) + 1;
        faults.drop_upload_every.is_some_and(|every| every > 0 && k.is_multiple_of(every))
    };
    let url = match request.uri().path_and_query() {
        Some(pq) => format!("{}{pq}", state.upstream),
        None => state.upstream.clone(),
    };
    let mut forward = state.client.request(method.clone(), url);
    for (name, value) in request.headers() {
        if name != hyper::header::HOST {
            forward = forward.header(name, value);
        }
    }
    if let Some(host) = request.headers().get(hyper::header::HOST) {
        forward = forward.header("x-forwarded-host", host).header("x-forwarded-proto", "http");
    }
    let counters = state.counters.clone();
    let mut body_stream = request.into_body().into_data_stream().map_err(std::io::Error::other);
    if drop_this {
        // Take part of the body, then vanish as a crashed proxy or a
        // reset connection would.
        let _ = body_stream.next().await;
        counters.faults.fetch_add(1, Relaxed);
        return Err(std::io::Error::other("injected dropped connection"));
    }
    let byte_counter = counters.clone();
    let body_stream = body_stream.inspect_ok(move |chunk| {
        if is_upload_put {
            byte_counter.upload_bytes.fetch_add(chunk.len() as u64, Relaxed);
        }
    });
    let response = forward.body(reqwest::Body::wrap_stream(body_stream)).send().await.map_err(std::io::Error::other)?;
    let status = response.status();
    let read = method == hyper::Method::GET && (path.contains("/blobs/sha256:") || path.contains("/manifests/"));
    if status == StatusCode::OK && read {
        let object = path.rsplit('/').next().unwrap_or_default().to_string();
        counters.reads.lock().unwrap_or_else(|p| p.into_inner()).push(object);
    }
    if status == StatusCode::CREATED {
        if is_upload_put {
            counters.uploads.fetch_add(1, Relaxed);
        } else if method == hyper::Method::POST && query.contains("mount=") {
            counters.mounts.fetch_add(1, Relaxed);
        } else if method == hyper::Method::PUT && path.contains("/manifests/") {
            counters.manifest_puts.fetch_add(1, Relaxed);
        }
    }
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let stream = response.bytes_stream().map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
    builder.body(BodyExt::boxed(StreamBody::new(stream))).map_err(std::io::Error::other)
}
