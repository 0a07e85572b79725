//! The shared side of the store (`lumen telemetry --object-store URL`): an S3-compatible
//! bucket (`s3://bucket/prefix`, credentials and endpoint from the usual `AWS_*`
//! environment variables) or a shared directory (`file:///path`), through `object_store`.
//!
//! Each telemetry process is one writer with its own id and its own part of the bucket:
//! `<prefix>/<writer>/<table>/<file>.parquet` and `<prefix>/<writer>/<table>/manifest.json`.
//! A writer uploads a file before its local manifest names it and publishes its manifest
//! after, so a manifest in the bucket only ever names files that are there. Writers never
//! touch each other's objects; each reads the others' manifests every refresh and queries
//! their files where they lie. Local files stay the writer's own copy (the WAL and
//! compaction work on them); the bucket is the copy other writers read and the one that
//! outlives the machine.

use std::path::Path;
use std::sync::Arc;

use datafusion::execution::object_store::ObjectStoreUrl;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;

use crate::manifest::{self, DataFile};

/// Errors of the bucket; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("object store URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("{location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Manifest(String),
}

/// Another writer's files of one table, as its manifest in the bucket lists them.
#[derive(Debug, Clone)]
pub struct PeerFile {
    /// Where DataFusion reads it (`s3://bucket/prefix/writer/table/name`).
    pub url: String,
    pub file: DataFile,
}

/// A bucket (or shared directory) and this process's writer id in it.
#[derive(Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket` or `file://`: what DataFusion resolves the store by.
    store_url: ObjectStoreUrl,
    /// The URL prefix of every object path (`s3://bucket/` or `file:///`).
    url_base: String,
    prefix: ObjectPath,
    writer: String,
}

