//! The resources users write, as Rust types deriving `kube::CustomResource`: Istio's
//! VirtualService and DestinationRule (`istio.rs`) and Gateway API's HTTPRoute and GRPCRoute
//! (`gateway.rs`). The CRDs in `deploy/crds/` are generated from these types
//! ([`crd_files`]); `control/tests/crds.rs` fails when the two drift apart.

pub mod gateway;
pub mod istio;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API versions Istio serves its networking kinds under, newest (the stored one) first:
/// the schema is the same, so YAML written for any of them reads as v1.
pub const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// A CRD served under every version in `versions` (the first stored), one schema for all.
fn with_versions(mut crd: CustomResourceDefinition, versions: &[&str]) -> CustomResourceDefinition {
    if let Some(first) = crd.spec.versions.first().cloned() {
        crd.spec.versions = versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut version = first.clone();
                version.name = (*v).to_string();
                version.storage = i == 0;
                version.served = true;
                version
            })
            .collect();
    }
    crd
}

/// Every CRD Lumen reads, by the file under `deploy/crds/` it is written to.
pub fn crds() -> Vec<(&'static str, Vec<CustomResourceDefinition>)> {
    vec![
        (
            "istio-networking.yaml",
            vec![
                with_versions(istio::VirtualService::crd(), &ISTIO_VERSIONS),
                with_versions(istio::DestinationRule::crd(), &ISTIO_VERSIONS),
            ],
        ),
        (
            "gateway-api-routes.yaml",
            vec![gateway::HTTPRoute::crd(), gateway::GRPCRoute::crd()],
        ),
    ]
}

/// The text of each file under `deploy/crds/`: multi-document YAML as `kubectl apply -f`
/// takes it, with a header saying where it comes from.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|(file, crds)| {
            let mut text = String::from(
                "# Generated from control/src/crd by `LUMEN_WRITE_CRDS=1 cargo test -p lumen-control --test crds`.\n# Do not edit: change the Rust types and regenerate.\n",
            );
            for crd in crds {
                text.push_str("---\n");
                text.push_str(&serde_yaml::to_string(&crd)?);
            }
            Ok((file, text))
        })
        .collect()
}

/// One YAML document read as the resource its `apiVersion` and `kind` say.
#[derive(Debug, Clone)]
pub enum Document {
    VirtualService(Box<istio::VirtualService>),
    DestinationRule(Box<istio::DestinationRule>),
    HttpRoute(Box<gateway::HTTPRoute>),
    GrpcRoute(Box<gateway::GRPCRoute>),
    /// A kind this module does not type (the core kinds the model reads itself, and those
    /// out of Lumen's scope).
    Other {
        api_version: String,
        kind: String,
    },
}

/// Why a document could not be read as its kind: the field path (`spec.http[0].match[0].uri`)
/// and what is wrong there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {path}: {message}")]
pub struct DocumentError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub path: String,
    pub message: String,
}

/// The API versions each typed kind is read under.
fn versions_of(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (group, kind) {
        ("networking.istio.io", "VirtualService" | "DestinationRule") => Some(&ISTIO_VERSIONS),
        ("gateway.networking.k8s.io", "HTTPRoute") => Some(&["v1", "v1beta1"]),
        ("gateway.networking.k8s.io", "GRPCRoute") => Some(&["v1", "v1alpha2"]),
        _ => None,
    }
}

/// Reads one document. A typed kind's `spec` is read strictly: an unknown field, a wrong type
/// or a missing required field is an error naming its path; so is an API version the kind is
/// not served under.
pub fn parse_document(value: &serde_yaml::Value) -> Result<Document, DocumentError> {
    fn text(v: Option<&serde_yaml::Value>) -> &str {
        v.and_then(|v| v.as_str()).unwrap_or_default()
    }
    let api_version = text(value.get("apiVersion")).to_string();
    let kind = text(value.get("kind")).to_string();
    let meta = value.get("metadata");
    let name = text(meta.and_then(|m| m.get("name"))).to_string();
    let namespace = match text(meta.and_then(|m| m.get("namespace"))) {
        "" => "default".to_string(),
        ns => ns.to_string(),
    };
    let error = |path: &str, message: String| DocumentError {
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        path: path.to_string(),
        message,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let Some(versions) = versions_of(group, &kind) else {
        return Ok(Document::Other {
            api_version: api_version.clone(),
            kind: kind.clone(),
        });
    };
    if !versions.contains(&version) {
        return Err(error(
            "apiVersion",
            format!(
                "{api_version} is not served for {kind}: lumen reads {}",
                versions
                    .iter()
                    .map(|v| format!("{group}/{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if name.is_empty() {
        return Err(error("metadata.name", "is missing".to_string()));
    }
    let metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta = match meta {
        Some(m) => serde_path_to_error::deserialize(m.clone()).map_err(|e| {
            error(
                &format!("metadata.{}", e.path()),
                e.into_inner().to_string(),
            )
        })?,
        None => k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default(),
    };
    fn spec<T: serde::de::DeserializeOwned + Default>(
        value: &serde_yaml::Value,
        error: &dyn Fn(&str, String) -> DocumentError,
    ) -> Result<T, DocumentError> {
        match value.get("spec") {
            None => Err(error("spec", "is missing".to_string())),
            Some(s) => serde_path_to_error::deserialize(s.clone()).map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{path}")
                };
                error(&path, e.into_inner().to_string())
            }),
        }
    }
    let mut doc = match kind.as_str() {
        "VirtualService" => Document::VirtualService(Box::new(istio::VirtualService::new(
            &name,
            spec(value, &error)?,
        ))),
        "DestinationRule" => Document::DestinationRule(Box::new(istio::DestinationRule::new(
            &name,
            spec(value, &error)?,
        ))),
        "HTTPRoute" => Document::HttpRoute(Box::new(gateway::HTTPRoute::new(
            &name,
            spec(value, &error)?,
        ))),
        _ => Document::GrpcRoute(Box::new(gateway::GRPCRoute::new(
            &name,
            spec(value, &error)?,
        ))),
    };
    let slot = match &mut doc {
        Document::VirtualService(r) => &mut r.metadata,
        Document::DestinationRule(r) => &mut r.metadata,
        Document::HttpRoute(r) => &mut r.metadata,
        Document::GrpcRoute(r) => &mut r.metadata,
        Document::Other { .. } => return Ok(doc),
    };
    *slot = metadata;
    slot.namespace = Some(namespace);
    Ok(doc)
}
