//! `GET /backbones` (the catalogue and uploaded TorchScript backbones),
//! `POST /backbones` (upload one), `DELETE /backbones/{name}`.

use std::path::Path as FsPath;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use serde::Serialize;

use super::upload::{read_multipart, RemoveOnDrop};
use super::{AppState, Created};
use crate::api::error::{ApiError, FieldError};
use crate::data::preprocess::Normalization;
use crate::models::script::{self, Output};
use crate::models::{self, BackboneSpec};
use crate::store::backbones::{self as store, NewScriptBackbone, ScriptBackboneRow};

/// One entry of `GET /backbones`: a catalogue backbone or an uploaded one.
#[derive(Serialize)]
pub struct BackboneView {
    name: String,
    family: String,
    parameters: u64,
    feature_dim: i64,
    default_image_size: i64,
    normalization: Normalization,
    /// Published ImageNet top-1 (catalogue backbones only).
    imagenet_top1: Option<f64>,
    bundled: bool,
    /// Whether the weights are present, so jobs can use it.
    weights: bool,
    weights_source: String,
    /// Stages, first to last, that freezing counts (`trainable_stages`).
    stages: Vec<String>,
    /// Whether a user uploaded it (`POST /backbones`).
    uploaded: bool,
    /// The final linear layer removed from an uploaded module's forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed_layer: Option<String>,
}

impl BackboneView {
    fn catalogue(spec: &BackboneSpec, weights_dir: &FsPath) -> Self {
        Self {
            name: spec.name.into(),
            family: spec.family().into(),
            parameters: spec.parameters,
            feature_dim: spec.feature_dim,
            default_image_size: spec.default_image_size,
            normalization: spec.normalization,
            imagenet_top1: Some(spec.imagenet_top1),
            bundled: spec.bundled,
            weights: spec.weights_path(weights_dir).exists(),
            weights_source: spec.weights_source.into(),
            stages: spec.stage_names(),
            uploaded: false,
            removed_layer: None,
        }
    }

    fn uploaded(row: &ScriptBackboneRow) -> Self {
        Self {
            name: row.name.clone(),
            family: script::FAMILY.into(),
            parameters: row.parameters as u64,
            feature_dim: row.feature_dim.into(),
            default_image_size: row.image_size.into(),
            normalization: row.normalization.0,
            imagenet_top1: None,
            bundled: false,
            weights: true,
            weights_source: format!(
                "uploaded TorchScript module{} (sha256 {}); its own terms apply",
                row.source_file
                    .as_deref()
                    .map(|f| format!(" {f}"))
                    .unwrap_or_default(),
                row.sha256
            ),
            stages: row.stages.0.iter().map(|s| s.prefix.clone()).collect(),
            uploaded: true,
            removed_layer: row.removed_layer.clone(),
        }
    }
}

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<BackboneView>>, ApiError> {
    let mut views: Vec<BackboneView> = models::CATALOGUE
        .iter()
        .map(|spec| BackboneView::catalogue(spec, &state.weights_dir))
        .collect();
    views.extend(
        store::list(&state.pool)
            .await?
            .iter()
            .map(BackboneView::uploaded),
    );
    Ok(Json(views))
}

/// The upload's form fields.
struct UploadForm {
    name: Option<String>,
    image_size: i64,
    mean: [f64; 3],
    std: [f64; 3],
    output: Output,
    filename: Option<String>,
    file_bytes: Option<u64>,
}

fn three_numbers(value: &str) -> Option<[f64; 3]> {
    let numbers: Vec<f64> = value
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    let numbers: [f64; 3] = numbers.try_into().ok()?;
    numbers.iter().all(|v| v.is_finite()).then_some(numbers)
}

impl UploadForm {
    fn set(&mut self, field: &str, value: &str, errors: &mut Vec<FieldError>) {
        let value = value.trim();
        let mut invalid = |reason: String| errors.push(FieldError::new(field, reason));
        match field {
            "name" => {
                let valid = (1..=64).contains(&value.len())
                    && value.starts_with(|c: char| c.is_ascii_lowercase())
                    && value
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
                if valid {
                    self.name = Some(value.to_string());
                } else {
                    invalid(format!(
                        "{value:?} is not a backbone name: 1 to 64 of a-z, 0-9, _ and -, starting with a letter"
                    ));
                }
            }
            "image_size" => match value.parse::<i64>() {
                Ok(size) if (32..=1024).contains(&size) => self.image_size = size,
                _ => invalid(format!("{value:?} is not a side from 32 to 1024")),
            },
            "mean" => match three_numbers(value) {
                Some(mean) => self.mean = mean,
                None => invalid(format!("{value:?} is not three numbers (r,g,b)")),
            },
            "std" => match three_numbers(value) {
                Some(std) if std.iter().all(|s| *s > 0.0) => self.std = std,
                _ => invalid(format!("{value:?} is not three positive numbers (r,g,b)")),
            },
            "output" => match Output::parse(value) {
                Some(output) => self.output = output,
                None => invalid(format!("{value:?} is not one of: auto, features, logits")),
            },
            _ => {
                invalid("unknown field; expected file, name, image_size, mean, std, output".into())
            }
        }
    }
}

/// A fresh key per upload, so that concurrent uploads never share a file.
fn artifact_key(name: &str) -> String {
    format!("backbones/{name}-{}.pt", uuid::Uuid::new_v4().simple())
}

pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<Created<BackboneView>, ApiError> {
    let Some(check) = state.script_check.clone() else {
        return Err(ApiError::Forbidden(
            "uploading TorchScript backbones is off: a module is code the server runs. \
             The operator allows it with --allow-script-backbones \
             (FINETUNED_ALLOW_SCRIPT_BACKBONES=true)"
                .into(),
        ));
    };
    state.artifacts.room()?;
    let upload = RemoveOnDrop(state.artifacts.temp_file(".pt"));
    let form = read_form(&state, request, &upload.0).await?;
    let name = form.name.clone().unwrap_or_default();
    if models::find(&name).is_some() || store::get(&state.pool, &name).await?.is_some() {
        return Err(taken(&name));
    }
    let (found, module) = check
        .run(&upload.0, form.image_size, form.output)
        .await?
        .map_err(|reasons| {
            ApiError::invalid(
                "the TorchScript module cannot be used as a backbone",
                reasons
                    .into_iter()
                    .map(|reason| FieldError::new("file", reason))
                    .collect(),
            )
        })?;
    // Written under tmp/ (swept after a crash), then moved into place.
    let stored = RemoveOnDrop(state.artifacts.temp_file(".pt"));
    std::fs::write(&stored.0, &module)?;
    let digest = sha256_hex(&module);
    let new = NewScriptBackbone {
        name: name.clone(),
        image_size: form.image_size as i32,
        normalization: Normalization {
            mean: form.mean,
            std: form.std,
        },
        feature_dim: found.feature_dim as i32,
        parameters: found.parameters,
        stages: found.stages,
        removed_layer: found.removed_layer,
        source_file: form.filename,
        bytes: form.file_bytes.unwrap_or_default() as i64,
        sha256: digest,
        artifact_key: artifact_key(&name),
    };
    let row = place(&state, stored, new).await?;
    tracing::info!(backbone = %row.name, feature_dim = row.feature_dim, "TorchScript backbone registered");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/backbones/{name}"))],
        Json(BackboneView::uploaded(&row)),
    ))
}

fn taken(name: &str) -> ApiError {
    ApiError::Conflict(format!("a backbone named {name} already exists"))
}

/// Reads the multipart form, streaming the module to `upload`.
async fn read_form(
    state: &AppState,
    request: Request,
    upload: &FsPath,
) -> Result<UploadForm, ApiError> {
    let mut form = UploadForm {
        name: None,
        image_size: 224,
        mean: Normalization::IMAGENET.mean,
        std: Normalization::IMAGENET.std,
        output: Output::Auto,
        filename: None,
        file_bytes: None,
    };
    let mut errors = Vec::new();
    let limit = state.limits.max_upload_bytes;
    let file = read_multipart(request, state, upload, limit, |field, value| {
        form.set(field, value, &mut errors)
    })
    .await?;
    if let Some(file) = file {
        form.filename = file.filename;
        form.file_bytes = Some(file.bytes);
    }
    if form.file_bytes.is_none() {
        errors.push(FieldError::new(
            "file",
            "missing: send the TorchScript module as the `file` part",
        ));
    }
    if form.name.is_none() && !errors.iter().any(|e| e.path == "name") {
        errors.push(FieldError::new("name", "missing: the name jobs will use"));
    }
    if errors.is_empty() {
        Ok(form)
    } else {
        Err(ApiError::invalid("the backbone upload is invalid", errors))
    }
}

/// Moves the checked module under its key, publishes it and records the
/// row; on any failure nothing stays behind.
async fn place(
    state: &AppState,
    stored: RemoveOnDrop,
    new: NewScriptBackbone,
) -> Result<ScriptBackboneRow, ApiError> {
    let path = state.artifacts.path(&new.artifact_key);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::rename(&stored.0, &path)?;
    stored.keep();
    let placed = RemoveOnDrop(path);
    state.artifacts.publish(&new.artifact_key).await?;
    let inserted = store::insert(&state.pool, &new).await;
    if let Ok(Some(row)) = inserted {
        placed.keep();
        return Ok(row);
    }
    let _ = state.artifacts.unpublish(&new.artifact_key).await;
    Err(match inserted {
        Ok(_) => taken(&new.name),
        Err(err) => err.into(),
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<BackboneView>, ApiError> {
    if let Some(spec) = models::find(&name) {
        return Ok(Json(BackboneView::catalogue(spec, &state.weights_dir)));
    }
    store::get(&state.pool, &name)
        .await?
        .map(|row| Json(BackboneView::uploaded(&row)))
        .ok_or_else(|| ApiError::NotFound(format!("no backbone named {name}")))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if models::find(&name).is_some() {
        return Err(ApiError::Conflict(format!(
            "{name} is a catalogue backbone; only uploaded backbones can be deleted"
        )));
    }
    let row = store::get(&state.pool, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backbone named {name}")))?;
    let (jobs, models) = store::users(&state.pool, &name).await?;
    if jobs > 0 || models > 0 {
        return Err(ApiError::Conflict(format!(
            "{name} is used by {jobs} unfinished job(s) and {models} model(s); it stays while they need it"
        )));
    }
    if store::delete(&state.pool, &name).await? {
        let _ = std::fs::remove_file(state.artifacts.path(&row.artifact_key));
        if let Err(err) = state.artifacts.unpublish(&row.artifact_key).await {
            tracing::warn!(backbone = %name, error = %err, "could not remove the module from the shared store");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}
