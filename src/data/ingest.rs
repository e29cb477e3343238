//! The ingest pipeline: an archive's members decoded on every core into a
//! staging file, checked (classes, counts), split, and stored as the
//! dataset's split files and index, with duplicates and cross-split leakage
//! reported.
//!
//! An ingest either stores a complete dataset directory or nothing: the
//! caller passes a fresh directory and removes it on any error.

use std::collections::HashMap;
use std::path::Path;

use super::archive::{self, GivenSplit};
use super::{preprocess, split, stored};
use super::{DataError, IngestOptions, IngestReport, Progress, Skipped};
use crate::validation::FieldError;

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
