//! `lumen control --kube`: the model from a Kubernetes API server, watched with kube-rs's
//! runtime watchers, one per kind, feeding the same [`Model`] the config directory feeds.
//!
//! Each kind's objects are cached as the API serves them. A change marks the cache dirty; once
//! the watchers have all listed their kind and changes have been quiet for [`QUIET`] (or
//! [`MAX_DELAY`] after the first), the model is rebuilt from the whole cache and published if
//! it differs, so a flood of changes makes one push, not one per change. After each rebuild
//! every Istio and Gateway API object gets an `Accepted` condition saying whether it applies
//! and, if not, why (the same words `/debug/config` shows); it is written only when it
//! differs from what the object carries, so status writes never loop through the watch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{Model, ModelError, Rejection};

/// How long changes must be quiet before the model is rebuilt.
pub const QUIET: Duration = Duration::from_millis(50);
/// The longest a change waits for quiet: a steady stream of changes still applies.
pub const MAX_DELAY: Duration = Duration::from_millis(250);
/// The name Lumen writes its route statuses under (Gateway API's `controllerName`).
pub const CONTROLLER_NAME: &str = "lumen.dev/control";
/// `origin` of every object read from the API, in rejections.
const ORIGIN: &str = "kubernetes";

/// How a kind reports whether Lumen accepted an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusStyle {
    /// Core kinds: Lumen writes nothing on them.
    None,
    /// Istio's kinds: `status.conditions`, as Istio's own `Reconciled` condition sits.
    Conditions,
    /// Gateway API routes: one `status.parents` entry per parent reference, by controller.
    RouteParents,
}

/// A kind Lumen watches.
#[derive(Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    status: StatusStyle,
}

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The kinds the model is built from, in the order they are read (Services before the
/// routes that name them, as a config directory is read in file order).
pub const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        status: StatusStyle::None,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        status: StatusStyle::None,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        status: StatusStyle::None,
    },
    Kind {
        group: "networking.istio.io",
        version: "v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "networking.istio.io",
        version: "v1",
        kind: "VirtualService",
        plural: "virtualservices",
        status: StatusStyle::Conditions,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        status: StatusStyle::RouteParents,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        status: StatusStyle::RouteParents,
    },
];

/// The ClusterRole `lumen control --kube` runs under: get, list and watch every kind it
/// reads; patch the status of those it reports on. `deploy/rbac.yaml` is this, written by
/// the CRD drift test (`control/tests/crds.rs`).
pub fn cluster_role() -> k8s_openapi::api::rbac::v1::ClusterRole {
    use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
    let mut groups: BTreeMap<&str, Vec<&Kind>> = BTreeMap::new();
    for kind in KINDS {
        groups.entry(kind.group).or_default().push(kind);
    }
    let mut rules = Vec::new();
    for (group, kinds) in &groups {
        rules.push(PolicyRule {
            api_groups: Some(vec![group.to_string()]),
            resources: Some(kinds.iter().map(|k| k.plural.to_string()).collect()),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        });
        let status: Vec<String> = kinds
            .iter()
            .filter(|k| k.status != StatusStyle::None)
            .map(|k| format!("{}/status", k.plural))
            .collect();
        if !status.is_empty() {
            rules.push(PolicyRule {
                api_groups: Some(vec![group.to_string()]),
                resources: Some(status),
                verbs: vec!["get".into(), "patch".into(), "update".into()],
                ..Default::default()
            });
        }
    }
    ClusterRole {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("lumen-control".into()),
            ..Default::default()
        },
        rules: Some(rules),
        ..Default::default()
    }
}

/// A connection to a Kubernetes API server.
#[derive(Clone)]
pub struct KubeSource {
    client: kube::Client,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("namespace", &self.client.default_namespace())
            .finish_non_exhaustive()
    }
}

/// Objects of one kind by (namespace, name), as last served.
type Objects = BTreeMap<(String, String), Value>;

impl KubeSource {
    /// Connects as `kubectl` would: `KUBECONFIG` or `~/.kube/config`, else the in-cluster
    /// service account.
    pub async fn connect() -> Result<KubeSource, ModelError> {
        let client = kube::Client::try_default().await.map_err(|e| {
            ModelError::Kube(format!("no usable kubeconfig or in-cluster account: {e}"))
        })?;
        Ok(KubeSource { client })
    }

    pub fn from_client(client: kube::Client) -> KubeSource {
        KubeSource { client }
    }

