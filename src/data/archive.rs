//! Reads an uploaded archive (zip, tar or tar.gz) of labelled images, in two
//! passes so that no more than a few images are ever held in memory:
//! [`list`] reads names (and a `labels.csv` manifest) and assigns each image
//! its class and given split; [`Listing::read_members`] then streams the
//! images' bytes one by one.
//!
//! Accepted layouts: `class/*`; `train/class/*` + `val/class/*` (also
//! `valid/`, `validation/`) + optional `test/class/*`; or a `labels.csv`
//! manifest (`path,label[,split]`) beside the images. Any of them may be
//! wrapped in a single top-level folder (what zipping a folder produces).
//! Operating-system litter is dropped, other non-images are skipped and
//! reported; unsafe paths reject the whole archive.
//!
//! Everything a listing holds is bounded before it is read: entries, paths,
//! the manifest, tar extension headers and, for tar.gz, the inflation of the
//! whole stream ([`tar_guard`]).

mod tar_guard;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use crate::validation::FieldError;
use tar_guard::{Refusal, TarGuard};

use super::{DataError, Problems, Skipped};

/// Which split a file was placed in by the archive's own layout or manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GivenSplit {
    Train,
    Val,
    Test,
}

impl GivenSplit {
    pub fn name(self) -> &'static str {
        match self {
            GivenSplit::Train => "train",
            GivenSplit::Val => "val",
            GivenSplit::Test => "test",
        }
    }
}

/// An image file found in the archive, not yet read.
#[derive(Debug, Clone)]
pub struct Member {
    pub path: String,
    pub class: String,
    pub split: Option<GivenSplit>,
    /// The entry's index (zip) or ordinal (tar) in the archive.
    locator: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zip,
    Tar,
    TarGz,
}

/// The labelled images of an archive, and the files left out.
pub struct Listing {
    kind: Kind,
    pub members: Vec<Member>,
    pub skipped: Vec<Skipped>,
}

/// Archive-bomb bounds: entries, total uncompressed bytes, and how much an
/// entry (zip) or the whole stream (tar.gz) may expand (images barely
/// compress, so a high ratio is an attack).
pub const MAX_ENTRIES: usize = 200_000;
pub const MAX_TOTAL_BYTES: u64 = 8 * 1024 * 1024 * 1024;
pub const MAX_RATIO: u64 = 100;
/// A tar.gz smaller than this is counted as this size for [`MAX_RATIO`]:
/// tar pads each entry to 512 bytes and the archive to 10 KiB, so small
/// honest ones compress well.
const RATIO_FLOOR_BYTES: u64 = 1024 * 1024;
/// Larger single files are skipped unread (no camera makes them).
pub const MAX_IMAGE_BYTES: u64 = 256 * 1024 * 1024;
/// Bound on the manifests read, together: each is read whole. A row per
/// entry at [`MAX_ENTRIES`] leaves each over 80 bytes.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// Bounds on the paths a listing holds: one path, its depth (each folder
/// is held apart), and all of them together.
const MAX_PATH_BYTES: usize = 1024;
const MAX_PATH_DEPTH: usize = 16;
const MAX_PATHS_BYTES: u64 = 64 * 1024 * 1024;
pub const MANIFEST: &str = "labels.csv";

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];
const SPLIT_NAMES: &[(&str, GivenSplit)] = &[
    ("train", GivenSplit::Train),
    ("val", GivenSplit::Val),
    ("valid", GivenSplit::Val),
    ("validation", GivenSplit::Val),
    ("test", GivenSplit::Test),
];

/// A file kept by the first pass: an image (by locator) or the manifest.
struct Found {
    images: Vec<(usize, Vec<String>)>,
    manifests: Vec<(Vec<String>, Vec<u8>)>,
    skipped: Vec<Skipped>,
}

/// Lists an uploaded archive, whichever kind its first bytes say it is:
/// zip, tar, or gzip-compressed tar.
pub fn list(path: &Path) -> Result<Listing, DataError> {
    let kind = kind_of(path)?;
    let found = match kind {
        Kind::Zip => list_zip(path)?,
        Kind::Tar | Kind::TarGz => list_tar(tar_stream(path, kind)?)?,
    };
    let Found {
        images,
        manifests,
        mut skipped,
    } = found;
    let (members, mut more) = classify(images, manifests)?;
    skipped.append(&mut more);
    Ok(Listing {
        kind,
        members,
        skipped,
    })
}

