//! `POST /predict`: top-k labels for images, as multipart `image` parts, a
//! JSON body of base64 images, or one raw `image/*` body.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::Json;
use base64::Engine;
use futures_util::future;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::extract::ApiQuery;
use super::AppState;
use crate::api::error::{ApiError, FieldError};
use crate::artifacts::Artifacts;
use crate::data::preprocess;
use crate::serve::{ModelSpec, Prediction, ServeError};
use crate::store::models::{self, ModelRow, DEFAULT_ALIAS};
use crate::telemetry;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictParams {
    /// Model id or deployment alias; the `default` deployment when absent.
    model: Option<String>,
    top_k: Option<usize>,
}

const DEFAULT_TOP_K: usize = 5;
/// Most images one request may carry.
const MAX_IMAGES: usize = 64;
/// An image's reason when the server failed to decode it (the cause is
/// logged, not sent).
const DECODE_FAILED: &str = "the server failed to decode this image (internal error)";

/// The JSON form of a request: one image or several, base64-encoded.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonImages {
    image: Option<String>,
    images: Option<Vec<String>>,
}

/// One image of the request as received.
struct Upload {
    filename: Option<String>,
    bytes: Result<Bytes, String>,
}

/// The outcome for one image: its predictions, or why it has none.
#[derive(Serialize)]
pub struct ImageResult {
    /// The file name the client gave the part, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predictions: Option<Vec<Prediction>>,
    /// Set when this image could not be used; the others are unaffected.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
pub struct PredictResponse {
    model_id: Uuid,
    results: Vec<ImageResult>,
    elapsed_ms: f64,
}

pub async fn predict(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<PredictParams>,
    request: Request,
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
    let uploads = read_images(request, &state).await?;
    if uploads.is_empty() {
        return Err(ApiError::invalid("no image given", vec![FieldError::new(
            "image",
            "send multipart `image` parts, a JSON {\"image\"|\"images\": base64}, or an image/* body",
        )]));
    }
    if uploads.len() > MAX_IMAGES {
        return Err(ApiError::invalid(
            "too many images",
            vec![FieldError::new(
                "image",
                format!("at most {MAX_IMAGES} images per request"),
            )],
        ));
    }

    // Decode on the blocking pool, as many at once as there are permits, to
    // the side the model's dataset was stored at; each image goes to the
    // inference threads the moment it is decoded, so decoding the rest
    // overlaps the first forward passes.
    let spec = model_spec(&state, &model).await?;
    let stored_size = spec.stored_size;
    let mut failures: Vec<Option<String>> = vec![None; uploads.len()];
    let decoding: FuturesUnordered<_> = uploads
        .iter()
        .enumerate()
        .map(|(place, upload)| {
            let bytes = upload.bytes.clone();
            let permits = state.decode_permits.clone();
            async move { (place, decode(bytes, permits, stored_size).await) }
        })
        .collect();
    let ready = decoding.filter_map(|(place, decoded)| {
        future::ready(match decoded {
            Ok(image) => Some((place, image)),
            Err(reason) => {
                failures[place] = Some(reason);
                None
            }
        })
    });
    let predicted = tokio::time::timeout(
        state.predict_timeout,
        state
            .predictor
            .predict_as_ready(spec, top_k, uploads.len(), ready),
    )
    .await
    .map_err(|_| {
        ApiError::Unavailable(format!(
            "prediction took longer than {:?}",
            state.predict_timeout
        ))
    })?
    .map_err(|err| match err {
        ServeError::Overloaded => {
            ApiError::Overloaded("too many predictions are waiting; retry shortly".into())
        }
        ServeError::Stopped => ApiError::Unavailable(err.to_string()),
        other => ApiError::Internal(other.into()),
    })?;
    if predicted.is_empty() {
        let errors = uploads
            .iter()
            .zip(&failures)
            .enumerate()
            .map(|(i, (u, reason))| {
                FieldError::new(
                    image_path(i, &u.filename),
                    reason.clone().unwrap_or_default(),
                )
            })
            .collect();
        return Err(ApiError::invalid("no image could be decoded", errors));
    }

    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        images = uploads.len(),
        "predicted"
    );
    let mut predictions: Vec<Option<Vec<Prediction>>> = vec![None; uploads.len()];
    for (place, rows) in predicted {
        predictions[place] = Some(rows);
    }
    let results = uploads
        .into_iter()
        .zip(predictions.into_iter().zip(failures))
        .map(|(upload, (predictions, error))| ImageResult {
            filename: upload.filename,
            predictions,
            error,
        })
        .collect();
    metrics::histogram!(telemetry::PREDICT_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(Json(PredictResponse {
        model_id: model.id,
        results,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Decodes one image on the blocking pool once a decode permit is free.
async fn decode(
    bytes: Result<Bytes, String>,
    permits: Arc<Semaphore>,
    stored_size: u32,
) -> Result<Vec<u8>, String> {
    let bytes = bytes?;
    let _permit = permits.acquire_owned().await.map_err(|err| {
        tracing::error!(error = %err, "no decode permit");
        DECODE_FAILED.to_string()
    })?;
    tokio::task::spawn_blocking(move || preprocess::decode_at(&bytes, stored_size))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, "an image's decode task failed");
            DECODE_FAILED.to_string()
        })?
        .map_err(|reason| format!("cannot decode: {reason}"))
}

/// Reads the request's images in whichever form it came.
async fn read_images(request: Request, state: &AppState) -> Result<Vec<Upload>, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let mut uploads = Vec::new();
        while let Some(field) = multipart.next_field().await? {
            let name = field.name().unwrap_or_default().to_string();
            if name != "image" {
                return Err(ApiError::invalid(
                    "unexpected form field",
                    vec![FieldError::new(name, "only `image` parts are accepted")],
                ));
            }
            let filename = field.file_name().map(str::to_string);
            uploads.push(Upload {
                filename,
                bytes: Ok(field.bytes().await?),
            });
        }
        return Ok(uploads);
    }
    let body = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "request body too large: {}",
                    rejection.body_text()
                ))
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
    if content_type.starts_with("application/json") {
        let json: JsonImages = serde_json::from_slice(&body).map_err(|err| {
            ApiError::invalid(
                "the JSON body does not match the schema",
                vec![FieldError::new("body", err.to_string())],
            )
        })?;
        let engine = base64::engine::general_purpose::STANDARD;
        let encoded: Vec<String> = json
            .image
            .into_iter()
            .chain(json.images.unwrap_or_default())
            .collect();
        return Ok(encoded
            .into_iter()
            .map(|text| Upload {
                filename: None,
                bytes: engine
                    .decode(text.trim())
                    .map(Bytes::from)
                    .map_err(|e| format!("not valid base64: {e}")),
            })
            .collect());
    }
    if content_type.starts_with("image/") || content_type == "application/octet-stream" {
        return Ok(vec![Upload {
            filename: None,
            bytes: Ok(body),
        }]);
    }
    Err(ApiError::UnsupportedMediaType(format!(
        "content type {content_type:?} is not accepted; use multipart/form-data, application/json or image/*"
    )))
}

