//! Per-route limits the HTTP layer enforces before a handler runs out of
//! bounds: how long a request may take and how many run at once. Both answer
//! in problem+json, like every other error.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::api::error::ApiError;

/// Limits of the HTTP layer, from the configuration.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub max_upload_bytes: usize,
    pub max_predict_bytes: usize,
    /// JSON routes and `/predict`'s reading and decoding.
    pub request_timeout: Duration,
    /// Dataset uploads, ingest included.
    pub upload_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub max_concurrent_uploads: usize,
    /// Browser origins allowed by CORS; empty turns CORS off.
    pub cors_origins: Vec<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 2 * 1024 * 1024 * 1024,
            max_predict_bytes: 20 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(3600),
            max_concurrent_requests: 256,
            max_concurrent_uploads: 2,
            cors_origins: Vec::new(),
        }
    }
}

/// Middleware: a handler still running after the deadline is dropped and the
/// client gets a 503. Streams (SSE) are not cut: the deadline covers the
/// handler, not the body it returns.
pub async fn deadline(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!(
            "the request took longer than its {} s limit",
            limit.as_secs_f64()
        ))
        .into_response(),
    }
}

/// Middleware: at most the semaphore's permits in flight; the rest are
/// refused at once with 503 + Retry-After instead of queueing without bound.
pub async fn concurrency(
    State((permits, what)): State<(Arc<Semaphore>, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            ApiError::Overloaded(format!("too many {what} at once; retry shortly")).into_response()
        }
    }
}