/// Whether `id` is a usable writer id: it becomes a path segment in the bucket.
pub fn valid_writer_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The writer id kept in `<data>/writer-id`, made up (16 random hex digits) and stored
/// there at the first start, so a restarted process is the same writer.
pub fn writer_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("writer-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if valid_writer_id(id.trim()) => return Ok(id.trim().to_string()),
        Ok(id) => {
            return Err(std::io::Error::other(format!(
                "{}: {:?} is not a writer id (letters, digits, '-', '_')",
                path.display(),
                id.trim()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("{:016x}", rand::random::<u64>());
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join("writer-id.tmp");
    std::fs::write(&tmp, &id)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

impl Remote {
    /// Opens `url` (`s3://bucket[/prefix]` or `file:///dir`) as writer `writer`.
    pub fn open(url: &str, writer: &str) -> Result<Remote, RemoteError> {
        let bad = |why: String| RemoteError::Url {
            url: url.to_string(),
            why,
        };
        if !valid_writer_id(writer) {
            return Err(bad(format!(
                "writer id {writer:?} must be 1 to 64 letters, digits, '-' or '_'"
            )));
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (store, store_url, url_base, prefix): (Arc<dyn ObjectStore>, _, _, _) =
            match parsed.scheme() {
                "s3" => {
                    let bucket = parsed
                        .host_str()
                        .filter(|b| !b.is_empty())
                        .ok_or_else(|| bad("no bucket name".into()))?;
                    let s3 = object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .build()
                        .map_err(|e| bad(e.to_string()))?;
                    let store_url = ObjectStoreUrl::parse(format!("s3://{bucket}"))
                        .map_err(|e| bad(e.to_string()))?;
                    let prefix = ObjectPath::from(parsed.path().trim_matches('/'));
                    (Arc::new(s3), store_url, format!("s3://{bucket}/"), prefix)
                }
                "file" => {
                    let dir = parsed
                        .to_file_path()
                        .map_err(|()| bad("not a local path".into()))?;
                    std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
                    let prefix =
                        ObjectPath::from_filesystem_path(&dir).map_err(|e| bad(e.to_string()))?;
                    let store_url = ObjectStoreUrl::local_filesystem();
                    (
                        Arc::new(object_store::local::LocalFileSystem::new()),
                        store_url,
                        "file:///".to_string(),
                        prefix,
                    )
                }
                other => {
                    return Err(bad(format!(
                        "scheme {other:?} is not supported (s3:// or file://)"
                    )));
                }
            };
        Ok(Remote {
            store,
            store_url,
            url_base,
            prefix,
            writer: writer.to_string(),
        })
    }

    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// The store, for DataFusion to read remote files through.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// What the store is registered under in DataFusion's runtime.
    pub fn store_url(&self) -> &ObjectStoreUrl {
        &self.store_url
    }

    /// Whether DataFusion must be told about the store (a local directory it knows).
    pub fn needs_registration(&self) -> bool {
        self.url_base != "file:///"
    }

    fn path(&self, writer: &str, table: &str, name: &str) -> ObjectPath {
        self.prefix.clone().join(writer).join(table).join(name)
    }

    fn url_of(&self, path: &ObjectPath) -> String {
        format!("{}{}", self.url_base, path)
    }

    fn store_err(path: &ObjectPath) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        move |source| RemoteError::Store {
            location: path.to_string(),
            source,
        }
    }

    /// Uploads a local file as this writer's `table/name` (multipart when large).
    pub async fn upload(&self, table: &str, local: &Path, name: &str) -> Result<(), RemoteError> {
        let path = self.path(&self.writer, table, name);
        let io = |source| RemoteError::Io {
            location: local.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(io)?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), path.clone());
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        let closed = match copied {
            Ok(_) => writer.shutdown().await,
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        };
        closed.map_err(|source| RemoteError::Io {
            location: self.url_of(&path),
            source,
        })
    }

    /// Publishes this writer's manifest of `table`.
    pub async fn put_manifest(&self, table: &str, files: &[DataFile]) -> Result<(), RemoteError> {
        let path = self.path(&self.writer, table, manifest::MANIFEST_FILE);
        let bytes = manifest::encode(table, files).map_err(|source| RemoteError::Io {
            location: self.url_of(&path),
            source,
        })?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(Self::store_err(&path))?;
        Ok(())
    }

    /// This writer's manifest of `table` in the bucket, if it has published one.
    pub async fn own_manifest(&self, table: &str) -> Result<Option<Vec<DataFile>>, RemoteError> {
        self.manifest_of(&self.writer, table).await
    }

    async fn manifest_of(
        &self,
        writer: &str,
        table: &str,
    ) -> Result<Option<Vec<DataFile>>, RemoteError> {
        let path = self.path(writer, table, manifest::MANIFEST_FILE);
        let bytes = match self.store.get(&path).await {
            Ok(got) => got.bytes().await.map_err(Self::store_err(&path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::store_err(&path)(e)),
        };
        manifest::decode(&bytes, table, &self.url_of(&path))
            .map(Some)
            .map_err(RemoteError::Manifest)
    }

    /// Names of this writer's objects of `table` (Parquet files, not the manifest).
    pub async fn own_files(&self, table: &str) -> Result<Vec<String>, RemoteError> {
        let dir = self.prefix.clone().join(self.writer.as_str()).join(table);
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(Self::store_err(&dir))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .filter(|n| n.ends_with(".parquet"))
            .collect())
    }

    /// Deletes this writer's `table/name` (gone already is fine).
    pub async fn delete(&self, table: &str, name: &str) -> Result<(), RemoteError> {
        let path = self.path(&self.writer, table, name);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::store_err(&path)(e)),
        }
    }

    /// Every other writer's files of `table`, from their manifests. A writer whose manifest
    /// cannot be read is skipped and reported; the others still count.
    pub async fn peer_files(&self, table: &str) -> Result<Vec<PeerFile>, RemoteError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(Self::store_err(&self.prefix))?;
        let mut out = Vec::new();
        for dir in listed.common_prefixes {
            let Some(writer) = dir.filename().map(str::to_string) else {
                continue;
            };
            if writer == self.writer || !valid_writer_id(&writer) {
                continue;
            }
            match self.manifest_of(&writer, table).await {
                Ok(Some(files)) => out.extend(files.into_iter().map(|file| PeerFile {
                    url: self.url_of(&self.path(&writer, table, &file.name)),
                    file,
                })),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(writer = %writer, table, error = %e, "a peer's manifest is unreadable, its files are left out")
                }
            }
        }
        Ok(out)
    }
}
