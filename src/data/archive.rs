//! Reads an uploaded archive (zip, tar or tar.gz) of class folders into labelled image entries.
//!
//! Accepted layouts: `class/*`, or `train/class/*` + `val/class/*`, either
//! one optionally wrapped in a single top-level folder (what zipping a folder
//! produces). Operating-system litter and non-images are skipped and
//! reported; unsafe paths reject the whole archive.

use std::io::Read;
use std::path::Path;

use crate::error::FieldError;

use super::{DataError, Skipped};

/// Which split a file was placed in by the archive's own layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GivenSplit {
    Train,
    Val,
}

/// An image file found in the archive, not yet decoded.
pub struct Entry {
    pub path: String,
    pub class: String,
    pub split: Option<GivenSplit>,
    pub bytes: Vec<u8>,
}

/// Archive-bomb bounds: entries, total uncompressed bytes, and how much an
/// entry may expand (images barely compress, so a high ratio is an attack).
pub const MAX_ENTRIES: usize = 200_000;
pub const MAX_TOTAL_BYTES: u64 = 8 * 1024 * 1024 * 1024;
pub const MAX_RATIO: u64 = 100;

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];
const SPLIT_DIRS: &[(&str, GivenSplit)] = &[
    ("train", GivenSplit::Train),
    ("val", GivenSplit::Val),
    ("valid", GivenSplit::Val),
    ("validation", GivenSplit::Val),
];

/// Reads every image entry of the zip at `path`.
fn read_zip(path: &Path) -> Result<(Vec<Entry>, Vec<Skipped>), DataError> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(file).map_err(|err| {
        DataError::invalid(
            "the upload is not a readable zip archive",
            vec![FieldError::new("file", err.to_string())],
        )
    })?;

    if zip.len() > MAX_ENTRIES {
        return Err(DataError::invalid(
            "the archive has too many entries",
            vec![FieldError::new(
                "file",
                format!("{} entries; at most {MAX_ENTRIES}", zip.len()),
            )],
        ));
    }
    let mut files: Vec<(usize, Vec<String>)> = Vec::new();
    let mut skipped = Vec::new();
    let mut unsafe_paths = Vec::new();
    let mut bombs = Vec::new();
    let mut total: u64 = 0;
    for index in 0..zip.len() {
        let entry = zip.by_index_raw(index).map_err(corrupt)?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().to_string();
        total = total.saturating_add(entry.size());
        if entry.size() > entry.compressed_size().max(1024).saturating_mul(MAX_RATIO) {
            bombs.push(FieldError::new(
                format!("file:{name}"),
                format!(
                    "expands from {} to {} bytes, more than {MAX_RATIO}x (archive bomb)",
                    entry.compressed_size(),
                    entry.size()
                ),
            ));
            continue;
        }
        if entry.enclosed_name().is_none() || entry.is_symlink() {
            unsafe_paths.push(FieldError::new(
                format!("file:{name}"),
                "unsafe path (absolute, `..` or symlink)",
            ));
            continue;
        }
        if let Some(parts) = image_parts(&name, &mut skipped) {
            files.push((index, parts));
        }
    }
    if !unsafe_paths.is_empty() {
        return Err(DataError::invalid(
            "the archive contains unsafe paths",
            unsafe_paths,
        ));
    }
    if total > MAX_TOTAL_BYTES {
        bombs.push(FieldError::new(
            "file",
            format!("{total} bytes uncompressed; at most {MAX_TOTAL_BYTES}"),
        ));
    }
    if !bombs.is_empty() {
        return Err(DataError::invalid(
            "the archive expands beyond its limits",
            bombs,
        ));
    }

    let (labelled, mut skipped_more) = classify(files);
    skipped.append(&mut skipped_more);
    let mut entries = Vec::new();
    for (name, class, split, index) in labelled {
        let entry = zip.by_index(index).map_err(corrupt)?;
        let declared = entry.size();
        let mut bytes = Vec::with_capacity(declared as usize);
        // Never more than the header declared, whatever the stream holds.
        if let Err(err) = entry.take(declared).read_to_end(&mut bytes) {
            skipped.push(Skipped::new(
                &name,
                format!("unreadable in the archive: {err}"),
            ));
            continue;
        }
        entries.push(Entry {
            path: name,
            class,
            split,
            bytes,
        });
    }
    Ok((entries, skipped))
}

/// The path's folders and file name when it names an image file; litter is
/// dropped silently, other files are reported as skipped.
fn image_parts(name: &str, skipped: &mut Vec<Skipped>) -> Option<Vec<String>> {
    let parts: Vec<String> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
        .collect();
    if parts.is_empty() || is_litter(&parts) {
        return None;
    }
    let extension = parts
        .last()
        .and_then(|f| f.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    if !extension.is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.as_str())) {
        skipped.push(Skipped::new(name, "not an image file"));
        return None;
    }
    Some(parts)
}

/// Reads an uploaded archive, whichever kind its first bytes say it is:
/// zip, tar, or gzip-compressed tar.
pub fn read_archive(path: &Path) -> Result<(Vec<Entry>, Vec<Skipped>), DataError> {
    let mut head = [0u8; 512];
    let n = std::fs::File::open(path)?.read(&mut head)?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        read_zip(path)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        let file = std::fs::File::open(path)?;
        read_tar(flate2::read::GzDecoder::new(file))
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        read_tar(std::fs::File::open(path)?)
    } else {
        Err(DataError::invalid(
            "the upload is not a zip, tar or tar.gz archive",
            vec![FieldError::new(
                "file",
                "unrecognised content (the archive's first bytes match no supported format)",
            )],
        ))
    }
}

