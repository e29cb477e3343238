//! Where the bytes live: uploaded archives, decoded datasets, checkpoints.
//!
//! Every process works on files in a local directory (libtorch reads and
//! writes paths). With an artifact URL (`s3://bucket/prefix`, or `file://`
//! for a shared mount) that directory is a cache of an object store, reached
//! through the `object_store` crate: finished datasets and every saved
//! checkpoint are published to it, and a process that lacks a file fetches
//! it before use. Without one, the local directory is the store and
//! publishing and fetching do nothing. Rows in Postgres hold keys relative
//! to the root (`datasets/<id>/…`), valid in both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

#[derive(Clone)]
pub struct Artifacts {
    root: PathBuf,
    remote: Option<Arc<dyn ObjectStore>>,
    /// The same store, asked with little patience: for requests a client is
    /// waiting on (serving), which answer 503 rather than wait out an outage.
    impatient: Option<Arc<dyn ObjectStore>>,
    /// How long an unreachable store is retried before a transfer fails
    /// for good (zero: not at all, beyond the client's own quick retries).
    patience: Duration,
    /// Free bytes the disk under `root` must keep (uploads, jobs and
    /// checkpoints stop short of it; the embedded Postgres may share it).
    min_free_bytes: u64,
}

/// The disk under the artifacts is below its free-space floor.
#[derive(Debug, thiserror::Error)]
#[error(
    "only {} MiB free on the disk of {}, below the {} MiB floor (--min-free-disk-mib)",
    free / (1024 * 1024),
    dir.display(),
    floor / (1024 * 1024)
)]
pub struct LowDisk {
    pub free: u64,
    pub floor: u64,
    pub dir: PathBuf,
}

/// Bytes available to this user on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string and a zeroed statvfs for the duration of the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("root", &self.root)
            .field("remote", &self.remote.as_ref().map(|r| r.to_string()))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact file: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported artifact URL {0:?}: use s3://bucket[/prefix] or file:///directory")]
    Url(String),
}

impl ArtifactError {
    /// Whether the store could not be reached or answered with a failure of
    /// its own (worth retrying later), rather than refusing the request.
    pub fn is_unavailable(&self) -> bool {
        use object_store::Error as E;
        match self {
            Self::Store(
                E::NotFound { .. }
                | E::InvalidPath { .. }
                | E::NotSupported { .. }
                | E::AlreadyExists { .. }
                | E::Precondition { .. }
                | E::NotModified { .. }
                | E::PermissionDenied { .. }
                | E::Unauthenticated { .. }
                | E::UnknownConfigurationKey { .. }
                | E::NotImplemented,
            ) => false,
            Self::Store(_) => true,
            Self::Io(_) | Self::Url(_) => false,
        }
    }
}

/// How long a worker or an upload waits out an unreachable store, retrying
/// with backoff, before the transfer fails for good.
pub const STORE_PATIENCE: Duration = Duration::from_secs(300);

/// The object store client's own retries for a transfer nobody waits on:
/// its defaults (transport errors and 5xx, backoff up to 15 s, 3 minutes).
fn patient_retries() -> RetryConfig {
    RetryConfig::default()
}

/// For a request a client waits on: a couple of quick tries, then the
/// caller answers 503 with `Retry-After`.
fn impatient_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(3),
    }
}

