//! Aggregated Discovery Service (xDS v3) over gRPC: state of the world here, incremental
//! (delta) in [`delta`].
//!
//! One task per proxy stream. A stream learns its node from the first request, then for each
//! resource type keeps what the proxy subscribed to, what was last sent (version, nonce) and
//! what the proxy said about it (ACK or NACK). A request whose nonce is not the last one sent is
//! stale and ignored, a NACK is recorded and not retried until the configuration changes, and
//! every model change is pushed to every stream whose resources it changed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lumen_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use lumen_api::type_url;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tonic::Status;

mod delta;
mod scope;
pub mod service;
pub mod wire;

use scope::Scope;
use wire::{Outgoing, Parts, Requests, Responses, Tx};

use crate::model::Model;
use crate::translate::{NamedResource, Outbound, ProxyNode, ProxyResources, translate};

/// The xDS state shared by every stream and the debug endpoints.
#[derive(Debug)]
pub struct XdsState {
    model: watch::Receiver<Arc<Model>>,
    /// Cancelled when the control plane stops: every ADS stream then ends (UNAVAILABLE), so
    /// proxies reconnect elsewhere instead of holding a stream to a server going away.
    pub closing: tokio_util::sync::CancellationToken,
    proxies: std::sync::Mutex<BTreeMap<u64, ProxyStatus>>,
    next_stream: AtomicU64,
    next_nonce: AtomicU64,
    /// DiscoveryResponses sent, every stream and type together (`/metrics`).
    pub pushes: AtomicU64,
    /// Their encoded bytes (`/metrics`; the delta ÷ state-of-the-world benchmark).
    pub pushed_bytes: AtomicU64,
    /// The translation of the current model that every proxy shares.
    shared: std::sync::Mutex<Shared>,
}

/// The parts of a model's translation every proxy (or every proxy of a namespace) is sent
/// alike, computed once a model and shared.
#[derive(Debug, Default)]
struct Shared {
    model: Option<Arc<Model>>,
    outbound: Arc<Outbound>,
    /// Route tables by namespace, and by pod labels when routes match on them.
    routes: HashMap<RoutesKey, Arc<Vec<NamedResource>>>,
}

/// What `/debug/syncz` reports for one connected proxy (as `istioctl proxy-status`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProxyStatus {
    pub node_id: String,
    pub connected_at_unix: u64,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    /// SYNCED, STALE (sent, not acknowledged yet), NACK.
    pub state: &'static str,
    pub sent_version: String,
    pub acked_version: String,
    pub resources: usize,
    pub nack: Option<String>,
}

/// What a stream sent of one type and what the proxy said of it.
#[derive(Debug, Default)]
struct Subscription {
    sent_version: Option<String>,
    sent_nonce: String,
    /// Responses the last push was split into (delta; each `<nonce>-<k>`): the last one's
    /// ACK is the push's.
    chunks: usize,
    acked_version: String,
    nack: Option<String>,
    resources: usize,
}

/// Whose route tables: a namespace's sidecars, with a pod's labels when routes match on
/// their callers' labels.
type RoutesKey = (String, Option<BTreeMap<String, String>>);

/// The types served, in the order a change is pushed (Envoy's: clusters, then their
/// endpoints, then listeners, then their routes, so nothing names what is not there yet).
const KNOWN_TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
];

/// The most resource names one stream may subscribe to for one type.
pub const MAX_SUBSCRIBED_NAMES: usize = 65_536;

/// Listeners and clusters: no names means everything (xDS protocol).
fn is_wildcard_type(ty: &str) -> bool {
    ty == type_url::LISTENER || ty == type_url::CLUSTER
}

impl XdsState {
    pub fn new(model: watch::Receiver<Arc<Model>>) -> Arc<XdsState> {
        Arc::new(XdsState {
            model,
            closing: tokio_util::sync::CancellationToken::new(),
            proxies: std::sync::Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(1),
            next_nonce: AtomicU64::new(1),
            pushes: AtomicU64::new(0),
            pushed_bytes: AtomicU64::new(0),
            shared: std::sync::Mutex::new(Shared::default()),
        })
    }

