//! `POST /predict`: top-k labels for uploaded images.

use std::time::Instant;

use axum::extract::{Multipart, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::ApiQuery;
use super::AppState;
use crate::data::preprocess;
use crate::error::{ApiError, FieldError};
use crate::serve::{ModelSpec, Prediction, ServeError};
use crate::store::models::{self, ModelRow};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictParams {
    /// Model id; the newest model when absent.
    model: Option<String>,
    top_k: Option<usize>,
}

const DEFAULT_TOP_K: usize = 5;
/// Most images one request may carry.
const MAX_IMAGES: usize = 64;

#[derive(Serialize)]
pub struct ImagePrediction {
    /// The file name the client gave the part, if any.
    filename: Option<String>,
    predictions: Vec<Prediction>,
}

#[derive(Serialize)]
pub struct PredictResponse {
    model_id: Uuid,
    results: Vec<ImagePrediction>,
    elapsed_ms: f64,
}

pub async fn predict(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<PredictParams>,
    mut multipart: Multipart,
) -> Result<Json<PredictResponse>, ApiError> {
    let started = Instant::now();
    let top_k = params.top_k.unwrap_or(DEFAULT_TOP_K);
    if top_k == 0 {
        return Err(ApiError::invalid(
            "invalid query parameters",
            vec![FieldError::new("query:top_k", "must be at least 1")],
        ));
    }
    let model = resolve_model(&state, params.model.as_deref()).await?;

    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        if name != "image" {
            return Err(ApiError::invalid(
                "unexpected form field",
                vec![FieldError::new(name, "only `image` parts are accepted")],
            ));
        }
        if parts.len() == MAX_IMAGES {
            return Err(ApiError::invalid(
                "too many images",
                vec![FieldError::new(
                    "image",
                    format!("at most {MAX_IMAGES} images per request"),
                )],
            ));
        }
        let filename = field.file_name().map(str::to_string);
        parts.push((filename, field.bytes().await?));
    }
    if parts.is_empty() {
        return Err(ApiError::invalid(
            "no image given",
            vec![FieldError::new(
                "image",
                "attach at least one image as an `image` form part",
            )],
        ));
    }

    let (filenames, encoded): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    let decoded = tokio::task::spawn_blocking(move || {
        encoded
            .iter()
            .map(|bytes| preprocess::decode_canonical(bytes))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|err| ApiError::Internal(err.into()))?;
    let mut images = Vec::with_capacity(decoded.len());
    let mut errors = Vec::new();
    for (i, result) in decoded.into_iter().enumerate() {
        match result {
            Ok(pixels) => images.push(pixels),
            Err(reason) => errors.push(FieldError::new(
                format!(
                    "image[{i}]{}",
                    filenames[i]
                        .as_deref()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default()
                ),
                format!("cannot decode: {reason}"),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(
            "some images could not be decoded",
            errors,
        ));
    }

    let spec = ModelSpec {
        id: model.id,
        checkpoint: state.artifacts.path(&model.artifact_key),
        backbone: model.backbone.clone(),
        labels: model.labels.0.clone(),
        image_size: i64::from(model.image_size),
        normalization: serde_json::from_value(model.normalization.0.clone())
            .map_err(|e| ApiError::Internal(e.into()))?,
    };
    let predictions =
        state
            .predictor
            .predict(spec, images, top_k)
            .await
            .map_err(|err| match err {
                ServeError::Stopped => ApiError::Unavailable(err.to_string()),
                other => ApiError::Internal(other.into()),
            })?;
    Ok(Json(PredictResponse {
        model_id: model.id,
        results: filenames
            .into_iter()
            .zip(predictions)
            .map(|(filename, predictions)| ImagePrediction {
                filename,
                predictions,
            })
            .collect(),
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

async fn resolve_model(state: &AppState, requested: Option<&str>) -> Result<ModelRow, ApiError> {
    match requested {
        Some(raw) => {
            let id = Uuid::parse_str(raw)
                .map_err(|_| ApiError::NotFound(format!("no model with id {raw:?}")))?;
            models::get(&state.pool, id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no model with id {id}")))
        }
        None => models::latest(&state.pool).await?.ok_or_else(|| {
            ApiError::NotFound(
                "no model has been trained yet: POST /jobs and wait for it to succeed".into(),
            )
        }),
    }
}
