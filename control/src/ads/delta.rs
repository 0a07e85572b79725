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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lumen_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::{Status, Streaming};

use super::{
    KNOWN_TYPES, MAX_SUBSCRIBED_NAMES, Subscription, XdsState, connect_node, is_wildcard_type,
    served_type,
};
use crate::translate::{NameIndex, NamedResource, ProxyNode, ProxyResources};

/// A type's subscription: everything (wildcard), or names. Names among the shared
/// resources are bits over their positions (a [`NameIndex`]), so a proxy subscribed to
/// every endpoint of a thousand services costs a stream 125 bytes, not a thousand strings;
/// other names (the proxy's own resources, routes, names that do not exist) are kept as
/// they are.
#[derive(Debug, Clone, Default)]
struct Scope {
    wildcard: bool,
    bits: Vec<u64>,
    index: Option<Arc<NameIndex>>,
    extra: BTreeSet<String>,
}

impl Scope {
    fn bit(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    fn set_bit(&mut self, i: usize, on: bool) {
        let w = i / 64;
        if self.bits.len() <= w {
            if !on {
                return;
            }
            self.bits.resize(w + 1, 0);
        }
        if on {
            self.bits[w] |= 1 << (i % 64);
        } else {
            self.bits[w] &= !(1 << (i % 64));
        }
    }

    /// Whether `name` is subscribed; `at` is its position among shared resources indexed
    /// by an index, when it is one of them (a bit to test when that is this scope's index).
    fn covers(&self, name: &str, at: Option<(usize, &Arc<NameIndex>)>) -> bool {
        if self.wildcard {
            return true;
        }
        match (at, &self.index) {
            (Some((i, index)), Some(mine)) if Arc::ptr_eq(index, mine) => self.bit(i),
            _ => {
                self.extra.contains(name)
                    || self
                        .index
                        .as_ref()
                        .and_then(|ix| ix.position(name))
                        .is_some_and(|i| self.bit(i))
            }
        }
    }

    fn insert(&mut self, name: &str) {
        match self.index.as_ref().and_then(|ix| ix.position(name)) {
            Some(i) => self.set_bit(i, true),
            None => {
                self.extra.insert(name.to_string());
            }
        }
    }

    fn remove(&mut self, name: &str) {
        match self.index.as_ref().and_then(|ix| ix.position(name)) {
            Some(i) => self.set_bit(i, false),
            None => {
                self.extra.remove(name);
            }
        }
    }

    /// Names subscribed (wildcard aside).
    fn len(&self) -> usize {
        self.bits
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
            + self.extra.len()
    }

    /// Moves the names onto `index`, the shared resources' index now; `old` is the list
    /// the bits referred to.
    fn rebase(&mut self, old: &[NamedResource], index: Option<&Arc<NameIndex>>) {
        let same = match (&self.index, index) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let bits = std::mem::take(&mut self.bits);
        let mut names: Vec<String> = Vec::new();
        for (w, word) in bits.iter().enumerate() {
            for b in 0..64 {
                if (word >> b) & 1 == 1
                    && let Some(r) = old.get(w * 64 + b)
                {
                    names.push(r.name.clone());
                }
            }
        }
        let extra = std::mem::take(&mut self.extra);
        self.index = index.cloned();
        for name in names.iter().chain(&extra) {
            self.insert(name);
        }
    }
}

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

/// The most resource bytes one response carries (a single bigger resource goes alone).
pub const CHUNK_BYTES: usize = 4 * 1024;

/// The responses that bring the proxy from what it `had` to what `scope` covers of `now`,
/// if any changed (`always`: answer even with nothing, as a first request needs): the
/// changed resources in chunks of at most [`CHUNK_BYTES`], the removed names with the last.
/// A name subscribed on the first request that does not exist is answered as removed once,
/// so the proxy need not wait for it.
fn diff(
    ty: &'static str,
    had: &Had<'_>,
    scope: &Scope,
    now: &ProxyResources,
    always: bool,
    first: bool,
) -> Option<(Vec<DeltaDiscoveryResponse>, usize)> {
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
            changed.push(Resource {
                name: r.name.clone(),
                version: format!("{:016x}", r.version),
                resource: Some(r.resource.clone()),
                ..Default::default()
            });
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
    tx: &super::Tx<DeltaDiscoveryResponse>,
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
        tx.send(Box::new(Ok(response))).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Runs one delta ADS stream to its end; returns the node id, if one was learnt.
pub(super) async fn run(
    state: &XdsState,
    stream: u64,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: &super::Tx<DeltaDiscoveryResponse>,
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
                        && push(state, tx, st, out).await.is_err()
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

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_api::pb::google::protobuf::Any;

    fn named(names: &[&str]) -> Vec<NamedResource> {
        names
            .iter()
            .map(|n| NamedResource::new((*n).to_string(), Any::default()))
            .collect()
    }

    #[test]
    fn a_scope_keeps_shared_names_as_bits_and_carries_them_to_a_new_index() {
        let old = named(&["a", "b", "c"]);
        let old_index = NameIndex::for_tests(&old);
        let mut scope = Scope {
            index: Some(old_index.clone()),
            ..Scope::default()
        };
        scope.insert("b");
        scope.insert("later");
        assert!(scope.covers("b", Some((1, &old_index))));
        assert!(!scope.covers("a", Some((0, &old_index))));
        assert!(scope.covers("later", None));
        assert_eq!((scope.len(), scope.extra.len()), (2, 1));
        // A new list: b moved, the name that did not exist now does.
        let new = named(&["later", "c", "b"]);
        let new_index = NameIndex::for_tests(&new);
        scope.rebase(&old, Some(&new_index));
        assert!(scope.covers("b", Some((2, &new_index))));
        assert!(scope.covers("later", Some((0, &new_index))));
        assert!(!scope.covers("c", Some((1, &new_index))));
        assert!(scope.extra.is_empty(), "{:?}", scope.extra);
        scope.remove("b");
        assert_eq!(scope.len(), 1);
    }
}
