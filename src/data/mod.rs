//! Datasets: an uploaded archive becomes validated, split, decoded-once
//! image tensors.
//!
//! - [`archive`]: reading zip and tar archives safely, and classifying their
//!   layout (class folders, given splits, a labels manifest).
//! - [`ingest`]: the pipeline: decode every image, check, split, store.
//! - [`split`]: the stratified, seeded train/val/test assignment.
//! - [`preprocess`]: the one decode and resize path shared by ingest,
//!   training, evaluation and prediction.
//! - [`stored`]: the stored dataset's files (split tensors and index).
//!
//! This module holds what they share: the error type, the problems found in
//! an upload, the ingest's options, progress and report.

pub mod archive;
pub mod ingest;
pub mod preprocess;
pub mod split;
pub mod stored;

use serde::Serialize;

use crate::validation::{FieldError, MAX_LISTED_ERRORS};
pub use ingest::ingest_archive;
pub use stored::{load_split, TEST_FILE, TRAIN_FILE, VAL_FILE};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The upload's content is unusable; the problems found are listed,
    /// those past [`MAX_LISTED_ERRORS`] only counted.
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
        omitted: usize,
    },
    #[error("dataset storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("dataset tensors: {0}")]
    Torch(#[from] tch::TchError),
}

impl DataError {
    pub fn invalid(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        Self::Invalid {
            detail: detail.into(),
            errors,
            omitted: 0,
        }
    }
}

/// Problems found in an upload as they are met: the first
/// [`MAX_LISTED_ERRORS`] kept, the rest only counted, so that an archive of
/// millions of bad rows costs no more memory than one of a hundred.
#[derive(Debug, Default)]
pub(crate) struct Problems {
    listed: Vec<FieldError>,
    omitted: usize,
}

impl Problems {
    pub fn push(&mut self, error: FieldError) {
        self.add(|| error);
    }

    /// Like [`Problems::push`], making the error only if it is to be listed.
    pub fn add(&mut self, make: impl FnOnce() -> FieldError) {
        if self.listed.len() < MAX_LISTED_ERRORS {
            self.listed.push(make());
        } else {
            self.omitted += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The problems as an error, or `Ok` when there are none.
    pub fn check(self, detail: impl Into<String>) -> Result<(), DataError> {
        if self.is_empty() {
            return Ok(());
        }
        Err(DataError::Invalid {
            detail: detail.into(),
            errors: self.listed,
            omitted: self.omitted,
        })
    }
}

/// A file in the upload that was not used, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

impl Skipped {
    fn new(path: &str, reason: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Share of each class held out for validation when the archive has no val/.
    pub val_fraction: f64,
    /// Share of each class held out for a final test when the archive has no test/.
    pub test_fraction: f64,
    /// Seed of the stratified split, so the same upload splits the same way.
    pub seed: u64,
    /// Fewest training images a class may have.
    pub min_train_per_class: usize,
    /// Reject the upload when any image cannot be decoded, instead of
    /// skipping it.
    pub strict: bool,
    /// Side the images are stored at: shorter side resized to it (aspect
    /// kept), then the centre square.
    pub stored_size: u32,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.2,
            test_fraction: 0.0,
            seed: 0,
            min_train_per_class: 2,
            strict: false,
            stored_size: preprocess::STORED_SIZE,
        }
    }
}

/// How far an ingest has got, for a client polling it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Progress {
    /// `reading` (listing the archive), `decoding`, then `storing`.
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
}

/// What an ingest stored.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Class names, sorted; a label is an index into this list.
    pub classes: Vec<String>,
    pub train_counts: Vec<i64>,
    pub val_counts: Vec<i64>,
    pub test_counts: Vec<i64>,
    pub skipped: Vec<Skipped>,
    /// Files with identical bytes, each group sorted by path.
    pub duplicates: Vec<Vec<String>>,
    /// Duplicate groups spread over more than one split: the validation or
    /// test score would flatter the model on them.
    pub leakage: Vec<Vec<String>>,
}
