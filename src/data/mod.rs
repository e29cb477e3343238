//! Dataset ingest: archive → validated, split, decoded-once image tensors.
//!
//! An ingest either stores a complete dataset directory or nothing: the
//! caller passes a fresh directory and removes it on any error.

pub mod archive;
pub mod preprocess;
pub mod split;

use std::path::Path;

use serde::Serialize;
use tch::Tensor;

use crate::error::FieldError;
use archive::GivenSplit;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The upload's content is unusable; every problem found is listed.
    #[error("{detail}")]
    Invalid {
        detail: String,
        errors: Vec<FieldError>,
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
        }
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
    /// Seed of the stratified split, so the same upload splits the same way.
    pub seed: u64,
    /// Fewest training images a class may have.
    pub min_train_per_class: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.2,
            seed: 0,
            min_train_per_class: 2,
        }
    }
}

/// What an ingest stored.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Class names, sorted; a label is an index into this list.
    pub classes: Vec<String>,
    pub train_counts: Vec<i64>,
    pub val_counts: Vec<i64>,
    pub skipped: Vec<Skipped>,
    /// Files with identical bytes, each group sorted by path.
    pub duplicates: Vec<Vec<String>>,
    /// Duplicate groups that ended up in both train and val: the validation
    /// score would flatter the model on them.
    pub leakage: Vec<Vec<String>>,
}

pub const TRAIN_FILE: &str = "train.safetensors";
pub const VAL_FILE: &str = "val.safetensors";

/// Validates, splits and decodes the archive (zip, tar or tar.gz) at
/// `archive`, writing the split tensors into `out_dir`.
pub fn ingest_archive(
    archive: &Path,
    out_dir: &Path,
    opts: &IngestOptions,
) -> Result<IngestReport, DataError> {
    let (entries, mut skipped) = archive::read_archive(archive)?;
    let decoded = decode_all(&entries);

    let mut images = Vec::with_capacity(entries.len());
    for (entry, result) in entries.iter().zip(decoded) {
        match result {
            Ok(pixels) => images.push((entry, pixels)),
            Err(reason) => skipped.push(Skipped::new(
                &entry.path,
                format!("cannot decode: {reason}"),
            )),
        }
    }

    let mut classes: Vec<String> = images
        .iter()
        .filter(|(e, _)| e.split != Some(GivenSplit::Val))
        .map(|(e, _)| e.class.clone())
        .collect();
    classes.sort();
    classes.dedup();
    check_classes(&classes, &images)?;

    let labelled: Vec<split::Item> = images
        .iter()
        .enumerate()
        .map(|(index, (entry, _))| split::Item {
            index,
            label: classes.binary_search(&entry.class).expect("class checked"),
            given: entry.split,
        })
        .collect();
    let (train, val) = split::assign(&labelled, classes.len(), opts.val_fraction, opts.seed);

    let train_counts = split::counts(&train, &labelled, classes.len());
    let val_counts = split::counts(&val, &labelled, classes.len());
    let too_small: Vec<FieldError> = classes
        .iter()
        .zip(&train_counts)
        .filter(|(_, &n)| (n as usize) < opts.min_train_per_class)
        .map(|(class, n)| {
            FieldError::new(
                format!("class:{class}"),
                format!(
                    "{n} training image(s); at least {} needed",
                    opts.min_train_per_class
                ),
            )
        })
        .collect();
    if !too_small.is_empty() {
        return Err(DataError::invalid(
            "some classes have too few images",
            too_small,
        ));
    }

    std::fs::create_dir_all(out_dir)?;
    for (file, members) in [(TRAIN_FILE, &train), (VAL_FILE, &val)] {
        let pixels: Vec<Vec<u8>> = members.iter().map(|&i| images[i].1.clone()).collect();
        let labels: Vec<i64> = members.iter().map(|&i| labelled[i].label as i64).collect();
        let tensor = preprocess::stack_canonical(&pixels);
        Tensor::write_safetensors(
            &[
                ("images", &tensor),
                ("labels", &Tensor::from_slice(&labels)),
            ],
            out_dir.join(file),
        )?;
    }
    let (duplicates, leakage) = find_duplicates(&images, &val);
    Ok(IngestReport {
        classes,
        train_counts,
        val_counts,
        skipped,
        duplicates,
        leakage,
    })
}

/// Groups of images with identical bytes, and those of them split across
/// train and val (`val` holds indices into `images`).
#[allow(clippy::type_complexity)]
fn find_duplicates(
    images: &[(&archive::Entry, Vec<u8>)],
    val: &[usize],
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    use sha2::{Digest, Sha256};
    let mut groups: std::collections::HashMap<[u8; 32], Vec<usize>> = Default::default();
    for (index, (entry, _)) in images.iter().enumerate() {
        groups
            .entry(Sha256::digest(&entry.bytes).into())
            .or_default()
            .push(index);
    }
    let val: std::collections::HashSet<usize> = val.iter().copied().collect();
    let mut duplicates = Vec::new();
    let mut leakage = Vec::new();
    for members in groups.into_values().filter(|m| m.len() > 1) {
        let mut paths: Vec<String> = members.iter().map(|&i| images[i].0.path.clone()).collect();
        paths.sort();
        let in_val = members.iter().filter(|i| val.contains(i)).count();
        if in_val > 0 && in_val < members.len() {
            leakage.push(paths.clone());
        }
        duplicates.push(paths);
    }
    duplicates.sort();
    leakage.sort();
    (duplicates, leakage)
}

/// Reads a stored split: uint8 images `[N, 3, 256, 256]` and int64 labels `[N]`.
pub fn load_split(dir: &Path, file: &str) -> Result<(Tensor, Tensor), DataError> {
    let tensors = Tensor::read_safetensors(dir.join(file))?;
    let mut images = None;
    let mut labels = None;
    for (name, tensor) in tensors {
        match name.as_str() {
            "images" => images = Some(tensor),
            "labels" => labels = Some(tensor),
            _ => {}
        }
    }
    match (images, labels) {
        (Some(images), Some(labels)) => Ok((images, labels)),
        _ => Err(DataError::Io(std::io::Error::other(format!(
            "{} lacks its images or labels",
            dir.join(file).display()
        )))),
    }
}

fn check_classes(
    classes: &[String],
    images: &[(&archive::Entry, Vec<u8>)],
) -> Result<(), DataError> {
    if images.is_empty() {
        return Err(DataError::invalid(
            "the archive holds no decodable images in class folders",
            vec![FieldError::new(
                "file",
                "expected class/*.jpg or train/class/*.jpg",
            )],
        ));
    }
    let mut errors = Vec::new();
    if classes.len() < 2 {
        errors.push(FieldError::new(
            "file",
            format!(
                "found {} class folder(s) ({}); at least 2 are needed",
                classes.len(),
                classes.join(", ")
            ),
        ));
    }
    let mut unknown: Vec<&str> = images
        .iter()
        .filter(|(e, _)| classes.binary_search(&e.class).is_err())
        .map(|(e, _)| e.class.as_str())
        .collect();
    unknown.sort();
    unknown.dedup();
    for class in unknown {
        errors.push(FieldError::new(
            format!("class:{class}"),
            "appears in val/ but not in train/",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DataError::invalid(
            "the archive's classes are unusable",
            errors,
        ))
    }
}

/// Decodes every entry, spread over all cores.
fn decode_all(entries: &[archive::Entry]) -> Vec<Result<Vec<u8>, String>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = entries.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = entries
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|e| preprocess::decode_canonical(&e.bytes))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decoder thread panicked"))
            .collect()
    })
}
