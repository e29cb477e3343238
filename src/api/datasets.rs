//! `POST /datasets` (archive upload), `GET /datasets`, `GET /datasets/{id}`,
//! `GET /datasets/{id}/samples`, `DELETE /datasets/{id}`.

use std::path::Path as FsPath;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::extract::ApiQuery;
use super::upload::{read_multipart, remove_path, write_upload, RemoveOnDrop};
use super::{parse_id, AppState, Created};
use crate::artifacts::Artifacts;
use crate::data::{self, preprocess, stored, IngestOptions, Progress};
use crate::error::{ApiError, FieldError};
use crate::store::datasets::{self as store, DatasetRow, Ingested};
use crate::store::{DatasetStatus, Pool};

/// Form fields of an upload besides the archive itself.
struct UploadForm {
    name: Option<String>,
    options: IngestOptions,
    /// Bytes of the archive, once streamed to disk.
    archive_bytes: Option<u64>,
    filename: Option<String>,
}

/// Upload settings as query parameters, for raw-body uploads (form fields
/// of the same names take precedence in multipart uploads).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    name: Option<String>,
    val_fraction: Option<String>,
    test_fraction: Option<String>,
    seed: Option<String>,
    min_per_class: Option<String>,
    strict: Option<String>,
    stored_size: Option<String>,
}

/// Content types of a raw-body upload (the archive's kind is read from its
/// bytes either way).
const ARCHIVE_TYPES: &[&str] = &[
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-compressed-tar",
    "application/octet-stream",
];

/// Longest dataset name: a label for people, not a document.
const MAX_NAME_CHARS: usize = 200;