impl Listing {
    /// Streams the bytes of every member, in archive order, to `each` with
    /// the member's index in [`Listing::members`]; an entry that cannot be
    /// read is passed as its reason.
    pub fn read_members(
        &self,
        path: &Path,
        mut each: impl FnMut(usize, Result<Vec<u8>, String>),
    ) -> Result<(), DataError> {
        let by_locator: HashMap<usize, usize> = self
            .members
            .iter()
            .enumerate()
            .map(|(index, m)| (m.locator, index))
            .collect();
        match self.kind {
            Kind::Zip => {
                let mut zip = open_zip(path)?;
                let mut order: Vec<(usize, usize)> = by_locator.into_iter().collect();
                order.sort_unstable();
                for (locator, index) in order {
                    let entry = zip.by_index(locator).map_err(corrupt)?;
                    let declared = entry.size();
                    each(index, read_bounded(entry, declared).map_err(unreadable));
                }
                Ok(())
            }
            Kind::Tar | Kind::TarGz => {
                read_tar_members(tar_stream(path, self.kind)?, &by_locator, each)
            }
        }
    }
}

fn kind_of(path: &Path) -> Result<Kind, DataError> {
    let mut head = [0u8; 512];
    let n = std::fs::File::open(path)?.read(&mut head)?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Kind::Zip)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Kind::TarGz)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Kind::Tar)
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

/// The archive's tar stream, inflated for tar.gz, behind a [`TarGuard`]
/// whose limit makes the whole inflation count against the archive's bounds.
fn tar_stream(path: &Path, kind: Kind) -> Result<TarGuard<Box<dyn Read>>, DataError> {
    let file = std::fs::File::open(path)?;
    if kind != Kind::TarGz {
        return Ok(TarGuard::new(Box::new(file), MAX_TOTAL_BYTES));
    }
    let compressed = file.metadata()?.len();
    let limit = compressed
        .max(RATIO_FLOOR_BYTES)
        .saturating_mul(MAX_RATIO)
        .min(MAX_TOTAL_BYTES);
    Ok(TarGuard::new(
        Box::new(flate2::read::GzDecoder::new(file)),
        limit,
    ))
}

/// Reads at most `declared` bytes: never more than the header said,
/// whatever the stream holds.
fn read_bounded(entry: impl Read, declared: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(declared.min(MAX_IMAGE_BYTES) as usize);
    entry.take(declared).read_to_end(&mut bytes).map(|_| bytes)
}

fn unreadable(err: std::io::Error) -> String {
    format!("unreadable in the archive: {err}")
}

/// Counts a manifest of `size` bytes against [`MAX_MANIFEST_BYTES`].
fn count_manifest(name: &str, size: u64, read: &mut u64) -> Result<(), DataError> {
    *read = read.saturating_add(size);
    if *read <= MAX_MANIFEST_BYTES {
        return Ok(());
    }
    Err(DataError::invalid(
        "the manifest is too large",
        vec![FieldError::new(
            format!("file:{name}"),
            format!("{size} bytes; manifests may hold at most {MAX_MANIFEST_BYTES} bytes in all"),
        )],
    ))
}

