//! `lumen`: the command-line entry point. Parses flags and wires the library crates together;
//! no logic of its own. With no subcommand it runs `lumen demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lumen::demo::{self, DemoOptions};
use lumen_control::{ConfigSource, Control, ControlOptions};
use lumen_telemetry::meshmetrics::MeshMetricsOptions;
use lumen_telemetry::{QueryLimits, StoreOptions, Telemetry, TelemetryOptions};

/// mimalloc: the telemetry service allocates and frees per span on its ingest path, where
/// glibc's allocator cost about a tenth of its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lumen",
    version,
    about = "Lumen: an observability-first service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The whole mesh in one process: demo services, sidecars, control plane, telemetry, load.
    Demo(DemoArgs),
    /// The telemetry service alone: OTLP in, Parquet store, SQL, dashboard.
    Telemetry(TelemetryArgs),
    /// The control plane alone: config directory to xDS over ADS.
    Control(ControlArgs),
    /// Print the version.
    Version,
}

#[derive(Parser)]
struct DemoArgs {
    /// Data directory for the telemetry store.
    #[arg(long, default_value = "lumen-data")]
    data: PathBuf,
    /// First three octets of the pods' loopback addresses.
    #[arg(long, default_value = "127.0.10", value_parser = parse_subnet)]
    pod_subnet: [u8; 3],
    #[arg(long, default_value = "127.0.0.1:4317")]
    otlp_grpc: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:4318")]
    otlp_http: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:16686")]
    http: SocketAddr,
    /// Jaeger's query API v3 over gRPC (jaeger.api_v3.QueryService).
    #[arg(long, default_value = "127.0.0.1:16685")]
    jaeger_grpc: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15014")]
    control_http: SocketAddr,
    /// Requests per second sent to productpage.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Stop the load after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
}

