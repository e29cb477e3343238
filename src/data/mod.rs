//! Dataset ingest: archive → validated, split, decoded-once image tensors.
//!
//! An ingest either stores a complete dataset directory or nothing: the
//! caller passes a fresh directory and removes it on any error.

pub mod archive;
pub mod preprocess;
pub mod split;
pub mod stored;

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;
use tch::Tensor;

use crate::validation::{FieldError, MAX_LISTED_ERRORS};
use archive::GivenSplit;
pub use stored::{TEST_FILE, TRAIN_FILE, VAL_FILE};

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

/// Name of the file holding every decoded image, in archive order, while
/// the splits are not yet known.
const STAGING_FILE: &str = "decoded.staging";

/// Validates, splits and decodes the archive (zip, tar or tar.gz) at
/// `archive`, writing the split files into `out_dir`. Images are streamed
/// through the decoders a few at a time; `progress` hears of each step.
pub fn ingest_archive(
    archive: &Path,
    out_dir: &Path,
    opts: &IngestOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<IngestReport, DataError> {
    progress(Progress {
        stage: "reading",
        done: 0,
        total: 0,
    });
    let listing = archive::list(archive)?;
    let mut skipped = listing.skipped.clone();
    if listing.members.is_empty() {
        return Err(no_images());
    }
    std::fs::create_dir_all(out_dir)?;
    let staging = out_dir.join(STAGING_FILE);
    let decoded = decode_into(&listing, archive, &staging, opts.stored_size, progress);
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(err) => {
            let _ = std::fs::remove_file(&staging);
            return Err(err);
        }
    };
    let result = store_splits(&listing, decoded, &staging, out_dir, opts, progress);
    let _ = std::fs::remove_file(&staging);
    let mut report = result?;
    skipped.append(&mut report.skipped);
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    report.skipped = skipped;
    Ok(report)
}

type Hash = [u8; 32];

/// Each member's decode outcome: its content hash, or why it was unusable.
type Decoded = Vec<Result<Hash, String>>;

/// Decodes every member on all cores into its slot of the staging file
/// (member `i` at `i` × the image's bytes). The archive is read on this thread;
/// a bounded queue keeps only a few encoded images in memory.
fn decode_into(
    listing: &archive::Listing,
    archive: &Path,
    staging: &Path,
    side: u32,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Decoded, DataError> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let total = listing.members.len();
    let file = std::fs::File::create(staging)?;
    let image_bytes = preprocess::stored_bytes(side);
    file.set_len((total * image_bytes) as u64)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(2 * threads);
    let done = AtomicUsize::new(0);
    let mut outcomes: Decoded = vec![Err(String::new()); total];
    std::thread::scope(|scope| -> Result<(), DataError> {
        let decoders: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, file, done) = (rx.clone(), &file, &done);
                scope.spawn(
                    move || -> std::io::Result<Vec<(usize, Result<Hash, String>)>> {
                        let mut results = Vec::new();
                        for (index, bytes) in rx {
                            use sha2::{Digest, Sha256};
                            let outcome = match preprocess::decode_at(&bytes, side) {
                                Ok(pixels) => {
                                    file.write_all_at(&pixels, (index * image_bytes) as u64)?;
                                    Ok(Sha256::digest(&bytes).into())
                                }
                                Err(reason) => Err(format!("cannot decode: {reason}")),
                            };
                            results.push((index, outcome));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(results)
                    },
                )
            })
            .collect();
        drop(rx);
        let read = listing.read_members(archive, |index, bytes| {
            match bytes {
                // The decoders only stop early on a write error, reported below.
                Ok(bytes) => drop(tx.send((index, bytes))),
                Err(reason) => {
                    outcomes[index] = Err(reason);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            progress(Progress {
                stage: "decoding",
                done: done.load(Ordering::Relaxed),
                total,
            });
        });
        drop(tx);
        for decoder in decoders {
            for (index, outcome) in decoder.join().expect("decoder thread panicked")? {
                outcomes[index] = outcome;
            }
        }
        read
    })?;
    Ok(outcomes)
}

