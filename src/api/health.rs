//! Liveness, readiness, the backbone catalogue and the API contract.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::AppState;
use crate::error::ApiError;
use crate::models::{self, BackboneSpec};

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres answers.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(|err| ApiError::Unavailable(format!("database unreachable: {err}")))?;
    Ok(Json(json!({ "status": "ready" })))
}

#[derive(Serialize)]
pub struct BackboneView {
    #[serde(flatten)]
    spec: BackboneSpec,
    /// Whether the pretrained weights are installed, so jobs can use it.
    weights: bool,
    /// Stages, first to last, that freezing counts (`trainable_stages`).
    stages: Vec<String>,
}

pub async fn backbones(State(state): State<AppState>) -> Json<Vec<BackboneView>> {
    Json(
        models::CATALOGUE
            .iter()
            .map(|spec| BackboneView {
                spec: *spec,
                weights: spec.weights_path(&state.weights_dir).exists(),
                stages: spec.stage_names(),
            })
            .collect(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../openapi.yaml"),
    )
}