/// What the inference thread needs to load a model.
/// A client is waiting: an unreachable store is a 503 at once, not waited out.
pub(crate) async fn model_spec(state: &AppState, model: &ModelRow) -> Result<ModelSpec, ApiError> {
    let artifacts = state.artifacts.impatient();
    artifacts.fetch_final(&model.artifact_key).await?;
    let mut spec = serving_spec(model, &state.artifacts)?;
    if let Some(backbone) = crate::train::backbone::uploaded(&state.pool, &model.backbone).await? {
        artifacts.fetch_final(&backbone.artifact_key).await?;
        spec.script = Some(crate::train::backbone::script_spec(
            &backbone,
            &state.artifacts,
        ));
    }
    Ok(spec)
}

/// The serving spec of a registered model, its checkpoint under `artifacts`
/// (without an uploaded backbone: [`model_spec`] adds that).
fn serving_spec(model: &ModelRow, artifacts: &Artifacts) -> anyhow::Result<ModelSpec> {
    Ok(ModelSpec {
        id: model.id,
        checkpoint: artifacts.path(&model.artifact_key),
        backbone: model.backbone.clone(),
        labels: model.labels.0.clone(),
        image_size: i64::from(model.image_size),
        stored_size: model.stored_size as u32,
        normalization: serde_json::from_value(model.normalization.0.clone())
            .context("reading the model's normalization")?,
        script: None,
    })
}

fn image_path(index: usize, filename: &Option<String>) -> String {
    match filename {
        Some(f) => format!("image[{index}] ({f})"),
        None => format!("image[{index}]"),
    }
}

/// The model a request names (an id or a deployment alias), or the default
/// deployment.
async fn resolve_model(state: &AppState, requested: Option<&str>) -> Result<ModelRow, ApiError> {
    match requested {
        Some(raw) => {
            let found = match Uuid::parse_str(raw) {
                Ok(id) => models::get(&state.pool, id).await?,
                Err(_) => models::by_alias(&state.pool, raw).await?,
            };
            found.ok_or_else(|| ApiError::NotFound(format!("no model with id or alias {raw:?}")))
        }
        None => models::by_alias(&state.pool, DEFAULT_ALIAS).await?.ok_or_else(|| {
            ApiError::NotFound(
                "no model is deployed: train one (POST /jobs) or deploy one (POST /models/{id}/deploy)".into(),
            )
        }),
    }
}
