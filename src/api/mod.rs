//! The HTTP API: router, shared state, one module per resource.

mod auth;
mod backbones;
mod console;
mod datasets;
pub mod error;
mod events;
mod extract;
mod health;
mod jobs;
mod limits;
mod models;
mod origin;
mod predict;
pub mod server;
mod telemetry;
mod text;
mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use uuid::Uuid;

pub use events::EventStreams;
pub use limits::HttpLimits;
pub(crate) use predict::model_spec;

use crate::api::error::ApiError;
use crate::artifacts::Artifacts;
use crate::auth::Auth;
use crate::serve::Predictor;
use crate::store::Pool;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub artifacts: Artifacts,
    pub predictor: Predictor,
    pub auth: Auth,
    pub weights_dir: PathBuf,
    pub limits: HttpLimits,
    pub predict_timeout: Duration,
    /// Bounds the images decoded at once, so decoding does not starve
    /// libtorch's threads of cores.
    pub decode_permits: Arc<Semaphore>,
    /// `/jobs/{id}/events` streams: their cap and the feeds they share.
    pub events: EventStreams,
    /// How uploaded TorchScript backbones are checked; `None` refuses them
    /// (the default: a module is code).
    pub script_check: Option<crate::sandbox::ScriptCheck>,
}

/// JSON request bodies (job configurations) are small.
const MAX_JSON_BYTES: usize = 1024 * 1024;

pub fn router(state: AppState) -> Router {
    crate::telemetry::handle();
    let limits = state.limits.clone();
    let uploads = Router::new()
        .route("/datasets", post(datasets::create))
        .route("/backbones", post(backbones::create))
        .layer(DefaultBodyLimit::max(limits.max_upload_bytes))
        .layer(from_fn_with_state(limits.upload_timeout, limits::deadline))
        .layer(from_fn_with_state(
            (
                Arc::new(Semaphore::new(limits.max_concurrent_uploads)),
                "uploads",
            ),
            limits::concurrency,
        ));
    // `/predict` has its own deadline for the model; this one bounds reading.
    let predictions = Router::new()
        .route("/predict", post(predict::predict))
        .layer(DefaultBodyLimit::max(limits.max_predict_bytes))
        .layer(from_fn_with_state(
            limits.request_timeout + state.predict_timeout,
            limits::deadline,
        ));
    let router = Router::new()
        // Listing is not an upload: it must answer while uploads fill their slots.
        .route("/datasets", get(datasets::list))
        .route(
            "/datasets/{id}",
            get(datasets::get).delete(datasets::delete),
        )
        .route("/datasets/{id}/samples", get(datasets::samples))
        .route("/jobs", post(jobs::create).get(jobs::list))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/metrics", get(jobs::metrics))
        .route("/jobs/{id}/events", get(events::events))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/models", get(models::list))
        .route("/models/{id}", get(models::get))
        .route("/models/{id}/deploy", post(models::deploy))
        .route("/models/{id}/export", get(models::export))
        .route("/backbones", get(backbones::list))
        .route(
            "/backbones/{name}",
            get(backbones::get).delete(backbones::delete),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.yaml", get(health::openapi))
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(from_fn_with_state(limits.request_timeout, limits::deadline))
        .merge(uploads)
        .merge(predictions)
        .merge(console::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(from_fn_with_state(state.auth.clone(), auth::require_key))
        .layer(from_fn(text::refuse_nul_in_uri))
        .layer(from_fn_with_state(
            Arc::new(limits.cors_origins.clone()),
            origin::refuse_other_sites,
        ))
        .layer(from_fn_with_state(
            (
                Arc::new(Semaphore::new(limits.max_concurrent_requests)),
                "requests",
            ),
            limits::concurrency,
        ))
        .layer(from_fn(telemetry::track_http));
    with_cors(router, &limits.cors_origins)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every log line of a request carries its id (the client's `x-request-id`
/// or a fresh UUID, echoed in the response).
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
}

/// CORS only when origins are configured: browsers refuse cross-origin
/// calls otherwise.
fn with_cors(router: Router<AppState>, origins: &[String]) -> Router<AppState> {
    if origins.is_empty() {
        return router;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    router.layer(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([REQUEST_ID.clone(), header::RETRY_AFTER, header::LINK]),
    )
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not supported on {}", uri.path()))
}

/// Parses a resource id from the path; anything else names no resource.
/// A `201 Created` answer: its `Location` header and the new resource.
type Created<T> = (
    axum::http::StatusCode,
    [(axum::http::header::HeaderName, String); 1],
    axum::Json<T>,
);

fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        // Echo a little of it, not a path of kilobytes.
        let shown: String = raw.chars().take(64).collect();
        let cut = if shown.len() < raw.len() { "…" } else { "" };
        ApiError::NotFound(format!("no {what} with id {shown:?}{cut}"))
    })
}
