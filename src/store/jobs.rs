//! The `jobs` table as users see it: enqueue (waking idle workers), get,
//! list and cancel.
//!
//! A worker's side of the queue (claim, lease, fence, heartbeat, finish,
//! reaper) is in [`super::leases`], each attempt's record in [`super::runs`];
//! both are re-exported here, so the queue reads as one API
//! (`store::jobs::claim`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{JobStatus, JOBS_CHANNEL};

pub use super::leases::{
    begin, claim, explain_claim, fence, finish, heartbeat, holds, reap_expired, release,
    set_progress, set_test_metrics, upsert_worker, worker_seen, Fenced, Lease, Reaped,
};
pub use super::runs::{finish_run, runs, set_run_started, start_run, RunRow};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub config: Json<Value>,
    pub status: JobStatus,
    pub priority: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    pub error: Option<String>,
    pub epoch: i32,
    pub best_epoch: Option<i32>,
    pub best_metric: Option<f64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Within the running epoch: step, steps, images/s, ETA.
    pub progress: Option<Json<Value>>,
    pub cancel_requested: bool,
    /// The model the job produced, once it succeeded.
    pub model_id: Option<Uuid>,
    /// The best checkpoint's scores on the dataset's test split.
    pub test_metrics: Option<Json<Value>>,
}

pub(super) const COLUMNS: &str =
    "id, dataset_id, config, status, priority, attempts, max_attempts, error, \
     epoch, best_epoch, best_metric, created_at, started_at, finished_at, updated_at, \
     progress, cancel_requested, (SELECT m.id FROM models m WHERE m.job_id = jobs.id) AS model_id, \
     test_metrics";

pub struct NewJob<'a> {
    pub dataset_id: Uuid,
    pub config: Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub idempotency_key: Option<&'a str>,
}

/// Queues a job and wakes idle workers, in one transaction. With an
/// idempotency key already used, returns the existing job and `false`.
pub async fn enqueue(pool: &PgPool, new: NewJob<'_>) -> sqlx::Result<(JobRow, bool)> {
    let mut tx = pool.begin().await?;
    let inserted: Option<JobRow> = sqlx::query_as(&format!(
        "INSERT INTO jobs (id, dataset_id, config, priority, max_attempts, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(new.dataset_id)
    .bind(Json(&new.config))
    .bind(new.priority)
    .bind(new.max_attempts)
    .bind(new.idempotency_key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = inserted else {
        tx.rollback().await?;
        let existing = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1"
        ))
        .bind(new.idempotency_key)
        .fetch_one(pool)
        .await?;
        return Ok((existing, false));
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(JOBS_CHANNEL)
        .bind(job.id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((job, true))
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// One page of [`list`].
#[derive(Debug)]
pub struct Page {
    pub jobs: Vec<JobRow>,
    /// Whether jobs older than the last one on this page exist.
    pub more: bool,
}

/// A page of jobs, newest first (by `created_at`, then id, an order no
/// insert changes below the newest job): at most `limit` jobs, those after
/// job `after` (the last one of the previous page) when given. `None`: no
/// job has the id `after`. Each page is read from the index `jobs_newest`
/// (migration 0009), starting at its cursor, however deep it lies.
pub async fn list(pool: &PgPool, limit: u32, after: Option<Uuid>) -> sqlx::Result<Option<Page>> {
    let fetch = i64::from(limit) + 1;
    let mut jobs: Vec<JobRow> = match after {
        None => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1"
            ))
            .bind(fetch)
            .fetch_all(pool)
            .await?
        }
        Some(after) => {
            sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM jobs
                 WHERE (created_at, id) < (SELECT created_at, id FROM jobs WHERE id = $2)
                 ORDER BY created_at DESC, id DESC LIMIT $1"
            ))
            .bind(fetch)
            .bind(after)
            .fetch_all(pool)
            .await?
        }
    };
    // An empty page after a cursor: the end, or a cursor naming no job.
    if let (Some(after), true) = (after, jobs.is_empty()) {
        if get(pool, after).await?.is_none() {
            return Ok(None);
        }
    }
    let more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    Ok(Some(Page { jobs, more }))
}

/// Cancels a job: a queued one at once, a running one by asking its worker
/// (which stops within a batch). Finished jobs are returned unchanged.
pub async fn cancel(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "UPDATE jobs SET
             cancel_requested = (status IN ('queued', 'running')) OR cancel_requested,
             status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
             finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
             updated_at = now()
         WHERE id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn cancel_requested(pool: &PgPool, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}