impl UploadForm {
    /// Applies one text setting (form field or query parameter).
    fn set(&mut self, field: &str, value: &str, errors: &mut Vec<FieldError>) {
        match field {
            "name" if value.chars().count() > MAX_NAME_CHARS => errors.push(FieldError::new(
                "name",
                format!("longer than {MAX_NAME_CHARS} characters"),
            )),
            "name" => self.name = Some(value.to_string()),
            "val_fraction" => match value.trim().parse::<f64>() {
                Ok(v) if (0.05..=0.5).contains(&v) => self.options.val_fraction = v,
                _ => errors.push(FieldError::new(
                    "val_fraction",
                    "must be a number in [0.05, 0.5]",
                )),
            },
            "test_fraction" => match value.trim().parse::<f64>() {
                Ok(v) if (0.0..=0.5).contains(&v) => self.options.test_fraction = v,
                _ => errors.push(FieldError::new(
                    "test_fraction",
                    "must be a number in [0, 0.5]",
                )),
            },
            "seed" => match value.trim().parse::<u64>() {
                Ok(v) => self.options.seed = v,
                Err(_) => errors.push(FieldError::new("seed", "must be a non-negative integer")),
            },
            "min_per_class" => match value.trim().parse::<usize>() {
                Ok(v) if (1..=100_000).contains(&v) => self.options.min_train_per_class = v,
                _ => errors.push(FieldError::new(
                    "min_per_class",
                    "must be an integer in [1, 100000]",
                )),
            },
            "stored_size" => match value.trim().parse::<u32>() {
                Ok(v) if preprocess::STORED_SIZES.contains(&v) => self.options.stored_size = v,
                _ => errors.push(FieldError::new(
                    "stored_size",
                    format!(
                        "must be an integer in [{}, {}]",
                        preprocess::STORED_SIZES.start(),
                        preprocess::STORED_SIZES.end()
                    ),
                )),
            },
            "strict" => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => self.options.strict = true,
                "false" | "0" => self.options.strict = false,
                _ => errors.push(FieldError::new("strict", "must be true or false")),
            },
            other => errors.push(FieldError::new(
                other,
                "unknown form field; expected file, name, val_fraction, test_fraction, seed, min_per_class, strict or stored_size",
            )),
        }
    }

    /// Checks that the settings fit together.
    fn check(&self, errors: &mut Vec<FieldError>) {
        if self.options.val_fraction + self.options.test_fraction > 0.8 {
            errors.push(FieldError::new(
                "test_fraction",
                "val_fraction + test_fraction must leave at least 20% for training",
            ));
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<UploadParams>,
    request: Request,
) -> Result<Created<DatasetRow>, ApiError> {
    state.artifacts.room()?;
    let upload = RemoveOnDrop(state.artifacts.temp_file(".upload"));
    let mut form = UploadForm {
        name: None,
        options: IngestOptions::default(),
        archive_bytes: None,
        filename: None,
    };
    let mut errors = Vec::new();
    for (field, value) in [
        ("name", &params.name),
        ("val_fraction", &params.val_fraction),
        ("test_fraction", &params.test_fraction),
        ("seed", &params.seed),
        ("min_per_class", &params.min_per_class),
        ("strict", &params.strict),
        ("stored_size", &params.stored_size),
    ] {
        if let Some(value) = value {
            form.set(field, value, &mut errors);
        }
    }
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let limit = state.limits.max_upload_bytes;
    if content_type == "multipart/form-data" {
        let file = read_multipart(request, &state, &upload.0, limit, |field, value| {
            form.set(field, value, &mut errors)
        })
        .await?;
        if let Some(file) = file {
            form.filename = file.filename;
            form.archive_bytes = Some(file.bytes);
        }
    } else if ARCHIVE_TYPES.contains(&content_type.as_str()) {
        let chunks = request.into_body().into_data_stream().map(|chunk| {
            chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))
        });
        form.archive_bytes = Some(write_upload(&upload.0, chunks, limit).await?);
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "content type {content_type:?} is not accepted; send multipart/form-data with a `file` part, or the archive itself as application/zip, application/x-tar or application/gzip"
        )));
    }
    let Some(bytes) = form.archive_bytes else {
        errors.push(FieldError::new(
            "file",
            "missing: attach the archive as the `file` form field, or send it as the body",
        ));
        return Err(ApiError::invalid("the upload is incomplete", errors));
    };
    form.check(&mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid("some form fields are invalid", errors));
    }

    let id = Uuid::new_v4();
    let key = Artifacts::dataset_key(id);
    let name = form
        .name
        .or(form.filename.map(|f| archive_stem(&f).to_string()))
        .unwrap_or_else(|| format!("dataset-{id}"));
    // Armed before the insert: a request dropped while the insert is in
    // flight may still have committed it.
    let row_guard = DiscardOnDrop {
        pool: Some(state.pool.clone()),
        id,
    };
    let stored_size = form.options.stored_size as i32;
    store::insert_ingesting(&state.pool, id, &name, bytes as i64, stored_size, &key).await?;
    let dataset_dir = RemoveOnDrop(state.artifacts.path(&key));
    match ingest(&state, id, upload, dataset_dir, form.options).await {
        Ok((report, dataset_dir)) => {
            let row = store::finish_ingest(&state.pool, id, ingested(&report)).await?;
            let Some(row) = row else {
                return Err(ApiError::Conflict(format!(
                    "dataset {id} was deleted while it was ingesting"
                )));
            };
            row_guard.disarm();
            dataset_dir.keep();
            tracing::info!(dataset_id = %id, classes = row.classes.len(), images = row.num_train + row.num_val + row.num_test, "dataset stored");
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, format!("/datasets/{id}"))],
                Json(row),
            ))
        }
        Err(err) => {
            store::discard_ingesting(&state.pool, id).await?;
            row_guard.disarm();
            Err(err)
        }
    }
}

/// What the row records of a finished ingest.
fn ingested(report: &data::IngestReport) -> Ingested<'_> {
    let counts = |per_class: &[i64]| -> serde_json::Map<String, serde_json::Value> {
        report
            .classes
            .iter()
            .cloned()
            .zip(per_class.iter().map(|&n| json!(n)))
            .collect()
    };
    let total = |per_class: &[i64]| per_class.iter().sum::<i64>() as i32;
    Ingested {
        classes: &report.classes,
        counts: json!({
            "train": counts(&report.train_counts),
            "val": counts(&report.val_counts),
            "test": counts(&report.test_counts),
        }),
        num_train: total(&report.train_counts),
        num_val: total(&report.val_counts),
        num_test: total(&report.test_counts),
        report: report_json(report),
    }
}

