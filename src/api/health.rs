//! Liveness, readiness, the backbone catalogue and the API contract.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::api::error::ApiError;
use crate::models;
use crate::{store, telemetry};

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres answers (an embedded one that died fails at once, not
/// after the pool's reconnect attempts), every migration is applied and the
/// catalogue's pretrained weights are installed and the disk is above its
/// free-space floor; the body says what is not.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if let Some(outage) = store::embedded::outage() {
        return Err(ApiError::Unavailable(outage));
    }
    let pending = store::pending_migrations(&state.pool)
        .await
        .map_err(|err| {
            tracing::warn!(error = %err, "readiness: the database did not answer");
            ApiError::Unavailable("database not ready".into())
        })?;
    if !pending.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "migrations not applied yet: {}",
            pending.join(", ")
        )));
    }
    let missing: Vec<String> = models::CATALOGUE
        .iter()
        .filter(|spec| spec.bundled)
        .map(|spec| spec.weights_path(&state.weights_dir))
        .filter(|path| !path.exists())
        .map(|path| path.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "pretrained weights missing (scripts/setup installs them): {}",
            missing.join(", ")
        )));
    }
    state
        .artifacts
        .room()
        .map_err(|low| ApiError::Unavailable(low.to_string()))?;
    Ok(Json(json!({ "status": "ready" })))
}

/// Prometheus text format: this process's counters and histograms, plus
/// queue depth and live workers read from Postgres at scrape time (the same
/// figures from every API process).
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = store::stats::jobs_by_status(&state.pool).await?;
    let workers = store::stats::live_workers(&state.pool).await?;
    let mut text = telemetry::handle().render();
    text.push_str(&format!(
        "# HELP {jobs} Jobs in Postgres by status\n# TYPE {jobs} gauge\n",
        jobs = telemetry::JOBS
    ));
    for (status, n) in counts {
        text.push_str(&format!("{}{{status=\"{status}\"}} {n}\n", telemetry::JOBS));
    }
    text.push_str(&format!(
        "# HELP {w} Workers with a heartbeat in the last minute\n# TYPE {w} gauge\n{w} {workers}\n",
        w = telemetry::WORKERS_SEEN
    ));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../openapi.yaml"),
    )
}