/// Reads every image file of a tar stream, bounded like a zip: entries,
/// total bytes (which for tar.gz bounds the inflation), unsafe paths and
/// links refused.
fn read_tar(stream: impl Read) -> Result<(Vec<Entry>, Vec<Skipped>), DataError> {
    let broken = |err: std::io::Error| {
        DataError::invalid(
            "the tar archive is corrupt",
            vec![FieldError::new("file", err.to_string())],
        )
    };
    let mut archive = tar::Archive::new(stream);
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut unsafe_paths = Vec::new();
    let mut total: u64 = 0;
    for (count, entry) in archive.entries().map_err(broken)?.enumerate() {
        let mut entry = entry.map_err(broken)?;
        if count >= MAX_ENTRIES {
            return Err(DataError::invalid(
                "the archive has too many entries",
                vec![FieldError::new(
                    "file",
                    format!("more than {MAX_ENTRIES} entries"),
                )],
            ));
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let escapes = name.starts_with('/') || name.split('/').any(|p| p == "..");
        if escapes || kind.is_symlink() || kind.is_hard_link() {
            unsafe_paths.push(FieldError::new(
                format!("file:{name}"),
                "unsafe path (absolute, `..` or link)",
            ));
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let Some(parts) = image_parts(&name, &mut skipped) else {
            continue;
        };
        total = total.saturating_add(entry.size());
        if total > MAX_TOTAL_BYTES {
            return Err(DataError::invalid(
                "the archive expands beyond its limits",
                vec![FieldError::new(
                    "file",
                    format!("more than {MAX_TOTAL_BYTES} bytes of images"),
                )],
            ));
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        let declared = entry.size();
        if let Err(err) = (&mut entry).take(declared).read_to_end(&mut bytes) {
            skipped.push(Skipped::new(
                &name,
                format!("unreadable in the archive: {err}"),
            ));
            continue;
        }
        files.push((bytes, parts));
    }
    if !unsafe_paths.is_empty() {
        return Err(DataError::invalid(
            "the archive contains unsafe paths",
            unsafe_paths,
        ));
    }
    let (labelled, mut more) = classify(files);
    skipped.append(&mut more);
    let entries = labelled
        .into_iter()
        .map(|(path, class, split, bytes)| Entry {
            path,
            class,
            split,
            bytes,
        })
        .collect();
    Ok((entries, skipped))
}

/// Drops a wrapper folder and assigns each image file its class and split
/// from its path; what fits no layout is skipped with the reason.
#[allow(clippy::type_complexity)]
fn classify<T>(
    mut files: Vec<(T, Vec<String>)>,
) -> (Vec<(String, String, Option<GivenSplit>, T)>, Vec<Skipped>) {
    strip_wrapper_folder(&mut files);
    let split_layout = files
        .iter()
        .any(|(_, parts)| parts.len() >= 3 && split_of(&parts[0]).is_some());
    let mut labelled = Vec::new();
    let mut skipped = Vec::new();
    for (payload, parts) in files {
        let name = parts.join("/");
        let (split, class) = match (split_layout, parts.len()) {
            (true, n) if n >= 3 => match split_of(&parts[0]) {
                Some(split) => (Some(split), parts[1].clone()),
                None => {
                    skipped.push(Skipped::new(&name, "outside the train/ and val/ folders"));
                    continue;
                }
            },
            (false, n) if n >= 2 => (None, parts[0].clone()),
            _ => {
                skipped.push(Skipped::new(&name, "not inside a class folder"));
                continue;
            }
        };
        labelled.push((name, class, split, payload));
    }
    (labelled, skipped)
}

fn corrupt(err: zip::result::ZipError) -> DataError {
    DataError::invalid(
        "the zip archive is corrupt",
        vec![FieldError::new("file", err.to_string())],
    )
}

fn split_of(dir: &str) -> Option<GivenSplit> {
    let dir = dir.to_ascii_lowercase();
    SPLIT_DIRS
        .iter()
        .find(|(name, _)| *name == dir)
        .map(|(_, split)| *split)
}

/// macOS resource forks, Finder and Explorer metadata, hidden files.
fn is_litter(parts: &[String]) -> bool {
    parts.iter().any(|p| p.starts_with('.') || p == "__MACOSX")
        || parts.last().is_some_and(|f| {
            f.eq_ignore_ascii_case("thumbs.db") || f.eq_ignore_ascii_case("desktop.ini")
        })
}

/// Zipping a folder wraps everything in it; a single common top folder that
/// is not itself a split folder is dropped.
fn strip_wrapper_folder<T>(files: &mut [(T, Vec<String>)]) {
    let Some(first) = files.first().map(|(_, parts)| parts[0].clone()) else {
        return;
    };
    let all_wrapped = files
        .iter()
        .all(|(_, parts)| parts.len() >= 3 && parts[0] == first);
    if all_wrapped && split_of(&first).is_none() {
        for (_, parts) in files.iter_mut() {
            parts.remove(0);
        }
    }
}
