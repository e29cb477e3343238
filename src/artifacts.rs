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

use futures_util::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

#[derive(Clone)]
pub struct Artifacts {
    root: PathBuf,
    remote: Option<Arc<dyn ObjectStore>>,
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
    /// (`AWS_ENDPOINT` for MinIO and other S3-compatible stores).
    pub fn open_with_remote(root: impl Into<PathBuf>, url: &str) -> Result<Self, ArtifactError> {
        let remote: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)?;
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?)
        } else if url.starts_with("s3://") {
            Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()?,
            )
        } else {
            return Err(ArtifactError::Url(url.to_string()));
        };
        let mut artifacts = Self::open(root)?;
        artifacts.remote = Some(remote);
        Ok(artifacts)
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

    /// Uploads one local file under its key (streamed, multipart when large).
    pub async fn publish(&self, key: &str) -> Result<(), ArtifactError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let mut file = tokio::fs::File::open(self.path(key)).await?;
        let mut writer = BufWriter::new(remote.clone(), ObjectPath::from(key));
        tokio::io::copy(&mut file, &mut writer).await?;
        writer.shutdown().await?;
        Ok(())
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
        match &self.remote {
            Some(remote) => match remote.delete(&ObjectPath::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(err) => Err(err.into()),
            },
            None => Ok(()),
        }
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
        let prefix = ObjectPath::from(key);
        let mut listing = remote.list(Some(&prefix));
        let mut objects = Vec::new();
        while let Some(meta) = listing.next().await {
            objects.push(meta?);
        }
        if objects.is_empty() {
            // `list` covers what lies under a directory key; a file key is
            // fetched by name.
            if let Ok(meta) = remote.head(&prefix).await {
                objects.push(meta);
            }
        }
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
    /// a reader never sees half a file.
    async fn download(
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