    /// What `node` is sent for `model`: the model's shared translation (made by the first
    /// proxy to ask) and the node's own inbound part.
    pub fn resources_for(&self, model: &Arc<Model>, node: &ProxyNode) -> ProxyResources {
        let (outbound, routes) = {
            let Ok(mut shared) = self.shared.lock() else {
                return translate(model, node);
            };
            if !shared.model.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
                shared.model = Some(model.clone());
                let mut outbound = crate::translate::outbound(model);
                outbound.reuse_indexes(&shared.outbound);
                shared.outbound = Arc::new(outbound);
                shared.routes.clear();
            }
            let labels = model
                .uses_source_labels()
                .then(|| crate::translate::pod_labels(model, node).cloned())
                .flatten();
            let routes = shared
                .routes
                .entry((node.namespace.clone(), labels.clone()))
                .or_insert_with(|| {
                    Arc::new(crate::translate::routes(
                        model,
                        &node.namespace,
                        labels.as_ref(),
                    ))
                })
                .clone();
            (shared.outbound.clone(), routes)
        };
        crate::translate::assemble(&outbound, &routes, crate::translate::inbound(model, node))
    }

    /// The model the proxies are being sent.
    pub fn model(&self) -> Arc<Model> {
        self.model.borrow().clone()
    }

    /// A copy of every connected proxy's status.
    pub fn proxy_status(&self) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    fn record(&self, stream: u64, node: &ProxyNode, subs: &HashMap<&'static str, Subscription>) {
        let types = subs
            .iter()
            .map(|(ty, sub)| {
                let state = if sub.nack.is_some() {
                    "NACK"
                } else if sub.sent_version.as_deref() == Some(sub.acked_version.as_str()) {
                    "SYNCED"
                } else {
                    "STALE"
                };
                let status = TypeStatus {
                    state,
                    sent_version: sub.sent_version.clone().unwrap_or_default(),
                    acked_version: sub.acked_version.clone(),
                    resources: sub.resources,
                    nack: sub.nack.clone(),
                };
                (type_url::short(ty), status)
            })
            .collect();
        if let Ok(mut proxies) = self.proxies.lock() {
            let connected_at_unix = proxies.get(&stream).map_or_else(
                || {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                },
                |p| p.connected_at_unix,
            );
            proxies.insert(
                stream,
                ProxyStatus {
                    node_id: node.id.clone(),
                    connected_at_unix,
                    types,
                },
            );
        }
    }

    /// Sends one response on a stream, counted in `/metrics` (a response that could not be
    /// framed goes as the status that ends the stream); `Err` when the stream is gone.
    async fn send(&self, tx: &Tx, out: Result<Outgoing, Status>) -> Result<(), ()> {
        if let Ok(out) = &out {
            self.pushes.fetch_add(1, Ordering::Relaxed);
            self.pushed_bytes
                .fetch_add(out.encoded_len() as u64, Ordering::Relaxed);
        }
        tx.send(Box::new(out)).await.map_err(|_| ())
    }

    fn forget(&self, stream: u64) {
        if let Ok(mut proxies) = self.proxies.lock() {
            proxies.remove(&stream);
        }
    }
}

/// A state-of-the-world ADS stream (`StreamAggregatedResources`).
pub(crate) fn stream_aggregated_resources(
    state: Arc<XdsState>,
    requests: Requests<DiscoveryRequest>,
) -> Responses {
    serve_stream(
        state,
        "state of the world",
        move |state, stream, tx| async move { run_stream(&state, stream, requests, &tx).await },
    )
}

/// An incremental ADS stream (`DeltaAggregatedResources`).
pub(crate) fn delta_aggregated_resources(
    state: Arc<XdsState>,
    requests: Requests<DeltaDiscoveryRequest>,
) -> Responses {
    serve_stream(state, "delta", move |state, stream, tx| async move {
        delta::run(&state, stream, requests, &tx).await
    })
}