#[derive(clap::Args)]
struct TelemetryArgs {
    #[arg(long, default_value = "lumen-data")]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:4317")]
    otlp_grpc: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:4318")]
    otlp_http: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:16686")]
    http: SocketAddr,
    /// Jaeger's query API v3 over gRPC (jaeger.api_v3.QueryService).
    #[arg(long, default_value = "127.0.0.1:16685")]
    jaeger_grpc: SocketAddr,
    /// The control plane's HTTP address (e.g. http://127.0.0.1:15014), for the dashboard's
    /// proxy status page.
    #[arg(long)]
    control_url: Option<String>,
    /// Seconds between memtable flushes to Parquet.
    #[arg(long, default_value_t = 5)]
    flush_interval: u64,
    /// Host names the HTTP port answers to, besides loopback names and its own address
    /// (repeat the flag for several).
    #[arg(long = "allow-host")]
    allow_host: Vec<String>,
    /// Seconds a query may run before its plan is cancelled.
    #[arg(long, default_value_t = 30)]
    query_timeout: u64,
    /// MiB of memory all running queries may use together.
    #[arg(long, default_value_t = 96)]
    query_memory: usize,
    /// Rows a query result may hold; longer results are cut and flagged as truncated.
    #[arg(long, default_value_t = 10_000)]
    query_max_rows: usize,
    /// Queries that may run at once.
    #[arg(long, default_value_t = 4)]
    query_concurrency: usize,
    /// MiB of rows held in memory (memtables and requests being converted); past it OTLP
    /// exports are refused with RESOURCE_EXHAUSTED until a flush frees room.
    #[arg(long, default_value_t = 128)]
    max_buffered_mib: usize,
    /// OTLP export requests handled at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 32)]
    max_inflight_requests: usize,
    /// MiB of the largest OTLP request accepted (after decompression).
    #[arg(long, default_value_t = 4)]
    max_message_mib: usize,
    /// OTLP/gRPC connections open at once; more wait until one closes.
    #[arg(long, default_value_t = 128)]
    max_connections: usize,
    /// Hours data is kept after it was stored; older files are dropped (0: keep forever).
    #[arg(long, default_value_t = 168)]
    retention_hours: u64,
    /// MiB of Parquet files each table keeps at most; the oldest go first (0: no cap).
    #[arg(long, default_value_t = 0)]
    retention_mib: u64,
    /// Also publish Parquet files to this bucket and query the other writers' files in it:
    /// `s3://bucket/prefix` (credentials, region and endpoint from the AWS_* environment
    /// variables, e.g. AWS_ENDPOINT_URL and AWS_ALLOW_HTTP=true for a local S3) or
    /// `file:///shared/dir`.
    #[arg(long)]
    object_store: Option<String>,
    /// This process's name in the bucket (default: an id made up at the first start and
    /// kept in <data>/writer-id).
    #[arg(long)]
    writer_id: Option<String>,
    /// Series of the mesh's metric families (istio_*) served on /metrics, across all
    /// proxies; points of new series past it are dropped and counted.
    #[arg(long, default_value_t = 50_000)]
    max_metric_series: usize,
    /// Seconds after which a series no proxy reported any more leaves /metrics.
    #[arg(long, default_value_t = 300)]
    metric_series_ttl_secs: u64,
    /// Milliseconds each flush waits before writing: a slow disk, for backpressure tests.
    #[arg(long, default_value_t = 0, hide = true)]
    debug_flush_delay_ms: u64,
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Directory of Kubernetes YAML (Services, Pods, VirtualServices, DestinationRules,
    /// HTTPRoutes, GRPCRoutes), re-read when it changes.
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    config_dir: Option<PathBuf>,
    /// Watch a Kubernetes API server instead (KUBECONFIG, ~/.kube/config or the in-cluster
    /// service account, as kubectl finds it); refusals are written as status conditions.
    #[arg(long)]
    kube: bool,
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15014")]
    http: SocketAddr,
}

fn parse_subnet(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<u8> = s
        .split('.')
        .map(|p| p.parse::<u8>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match parts.as_slice() {
        [127, b, c] => Ok([127, *b, *c]),
        _ => Err(format!(
            "{s:?} must be three octets of 127.0.0.0/8, like 127.0.10"
        )),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lumen=info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli
        .command
        .unwrap_or(Command::Demo(DemoArgs::parse_from(["demo"])))
    {
        Command::Demo(args) => run_demo(args).await,
        Command::Telemetry(args) => {
            let telemetry = Telemetry::bind(TelemetryOptions {
                otlp_grpc_addr: args.otlp_grpc,
                otlp_http_addr: args.otlp_http,
                http_addr: args.http,
                jaeger_grpc_addr: args.jaeger_grpc,
                flush_interval: Duration::from_secs(args.flush_interval.max(1)),
                query: QueryLimits {
                    timeout: Duration::from_secs(args.query_timeout.max(1)),
                    memory_bytes: args.query_memory.max(1) * 1024 * 1024,
                    max_rows: args.query_max_rows.max(1),
                    max_concurrent: args.query_concurrency.max(1),
                    ..QueryLimits::default()
                },
                allowed_hosts: args.allow_host,
                store: StoreOptions {
                    max_buffered_bytes: args.max_buffered_mib.max(1) * 1024 * 1024,
                    flush_delay: Duration::from_millis(args.debug_flush_delay_ms),
                    retention_age: (args.retention_hours > 0)
                        .then(|| Duration::from_secs(args.retention_hours * 3600)),
                    retention_bytes: (args.retention_mib > 0)
                        .then(|| args.retention_mib * 1024 * 1024),
                    ..StoreOptions::default()
                },
                max_inflight_requests: args.max_inflight_requests.max(1),
                max_message_bytes: args.max_message_mib.max(1) * 1024 * 1024,
                max_connections: args.max_connections.max(1),
                object_store: args.object_store,
                writer_id: args.writer_id,
                mesh_metrics: MeshMetricsOptions {
                    max_series: args.max_metric_series,
                    ttl: Duration::from_secs(args.metric_series_ttl_secs.max(1)),
                },
                ..TelemetryOptions::new(args.data)
            })
            .await?;
            let store = telemetry.store();
            let replayed = &store.replayed;
            println!(
                "wal: replayed {} records from {} segments, cut {} damaged tails",
                replayed.records,
                replayed.segments,
                replayed.cut.len()
            );
            for (file, reason) in &store.quarantined {
                println!("quarantined: {} ({reason})", file.display());
            }
            println!(
                "otlp-http: http://{}/v1/",
                telemetry.otlp_http_addr().unwrap_or(args.otlp_http)
            );
            println!(
                "telemetry: OTLP gRPC {}, dashboard http://{}/, Jaeger gRPC {}",
                telemetry.otlp_grpc_addr().unwrap_or(args.otlp_grpc),
                telemetry.http_addr().unwrap_or(args.http),
                telemetry.jaeger_grpc_addr().unwrap_or(args.jaeger_grpc)
            );
            let dashboard = lumen_dashboard::router_with(
                Arc::new(telemetry.query_engine()),
                lumen_dashboard::DashboardOptions {
                    control_url: args.control_url,
                },
            );
            telemetry
                .run(dashboard, lumen_proxy::shutdown_on_signal())
                .await?;
            Ok(())
        }
        Command::Control(args) => {
            let source = match args.config_dir {
                Some(dir) => ConfigSource::Dir(dir),
                None => ConfigSource::Kube(lumen_control::KubeSource::connect().await?),
            };
            let control = Control::bind(ControlOptions {
                xds_addr: args.xds,
                http_addr: args.http,
                source,
            })
            .await?;
            println!(
                "control: xDS {}, HTTP {}",
                control.xds_addr().unwrap_or(args.xds),
                control.http_addr().unwrap_or(args.http)
            );
            control.run(lumen_proxy::shutdown_on_signal()).await?;
            Ok(())
        }
        Command::Version => {
            println!("lumen {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut options = DemoOptions::standard(args.data);
    options.pod_subnet = args.pod_subnet;
    options.otlp_grpc_addr = args.otlp_grpc;
    options.otlp_http_addr = args.otlp_http;
    options.http_addr = args.http;
    options.jaeger_grpc_addr = args.jaeger_grpc;
    options.xds_addr = args.xds;
    options.control_http_addr = args.control_http;
    options.rate_per_s = args.rate;
    options.load_duration = args.duration.map(Duration::from_secs);
    let shutdown = lumen_proxy::shutdown_on_signal();
    let running = demo::start(options, |line| println!("{line}")).await?;
    println!("dashboard: {}", running.dashboard_url());
    shutdown.cancelled().await;
    println!("stopping: draining sidecars and flushing telemetry");
    running.stop().await;
    println!("stopped");
    Ok(())
}
