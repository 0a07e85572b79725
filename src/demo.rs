//! `lumen demo`: the whole mesh in one process — telemetry with the dashboard, the control
//! plane with the embedded bookinfo configuration, one app and one sidecar per pod (each pod
//! on its own loopback address), and a steady load on productpage.

pub mod apps;
pub mod load;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lumen_api::ports;
use lumen_control::{ConfigSource, Control, ControlOptions, Model};
use lumen_proxy::{ExportOptions, Identity, Proxy, ProxyConfig};
use lumen_telemetry::{Telemetry, TelemetryOptions};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use apps::{App, AppKind};
use load::{LoadOptions, LoadStats};

/// The demo mesh's configuration, embedded so `lumen demo` needs no files.
pub const BOOKINFO_YAML: &str = include_str!("../fixtures/demo/bookinfo.yaml");
pub const ROUTING_YAML: &str = include_str!("../fixtures/demo/routing.yaml");
/// The pod subnet the fixtures are written for.
const FIXTURE_SUBNET: [u8; 3] = [127, 0, 10];

/// Where the demo listens and how hard it works.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// First three octets of the pods' loopback addresses (`127.0.10` → 127.0.10.1, ...).
    pub pod_subnet: [u8; 3],
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub jaeger_grpc_addr: SocketAddr,
    pub xds_addr: SocketAddr,
    pub control_http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub rate_per_s: f64,
    pub load_duration: Option<Duration>,
    pub flush_interval: Duration,
    pub span_export_interval: Duration,
    /// How often each sidecar exports its cumulative metrics.
    pub metric_export_interval: Duration,
    /// The load stops after this many requests (None: no limit).
    pub max_requests: Option<u64>,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo configuration: {0}")]
    Config(#[from] lumen_control::model::ModelError),
    #[error(transparent)]
    Telemetry(#[from] lumen_telemetry::TelemetryError),
    #[error(transparent)]
    Control(#[from] lumen_control::ControlError),
    #[error(transparent)]
    Proxy(#[from] lumen_proxy::ProxyError),
    #[error("binding app {name} on {addr}: {source}")]
    App {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("pod {0} has an app label the demo does not know")]
    UnknownApp(String),
    #[error("sidecars not ready after {0:?}: {1}")]
    NotReady(Duration, String),
}

/// A running demo.
#[derive(Debug)]
pub struct RunningDemo {
    pub telemetry_http: SocketAddr,
    pub otlp_grpc: SocketAddr,
    pub xds: SocketAddr,
    pub control_http: SocketAddr,
    pub pods: Vec<(String, IpAddr)>,
    pub load: Arc<LoadStats>,
    mesh: JoinSet<()>,
    telemetry: tokio::task::JoinHandle<()>,
    mesh_stop: CancellationToken,
    telemetry_stop: CancellationToken,
}

impl DemoOptions {
    /// Every port on 127.0.0.1 picked by the OS, pods on `pod_subnet`: for tests and
    /// benchmarks that run demos side by side.
    pub fn ephemeral(pod_subnet: [u8; 3], data_dir: PathBuf) -> DemoOptions {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        DemoOptions {
            pod_subnet,
            otlp_grpc_addr: any,
            otlp_http_addr: any,
            http_addr: any,
            jaeger_grpc_addr: any,
            xds_addr: any,
            control_http_addr: any,
            ..DemoOptions::standard(data_dir)
        }
    }

    /// The standard ports on 127.0.0.1 and pods on 127.0.10.x.
    pub fn standard(data_dir: PathBuf) -> DemoOptions {
        let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        DemoOptions {
            pod_subnet: FIXTURE_SUBNET,
            otlp_grpc_addr: local(4317),
            otlp_http_addr: local(4318),
            http_addr: local(16686),
            jaeger_grpc_addr: local(16685),
            xds_addr: local(ports::CONTROL_XDS),
            control_http_addr: local(ports::CONTROL_HTTP),
            data_dir,
            rate_per_s: 20.0,
            load_duration: None,
            flush_interval: Duration::from_secs(5),
            span_export_interval: Duration::from_secs(1),
            metric_export_interval: Duration::from_secs(5),
            max_requests: None,
        }
    }
}

/// The demo's model, with pod addresses moved to `subnet`.
pub fn demo_model(subnet: [u8; 3]) -> Result<Model, DemoError> {
    let mut model = Model::from_yaml("fixtures/demo/bookinfo.yaml", BOOKINFO_YAML)?;
    model.add_yaml("fixtures/demo/routing.yaml", ROUTING_YAML)?;
    model.move_pods(FIXTURE_SUBNET, subnet);
    Ok(model)
}

/// Starts every part of the demo; `say` is told what comes up where.
pub async fn start(options: DemoOptions, say: impl Fn(String)) -> Result<RunningDemo, DemoError> {
    let mesh_stop = CancellationToken::new();
    let telemetry_stop = CancellationToken::new();

    let telemetry = Telemetry::bind(TelemetryOptions {
        otlp_grpc_addr: options.otlp_grpc_addr,
        otlp_http_addr: options.otlp_http_addr,
        http_addr: options.http_addr,
        jaeger_grpc_addr: options.jaeger_grpc_addr,
        flush_interval: options.flush_interval,
        ..TelemetryOptions::new(options.data_dir.clone())
    })
    .await?;
    let otlp_grpc = telemetry.otlp_grpc_addr().unwrap_or(options.otlp_grpc_addr);
    let telemetry_http = telemetry.http_addr().unwrap_or(options.http_addr);
    say(format!(
        "telemetry: OTLP gRPC {otlp_grpc}, OTLP HTTP {}, HTTP {telemetry_http}, Jaeger gRPC {}, data {}",
        telemetry.otlp_http_addr().unwrap_or(options.otlp_http_addr),
        telemetry
            .jaeger_grpc_addr()
            .unwrap_or(options.jaeger_grpc_addr),
        options.data_dir.display()
    ));
    let model = demo_model(options.pod_subnet)?;
    let control = Control::bind(ControlOptions {
        xds_addr: options.xds_addr,
        http_addr: options.control_http_addr,
        source: ConfigSource::Static(model.clone()),
    })
    .await?;
    let xds = control.xds_addr().unwrap_or(options.xds_addr);
    let control_http = control.http_addr().unwrap_or(options.control_http_addr);
    say(format!(
        "control: xDS {xds}, HTTP {control_http} ({} services, {} pods, {} VirtualServices)",
        model.services.len(),
        model.pods.len(),
        model.virtual_services.len()
    ));
    let dashboard = lumen_dashboard::router_with(
        Arc::new(telemetry.query_engine()),
        lumen_dashboard::DashboardOptions {
            control_url: Some(format!("http://{control_http}")),
        },
    );
    let telemetry_task = {
        let stop = telemetry_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry.run(dashboard, stop).await {
                tracing::error!(error = %e, "telemetry stopped with an error");
            }
        })
    };

    let mut mesh = JoinSet::new();
    {
        let stop = mesh_stop.clone();
        mesh.spawn(async move {
            if let Err(e) = control.run(stop).await {
                tracing::error!(error = %e, "control plane stopped with an error");
            }
        });
    }

    let mut pods = Vec::new();
    let mut admin_addrs = Vec::new();
    let mut productpage = None;
    for pod in &model.pods {
        let app_label = pod.meta.labels.get("app").cloned().unwrap_or_default();
        let kind = AppKind::from_app_label(&app_label)
            .ok_or_else(|| DemoError::UnknownApp(pod.meta.name.clone()))?;
        let version = pod.meta.labels.get("version").cloned().unwrap_or_default();
        let identity = Identity {
            workload: Model::workload_name(pod),
            namespace: pod.meta.namespace.clone(),
            app: app_label.clone(),
            version: version.clone(),
            pod: pod.meta.name.clone(),
        };
        let config = ProxyConfig::sidecar(
            pod.ip,
            identity,
            format!("http://{xds}"),
            Some(format!("http://{otlp_grpc}")),
        );
        let export = ExportOptions {
            span_interval: options.span_export_interval,
            metric_interval: options.metric_export_interval,
            ..ExportOptions::default()
        };
        let proxy = Proxy::bind(config.clone(), export).await?;
        let app_port = pod
            .container_ports
            .first()
            .map_or(9080, |p| p.container_port);
        let app_addr = SocketAddr::new(pod.ip, app_port);
        let listener = TcpListener::bind(app_addr)
            .await
            .map_err(|source| DemoError::App {
                name: pod.meta.name.clone(),
                addr: app_addr,
                source,
            })?;
        let app = Arc::new(App::new(kind, version, config.outbound_addr));
        say(format!(
            "pod {:<15} app {app_addr}  sidecar outbound {} inbound {} admin {} prometheus {}",
            pod.meta.name,
            config.outbound_addr,
            config.inbound_addr,
            config.admin_addr,
            config.prometheus_addr
        ));
        {
            let stop = mesh_stop.clone();
            mesh.spawn(lumen_proxy::server::serve(
                listener,
                move |req| app.clone().handle(req),
                stop,
            ));
        }
        {
            let stop = mesh_stop.clone();
            mesh.spawn(proxy.run(stop));
        }
        if kind == AppKind::ProductPage {
            productpage = Some(config.inbound_addr);
        }
        admin_addrs.push(config.admin_addr);
        pods.push((pod.meta.name.clone(), pod.ip));
    }

    wait_ready(&admin_addrs, Duration::from_secs(15)).await?;
    say(format!("all {} sidecars ready", admin_addrs.len()));

    let load = Arc::new(LoadStats::default());
    if let Some(target) = productpage {
        let options = LoadOptions {
            target,
            host: "productpage:9080".to_string(),
            path: "/productpage".to_string(),
            rate_per_s: options.rate_per_s,
            duration: options.load_duration,
            max_requests: options.max_requests,
        };
        say(format!(
            "load: {} requests/s to productpage via its sidecar {target}",
            options.rate_per_s
        ));
        mesh.spawn(load::run(options, load.clone(), mesh_stop.clone()));
    }

    Ok(RunningDemo {
        telemetry_http,
        otlp_grpc,
        xds,
        control_http,
        pods,
        load,
        mesh,
        telemetry: telemetry_task,
        mesh_stop,
        telemetry_stop,
    })
}

/// Polls each sidecar's `/ready` until all answer 200.
async fn wait_ready(admins: &[SocketAddr], limit: Duration) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pending: Vec<SocketAddr> = admins.to_vec();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for addr in pending {
            if !is_ready(addr).await {
                still.push(addr);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let list: Vec<String> = pending.iter().map(ToString::to_string).collect();
            return Err(DemoError::NotReady(limit, list.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn is_ready(addr: SocketAddr) -> bool {
    use http_body_util::Empty;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let Ok(uri) = format!("http://{addr}/ready").parse::<hyper::Uri>() else {
        return false;
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), client.get(uri)).await, Ok(Ok(r)) if r.status().is_success())
}

impl RunningDemo {
    pub fn dashboard_url(&self) -> String {
        format!("http://{}/", self.telemetry_http)
    }

    /// Stops the mesh (load, apps, sidecars flush their telemetry), then telemetry (which
    /// flushes to Parquet).
    pub async fn stop(mut self) {
        self.mesh_stop.cancel();
        while self.mesh.join_next().await.is_some() {}
        self.telemetry_stop.cancel();
        let _ = self.telemetry.await;
    }
}
