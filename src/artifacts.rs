//! Where the bytes live: uploaded archives, decoded datasets, checkpoints.
//!
//! A local directory today. Rows in Postgres store keys relative to the root
//! (`datasets/<id>`), so a remote object store can take its place later.

use std::path::{Path, PathBuf};

use uuid::Uuid;

#[derive(Clone, Debug)]
pub struct Artifacts {
    root: PathBuf,
}

impl Artifacts {
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::create_dir_all(root.join("datasets"))?;
        std::fs::create_dir_all(root.join("jobs"))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a key stored in the database to a path.
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
}