impl Artifacts {
    /// A local directory only.
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::create_dir_all(root.join("datasets"))?;
        std::fs::create_dir_all(root.join("jobs"))?;
        Ok(Self {
            root,
            remote: None,
            impatient: None,
            patience: STORE_PATIENCE,
            min_free_bytes: 0,
        })
    }

    /// The same store, refusing new work below `bytes` free on its disk.
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// Whether the disk has room for new work (above the floor).
    pub fn room(&self) -> Result<(), LowDisk> {
        let free = free_bytes(&self.root).unwrap_or(u64::MAX);
        if free < self.min_free_bytes {
            return Err(LowDisk {
                free,
                floor: self.min_free_bytes,
                dir: self.root.clone(),
            });
        }
        Ok(())
    }

    /// A local cache directory in front of the object store at `url`.
    /// S3 settings come from the usual `AWS_*` environment variables
    /// (`AWS_ENDPOINT` for MinIO, SeaweedFS and other S3-compatible stores).
    pub fn open_with_remote(root: impl Into<PathBuf>, url: &str) -> Result<Self, ArtifactError> {
        let (remote, impatient): (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>) =
            if let Some(dir) = url.strip_prefix("file://") {
                std::fs::create_dir_all(dir)?;
                let local = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?);
                (local.clone(), local)
            } else if url.starts_with("s3://") {
                let s3 = |retries: RetryConfig| {
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(retries)
                        .build()
                };
                (
                    Arc::new(s3(patient_retries())?),
                    Arc::new(s3(impatient_retries())?),
                )
            } else {
                return Err(ArtifactError::Url(url.to_string()));
            };
        let mut artifacts = Self::open(root)?;
        artifacts.remote = Some(remote);
        artifacts.impatient = Some(impatient);
        Ok(artifacts)
    }

    /// A local cache directory in front of a store built by the caller.
    pub fn open_with_store(
        root: impl Into<PathBuf>,
        remote: Arc<dyn ObjectStore>,
    ) -> std::io::Result<Self> {
        let mut artifacts = Self::open(root)?;
        artifacts.impatient = Some(remote.clone());
        artifacts.remote = Some(remote);
        Ok(artifacts)
    }

    /// The same artifacts for a request a client is waiting on: an
    /// unreachable store fails fast ([`ArtifactError::is_unavailable`])
    /// instead of being waited out.
    pub fn impatient(&self) -> Self {
        Self {
            remote: self.impatient.clone(),
            patience: Duration::ZERO,
            ..self.clone()
        }
    }

    /// The same artifacts, waiting out an unreachable store for `patience`.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Runs one transfer, again with backoff while the store is unavailable
    /// (a restart, a network cut), until the patience is spent.
    async fn patiently<T, F, Fut>(&self, what: &str, mut transfer: F) -> Result<T, ArtifactError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ArtifactError>>,
    {
        let started = Instant::now();
        let mut wait = Duration::from_secs(1);
        loop {
            match transfer().await {
                Err(err) if err.is_unavailable() && started.elapsed() + wait < self.patience => {
                    tracing::warn!(error = %err, %what, retry_in = ?wait, "the artifact store is unavailable; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(16));
                }
                other => return other,
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a key stored in the database to a local path.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn dataset_key(id: Uuid) -> String {
        format!("datasets/{id}")
    }

    pub fn job_key(id: Uuid) -> String {
        format!("jobs/{id}")
    }

    /// A fresh path for an upload in progress; callers remove it when done.
    pub fn temp_file(&self, suffix: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}{suffix}", Uuid::new_v4()))
    }

    /// Removes what an interrupted process left behind: files in `tmp/`, and
    /// dataset directories with no row (`known`), once older than `age`
    /// (younger ones may belong to an ingest still running elsewhere).
    /// Returns the paths removed.
    pub fn sweep(
        &self,
        known: &std::collections::HashSet<Uuid>,
        age: std::time::Duration,
    ) -> std::io::Result<Vec<PathBuf>> {
        let stale = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age))
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(self.root.join("tmp"))?.flatten() {
            if stale(&entry.path()) && std::fs::remove_file(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
        for entry in std::fs::read_dir(self.root.join("datasets"))?.flatten() {
            let orphan = entry
                .file_name()
                .to_str()
                .and_then(|name| Uuid::parse_str(name).ok())
                .is_some_and(|id| !known.contains(&id));
            if orphan && stale(&entry.path()) && std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
        // Checkpoints and cards a crashed writer left half-written.
        removed.extend(crate::durable::sweep_partials(&self.root, age));
        Ok(removed)
    }

    /// Uploads one local file under its key (streamed, multipart when large),
    /// waiting out an unavailable store.
    pub async fn publish(&self, key: &str) -> Result<(), ArtifactError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        self.patiently(key, || upload(remote.clone(), self.path(key), key))
            .await
    }

    /// Like [`Self::publish`], for a file that a newer one may already have
    /// replaced and removed (old epoch checkpoints): a missing file is skipped.
    pub async fn publish_if_present(&self, key: &str) -> Result<(), ArtifactError> {
        match self.publish(key).await {
            Err(ArtifactError::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Uploads every file under a local key directory.
    pub async fn publish_dir(&self, key: &str) -> Result<(), ArtifactError> {
        if self.remote.is_none() {
            return Ok(());
        }
        let mut pending = vec![self.path(key)];
        while let Some(dir) = pending.pop() {
            let mut entries = tokio::fs::read_dir(&dir).await?;
            while let Some(entry) = entries.next_entry().await? {
                if entry.file_type().await?.is_dir() {
                    pending.push(entry.path());
                } else if let Ok(relative) = entry.path().strip_prefix(&self.root) {
                    self.publish(&relative.to_string_lossy()).await?;
                }
            }
        }
        Ok(())
    }

    /// Removes a key from the store (the local copy is the caller's).
    pub async fn unpublish(&self, key: &str) -> Result<(), ArtifactError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        self.patiently(key, || async {
            match remote.delete(&ObjectPath::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(err) => Err(err.into()),
            }
        })
        .await
    }

    /// Removes every object under a key directory from the store.
    pub async fn unpublish_dir(&self, key: &str) -> Result<(), ArtifactError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let mut listing = remote.list(Some(&ObjectPath::from(key)));
        let mut locations = Vec::new();
        while let Some(meta) = listing.next().await {
            locations.push(meta?.location);
        }
        for location in locations {
            self.unpublish(location.as_ref()).await?;
        }
        Ok(())
    }

    /// Makes sure every object under `key` (a file or a directory) is in the
    /// local cache, downloading what is missing. Returns the local path.
    pub async fn fetch(&self, key: &str) -> Result<PathBuf, ArtifactError> {
        let local = self.path(key);
        let Some(remote) = &self.remote else {
            return Ok(local);
        };
        let objects = self
            .patiently(key, || objects_under(remote.as_ref(), key))
            .await?;
        for meta in objects {
            let path = self.path(meta.location.as_ref());
            // Same size is not enough: a checkpoint rewritten elsewhere keeps
            // its size. Ours is current only if written after the object.
            let up_to_date = tokio::fs::metadata(&path).await.is_ok_and(|m| {
                let written = m.modified().map(chrono::DateTime::<chrono::Utc>::from);
                m.len() == meta.size && written.is_ok_and(|w| w >= meta.last_modified)
            });
            if !up_to_date {
                self.download(remote.as_ref(), &meta.location, &path)
                    .await?;
            }
        }
        Ok(local)
    }

    /// Like [`Self::fetch`] for artifacts that never change once written
    /// (a finished model's checkpoint): asks the store only when there is
    /// no local copy.
    pub async fn fetch_final(&self, key: &str) -> Result<PathBuf, ArtifactError> {
        let local = self.path(key);
        if self.remote.is_none() || tokio::fs::try_exists(&local).await.unwrap_or(false) {
            return Ok(local);
        }
        self.fetch(key).await
    }

    /// Streams one object to a temporary file and renames it into place, so
    /// a reader never sees half a file; waits out an unavailable store.
    async fn download(
        &self,
        remote: &dyn ObjectStore,
        location: &ObjectPath,
        path: &Path,
    ) -> Result<(), ArtifactError> {
        self.patiently(location.as_ref(), || {
            self.download_once(remote, location, path)
        })
        .await
    }

    async fn download_once(
        &self,
        remote: &dyn ObjectStore,
        location: &ObjectPath,
        path: &Path,
    ) -> Result<(), ArtifactError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let partial = self.temp_file(".download");
        let mut file = tokio::fs::File::create(&partial).await?;
        let mut stream = remote.get(location).await?.into_stream();
        let result = async {
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk?).await?;
            }
            file.flush().await?;
            tokio::fs::rename(&partial, path).await?;
            Ok::<(), ArtifactError>(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    }
}

/// The objects under a directory key, or the one object a file key names.
async fn objects_under(
    remote: &dyn ObjectStore,
    key: &str,
) -> Result<Vec<object_store::ObjectMeta>, ArtifactError> {
    let prefix = ObjectPath::from(key);
    let mut listing = remote.list(Some(&prefix));
    let mut objects = Vec::new();
    while let Some(meta) = listing.next().await {
        objects.push(meta?);
    }
    if objects.is_empty() {
        // `list` covers what lies under a directory key; a file key is
        // fetched by name.
        match remote.head(&prefix).await {
            Ok(meta) => objects.push(meta),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(objects)
}

/// Streams a local file to `key`: one PUT when small, a multipart upload in
/// parts otherwise (object_store's `BufWriter`), never the whole file in memory.
async fn upload(
    remote: Arc<dyn ObjectStore>,
    path: PathBuf,
    key: &str,
) -> Result<(), ArtifactError> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut writer = BufWriter::new(remote, ObjectPath::from(key));
    if let Err(err) = tokio::io::copy(&mut file, &mut writer).await {
        let _ = writer.abort().await;
        return Err(store_error(err));
    }
    writer.shutdown().await.map_err(store_error)?;
    Ok(())
}

/// `BufWriter` reports the store's errors as I/O errors: unwrap them, so an
/// unreachable store is told apart from a local file that failed.
fn store_error(err: std::io::Error) -> ArtifactError {
    match err.downcast::<object_store::Error>() {
        Ok(store) => ArtifactError::Store(store),
        Err(io) => ArtifactError::Io(io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_only_stale_leftovers_without_rows() {
        let root = std::env::temp_dir().join(format!("sweep-{}", Uuid::new_v4()));
        let artifacts = Artifacts::open(&root).unwrap();
        let (kept, orphan) = (Uuid::new_v4(), Uuid::new_v4());
        for id in [kept, orphan] {
            std::fs::create_dir_all(artifacts.path(&Artifacts::dataset_key(id))).unwrap();
        }
        let upload = artifacts.temp_file(".upload");
        std::fs::write(&upload, b"partial").unwrap();
        let known = [kept].into_iter().collect();
        // Young leftovers may belong to a running ingest: kept.
        assert!(artifacts
            .sweep(&known, std::time::Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let removed = artifacts
            .sweep(&known, std::time::Duration::from_millis(1))
            .unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!upload.exists());
        assert!(!artifacts.path(&Artifacts::dataset_key(orphan)).exists());
        assert!(artifacts.path(&Artifacts::dataset_key(kept)).exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
