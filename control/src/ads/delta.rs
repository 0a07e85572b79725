//! Incremental (delta) ADS: per resource type the stream keeps what the proxy subscribed to
//! (everything, for a wildcard subscription) and the version of every resource it was sent,
//! and each response carries only the resources whose version changed and the names that
//! went away. A reconnecting proxy names what it has (`initial_resource_versions`) and gets
//! only what differs. A push bigger than [`CHUNK_BYTES`] (4 KiB) goes as several responses (each
//! nonce `<push>-<k>`; the last one's ACK is the push's), which bounds what each stream's
//! encoder keeps: tonic reuses one buffer per stream, as large as the largest message it has
//! encoded. Pushes go in Envoy's order (clusters, endpoints, listeners, routes);
//! a NACK is recorded with its text and not retried until the configuration changes; a
//! request answering a nonce that is not the last one sent is stale and ignored.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lumen_api::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tonic::Status;

use super::scope::Scope;
use super::wire::{Outgoing, Parts, Requests, Tx};
use super::{
    KNOWN_TYPES, MAX_SUBSCRIBED_NAMES, Subscription, XdsState, connect_node, is_wildcard_type,
    served_type,
};
use crate::translate::{NameIndex, ProxyNode, ProxyResources};

/// One type's delta state.
#[derive(Debug, Default)]
struct DeltaSub {
    scope: Scope,
    /// What a reconnecting proxy said it has (`initial_resource_versions`), until the first
    /// response; after it, the proxy has the subscribed part of the stream's resources.
    listed: Option<BTreeMap<String, u64>>,
    started: bool,
}

/// What the proxy has of a type before a response.
enum Had<'a> {
    /// What it listed on connecting (nothing, for a new proxy).
    Listed(&'a BTreeMap<String, u64>),
    /// The part of these resources this scope covered.
    Was(&'a Scope, &'a ProxyResources),
}

impl Had<'_> {
    /// The version of `name` the proxy has, if any.
    fn version(&self, ty: &str, name: &str, hint: Option<(usize, &Arc<NameIndex>)>) -> Option<u64> {
        match self {
            Had::Listed(m) => m.get(name).copied(),
            Had::Was(scope, res) => {
                let (r, at) = res.find(ty, name, hint)?;
                let index = res.shared(ty).1;
                scope.covers(name, at.zip(index)).then_some(r.version)
            }
        }
    }

    /// Every name the proxy has.
    fn names(&self, ty: &str) -> Vec<String> {
        match self {
            Had::Listed(m) => m.keys().cloned().collect(),
            Had::Was(scope, res) => {
                let (shared, index) = res.shared(ty);
                let mut out: Vec<String> = shared
                    .iter()
                    .enumerate()
                    .filter(|(i, r)| scope.covers(&r.name, index.map(|ix| (*i, ix))))
                    .map(|(_, r)| r.name.clone())
                    .collect();
                out.extend(
                    res.own(ty)
                        .into_iter()
                        .filter(|r| scope.covers(&r.name, None))
                        .map(|r| r.name.clone()),
                );
                out
            }
        }
    }
}

/// The most resource bytes one response carries (a single bigger resource goes alone):
/// a push of a thousand clusters goes as a few responses, each far below the 4 MiB a gRPC
/// client takes by default.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// What one push sends: the changed resources in chunks of at most [`CHUNK_BYTES`], each a
/// response, and the removed names, with the last.
struct Push {
    version: String,
    chunks: Vec<Parts>,
    removed: Vec<String>,
    /// Resources the proxy has after it (`/debug/syncz`).
    count: usize,
}

