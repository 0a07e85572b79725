//! `lumen-proxy -c bootstrap.yaml`: runs one sidecar until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use lumen_proxy::{ExportOptions, Proxy, ProxyConfig, shutdown_on_signal};

/// Lumen sidecar proxy.
#[derive(Parser)]
#[command(name = "lumen-proxy", version)]
struct Args {
    /// Envoy v3 bootstrap file (node, admin, ADS cluster, `lumen-telemetry` cluster).
    #[arg(short = 'c', long = "config-path")]
    config: PathBuf,
    /// Worker threads, as Envoy's `--concurrency`. With 1 every connection, the xDS client and
    /// the telemetry exporter share one thread (no work stealing, no wakeups across threads:
    /// a sidecar's usual share of a core, and linkerd2-proxy's default). Default: the CPUs this
    /// process may run on.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: Option<u16>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = args.concurrency.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = ProxyConfig::from_bootstrap_file(&args.config)?;
    let proxy = Proxy::bind(config, ExportOptions::default()).await?;
    proxy.run(shutdown_on_signal()).await;
    Ok(())
}
