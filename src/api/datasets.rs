//! `POST /datasets` (archive upload), `GET /datasets`, `GET /datasets/{id}`,
//! `GET /datasets/{id}/samples`, `DELETE /datasets/{id}`.
//!
//! The handlers read the request; turning the upload into a dataset is
//! `datasets/ingest.rs`'s job, the samples and their thumbnails
//! `datasets/samples.rs`'s.

mod ingest;
mod samples;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use uuid::Uuid;

use super::extract::ApiQuery;
use super::upload::{read_multipart, remove_path, write_upload, RemoveOnDrop};
use super::{parse_id, AppState, Created};
use crate::api::error::{ApiError, FieldError};
use crate::artifacts::Artifacts;
use crate::data::{preprocess, IngestOptions};
use crate::store::datasets::{self as store, DatasetRow};
pub use samples::samples;

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
    let name = form
        .name
        .or(form.filename.map(|f| archive_stem(&f).to_string()))
        .unwrap_or_else(|| format!("dataset-{id}"));
    let row = ingest::run(&state, id, &name, bytes, upload, form.options).await?;
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
    state.artifacts.unpublish_dir(&key).await?;
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
