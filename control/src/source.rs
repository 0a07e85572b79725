//! Where the model comes from: a directory of Kubernetes YAML (re-read when it changes), a
//! Kubernetes API server (watched, see [`crate::cluster`]) or a model given in-process (the
//! demo's embedded configuration).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::KubeSource;
use crate::model::{Model, ModelError};

/// A source of configuration.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Every `*.yaml` in a directory, polled for changes.
    Dir(PathBuf),
    /// A Kubernetes API server, watched.
    Kube(KubeSource),
    /// A fixed model.
    Static(Model),
}

/// How often a config directory is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

impl ConfigSource {
    /// Loads the initial model; fails when the configuration cannot be read at all.
    pub async fn load(&self) -> Result<Model, ModelError> {
        match self {
            ConfigSource::Dir(dir) => Model::load_dir(dir),
            ConfigSource::Kube(kube) => kube.load().await,
            ConfigSource::Static(model) => {
                let mut model = model.clone();
                model.check();
                Ok(model)
            }
        }
    }

    /// Watches the source and publishes each new valid model. An invalid change is logged and
    /// the last good model stays in force: a typo never empties the mesh's configuration.
    pub async fn watch(self, tx: watch::Sender<Arc<Model>>, shutdown: CancellationToken) {
        let dir = match self {
            ConfigSource::Dir(dir) => dir,
            ConfigSource::Kube(kube) => return kube.watch(tx, shutdown).await,
            ConfigSource::Static(_) => return,
        };
        let mut last = fingerprint(&dir);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            last = now;
            match Model::load_dir(&dir) {
                Ok(model) => {
                    tracing::info!(dir = %dir.display(), services = model.services.len(), "configuration changed");
                    tx.send_replace(Arc::new(model));
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration change rejected, keeping the last good one")
                }
            }
        }
    }
}

/// A hash of the names, sizes and contents of the YAML files of a directory.
fn fingerprint(dir: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            path.hash(&mut hasher);
            if let Ok(bytes) = std::fs::read(&path) {
                bytes.hash(&mut hasher);
            }
        }
    }
    hasher.finish()
}
