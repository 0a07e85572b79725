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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = ProxyConfig::from_bootstrap_file(&args.config)?;
    let proxy = Proxy::bind(config, ExportOptions::default()).await?;
    proxy.run(shutdown_on_signal()).await;
    Ok(())
}
