//! The HTTP API: router, shared state, one module per resource.

mod datasets;
mod events;
mod extract;
mod health;
mod jobs;
mod models;
mod predict;

use std::path::PathBuf;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::artifacts::Artifacts;
use crate::error::ApiError;
use crate::serve::Predictor;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub artifacts: Artifacts,
    pub predictor: Predictor,
    pub weights_dir: PathBuf,
    pub max_upload_bytes: usize,
    pub max_predict_bytes: usize,
    pub predict_timeout: std::time::Duration,
    /// Bounds the images decoded at once, so decoding does not starve
    /// libtorch's threads of cores.
    pub decode_permits: std::sync::Arc<tokio::sync::Semaphore>,
}

/// JSON request bodies (job configurations) are small.
const MAX_JSON_BYTES: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    let uploads = Router::new()
        .route("/datasets", post(datasets::create).get(datasets::list))
        .layer(DefaultBodyLimit::max(state.max_upload_bytes));
    let predictions = Router::new()
        .route("/predict", post(predict::predict))
        .layer(DefaultBodyLimit::max(state.max_predict_bytes));
    Router::new()
        .route("/datasets/{id}", get(datasets::get))
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/metrics", get(jobs::metrics))
        .route("/jobs/{id}/events", get(events::events))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/models", get(models::list))
        .route("/models/{id}", get(models::get))
        .route("/models/{id}/deploy", post(models::deploy))
        .route("/models/{id}/export", get(models::export))
        .route("/backbones", get(health::backbones))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.yaml", get(health::openapi))
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .merge(uploads)
        .merge(predictions)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not supported on {}", uri.path()))
}

/// Parses a resource id from the path; anything else names no resource.
fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("no {what} with id {raw:?}")))
}