/// Entries of each report list kept (in the answer and the row); a few
/// kilobytes of archive may name millions of skipped files.
const REPORT_ENTRIES: usize = 1000;

/// The report, each list cut to [`REPORT_ENTRIES`] with the rest counted
/// (`skipped_omitted`, …).
fn report_json(report: &data::IngestReport) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let mut list = |name: &str, items: Vec<serde_json::Value>| {
        let omitted = items.len().saturating_sub(REPORT_ENTRIES);
        out.insert(
            name.to_string(),
            items.into_iter().take(REPORT_ENTRIES).collect(),
        );
        if omitted > 0 {
            out.insert(format!("{name}_omitted"), omitted.into());
        }
    };
    let values = |items: &[Vec<String>]| items.iter().map(|group| json!(group)).collect();
    list("skipped", report.skipped.iter().map(|s| json!(s)).collect());
    list("duplicates", values(&report.duplicates));
    list("leakage", values(&report.leakage));
    serde_json::Value::Object(out)
}

/// Runs the ingest on a blocking thread, recording its progress on the row
/// every second, and publishes the result to the shared store.
async fn ingest(
    state: &AppState,
    id: Uuid,
    upload: RemoveOnDrop,
    dataset_dir: RemoveOnDrop,
    options: IngestOptions,
) -> Result<(data::IngestReport, RemoveOnDrop), ApiError> {
    let latest = std::sync::Arc::new(std::sync::Mutex::new(Progress {
        stage: "reading",
        done: 0,
        total: 0,
    }));
    let sink = latest.clone();
    // The ingest owns the cleanup guards: when the request is dropped (client
    // gone, deadline passed) they are dropped after the ingest stops writing.
    let mut task = tokio::task::spawn_blocking(move || {
        let report_progress = |p: Progress| *sink.lock().expect("progress lock") = p;
        let report = data::ingest_archive(&upload.0, &dataset_dir.0, &options, &report_progress);
        drop(upload);
        (report, dataset_dir)
    });
    let mut beat = tokio::time::interval(std::time::Duration::from_secs(1));
    beat.tick().await;
    let (report, dataset_dir) = loop {
        tokio::select! {
            done = &mut task => break done?,
            _ = beat.tick() => {
                let now = *latest.lock().expect("progress lock");
                if let Err(err) = store::set_progress(&state.pool, id, json!(now)).await {
                    tracing::warn!(dataset_id = %id, error = %err, "recording ingest progress failed");
                }
            }
        }
    };
    let report = report?;
    state
        .artifacts
        .publish_dir(&Artifacts::dataset_key(id))
        .await?;
    Ok((report, dataset_dir))
}

/// Removes the `ingesting` row of a request that was dropped mid-ingest.
struct DiscardOnDrop {
    /// `None` once disarmed.
    pool: Option<Pool>,
    id: Uuid,
}

impl DiscardOnDrop {
    fn disarm(mut self) {
        self.pool = None;
    }
}

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        let (Some(pool), id) = (self.pool.take(), self.id) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = store::discard_ingesting(&pool, id).await {
                    tracing::warn!(dataset_id = %id, error = %err, "removing an abandoned ingest failed");
                }
            });
        }
    }
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DatasetRow>, ApiError> {
    let id = parse_id(&id, "dataset")?;
    store::get(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))
}

/// Deletes a dataset's files, and its row unless jobs or models refer to it
/// (then it stays, `deleted`, for their lineage). 409 while a queued or
/// running job uses it.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "dataset")?;
    let deletion = store::delete(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))?;
    if let store::Deletion::InUse(jobs) = deletion {
        let jobs: Vec<String> = jobs.iter().map(Uuid::to_string).collect();
        return Err(ApiError::Conflict(format!(
            "dataset {id} is used by queued or running jobs ({}); cancel them first",
            jobs.join(", ")
        )));
    }
    let key = Artifacts::dataset_key(id);
    remove_path(&state.artifacts.path(&key));
    state.artifacts.unpublish_dir(&key).await?;
    tracing::info!(dataset_id = %id, "dataset deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /datasets/{id}/samples`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleParams {
    class: Option<String>,
    split: Option<String>,
    limit: Option<String>,
}

