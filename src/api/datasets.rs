//! `POST /datasets` (archive upload), `GET /datasets`, `GET /datasets/{id}`.

use std::path::{Path as FsPath, PathBuf};

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::extract::ApiQuery;
use super::{parse_id, AppState};
use crate::artifacts::Artifacts;
use crate::data::{self, DataError, IngestOptions};
use crate::error::{ApiError, FieldError};
use crate::store::datasets::{self as store, DatasetRow, NewDataset};

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
    seed: Option<String>,
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

impl UploadForm {
    /// Applies one text setting (form field or query parameter).
    fn set(&mut self, field: &str, value: &str, errors: &mut Vec<FieldError>) {
        match field {
            "name" => self.name = Some(value.to_string()),
            "val_fraction" => match value.trim().parse::<f64>() {
                Ok(v) if (0.05..=0.5).contains(&v) => self.options.val_fraction = v,
                _ => errors.push(FieldError::new(
                    "val_fraction",
                    "must be a number in [0.05, 0.5]",
                )),
            },
            "seed" => match value.trim().parse::<u64>() {
                Ok(v) => self.options.seed = v,
                Err(_) => errors.push(FieldError::new("seed", "must be a non-negative integer")),
            },
            other => errors.push(FieldError::new(
                other,
                "unknown form field; expected file, name, val_fraction or seed",
            )),
        }
    }
}

/// Streams chunks into a new file at `path`, refusing more than `limit`
/// bytes. Returns the bytes written.
async fn write_upload(
    path: &FsPath,
    mut chunks: impl futures_util::Stream<Item = Result<axum::body::Bytes, ApiError>> + Unpin,
    limit: usize,
) -> Result<u64, ApiError> {
    // Created here, not on a blocking thread: a request dropped mid-create
    // would leave the file after its guard ran.
    let file = std::fs::File::create(path).map_err(internal)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut written = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        written += chunk.len() as u64;
        if written > limit as u64 {
            return Err(ApiError::PayloadTooLarge(format!(
                "the upload is larger than the {limit}-byte limit"
            )));
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    Ok(written)
}

pub async fn create(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<UploadParams>,
    request: Request,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, String); 1],
        Json<DatasetRow>,
    ),
    ApiError,
> {
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
        ("seed", &params.seed),
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
        let mut multipart = Multipart::from_request(request, &state)
            .await
            .map_err(ApiError::from)?;
        while let Some(mut field) = multipart.next_field().await? {
            let field_name = field.name().unwrap_or_default().to_string();
            if field_name == "file" {
                form.filename = field.file_name().map(str::to_string);
                let chunks = (&mut field).map(|chunk| chunk.map_err(ApiError::from));
                form.archive_bytes = Some(write_upload(&upload.0, chunks, limit).await?);
            } else {
                let value = field.text().await?;
                form.set(&field_name, &value, &mut errors);
            }
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
    if !errors.is_empty() {
        return Err(ApiError::invalid("some form fields are invalid", errors));
    }

    let id = Uuid::new_v4();
    let key = Artifacts::dataset_key(id);
    let dataset_dir = RemoveOnDrop(state.artifacts.path(&key));
    let options = form.options.clone();
    // The ingest owns the cleanup guards: when the request is dropped (client
    // gone, deadline passed) they are dropped after the ingest stops writing.
    let (report, dataset_dir) = tokio::task::spawn_blocking(move || {
        let report = data::ingest_archive(&upload.0, &dataset_dir.0, &options);
        drop(upload);
        (report, dataset_dir)
    })
    .await
    .map_err(|err| ApiError::Internal(err.into()))?;
    let report = report.map_err(|err| match err {
        DataError::Invalid { detail, errors } => ApiError::invalid(detail, errors),
        other => ApiError::Internal(other.into()),
    })?;

    let counts = |per_class: &[i64]| -> serde_json::Map<String, serde_json::Value> {
        report
            .classes
            .iter()
            .cloned()
            .zip(per_class.iter().map(|&n| json!(n)))
            .collect()
    };
    let name = form
        .name
        .or(form.filename.map(|f| archive_stem(&f).to_string()))
        .unwrap_or_else(|| format!("dataset-{id}"));
    state
        .artifacts
        .publish_dir(&key)
        .await
        .map_err(|err| ApiError::Internal(err.into()))?;
    let row = store::insert(&state.pool, NewDataset {
        id,
        name: &name,
        classes: &report.classes,
        counts: json!({ "train": counts(&report.train_counts), "val": counts(&report.val_counts) }),
        num_train: report.train_counts.iter().sum::<i64>() as i32,
        num_val: report.val_counts.iter().sum::<i64>() as i32,
        bytes: bytes as i64,
        artifact_key: &key,
        report: json!({
            "skipped": report.skipped,
            "duplicates": report.duplicates,
            "leakage": report.leakage,
        }),
    })
    .await?;
    dataset_dir.keep();
    tracing::info!(dataset_id = %id, classes = row.classes.len(), images = row.num_train + row.num_val, "dataset stored");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/datasets/{id}"))],
        Json(row),
    ))
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
    state
        .artifacts
        .unpublish_dir(&key)
        .await
        .map_err(|err| ApiError::Internal(err.into()))?;
    tracing::info!(dataset_id = %id, "dataset deleted");
    Ok(StatusCode::NO_CONTENT)
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

fn internal(err: std::io::Error) -> ApiError {
    ApiError::Internal(err.into())
}

/// Removes a file or directory when dropped, unless kept: a failed or
/// abandoned upload leaves nothing behind.
struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_path(&self.0);
    }
}

fn remove_path(path: &FsPath) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}