/// Counts a member's path against the bounds on the paths a listing holds.
fn count_path(name: &str, held: &mut u64) -> Result<(), DataError> {
    if name.len() > MAX_PATH_BYTES {
        let end = (0..=64)
            .rev()
            .find(|&i| name.is_char_boundary(i))
            .unwrap_or(0);
        return Err(DataError::invalid(
            "the archive has an over-long path",
            vec![FieldError::new(
                "file",
                format!(
                    "a path of {} bytes ({}…); at most {MAX_PATH_BYTES}",
                    name.len(),
                    &name[..end]
                ),
            )],
        ));
    }
    *held += name.len() as u64;
    if *held > MAX_PATHS_BYTES {
        return Err(DataError::invalid(
            "the archive's paths are too long together",
            vec![FieldError::new(
                "file",
                format!("more than {MAX_PATHS_BYTES} bytes of paths"),
            )],
        ));
    }
    Ok(())
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<std::fs::File>, DataError> {
    zip::ZipArchive::new(std::fs::File::open(path)?).map_err(|err| {
        DataError::invalid(
            "the upload is not a readable zip archive",
            vec![FieldError::new("file", err.to_string())],
        )
    })
}

fn too_many_entries(detail: String) -> DataError {
    DataError::invalid(
        "the archive has too many entries",
        vec![FieldError::new("file", detail)],
    )
}

/// The zip's central directory: every bound is checked from the headers
/// before anything is inflated.
fn list_zip(path: &Path) -> Result<Found, DataError> {
    let mut zip = open_zip(path)?;
    if zip.len() > MAX_ENTRIES {
        return Err(too_many_entries(format!(
            "{} entries; at most {MAX_ENTRIES}",
            zip.len()
        )));
    }
    let mut found = Found {
        images: Vec::new(),
        manifests: Vec::new(),
        skipped: Vec::new(),
    };
    let mut unsafe_paths = Problems::default();
    let mut bombs = Problems::default();
    let (mut total, mut held, mut manifest_bytes) = (0u64, 0, 0);
    let mut manifest_indices = Vec::new();
    for index in 0..zip.len() {
        let entry = zip.by_index_raw(index).map_err(corrupt)?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().to_string();
        count_path(&name, &mut held)?;
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
        match sort_file(&name, entry.size(), &mut found.skipped) {
            Some(Sorted::Image(parts)) => found.images.push((index, parts)),
            Some(Sorted::Manifest(parts)) => {
                count_manifest(&name, entry.size(), &mut manifest_bytes)?;
                manifest_indices.push((index, name, parts));
            }
            None => {}
        }
    }
    unsafe_paths.check("the archive contains unsafe paths")?;
    if total > MAX_TOTAL_BYTES {
        bombs.push(FieldError::new(
            "file",
            format!("{total} bytes uncompressed; at most {MAX_TOTAL_BYTES}"),
        ));
    }
    bombs.check("the archive expands beyond its limits")?;
    for (index, name, parts) in manifest_indices {
        let entry = zip.by_index(index).map_err(corrupt)?;
        let declared = entry.size();
        let bytes = read_bounded(entry, declared).map_err(|err| manifest_unreadable(&name, err))?;
        found.manifests.push((parts, bytes));
    }
    Ok(found)
}

fn manifest_unreadable(name: &str, err: std::io::Error) -> DataError {
    if Refusal::of(&err).is_some() {
        return broken_tar(err);
    }
    DataError::invalid(
        "the manifest cannot be read",
        vec![FieldError::new(format!("file:{name}"), unreadable(err))],
    )
}

/// A tar stream's headers, bounded like a zip: entries, total bytes (which
/// for tar.gz bounds the inflation), unsafe paths and links refused.
fn list_tar(stream: impl Read) -> Result<Found, DataError> {
    let mut archive = tar::Archive::new(stream);
    let mut found = Found {
        images: Vec::new(),
        manifests: Vec::new(),
        skipped: Vec::new(),
    };
    let mut unsafe_paths = Problems::default();
    let (mut total, mut held, mut manifest_bytes) = (0u64, 0, 0);
    for (ordinal, entry) in archive.entries().map_err(broken_tar)?.enumerate() {
        let entry = entry.map_err(broken_tar)?;
        if ordinal >= MAX_ENTRIES {
            return Err(too_many_entries(format!("more than {MAX_ENTRIES} entries")));
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        count_path(&name, &mut held)?;
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
        total = total.saturating_add(entry.size());
        if total > MAX_TOTAL_BYTES {
            return Err(DataError::invalid(
                "the archive expands beyond its limits",
                vec![FieldError::new(
                    "file",
                    format!("more than {MAX_TOTAL_BYTES} bytes of files"),
                )],
            ));
        }
        match sort_file(&name, entry.size(), &mut found.skipped) {
            Some(Sorted::Image(parts)) => found.images.push((ordinal, parts)),
            Some(Sorted::Manifest(parts)) => {
                let declared = entry.size();
                count_manifest(&name, declared, &mut manifest_bytes)?;
                let bytes =
                    read_bounded(entry, declared).map_err(|err| manifest_unreadable(&name, err))?;
                found.manifests.push((parts, bytes));
            }
            None => {}
        }
    }
    unsafe_paths.check("the archive contains unsafe paths")?;
    Ok(found)
}

/// Streams a tar again, passing on the members the listing kept.
fn read_tar_members(
    stream: impl Read,
    by_locator: &HashMap<usize, usize>,
    mut each: impl FnMut(usize, Result<Vec<u8>, String>),
) -> Result<(), DataError> {
    let mut archive = tar::Archive::new(stream);
    for (ordinal, entry) in archive.entries().map_err(broken_tar)?.enumerate() {
        let entry = entry.map_err(broken_tar)?;
        if let Some(&index) = by_locator.get(&ordinal) {
            let declared = entry.size();
            each(index, read_bounded(entry, declared).map_err(unreadable));
        }
    }
    Ok(())
}

/// A tar stream's error; the guard's refusals say which bound was hit.
fn broken_tar(err: std::io::Error) -> DataError {
    let (detail, reason) = match Refusal::of(&err) {
        Some(Refusal::TooLong { limit }) if *limit < MAX_TOTAL_BYTES => (
            "the archive expands beyond its limits",
            format!(
                "inflates past {limit} bytes, more than {MAX_RATIO} times its compressed size (archive bomb)"
            ),
        ),
        Some(Refusal::TooLong { .. }) => (
            "the archive expands beyond its limits",
            format!("more than {MAX_TOTAL_BYTES} bytes uncompressed"),
        ),
        Some(refusal) => ("the tar archive has an unsupported entry", refusal.to_string()),
        None => ("the tar archive is corrupt", err.to_string()),
    };
    DataError::invalid(detail, vec![FieldError::new("file", reason)])
}

enum Sorted {
    Image(Vec<String>),
    Manifest(Vec<String>),
}

/// Sorts a file by its path: an image, the manifest, litter (dropped
/// silently) or anything else (reported as skipped).
fn sort_file(name: &str, size: u64, skipped: &mut Vec<Skipped>) -> Option<Sorted> {
    let parts = path_parts(name);
    if parts.is_empty() || is_litter(&parts) {
        return None;
    }
    if parts.len() > MAX_PATH_DEPTH {
        skipped.push(Skipped::new(
            name,
            format!("nested deeper than {MAX_PATH_DEPTH} folders"),
        ));
        return None;
    }
    let file = parts.last().expect("not empty");
    if file.eq_ignore_ascii_case(MANIFEST) && parts.len() <= 2 {
        return Some(Sorted::Manifest(parts));
    }
    let extension = file
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase());
    if !extension.is_some_and(|ext| IMAGE_EXTENSIONS.contains(&ext.as_str())) {
        skipped.push(Skipped::new(name, "not an image file"));
        return None;
    }
    if size > MAX_IMAGE_BYTES {
        skipped.push(Skipped::new(
            name,
            format!("{size} bytes; images may be at most {MAX_IMAGE_BYTES}"),
        ));
        return None;
    }
    Some(Sorted::Image(parts))
}

fn path_parts(name: &str) -> Vec<String> {
    name.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
        .collect()
}

/// Drops a wrapper folder and assigns each image its class and split, from
/// the manifest when there is one, else from its folders; what fits no
/// layout is skipped with the reason.
fn classify(
    mut images: Vec<(usize, Vec<String>)>,
    mut manifests: Vec<(Vec<String>, Vec<u8>)>,
) -> Result<(Vec<Member>, Vec<Skipped>), DataError> {
    strip_wrapper_folder(&mut images, &mut manifests);
    let manifest = manifests.into_iter().find(|(parts, _)| parts.len() == 1);
    if let Some((parts, bytes)) = manifest {
        return classify_by_manifest(images, &parts[0], &bytes);
    }
    let split_layout = images
        .iter()
        .any(|(_, parts)| parts.len() >= 3 && split_of(&parts[0]).is_some());
    let mut members = Vec::new();
    let mut skipped = Vec::new();
    for (locator, parts) in images {
        let path = parts.join("/");
        let (split, class) = match (split_layout, parts.len()) {
            (true, n) if n >= 3 => match split_of(&parts[0]) {
                Some(split) => (Some(split), parts[1].clone()),
                None => {
                    skipped.push(Skipped::new(
                        &path,
                        "outside the train/, val/ and test/ folders",
                    ));
                    continue;
                }
            },
            (false, n) if n >= 2 => (None, parts[0].clone()),
            _ => {
                skipped.push(Skipped::new(&path, "not inside a class folder"));
                continue;
            }
        };
        members.push(Member {
            path,
            class,
            split,
            locator,
        });
    }
    Ok((members, skipped))
}

/// Labels from `labels.csv` rows `path,label[,split]` (a header row naming
/// `path` is optional; paths are relative to the manifest's folder). Rows
/// naming no image in the archive, or malformed, reject the upload; images
/// the manifest does not list are skipped. Only the rows naming images are
/// held, so a manifest of bad rows costs no more than its bytes.
fn classify_by_manifest(
    images: Vec<(usize, Vec<String>)>,
    manifest_name: &str,
    bytes: &[u8],
) -> Result<(Vec<Member>, Vec<Skipped>), DataError> {
    let mut by_path: HashMap<String, usize> = images
        .into_iter()
        .map(|(locator, parts)| (parts.join("/"), locator))
        .collect();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut members = Vec::new();
    let mut errors = Problems::default();
    let mut seen = HashSet::new();
    // One record reused, and errors past the listed ones never formatted: a
    // manifest of millions of bad rows is read in moments.
    let mut record = csv::ByteRecord::new();
    for line in 1.. {
        let row = match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => manifest_row(&record, line == 1),
            Err(err) => Err(err.to_string().into()),
        };
        let at = || format!("{manifest_name}:{line}");
        let (path, label, split) = match row {
            Ok(Some(row)) => row,
            Ok(None) => continue,
            Err(reason) => {
                errors.add(|| FieldError::new(at(), reason));
                continue;
            }
        };
        let path = path_parts(path).join("/");
        match by_path.remove(&path) {
            Some(locator) => {
                seen.insert(path.clone());
                members.push(Member {
                    path,
                    class: label.to_string(),
                    split,
                    locator,
                });
            }
            None => errors.add(|| {
                let wrong = match seen.contains(&path) {
                    true => "is listed twice",
                    false => "is not an image in the archive",
                };
                FieldError::new(at(), format!("{path} {wrong}"))
            }),
        }
    }
    errors.check(format!("{manifest_name} does not match the archive"))?;
    let mut skipped: Vec<Skipped> = by_path
        .into_keys()
        .map(|path| Skipped::new(&path, format!("not listed in {manifest_name}")))
        .collect();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((members, skipped))
}