/// The push that brings the proxy from what it `had` to what `scope` covers of `now`, if
/// any changed (`always`: answer even with nothing, as a first request needs).
/// A name subscribed on the first request that does not exist is answered as removed once,
/// so the proxy need not wait for it.
fn diff(
    ty: &'static str,
    had: &Had<'_>,
    scope: &Scope,
    now: &ProxyResources,
    always: bool,
    first: bool,
) -> Option<Push> {
    let (shared, index) = now.shared(ty);
    let mut changed = Vec::new();
    let mut system = DefaultHasher::new();
    let mut count = 0;
    let present = shared
        .iter()
        .enumerate()
        .map(|(i, r)| (r, index.map(|ix| (i, ix))))
        .chain(now.own(ty).into_iter().map(|r| (r, None)));
    for (r, at) in present {
        if !scope.covers(&r.name, at) {
            continue;
        }
        count += 1;
        (&r.name, r.version).hash(&mut system);
        if had.version(ty, &r.name, at) != Some(r.version) {
            changed.push(r);
        }
    }
    // Gone, or no longer subscribed: removed.
    let has_now = |name: &str| {
        now.find(ty, name, None)
            .is_some_and(|(_, at)| scope.covers(name, at.zip(index)))
    };
    let mut removed: Vec<String> = had.names(ty).into_iter().filter(|n| !has_now(n)).collect();
    if first && !scope.wildcard {
        for n in &scope.extra {
            if now.find(ty, n, None).is_none() && !removed.contains(n) {
                removed.push(n.clone());
            }
        }
    }
    if changed.is_empty() && removed.is_empty() && !always {
        return None;
    }
    let mut chunks = Vec::new();
    let mut chunk = Parts::default();
    let mut bytes = 0;
    for r in changed {
        if bytes > 0 && bytes + r.delta_wire.len() > CHUNK_BYTES {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += r.delta_wire.len();
        chunk.push(&r.delta_wire);
    }
    chunks.push(chunk);
    Some(Push {
        version: format!("{:016x}", system.finish()),
        chunks,
        removed,
        count,
    })
}

async fn push(
    state: &XdsState,
    tx: &Tx,
    ty: &'static str,
    status: &mut Subscription,
    push: Push,
) -> Result<(), ()> {
    let nonce = state.next_nonce.fetch_add(1, Ordering::Relaxed).to_string();
    status.sent_version = Some(push.version.clone());
    status.sent_nonce = nonce.clone();
    status.chunks = push.chunks.len();
    status.resources = push.count;
    status.nack = None;
    let last = push.chunks.len() - 1;
    let mut removed = push.removed;
    for (k, chunk) in push.chunks.into_iter().enumerate() {
        let head = DeltaDiscoveryResponse {
            system_version_info: push.version.clone(),
            type_url: ty.to_string(),
            nonce: format!("{nonce}-{k}"),
            removed_resources: if k == last {
                std::mem::take(&mut removed)
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        state.send(tx, Outgoing::with_parts(&head, chunk)).await?;
    }
    Ok(())
}

/// Runs one delta ADS stream to its end; returns the node id, if one was learnt.
pub(super) async fn run(
    state: &XdsState,
    stream: u64,
    mut requests: Requests<DeltaDiscoveryRequest>,
    tx: &Tx,
) -> Option<String> {
    let mut model_rx = state.model.clone();
    let mut node: Option<ProxyNode> = None;
    let mut resources = ProxyResources::default();
    let mut subs: HashMap<&'static str, DeltaSub> = HashMap::new();
    let mut status: HashMap<&'static str, Subscription> = HashMap::new();
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
                    Err(e) => {
                        tracing::debug!(stream, error = %e, "delta ads stream error");
                        break;
                    }
                };
                if node.is_none() {
                    match connect_node(state, stream, req.node.as_ref(), &mut model_rx, "delta") {
                        Ok((n, r)) => (node, resources) = (Some(n), r),
                        Err(status) => {
                            let _ = tx.send(Box::new(Err(status))).await;
                            return None;
                        }
                    }
                }
                let Some(n) = node.as_ref() else { break };
                let Some(ty) = served_type(stream, &req.type_url) else { continue };
                let st = status.entry(ty).or_default();
                if !req.response_nonce.is_empty() {
                    // `<push>-<chunk>`: a response of the last push, or a stale one.
                    let (push_nonce, chunk) = req
                        .response_nonce
                        .split_once('-')
                        .map_or((req.response_nonce.as_str(), None), |(p, k)| (p, k.parse::<usize>().ok()));
                    if push_nonce != st.sent_nonce {
                        tracing::debug!(stream, type_url = ty, nonce = %req.response_nonce, "stale nonce ignored");
                        continue;
                    }
                    match &req.error_detail {
                        Some(detail) => {
                            tracing::warn!(stream, node = %n.id, type_url = ty, error = %detail.message, "proxy rejected configuration (delta NACK)");
                            st.nack = Some(detail.message.clone());
                        }
                        // The push is ACKed with its last response (unless a chunk of it was
                        // NACKed).
                        None if chunk == Some(st.chunks.saturating_sub(1)) && st.nack.is_none() => {
                            st.acked_version = st.sent_version.clone().unwrap_or_default();
                        }
                        None => {}
                    }
                }
                let sub = subs.entry(ty).or_default();
                let first = !sub.started;
                if first {
                    // Wildcard types with no names (or "*") mean everything; a reconnecting
                    // proxy says what it already has.
                    sub.scope.index = resources.shared(ty).1.cloned();
                    sub.scope.wildcard = is_wildcard_type(ty)
                        && (req.resource_names_subscribe.is_empty()
                            || req.resource_names_subscribe.iter().any(|n| n == "*"));
                    sub.listed = Some(
                        req.initial_resource_versions
                            .iter()
                            .map(|(name, v)| (name.clone(), u64::from_str_radix(v, 16).unwrap_or(0)))
                            .collect(),
                    );
                }
                let before = sub.scope.clone();
                for name in &req.resource_names_subscribe {
                    if name == "*" {
                        sub.scope.wildcard = true;
                    } else {
                        sub.scope.insert(name);
                    }
                }
                for name in &req.resource_names_unsubscribe {
                    if name == "*" {
                        sub.scope.wildcard = false;
                    } else {
                        sub.scope.remove(name);
                    }
                }
                if sub.scope.len() > MAX_SUBSCRIBED_NAMES {
                    let _ = tx
                        .send(Box::new(Err(Status::resource_exhausted(format!(
                            "more than {MAX_SUBSCRIBED_NAMES} {ty} names subscribed on one stream"
                        )))))
                        .await;
                    break;
                }
                let subscribing =
                    !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
                if first || subscribing {
                    let listed = sub.listed.take();
                    let had = match &listed {
                        Some(m) => Had::Listed(m),
                        None => Had::Was(&before, &resources),
                    };
                    let out = diff(ty, &had, &sub.scope, &resources, first, first);
                    sub.started = true;
                    if let Some(out) = out
                        && push(state, tx, ty, st, out).await.is_err()
                    {
                        break;
                    }
                }
                state.record(stream, n, &status);
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
                for ty in KNOWN_TYPES {
                    let (Some(sub), Some(st)) = (subs.get_mut(ty), status.get_mut(ty)) else {
                        continue;
                    };
                    if !sub.started {
                        continue;
                    }
                    let before = sub.scope.clone();
                    sub.scope.rebase(old.shared(ty).0, resources.shared(ty).1);
                    if let Some(out) = diff(ty, &Had::Was(&before, &old), &sub.scope, &resources, false, false)
                        && push(state, tx, ty, st, out).await.is_err()
                    {
                        closed = true;
                        break;
                    }
                }
                if closed {
                    break;
                }
                state.record(stream, n, &status);
            }
        }
    }
    node.map(|n| n.id)
}
