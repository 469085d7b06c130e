//! WATCH: a chunked 200 response with one `{"type":..,"object":..}` line per
//! event, fed from the store's change history and live broadcast.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::errors::{ApiError, ApiResult};
use super::http::{Body, Query, State};
use super::resources::ResourceType;
use super::selectors::Selectors;
use super::store::{Change, ChangeType, parse_rv, str_field, view};

/// Without `timeoutSeconds` the real server picks 30-60 minutes; tests
/// never wait that long, so one fixed value is enough.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

/// What one stored change means for this watcher, if anything. A change
/// that makes an object stop matching is a DELETED of the previous state at
/// the new resourceVersion, one that makes it match is an ADDED (09.4).
fn event_for(rt: &ResourceType, ns: Option<&str>, sel: &Selectors, change: &Change) -> Option<(&'static str, Value)> {
    if change.type_key != rt.storage() || ns.is_some_and(|n| str_field(&change.object, "namespace") != n) {
        return None;
    }
    let new = view(rt, &change.object);
    let now_matches = sel.matches(&new);
    match change.change {
        ChangeType::Added => now_matches.then_some(("ADDED", new)),
        ChangeType::Deleted => now_matches.then_some(("DELETED", new)),
        ChangeType::Modified => {
            let old = change.prev.as_ref().map(|p| view(rt, p));
            let was_matching = old.as_ref().is_some_and(|o| sel.matches(o));
            match (was_matching, now_matches) {
                (true, true) => Some(("MODIFIED", new)),
                (false, true) => Some(("ADDED", new)),
                (true, false) => {
                    let mut last = old.unwrap_or(new);
                    last["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                    Some(("DELETED", last))
                }
                (false, false) => None,
            }
        }
    }
}

fn chunked(stream: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b)))).boxed_unsync();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_else(|_| Response::new(http_body_util::Empty::new().boxed_unsync()))
}

pub fn serve(
    state: Arc<State>,
    rt: ResourceType,
    namespace: Option<String>,
    sel: Selectors,
    query: &Query,
) -> ApiResult<Response<Body>> {
    let from = match query.get("resourceVersion").filter(|s| !s.is_empty()) {
        None | Some("0") => None,
        Some(rv) => Some(parse_rv(rv).map_err(|_| {
            ApiError::internal(format!(
                "resourceVersion: Invalid value: {rv:?}: strconv.ParseUint: parsing {rv:?}: invalid syntax"
            ))
        })?),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let bookmarks = query.flag("allowWatchBookmarks");
    let start = match state.store.watch(&rt, namespace.as_deref(), from) {
        Ok(start) => start,
        // Too old: still a 200, with one ERROR event, then the end (10.12).
        Err(e) => {
            let error_line = line("ERROR", &e.to_status());
            return Ok(chunked(futures::stream::iter([error_line])));
        }
    };
    let interval = state.bookmark_interval;
    let stream = async_stream::stream! {
        let ns = namespace.as_deref();
        let deadline = tokio::time::Instant::now() + timeout;
        // A resourceVersion from the future: nothing until the store gets there.
        let mut sent_up_to = from.unwrap_or(0).max(start.start_rv);
        for change in &start.initial {
            if let Some((kind, obj)) = event_for(&rt, ns, &sel, change) {
                yield line(kind, &obj);
            }
        }
        let mut receiver = start.receiver;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        // Bookmarks only once a change of this type happened while live (README).
        let mut newest_of_type: Option<u64> = None;
        loop {
            tokio::select! {
                received = receiver.recv() => match received {
                    Ok(change) => {
                        if change.rv <= sent_up_to {
                            continue;
                        }
                        sent_up_to = change.rv;
                        if change.type_key == rt.storage() {
                            newest_of_type = Some(change.rv);
                        }
                        if let Some((kind, obj)) = event_for(&rt, ns, &sel, &change) {
                            yield line(kind, &obj);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let status = ApiError::expired(format!("too old resource version: {sent_up_to}")).to_status();
                        yield line("ERROR", &status);
                        break;
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = ticker.tick(), if bookmarks => {
                    if let Some(rv) = newest_of_type {
                        let bookmark = json!({
                            "kind": rt.kind,
                            "apiVersion": rt.api_version(),
                            "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
                        });
                        yield line("BOOKMARK", &bookmark);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    };
    Ok(chunked(stream))
}