/// A manifest row's path, label and split, trimmed; `None` for a header or
/// blank row.
type Row<'a> = Option<(&'a str, &'a str, Option<GivenSplit>)>;

/// Reads one manifest row, or says what is wrong with it.
fn manifest_row(record: &csv::ByteRecord, first: bool) -> Result<Row<'_>, Cow<'static, str>> {
    let text = |bytes| std::str::from_utf8(bytes).map(str::trim);
    let field = |i| text(record.get(i).unwrap_or(b"")).map_err(|_| "not UTF-8 text");
    let blank = record.iter().all(|f| text(f).is_ok_and(str::is_empty));
    if blank || (first && field(0)?.eq_ignore_ascii_case("path")) {
        return Ok(None);
    }
    let (path, label) = (field(0)?, field(1)?);
    if record.len() > 3 || path.is_empty() || label.is_empty() {
        return Err("expected `path,label[,split]`".into());
    }
    let split = match field(2)? {
        "" => None,
        given => Some(
            split_of(given).ok_or_else(|| format!("split {given:?} is not train, val or test"))?,
        ),
    };
    Ok(Some((path, label, split)))
}

fn corrupt(err: zip::result::ZipError) -> DataError {
    DataError::invalid(
        "the zip archive is corrupt",
        vec![FieldError::new("file", err.to_string())],
    )
}

fn split_of(dir: &str) -> Option<GivenSplit> {
    SPLIT_NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(dir))
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
fn strip_wrapper_folder(
    images: &mut [(usize, Vec<String>)],
    manifests: &mut [(Vec<String>, Vec<u8>)],
) {
    let Some(first) = images.first().map(|(_, parts)| parts[0].clone()) else {
        return;
    };
    // With a manifest beside them, images may sit directly in the wrapper.
    let manifest_wrapped = manifests
        .iter()
        .any(|(parts, _)| parts.len() == 2 && parts[0] == first);
    let depth = if manifest_wrapped { 2 } else { 3 };
    let all_wrapped = images
        .iter()
        .all(|(_, parts)| parts.len() >= depth && parts[0] == first);
    if all_wrapped && split_of(&first).is_none() {
        for (_, parts) in images.iter_mut() {
            parts.remove(0);
        }
        for (parts, _) in manifests.iter_mut() {
            if parts.len() == 2 && parts[0] == first {
                parts.remove(0);
            }
        }
    }
}