/// Runs one stream's task (`run`: to the stream's end, returning the node id it learnt)
/// until the proxy goes or the control plane stops; the body carries what it sends.
fn serve_stream<F, Fut>(state: Arc<XdsState>, protocol: &'static str, run: F) -> Responses
where
    F: FnOnce(Arc<XdsState>, u64, Tx) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let stream = state.next_stream.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let node = run(state.clone(), stream, tx).await;
        state.forget(stream);
        tracing::info!(
            stream,
            protocol,
            node = node.as_deref().unwrap_or("-"),
            "ads stream closed"
        );
    });
    Responses::new(rx)
}

/// The proxy a stream's first request names, and what it is sent; an error status for a
/// node id that is not a sidecar's.
fn connect_node(
    state: &XdsState,
    stream: u64,
    node: Option<&lumen_api::pb::envoy::config::core::v3::Node>,
    model_rx: &mut watch::Receiver<Arc<Model>>,
    protocol: &str,
) -> Result<(ProxyNode, ProxyResources), Status> {
    let id = node.map(|n| n.id.as_str()).unwrap_or_default();
    let n = ProxyNode::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    tracing::info!(stream, node = %n.id, protocol, "proxy connected");
    let model = model_rx.borrow_and_update().clone();
    let resources = state.resources_for(&model, &n);
    Ok((n, resources))
}

/// The served type a request names (logged and `None` for one lumen does not serve).
fn served_type(stream: u64, type_url: &str) -> Option<&'static str> {
    let ty = KNOWN_TYPES.iter().copied().find(|t| *t == type_url);
    if ty.is_none() {
        tracing::warn!(
            stream,
            type_url,
            "request for a resource type lumen does not serve"
        );
    }
    ty
}

/// Runs one ADS stream to its end; returns the node id, if one was learnt.
async fn run_stream(
    state: &XdsState,
    stream: u64,
    mut requests: Requests<DiscoveryRequest>,
    tx: &Tx,
) -> Option<String> {
    let mut model_rx = state.model.clone();
    let mut node: Option<ProxyNode> = None;
    let mut resources = ProxyResources::default();
    let mut subs: HashMap<&'static str, Subscription> = HashMap::new();
    let mut scopes: HashMap<&'static str, Scope> = HashMap::new();
    loop {
        tokio::select! {
            () = state.closing.cancelled() => {
                let _ = tx.send(Box::new(Err(Status::unavailable("the control plane is shutting down")))).await;
                break;
            }
            msg = requests.message() => {
                let req = match msg {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(stream, error = %status, "ads stream error");
                        break;
                    }
                };
                if node.is_none() {
                    match connect_node(state, stream, req.node.as_ref(), &mut model_rx, "state of the world") {
                        Ok((n, r)) => (node, resources) = (Some(n), r),
                        Err(status) => {
                            let _ = tx.send(Box::new(Err(status))).await;
                            return None;
                        }
                    }
                }
                let Some(n) = node.as_ref() else { break };
                let Some(ty) = served_type(stream, &req.type_url) else { continue };
                let sub = subs.entry(ty).or_default();
                if !req.response_nonce.is_empty() && req.response_nonce != sub.sent_nonce {
                    tracing::debug!(stream, type_url = ty, nonce = %req.response_nonce, "stale nonce ignored");
                    continue;
                }
                if let Some(detail) = &req.error_detail {
                    tracing::warn!(stream, node = %n.id, type_url = ty, version = ?sub.sent_version, error = %detail.message, "proxy rejected configuration (NACK)");
                    sub.nack = Some(detail.message.clone());
                    scopes.insert(ty, Scope::listed(is_wildcard_type(ty), &req.resource_names, resources.shared(ty).1));
                    state.record(stream, n, &subs);
                    continue;
                }
                let first = sub.sent_version.is_none();
                if !req.response_nonce.is_empty() {
                    sub.acked_version = req.version_info.clone();
                    sub.nack = None;
                }
                if req.resource_names.len() > MAX_SUBSCRIBED_NAMES {
                    let _ = tx
                        .send(Box::new(Err(Status::resource_exhausted(format!(
                            "more than {MAX_SUBSCRIBED_NAMES} {ty} names subscribed on one stream"
                        )))))
                        .await;
                    break;
                }
                let scope = Scope::listed(is_wildcard_type(ty), &req.resource_names, resources.shared(ty).1);
                let names_changed = scopes.get(ty).is_none_or(|s| !s.same(&scope));
                scopes.insert(ty, scope);
                if (first || names_changed)
                    && let Some(scope) = scopes.get(ty)
                    && send(state, tx, ty, sub, scope, &resources, None).await.is_err()
                {
                    break;
                }
                state.record(stream, n, &subs);
            }
            changed = model_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(n) = node.as_ref() else { continue };
                let old = std::mem::replace(
                    &mut resources,
                    state.resources_for(&model_rx.borrow_and_update().clone(), n),
                );
                let mut closed = false;
                // A cluster or listener sent again warms in Envoy until its endpoints or
                // routes come: after either, those go whole.
                let mut whole = false;
                for ty in KNOWN_TYPES {
                    let (Some(sub), Some(scope)) = (subs.get_mut(ty).filter(|s| s.sent_version.is_some()), scopes.get_mut(ty)) else {
                        continue;
                    };
                    scope.rebase(old.shared(ty).0, resources.shared(ty).1);
                    let from = (!whole || is_wildcard_type(ty)).then_some(&old);
                    match send(state, tx, ty, sub, scope, &resources, from).await {
                        Ok(sent) => whole |= sent && is_wildcard_type(ty),
                        Err(()) => closed = true,
                    }
                }
                if closed {
                    break;
                }
                state.record(stream, n, &subs);
            }
        }
    }
    node.map(|n| n.id)
}

