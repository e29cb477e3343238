//! `POST /jobs`, `GET /jobs`, `GET /jobs/{id}`, `GET /jobs/{id}/metrics`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::extract::{ApiJson, ApiQuery};
use super::{parse_id, AppState};
use crate::api::error::{ApiError, FieldError};
use crate::store::jobs::{self as store, JobRow, NewJob, RunRow};
use crate::store::metrics::{self, EpochMetrics};
use crate::store::{datasets, DatasetStatus, JobStatus};
use crate::train::{backbone, JobRequest};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A job as users see it.
#[derive(Serialize)]
pub struct JobView {
    id: Uuid,
    dataset_id: Uuid,
    status: JobStatus,
    config: Value,
    priority: i32,
    attempts: i32,
    max_attempts: i32,
    /// Last finished epoch.
    epoch: i32,
    epochs: i64,
    /// Within the running epoch: epoch, step, steps, images_per_second, eta_seconds.
    progress: Option<Value>,
    cancel_requested: bool,
    best_epoch: Option<i32>,
    /// Validation accuracy of the best epoch.
    best_val_accuracy: Option<f64>,
    error: Option<String>,
    /// The model this job produced, once it succeeded.
    model_id: Option<Uuid>,
    /// The best checkpoint's scores on the dataset's test split, when it has one.
    test_metrics: Option<Value>,
    /// Its attempts (only in `GET /jobs/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    runs: Option<Vec<RunRow>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl JobView {
    fn new(job: JobRow) -> Self {
        Self {
            epochs: job
                .config
                .0
                .get("epochs")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            id: job.id,
            dataset_id: job.dataset_id,
            status: job.status,
            config: job.config.0,
            priority: job.priority,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            epoch: job.epoch,
            progress: job.progress.map(|p| p.0),
            cancel_requested: job.cancel_requested,
            best_epoch: job.best_epoch,
            best_val_accuracy: job.best_metric,
            error: job.error,
            model_id: job.model_id,
            test_metrics: job.test_metrics.map(|m| m.0),
            runs: None,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            updated_at: job.updated_at,
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<JobRequest>,
) -> Result<(StatusCode, [(HeaderName, String); 1], Json<JobView>), ApiError> {
    state.artifacts.room()?;
    let key = match headers.get(IDEMPOTENCY_KEY) {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "invalid header",
                        vec![FieldError::new(
                            "header:Idempotency-Key",
                            "must be 1 to 255 visible ASCII characters",
                        )],
                    )
                })?,
        ),
        None => None,
    };
    let uploaded = match request.backbone.as_deref() {
        Some(name) => backbone::uploaded(&state.pool, name)
            .await?
            .map(|row| backbone::script_spec(&row, &state.artifacts)),
        None => None,
    };
    let job = request
        .validate(&state.weights_dir, uploaded.as_ref())
        .map_err(|errors| ApiError::invalid("the job configuration is invalid", errors))?;
    let dataset = datasets::get(&state.pool, job.dataset_id).await?;
    let problem = match dataset.map(|d| d.status) {
        None => Some("no dataset with this id".to_string()),
        Some(DatasetStatus::Deleted) => Some("no dataset with this id".to_string()),
        Some(DatasetStatus::Ready) => None,
        Some(status) => Some(format!("the dataset is {status}, not ready")),
    };
    if let Some(problem) = problem {
        return Err(ApiError::invalid(
            "the job configuration is invalid",
            vec![FieldError::new(
                "dataset_id",
                format!("{problem}: {}", job.dataset_id),
            )],
        ));
    }
    let (row, created) = store::enqueue(
        &state.pool,
        NewJob {
            dataset_id: job.dataset_id,
            config: serde_json::to_value(&job.config).map_err(|e| ApiError::Internal(e.into()))?,
            priority: job.priority,
            max_attempts: job.max_attempts,
            idempotency_key: key,
        },
    )
    .await?;
    if created {
        tracing::info!(job_id = %row.id, "job queued");
    }
    let location = format!("/jobs/{}", row.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(JobView::new(row)),
    ))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = find(&state, &id).await?;
    let runs = store::runs(&state.pool, job.id).await?;
    Ok(Json(JobView {
        runs: Some(runs),
        ..JobView::new(job)
    }))
}

/// Query of `GET /jobs`: a page's size and where it starts (Stripe's
/// names). Strings, so that a bad value is a 422 naming its parameter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    limit: Option<String>,
    starting_after: Option<String>,
}

/// Jobs on a page of `GET /jobs` when no `limit` is given, and the most.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

/// `GET /jobs`: a page of jobs, newest first. The body stays a plain array;
/// when older jobs follow, `Link: </jobs?limit=…&starting_after=…>;
/// rel="next"` (RFC 8288) names the next page, which starts after the last
/// job of this one. Jobs created meanwhile appear only on a first page, so
/// following the links lists every job once.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<(HeaderMap, Json<Vec<JobView>>), ApiError> {
    let mut errors = Vec::new();
    let limit = match params.limit.as_deref().map(str::parse::<u32>) {
        None => DEFAULT_PAGE,
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
        Some(_) => {
            errors.push(FieldError::new(
                "limit",
                format!("must be an integer in [1, {MAX_PAGE}]"),
            ));
            DEFAULT_PAGE
        }
    };
    let after = match params.starting_after.as_deref().map(Uuid::parse_str) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            errors.push(FieldError::new(
                "starting_after",
                "must be a job id (the last job of the previous page)",
            ));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid("invalid job listing query", errors));
    }
    let page = store::list(&state.pool, limit, after)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid job listing query",
                vec![FieldError::new(
                    "starting_after",
                    format!("no job with id {}", after.unwrap_or_default()),
                )],
            )
        })?;
    let mut headers = HeaderMap::new();
    if let (true, Some(last)) = (page.more, page.jobs.last()) {
        let next = format!(
            "</jobs?limit={limit}&starting_after={}>; rel=\"next\"",
            last.id
        );
        headers.insert(
            header::LINK,
            HeaderValue::from_str(&next).map_err(|e| ApiError::Internal(e.into()))?,
        );
    }
    Ok((
        headers,
        Json(page.jobs.into_iter().map(JobView::new).collect()),
    ))
}

#[derive(Serialize)]
pub struct MetricsView {
    job_id: Uuid,
    epochs: Vec<EpochMetrics>,
}

pub async fn metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<MetricsView>, ApiError> {
    let job = find(&state, &id).await?;
    let epochs = metrics::for_job(&state.pool, job.id, 0).await?;
    Ok(Json(MetricsView {
        job_id: job.id,
        epochs,
    }))
}

pub(super) async fn find(state: &AppState, raw_id: &str) -> Result<JobRow, ApiError> {
    let id = parse_id(raw_id, "job")?;
    store::get(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}

/// `POST /jobs/{id}/cancel`: a queued job is cancelled at once; a running one
/// stops within a batch (its recorded epochs stay). 409 once it has ended.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let job = find(&state, &id).await?;
    if job.status.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "job {} has already {}",
            job.id, job.status
        )));
    }
    let job = store::cancel(&state.pool, job.id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))?;
    tracing::info!(job_id = %job.id, status = %job.status, "cancel requested");
    Ok((StatusCode::ACCEPTED, Json(JobView::new(job))))
}