/// Side of the thumbnails `samples` returns.
const THUMBNAIL_SIDE: u32 = 96;

/// A few stored images with their source paths and thumbnails, taken from
/// each class in turn (or from one class), for a UI to show what a dataset
/// holds.
pub async fn samples(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<SampleParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id, "dataset")?;
    let dataset = store::get(&state.pool, id)
        .await?
        .filter(|d| d.status != DatasetStatus::Deleted)
        .ok_or_else(|| ApiError::NotFound(format!("no dataset with id {id}")))?;
    if dataset.status != DatasetStatus::Ready {
        return Err(ApiError::Conflict(format!(
            "dataset {id} is {}; samples exist once it is ready",
            dataset.status
        )));
    }
    let mut errors = Vec::new();
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => 12,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new("limit", "must be an integer in [1, 100]"));
            0
        }
    };
    let splits: Vec<&str> = match params.split.as_deref() {
        None => vec!["train", "val", "test"],
        Some(split @ ("train" | "val" | "test")) => vec![split],
        Some(_) => {
            errors.push(FieldError::new("split", "must be train, val or test"));
            vec![]
        }
    };
    let classes = &dataset.classes.0;
    let wanted_class = match &params.class {
        None => None,
        Some(class) => match classes.iter().position(|c| c == class) {
            Some(label) => Some(label),
            None => {
                errors.push(FieldError::new(
                    "class",
                    format!("no class {class:?}; the classes are {}", classes.join(", ")),
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid("invalid sample query", errors));
    }
    let dir = state.artifacts.fetch(&dataset.artifact_key).await?;
    let classes = classes.clone();
    let splits: Vec<String> = splits.into_iter().map(str::to_string).collect();
    let items = tokio::task::spawn_blocking(move || {
        pick_samples(&dir, &classes, &splits, wanted_class, limit)
    })
    .await?
    .map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ApiError::Conflict(format!(
            "dataset {id} was stored without a sample index; upload it again to browse it"
        )),
        _ => ApiError::Internal(err.into()),
    })?;
    Ok(Json(json!({ "dataset_id": id, "items": items })))
}

/// Takes up to `limit` images, one from each class in turn, with their
/// thumbnails as PNG data URLs.
fn pick_samples(
    dir: &FsPath,
    classes: &[String],
    splits: &[String],
    wanted_class: Option<usize>,
    limit: usize,
) -> std::io::Result<Vec<serde_json::Value>> {
    use base64::Engine;
    let index = stored::Index::read(dir)?;
    let mut per_class: Vec<std::collections::VecDeque<(&str, usize, &stored::IndexEntry)>> =
        vec![Default::default(); classes.len()];
    for split in splits {
        let entries = index.split(split).unwrap_or_default();
        for (slot, entry) in entries.iter().enumerate() {
            if wanted_class.is_none_or(|label| label == entry.label) {
                per_class[entry.label].push_back((split.as_str(), slot, entry));
            }
        }
    }
    let mut items = Vec::new();
    while items.len() < limit && per_class.iter().any(|queue| !queue.is_empty()) {
        for queue in per_class.iter_mut() {
            let Some((split, slot, entry)) = queue.pop_front() else {
                continue;
            };
            if items.len() == limit {
                break;
            }
            let file = match split {
                "train" => stored::TRAIN_FILE,
                "val" => stored::VAL_FILE,
                _ => stored::TEST_FILE,
            };
            let pixels = stored::read_image(&dir.join(file), slot)?;
            let png = stored::thumbnail_png(&pixels, THUMBNAIL_SIDE);
            items.push(json!({
                "split": split,
                "index": slot,
                "class": classes[entry.label],
                "path": entry.path,
                "thumbnail": format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                ),
            }));
        }
    }
    Ok(items)
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<DatasetRow>>, ApiError> {
    Ok(Json(store::list(&state.pool).await?))
}

/// An uploaded file's name without its archive extension.
fn archive_stem(filename: &str) -> &str {
    [".tar.gz", ".tgz", ".tar", ".zip"]
        .iter()
        .find_map(|ext| filename.strip_suffix(ext))
        .unwrap_or(filename)
}
