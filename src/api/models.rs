//! `GET /models`, `GET /models/{id}`, `POST /models/{id}/deploy`,
//! `GET /models/{id}/export`.

use std::io::Write;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::extract::ApiQuery;
use super::predict::model_spec;
use super::{parse_id, AppState};
use crate::api::error::{ApiError, FieldError};
use crate::serve;
use crate::store::models::{self as store, ModelRow, DEFAULT_ALIAS};
use crate::store::{datasets, jobs};

pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<ModelRow>>, ApiError> {
    Ok(Json(store::list(&state.pool).await?))
}

/// A model with where it came from.
#[derive(Serialize)]
pub struct ModelDetail {
    #[serde(flatten)]
    model: ModelRow,
    lineage: Value,
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelDetail>, ApiError> {
    let model = find(&state, &id).await?;
    let job = jobs::get(&state.pool, model.job_id).await?;
    let dataset = datasets::get(&state.pool, model.dataset_id).await?;
    let lineage = json!({
        "job": job.map(|j| json!({ "id": j.id, "config": j.config.0, "finished_at": j.finished_at })),
        "dataset": dataset.map(|d| json!({ "id": d.id, "name": d.name, "classes": d.classes.0, "counts": d.counts.0 })),
    });
    Ok(Json(ModelDetail { model, lineage }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    alias: Option<String>,
}

#[derive(Serialize)]
pub struct Deployment {
    alias: String,
    model_id: Uuid,
    /// The model the alias served before, still available by id.
    previous_model_id: Option<Uuid>,
}

/// Deploys a model under an alias (`default` unless the body names one).
/// The body is optional.
pub async fn deploy(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Deployment>, ApiError> {
    let model = find(&state, &id).await?;
    let request: DeployRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DeployRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::invalid(
                "the JSON body does not match the schema",
                vec![FieldError::new("body", err.to_string())],
            )
        })?
    };
    let alias = request.alias.unwrap_or_else(|| DEFAULT_ALIAS.to_string());
    let valid = !alias.is_empty()
        && alias.len() <= 64
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && Uuid::parse_str(&alias).is_err();
    if !valid {
        return Err(ApiError::invalid(
            "invalid alias",
            vec![FieldError::new(
                "alias",
                "1 to 64 letters, digits, '-', '_' or '.', and not a model id",
            )],
        ));
    }
    // Load and warm the model before it takes traffic.
    state
        .predictor
        .warm_up(model_spec(&state, &model).await?)
        .await
        .map_err(|err| ApiError::Internal(err.into()))?;
    let previous_model_id = store::deploy(&state.pool, model.id, &alias).await?;
    tracing::info!(model_id = %model.id, %alias, ?previous_model_id, "model deployed");
    Ok(Json(Deployment {
        alias,
        model_id: model.id,
        previous_model_id,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    format: Option<String>,
}

/// A zip holding `weights.safetensors` (torchvision names for the backbone,
/// `head.weight`/`head.bias` for the new head) and `model.json` (labels and
/// the preprocessing contract).
pub async fn export(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<ExportParams>,
) -> Result<impl IntoResponse, ApiError> {
    let format = params.format.unwrap_or_else(|| "safetensors".into());
    if !["safetensors", "torchscript"].contains(&format.as_str()) {
        return Err(ApiError::invalid(
            "unsupported export format",
            vec![FieldError::new(
                "query:format",
                format!("{format:?} is not supported; use safetensors or torchscript"),
            )],
        ));
    }
    let model = find(&state, &id).await?;
    let mut card = json!({
        "model_id": model.id,
        "backbone": model.backbone,
        "labels": model.labels.0,
        "image_size": model.image_size,
        "stored_size": model.stored_size,
        "preprocessing": {
            "normalization": model.normalization.0,
            "steps": [
                "decode, convert to RGB",
                format!("resize the shorter side to stored_size = {s} (bilinear, antialiased), center-crop {s}x{s}", s = model.stored_size),
                format!("center-crop {c}x{c} (224/256 of the side), resize to image_size x image_size (bilinear, antialiased)", c = (model.stored_size * 224 + 128) / 256),
                "scale to [0, 1], subtract mean, divide by std (per channel, RGB)",
            ],
        },
        "weights": "weights.safetensors: the backbone under its reference implementation's names (torchvision's features.* for MobileNetV2; efficientnet-lite-pytorch's _conv_stem, _blocks.*, _conv_head for EfficientNet-Lite, whose convolutions pad like TensorFlow's \"same\"), the head as head.weight [classes, features] and head.bias",
        "metrics": model.metrics.0,
    });
    // Fetches the checkpoint from the shared store if this host lacks it.
    let spec = model_spec(&state, &model).await?;
    let (file, contents) = if format == "torchscript" {
        card["module"] = json!(format!("model.pt: TorchScript. forward(images) takes uint8 [N, 3, {s}, {s}] RGB images after the first two steps (decode; shorter side to {s}, center crop) and returns softmax scores [N, classes] in the order of labels; the remaining steps are inside.", s = model.stored_size));
        card.as_object_mut().unwrap().remove("weights");
        let out = state.artifacts.temp_file(".pt");
        let traced = out.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let result = serve::export_torchscript(&spec, &traced)
                .map_err(std::io::Error::other)
                .and_then(|()| std::fs::read(&traced));
            let _ = std::fs::remove_file(&traced);
            result
        })
        .await??;
        ("model.pt", bytes)
    } else {
        let bytes = tokio::fs::read(&spec.checkpoint).await?;
        ("weights.safetensors", bytes)
    };
    let archive = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("model.json", options)
            .map_err(std::io::Error::other)?;
        zip.write_all(&serde_json::to_vec_pretty(&card).map_err(std::io::Error::other)?)?;
        zip.start_file(file, options)
            .map_err(std::io::Error::other)?;
        zip.write_all(&contents)?;
        Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
    })
    .await??;
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"model-{}.zip\"", model.id),
            ),
        ],
        Bytes::from(archive),
    ))
}

async fn find(state: &AppState, raw_id: &str) -> Result<ModelRow, ApiError> {
    let id = parse_id(raw_id, "model")?;
    store::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no model with id {id}")))
}
