//! The `jobs` table as a queue: enqueue, claim with `SKIP LOCKED`, lease
//! renewal by heartbeat, completion guarded by the lease owner, and a reaper
//! for leases whose worker vanished.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::JOBS_CHANNEL;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub dataset_id: Uuid,
    pub config: Json<Value>,
    pub status: String,
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

/// Every status a job can have.
pub const STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

/// Statuses a job never leaves.
pub const TERMINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

const COLUMNS: &str = "id, dataset_id, config, status, priority, attempts, max_attempts, error, \
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

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT 500"
    ))
    .fetch_all(pool)
    .await
}

/// Fails jobs whose lease expired on their last allowed attempt, so no job
/// stays `running` forever. Returns how many were failed.
pub async fn reap_expired(pool: &PgPool) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL, progress = NULL
         WHERE status = 'running' AND lease_expires_at < now() AND cancel_requested",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE runs SET outcome = 'lost', finished_at = now(), error = 'worker lease expired'
         WHERE outcome IS NULL AND job_id IN (
             SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < now())",
    )
    .execute(&mut *tx)
    .await?;
    let failed = sqlx::query(
        "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL,
             error = format('the worker was lost (lease expired) on attempt %s of %s', attempts, max_attempts)
         WHERE status = 'running' AND lease_expires_at < now() AND attempts >= max_attempts",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(failed)
}

/// Claims the most urgent queued job (or one whose worker's lease expired)
/// for `worker`, holding a lease of `lease_secs`.
pub async fn claim(pool: &PgPool, worker: &str, lease_secs: f64) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1,
             lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2),
             started_at = coalesce(started_at, now()), updated_at = now(), error = NULL
         WHERE id = (
             SELECT id FROM jobs
             WHERE (status = 'queued' OR (status = 'running' AND lease_expires_at < now()))
               AND NOT cancel_requested
               AND attempts < max_attempts
             ORDER BY priority DESC, created_at
             LIMIT 1
             FOR UPDATE SKIP LOCKED)
         RETURNING {COLUMNS}"
    ))
    .bind(worker)
    .bind(lease_secs)
    .fetch_optional(pool)
    .await
}

/// Renews the lease. `false` means the lease was lost (expired and taken
/// over, or the job was changed under us): the worker must stop.
pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
    lease_secs: f64,
) -> sqlx::Result<bool> {
    let renewed = sqlx::query(
        "WITH seen AS (UPDATE workers SET heartbeat_at = now() WHERE id = $2)
         UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3), updated_at = now()
         WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(worker)
    .bind(lease_secs)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// Ends a job the worker holds: `succeeded`, `failed` or `cancelled`.
pub async fn finish(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    worker: &str,
    status: &str,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE jobs SET status = $3, error = $4, finished_at = now(), updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL, progress = NULL
         WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(worker)
    .bind(status)
    .bind(error)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// Records the best checkpoint's test-split scores.
pub async fn set_test_metrics(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    metrics: Value,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE jobs SET test_metrics = $2 WHERE id = $1")
        .bind(id)
        .bind(Json(metrics))
        .execute(tx)
        .await
        .map(drop)
}

/// Starts a run row for this attempt.
pub async fn start_run(
    pool: &PgPool,
    job: &JobRow,
    worker: &str,
    device: &str,
    resumed_from_epoch: Option<i64>,
) -> sqlx::Result<Uuid> {
    let run_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO runs (id, job_id, attempt, worker, device, resumed_from_epoch)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(run_id)
    .bind(job.id)
    .bind(job.attempts)
    .bind(worker)
    .bind(device)
    .bind(resumed_from_epoch.map(|e| e as i32))
    .execute(pool)
    .await?;
    Ok(run_id)
}

pub async fn finish_run(
    tx: &mut sqlx::PgConnection,
    run_id: Uuid,
    outcome: &str,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE runs SET outcome = $2, error = $3, finished_at = now() WHERE id = $1")
        .bind(run_id)
        .bind(outcome)
        .bind(error)
        .execute(tx)
        .await?;
    Ok(())
}

pub async fn upsert_worker(pool: &PgPool, id: &str, host: &str, device: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, host, device) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), device = EXCLUDED.device",
    )
    .bind(id)
    .bind(host)
    .bind(device)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that an idle worker is alive.
pub async fn worker_seen(pool: &PgPool, id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE workers SET heartbeat_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Puts a job the worker holds back in the queue without spending an attempt.
pub async fn release(tx: &mut sqlx::PgConnection, id: Uuid, worker: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0),
             lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(worker)
    .execute(tx)
    .await?;
    Ok(())
}

/// Records in-epoch progress of a job the worker holds.
pub async fn set_progress(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
    progress: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET progress = $3 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(worker)
    .bind(Json(progress))
    .execute(pool)
    .await?;
    Ok(())
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

/// What the run found when training started.
pub async fn set_run_started(
    pool: &PgPool,
    run_id: Uuid,
    cached: bool,
    precision: &str,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE runs SET cached_features = $2, precision = $3 WHERE id = $1")
        .bind(run_id)
        .bind(cached)
        .bind(precision)
        .execute(pool)
        .await?;
    Ok(())
}

/// One attempt of a job, as users see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: Uuid,
    pub attempt: i32,
    pub worker: String,
    pub device: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    pub resumed_from_epoch: Option<i32>,
    pub cached_features: Option<bool>,
    /// `fp32`, or `bf16-autocast` on a CUDA device.
    pub precision: Option<String>,
}

pub async fn runs(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Vec<RunRow>> {
    sqlx::query_as(
        "SELECT id, attempt, worker, device, started_at, finished_at, outcome, error,
             resumed_from_epoch, cached_features, precision
         FROM runs WHERE job_id = $1 ORDER BY started_at",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await
}