/// Sends the subscribed resources of one type. On a change (`changed_from`: the resources
/// the proxy was sent before), nothing when the proxy already has this version, and for the
/// types whose responses need not be whole (endpoints and routes: xDS lets a state-of-the-
/// world response carry only the named resources that changed) only those that changed.
/// The response is this stream's head and the resources' shared encodings.
async fn send(
    state: &XdsState,
    tx: &Tx,
    ty: &'static str,
    sub: &mut Subscription,
    scope: &Scope,
    resources: &ProxyResources,
    changed_from: Option<&ProxyResources>,
) -> Result<bool, ()> {
    let (shared, index) = resources.shared(ty);
    let selected: Vec<&NamedResource> = shared
        .iter()
        .enumerate()
        .filter(|(i, r)| scope.covers(&r.name, index.map(|ix| (*i, ix))))
        .map(|(_, r)| r)
        .chain(
            resources
                .own(ty)
                .into_iter()
                .filter(|r| scope.covers(&r.name, None)),
        )
        .collect();
    let mut hasher = DefaultHasher::new();
    for r in &selected {
        r.name.hash(&mut hasher);
        r.version.hash(&mut hasher);
    }
    let version = format!("{:016x}", hasher.finish());
    if changed_from.is_some() && sub.sent_version.as_deref() == Some(version.as_str()) {
        return Ok(false);
    }
    let count = selected.len();
    let mut sent = Parts::default();
    for r in selected {
        let unchanged = || {
            changed_from.is_some_and(|old| {
                old.find(ty, &r.name, None)
                    .is_some_and(|(o, _)| o.version == r.version)
            })
        };
        if is_wildcard_type(ty) || !unchanged() {
            sent.push(&r.wire);
        }
    }
    if sent.slices() == 0 {
        // Only removals, which state of the world says by the clusters and listeners.
        return Ok(false);
    }
    let nonce = state.next_nonce.fetch_add(1, Ordering::Relaxed).to_string();
    let head = DiscoveryResponse {
        version_info: version.clone(),
        type_url: ty.to_string(),
        nonce: nonce.clone(),
        ..Default::default()
    };
    sub.resources = count;
    sub.sent_version = Some(version);
    sub.sent_nonce = nonce;
    sub.nack = None;
    state
        .send(tx, Outgoing::with_parts(&head, sent))
        .await
        .map(|()| true)
}