/// Validates the decoded images, splits them and writes the split files
/// from the staging file.
fn store_splits(
    listing: &archive::Listing,
    decoded: Decoded,
    staging: &Path,
    out_dir: &Path,
    opts: &IngestOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<IngestReport, DataError> {
    let members = &listing.members;
    let mut usable = Vec::new();
    let mut undecodable = Vec::new();
    let mut hashes = vec![None; members.len()];
    for (index, outcome) in decoded.into_iter().enumerate() {
        match outcome {
            Ok(hash) => {
                hashes[index] = Some(hash);
                usable.push(index);
            }
            Err(reason) => undecodable.push(Skipped::new(&members[index].path, reason)),
        }
    }
    if opts.strict && !undecodable.is_empty() {
        return Err(DataError::invalid(
            "some images cannot be decoded (strict=true rejects the upload)",
            undecodable
                .into_iter()
                .map(|s| FieldError::new(format!("file:{}", s.path), s.reason))
                .collect(),
        ));
    }
    if usable.is_empty() {
        return Err(no_images());
    }

    let mut classes: Vec<String> = usable
        .iter()
        .map(|&i| &members[i])
        .filter(|m| matches!(m.split, None | Some(GivenSplit::Train)))
        .map(|m| m.class.clone())
        .collect();
    classes.sort();
    classes.dedup();
    check_classes(&classes, usable.iter().map(|&i| &members[i]))?;

    let items: Vec<split::Item> = usable
        .iter()
        .map(|&i| split::Item {
            label: classes
                .binary_search(&members[i].class)
                .expect("class checked"),
            given: members[i].split,
        })
        .collect();
    let assignment = split::assign(
        &items,
        classes.len(),
        opts.val_fraction,
        opts.test_fraction,
        opts.seed,
    );
    check_counts(&classes, &items, &assignment, opts)?;

    let staging = std::fs::File::open(staging)?;
    let total = usable.len();
    let mut done = 0;
    let mut index = stored::Index::default();
    let image_bytes = preprocess::stored_bytes(opts.stored_size);
    let mut pixels = vec![0u8; image_bytes];
    for (file, chosen, entries) in [
        (stored::TRAIN_FILE, &assignment.train, &mut index.train),
        (stored::VAL_FILE, &assignment.val, &mut index.val),
        (stored::TEST_FILE, &assignment.test, &mut index.test),
    ] {
        if chosen.is_empty() && file == stored::TEST_FILE {
            continue;
        }
        let mut writer =
            stored::SplitWriter::create(&out_dir.join(file), chosen.len(), opts.stored_size)?;
        for &item in chosen.iter() {
            use std::os::unix::fs::FileExt;
            let member = usable[item];
            staging.read_exact_at(&mut pixels, (member * image_bytes) as u64)?;
            writer.push(&pixels, items[item].label)?;
            entries.push(stored::IndexEntry {
                path: members[member].path.clone(),
                label: items[item].label,
            });
            done += 1;
            if done % 64 == 0 {
                progress(Progress {
                    stage: "storing",
                    done,
                    total,
                });
            }
        }
        writer.finish()?;
    }
    index.write(out_dir)?;

    let paths: Vec<&str> = usable.iter().map(|&m| members[m].path.as_str()).collect();
    let item_hashes: Vec<Hash> = usable
        .iter()
        .map(|&m| hashes[m].expect("decoded"))
        .collect();
    let (duplicates, leakage) = find_duplicates(&paths, &item_hashes, &assignment);
    let count = |chosen: &[usize]| split::counts(chosen, &items, classes.len());
    Ok(IngestReport {
        train_counts: count(&assignment.train),
        val_counts: count(&assignment.val),
        test_counts: count(&assignment.test),
        classes,
        skipped: undecodable,
        duplicates,
        leakage,
    })
}

/// Groups of images with identical bytes (each sorted by path), and those of
/// them spread over more than one split.
fn find_duplicates(
    paths: &[&str],
    hashes: &[Hash],
    assignment: &split::Assignment,
) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let mut split_of = vec![0u8; paths.len()];
    for (split, chosen) in [(1, &assignment.val), (2, &assignment.test)] {
        for &i in chosen.iter() {
            split_of[i] = split;
        }
    }
    let mut groups: HashMap<Hash, Vec<usize>> = HashMap::new();
    for (index, hash) in hashes.iter().enumerate() {
        groups.entry(*hash).or_default().push(index);
    }
    let mut duplicates = Vec::new();
    let mut leakage = Vec::new();
    for members in groups.into_values().filter(|m| m.len() > 1) {
        let mut group: Vec<String> = members.iter().map(|&i| paths[i].to_string()).collect();
        group.sort();
        if members.iter().any(|&i| split_of[i] != split_of[members[0]]) {
            leakage.push(group.clone());
        }
        duplicates.push(group);
    }
    duplicates.sort();
    leakage.sort();
    (duplicates, leakage)
}

/// Reads a stored split: uint8 images `[N, 3, S, S]` and int64 labels `[N]`.
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

fn no_images() -> DataError {
    DataError::invalid(
        "the archive holds no decodable images in class folders",
        vec![FieldError::new(
            "file",
            "expected class/*.jpg, train/class/*.jpg or a labels.csv manifest",
        )],
    )
}

/// At least two classes, and no val/test class that train lacks.
fn check_classes<'a>(
    classes: &[String],
    members: impl Iterator<Item = &'a archive::Member>,
) -> Result<(), DataError> {
    let mut errors = Vec::new();
    if classes.len() < 2 {
        errors.push(FieldError::new(
            "file",
            format!(
                "found {} class(es) ({}); at least 2 are needed",
                classes.len(),
                classes.join(", ")
            ),
        ));
    }
    let mut unknown: Vec<(String, &'static str)> = members
        .filter(|m| classes.binary_search(&m.class).is_err())
        .map(|m| (m.class.clone(), m.split.map_or("val", GivenSplit::name)))
        .collect();
    unknown.sort();
    unknown.dedup();
    for (class, split) in unknown {
        errors.push(FieldError::new(
            format!("class:{class}"),
            format!("appears in {split} but not in train"),
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

/// Every class has enough training images, and there is something to
/// validate on.
fn check_counts(
    classes: &[String],
    items: &[split::Item],
    assignment: &split::Assignment,
    opts: &IngestOptions,
) -> Result<(), DataError> {
    let train_counts = split::counts(&assignment.train, items, classes.len());
    let mut errors: Vec<FieldError> = classes
        .iter()
        .zip(&train_counts)
        .filter(|(_, &n)| (n as usize) < opts.min_train_per_class)
        .map(|(class, n)| {
            FieldError::new(
                format!("class:{class}"),
                format!(
                    "{n} training image(s); at least {} needed (min_per_class)",
                    opts.min_train_per_class
                ),
            )
        })
        .collect();
    if errors.is_empty() && assignment.val.is_empty() {
        errors.push(FieldError::new(
            "file",
            "no validation images: every class has a single image, or val/ is empty",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DataError::invalid(
            "some classes have too few images",
            errors,
        ))
    }
}