    fn api(&self, kind: &Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &kind.resource())
    }

    /// Lists every kind once: the model a control plane starts with. A kind the server does
    /// not serve (its CRD not installed) counts as empty; an unreachable server fails.
    pub async fn load(&self) -> Result<Model, ModelError> {
        let mut cache: Vec<Objects> = Vec::with_capacity(KINDS.len());
        for kind in KINDS {
            let mut objects = Objects::new();
            match self.api(kind).list(&Default::default()).await {
                Ok(list) => {
                    for object in list.items {
                        insert(&mut objects, object);
                    }
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    tracing::warn!(kind = kind.kind, api_version = %kind.api_version(), "not served by the Kubernetes API (CRD not installed?): none read");
                }
                Err(e) => {
                    return Err(ModelError::Kube(format!(
                        "listing {} {}: {e}",
                        kind.api_version(),
                        kind.plural
                    )));
                }
            }
            cache.push(objects);
        }
        Ok(build(&cache))
    }

    /// Watches every kind until `shutdown`, publishing each new model (see the module's doc).
    pub async fn watch(self, tx: watch::Sender<Arc<Model>>, shutdown: CancellationToken) {
        let streams = KINDS.iter().enumerate().map(|(index, kind)| {
            watcher(self.api(kind), watcher::Config::default())
                .default_backoff()
                .map(move |event| (index, event))
                .boxed()
        });
        let mut events = futures::stream::select_all(streams);
        let mut cache: Vec<Objects> = KINDS.iter().map(|_| Objects::new()).collect();
        // Objects of a kind being re-listed (between Init and InitDone).
        let mut relisting: Vec<Option<Objects>> = KINDS.iter().map(|_| None).collect();
        let mut synced = vec![false; KINDS.len()];
        let mut last_good = LastGood::new();
        // When the first unapplied change came, and the latest.
        let mut dirty: Option<(Instant, Instant)> = None;
        loop {
            let due = match dirty {
                Some((first, last)) if synced.iter().all(|s| *s) => {
                    (last + QUIET).min(first + MAX_DELAY)
                }
                _ => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due) => {
                    dirty = None;
                    let model = build_keeping_good(&cache, &mut last_good);
                    self.write_statuses(&cache, &model).await;
                    if **tx.borrow() != model {
                        tracing::info!(services = model.services.len(), rejected = model.rejected.len(), "configuration changed in the Kubernetes API");
                        tx.send_replace(Arc::new(model));
                    }
                }
                next = events.next() => {
                    let Some((index, event)) = next else { return };
                    let kind = &KINDS[index];
                    let changed = match event {
                        Ok(watcher::Event::Init) => {
                            relisting[index] = Some(Objects::new());
                            false
                        }
                        Ok(watcher::Event::InitApply(object)) => {
                            if let Some(objects) = relisting[index].as_mut() {
                                insert(objects, object);
                            }
                            false
                        }
                        Ok(watcher::Event::InitDone) => {
                            cache[index] = relisting[index].take().unwrap_or_default();
                            synced[index] = true;
                            true
                        }
                        Ok(watcher::Event::Apply(object)) => insert(&mut cache[index], object),
                        Ok(watcher::Event::Delete(object)) => {
                            remove(&mut cache[index], &object)
                        }
                        Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                            if status.code == 404 =>
                        {
                            if !synced[index] {
                                tracing::warn!(kind = kind.kind, api_version = %kind.api_version(), "not served by the Kubernetes API (CRD not installed?): none read; retrying");
                                synced[index] = true;
                                true
                            } else {
                                false
                            }
                        }
                        Err(e) => {
                            tracing::warn!(kind = kind.kind, error = %e, "watching the Kubernetes API; retrying with backoff, the last good configuration stays");
                            false
                        }
                    };
                    if changed {
                        let now = Instant::now();
                        dirty = Some(dirty.map_or((now, now), |(first, _)| (first, now)));
                    }
                }
            }
        }
    }

    /// Writes the `Accepted` condition of every Istio and Gateway API object whose current
    /// status says otherwise. A failed write is logged; the next rebuild tries again.
    async fn write_statuses(&self, cache: &[Objects], model: &Model) {
        let now = now_rfc3339();
        for (index, (kind, objects)) in KINDS.iter().zip(cache).enumerate() {
            if kind.status == StatusStyle::None {
                continue;
            }
            for ((namespace, name), object) in objects {
                let refusal = refused(model, index, namespace, name);
                let Some(status) = wanted_status(kind, object, refusal, &now) else {
                    continue;
                };
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), namespace, &kind.resource());
                let patch = json!({ "status": status });
                if let Err(e) = api
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(kind = kind.kind, namespace, name, error = %e, "writing status");
                }
            }
        }
    }
}

fn key_of(object: &DynamicObject) -> (String, String) {
    (
        object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Caches `object`; true if it differs from what was cached.
fn insert(objects: &mut Objects, object: DynamicObject) -> bool {
    let key = key_of(&object);
    let Ok(value) = serde_json::to_value(&object) else {
        return false;
    };
    if objects.get(&key) == Some(&value) {
        return false;
    }
    objects.insert(key, value);
    true
}

fn remove(objects: &mut Objects, object: &DynamicObject) -> bool {
    objects.remove(&key_of(object)).is_some()
}

/// The model of everything cached, read kind by kind in [`KINDS`] order.
fn build(cache: &[Objects]) -> Model {
    let mut model = Model::default();
    for (kind, objects) in KINDS.iter().zip(cache) {
        for (index, object) in objects.values().enumerate() {
            let mut object = object.clone();
            // List items may come without their type; the watch says what they are.
            if let Some(map) = object.as_object_mut() {
                map.insert("apiVersion".into(), Value::String(kind.api_version()));
                map.insert("kind".into(), Value::String(kind.kind.to_string()));
            }
            let value = match serde_yaml::to_value(&object) {
                Ok(value) => value,
                Err(e) => {
                    tracing::warn!(kind = kind.kind, error = %e, "object not representable");
                    continue;
                }
            };
            if let Err(e) = model.add_value(ORIGIN, index, value) {
                tracing::warn!(kind = kind.kind, error = %e, "object not read");
            }
        }
    }
    model.check();
    model
}

/// Why `model` refused the object `name` of kind `KINDS[kind]`, if it did.
fn refused<'m>(
    model: &'m Model,
    kind: usize,
    namespace: &str,
    name: &str,
) -> Option<&'m Rejection> {
    model
        .rejected
        .iter()
        .find(|r| r.kind == KINDS[kind].kind && r.namespace == namespace && r.name == name)
}

