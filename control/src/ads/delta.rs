//! Incremental (delta) ADS: per resource type the stream keeps what the proxy subscribed to
//! (everything, for a wildcard subscription) and the version of every resource it was sent,
//! and each response carries only the resources whose version changed and the names that
//! went away. A reconnecting proxy names what it has (`initial_resource_versions`) and gets
//! only what differs. A push bigger than [`CHUNK_BYTES`] goes as several responses (each
//! nonce `<push>-<k>`; the last one's ACK is the push's), which bounds what each stream's
//! encoder keeps: tonic reuses one buffer per stream, as large as the largest message it has
//! encoded. Pushes go in Envoy's order (clusters, endpoints, listeners, routes);
//! a NACK is recorded with its text and not retried until the configuration changes; a
//! request answering a nonce that is not the last one sent is stale and ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::Ordering;

use lumen_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{
    KNOWN_TYPES, MAX_SUBSCRIBED_NAMES, Subscription, XdsState, connect_node, is_wildcard_type,
    served_type,
};
use crate::translate::{ProxyNode, ProxyResources};

/// One type's delta state.
#[derive(Debug, Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy has: resource name → version.
    sent: BTreeMap<String, u64>,
    started: bool,
}

/// The most resource bytes one response carries (a single bigger resource goes alone).
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The responses that bring the proxy from what it has to what it should have, if any
/// changed (`always`: answer even with nothing, as a first request needs): the changed
/// resources in chunks of at most [`CHUNK_BYTES`], the removed names with the last.
fn diff(
    ty: &'static str,
    sub: &mut DeltaSub,
    resources: &ProxyResources,
    always: bool,
) -> Option<(Vec<DeltaDiscoveryResponse>, usize)> {
    let mut changed = Vec::new();
    let mut present = BTreeSet::new();
    for r in resources.of_type(ty) {
        if !(sub.wildcard || sub.names.contains(&r.name)) {
            continue;
        }
        present.insert(r.name.clone());
        if sub.sent.get(&r.name) != Some(&r.version) {
            changed.push(Resource {
                name: r.name.clone(),
                version: format!("{:016x}", r.version),
                resource: Some(r.resource.clone()),
                ..Default::default()
            });
            sub.sent.insert(r.name.clone(), r.version);
        }
    }
    // Gone, or no longer subscribed: removed. A name subscribed that does not exist is
    // answered as removed once, so the proxy need not wait for it.
    let mut removed: Vec<String> = sub
        .sent
        .keys()
        .filter(|n| !present.contains(*n))
        .cloned()
        .collect();
    for n in &removed {
        sub.sent.remove(n);
    }
    if !sub.wildcard {
        for n in &sub.names {
            if !present.contains(n) && !removed.contains(n) && !sub.started {
                removed.push(n.clone());
            }
        }
    }
    sub.started = true;
    if changed.is_empty() && removed.is_empty() && !always {
        return None;
    }
    let mut system = DefaultHasher::new();
    sub.sent.hash(&mut system);
    let count = sub.sent.len();
    let version = format!("{:016x}", system.finish());
    let mut responses = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for r in changed {
        let size = prost::Message::encoded_len(&r);
        if !chunk.is_empty() && bytes + size > CHUNK_BYTES {
            responses.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.push(r);
    }
    responses.push(chunk);
    let last = responses.len() - 1;
    Some((
        responses
            .into_iter()
            .enumerate()
            .map(|(k, resources)| DeltaDiscoveryResponse {
                system_version_info: version.clone(),
                resources,
                type_url: ty.to_string(),
                removed_resources: if k == last {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
                ..Default::default()
            })
            .collect(),
        count,
    ))
}

async fn push(
    state: &XdsState,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    status: &mut Subscription,
    (responses, count): (Vec<DeltaDiscoveryResponse>, usize),
) -> Result<(), ()> {
    let nonce = state.next_nonce.fetch_add(1, Ordering::Relaxed).to_string();
    status.sent_version = responses.first().map(|r| r.system_version_info.clone());
    status.sent_nonce = nonce.clone();
    status.chunks = responses.len();
    status.resources = count;
    status.nack = None;
    for (k, mut response) in responses.into_iter().enumerate() {
        response.nonce = format!("{nonce}-{k}");
        state.pushes.fetch_add(1, Ordering::Relaxed);
        state.pushed_bytes.fetch_add(
            prost::Message::encoded_len(&response) as u64,
            Ordering::Relaxed,
        );
        tx.send(Ok(response)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Runs one delta ADS stream to its end; returns the node id, if one was learnt.
pub(super) async fn run(
    state: &XdsState,
    stream: u64,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> Option<String> {
    let mut model_rx = state.model.clone();
    let mut node: Option<ProxyNode> = None;
    let mut resources = ProxyResources::default();
    let mut subs: HashMap<&'static str, DeltaSub> = HashMap::new();
    let mut status: HashMap<&'static str, Subscription> = HashMap::new();
    loop {
        tokio::select! {
            () = state.closing.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("the control plane is shutting down"))).await;
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
                            let _ = tx.send(Err(status)).await;
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
                    sub.wildcard = is_wildcard_type(ty)
                        && (req.resource_names_subscribe.is_empty()
                            || req.resource_names_subscribe.iter().any(|n| n == "*"));
                    sub.sent = req
                        .initial_resource_versions
                        .iter()
                        .map(|(name, v)| (name.clone(), u64::from_str_radix(v, 16).unwrap_or(0)))
                        .collect();
                }
                for name in &req.resource_names_subscribe {
                    if name == "*" {
                        sub.wildcard = true;
                    } else {
                        sub.names.insert(name.clone());
                    }
                }
                for name in &req.resource_names_unsubscribe {
                    if name == "*" {
                        sub.wildcard = false;
                    } else {
                        sub.names.remove(name);
                    }
                }
                if sub.names.len() > MAX_SUBSCRIBED_NAMES {
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "more than {MAX_SUBSCRIBED_NAMES} {ty} names subscribed on one stream"
                        ))))
                        .await;
                    break;
                }
                let subscribing =
                    !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
                if (first || subscribing)
                    && let Some(out) = diff(ty, sub, &resources, first)
                    && push(state, tx, st, out).await.is_err()
                {
                    break;
                }
                state.record(stream, n, &status);
            }
            changed = model_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(n) = node.as_ref() else { continue };
                resources = state.resources_for(&model_rx.borrow_and_update().clone(), n);
                let mut closed = false;
                for ty in KNOWN_TYPES {
                    let (Some(sub), Some(st)) = (subs.get_mut(ty), status.get_mut(ty)) else {
                        continue;
                    };
                    if let Some(out) = diff(ty, sub, &resources, false)
                        && push(state, tx, st, out).await.is_err()
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