/// The last version of each object that was accepted, by (kind index, namespace, name).
type LastGood = BTreeMap<(usize, String, String), Value>;

/// The model of everything cached where a change to an object that was accepted before is
/// refused, its last accepted version stands in for it: an invalid edit changes nothing (as
/// Istio's validating webhook would have kept it out), and says so in the refusal.
fn build_keeping_good(cache: &[Objects], last_good: &mut LastGood) -> Model {
    last_good.retain(|(kind, namespace, name), _| {
        cache[*kind].contains_key(&(namespace.clone(), name.clone()))
    });
    let first = build(cache);
    let mut stand_ins = Vec::new();
    for ((kind, namespace, name), good) in last_good.iter() {
        let current = cache[*kind].get(&(namespace.clone(), name.clone()));
        if current != Some(good)
            && let Some(r) = refused(&first, *kind, namespace, name)
        {
            stand_ins.push((
                (*kind, namespace.clone(), name.clone()),
                good.clone(),
                r.clone(),
            ));
        }
    }
    let mut model = if stand_ins.is_empty() {
        first
    } else {
        let mut patched = cache.to_vec();
        for ((kind, namespace, name), good, _) in &stand_ins {
            patched[*kind].insert((namespace.clone(), name.clone()), good.clone());
        }
        build(&patched)
    };
    for (kind, objects) in cache.iter().enumerate() {
        for ((namespace, name), object) in objects {
            let standing_in = stand_ins
                .iter()
                .any(|((k, ns, n), _, _)| *k == kind && ns == namespace && n == name);
            if !standing_in && refused(&model, kind, namespace, name).is_none() {
                last_good.insert((kind, namespace.clone(), name.clone()), object.clone());
            }
        }
    }
    for (_, _, mut refusal) in stand_ins {
        refusal.reason = format!(
            "{}; the last accepted version of it stays in force",
            refusal.reason
        );
        model.rejected.push(refusal);
    }
    model
}

/// The status `object` should carry, or None when it already does (conditions compared by
/// type, status, reason, message and observed generation, not by transition time).
fn wanted_status(
    kind: &Kind,
    object: &Value,
    refusal: Option<&Rejection>,
    now: &str,
) -> Option<Value> {
    let generation = object
        .pointer("/metadata/generation")
        .and_then(Value::as_i64);
    let (status, reason, message) = match refusal {
        None => ("True", "Accepted", "applied by lumen control".to_string()),
        Some(r) => ("False", "Invalid", r.reason.clone()),
    };
    let mut condition = json!({
        "type": "Accepted",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    });
    if let Some(generation) = generation {
        condition["observedGeneration"] = json!(generation);
    }
    let same = |have: &Value| {
        ["type", "status", "reason", "message", "observedGeneration"]
            .iter()
            .all(|k| have.get(k) == condition.get(k))
    };
    let accepted = |conditions: Option<&Value>| {
        conditions
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"))
            .is_some_and(same)
    };
    match kind.status {
        StatusStyle::None => None,
        StatusStyle::Conditions => {
            if accepted(object.pointer("/status/conditions")) {
                return None;
            }
            Some(json!({ "conditions": [condition] }))
        }
        StatusStyle::RouteParents => {
            let refs = object
                .pointer("/spec/parentRefs")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let have = object
                .pointer("/status/parents")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ours: Vec<&Value> = have
                .iter()
                .filter(|p| p["controllerName"] == CONTROLLER_NAME)
                .collect();
            let current = ours.len() == refs.len()
                && refs
                    .iter()
                    .zip(&ours)
                    .all(|(r, p)| p.get("parentRef") == Some(r) && accepted(p.get("conditions")));
            if current {
                return None;
            }
            // Other controllers' entries stay; ours are replaced.
            let mut parents: Vec<Value> = have
                .into_iter()
                .filter(|p| p["controllerName"] != CONTROLLER_NAME)
                .collect();
            parents.extend(refs.into_iter().map(|r| {
                json!({
                    "parentRef": r,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [condition.clone()],
                })
            }));
            Some(json!({ "parents": parents }))
        }
    }
}

/// Now as Kubernetes writes times: RFC 3339 in UTC, whole seconds (`2026-11-26T14:00:00Z`).
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}
