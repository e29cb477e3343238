//! The `jobs` table as a queue: enqueue, claim with `SKIP LOCKED`, lease
//! renewal by heartbeat, writes fenced by the lease (see [`Lease`]), and a
//! reaper for leases whose worker vanished.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{JobStatus, RunOutcome, JOBS_CHANNEL};

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

/// A worker's hold on one attempt of a job. The attempt number is the
/// fencing token: a takeover raises it, so a worker that lost the job (frozen,
/// partitioned, slow past its lease) matches no row with its old lease and
/// every write it makes for the job is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: Uuid,
    pub worker: String,
    pub attempt: i32,
}

impl JobRow {
    /// The lease `worker` holds on the job it just claimed.
    pub fn lease(&self, worker: &str) -> Lease {
        Lease {
            job_id: self.id,
            worker: worker.to_string(),
            attempt: self.attempts,
        }
    }
}

/// The condition on `jobs` under which `$1..$3` (a [`Lease`]) may write.
const HELD: &str = "id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'running' \
     AND lease_expires_at > now()";

/// Begins a transaction that Postgres ends should its client stall inside
/// it (a frozen or partitioned worker), so the job's row lock it may hold
/// cannot keep another worker from taking the job over.
pub async fn begin(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Proof, inside a transaction, that a lease was held: the job's row stays
/// locked until the transaction ends, so no takeover commits in between.
/// Writes for a job take one.
pub struct Fenced<'t> {
    conn: &'t mut PgConnection,
    job_id: Uuid,
}

impl Fenced<'_> {
    /// The job whose lease was held.
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }
}

impl std::ops::Deref for Fenced<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
    }
}

impl std::ops::DerefMut for Fenced<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
    }
}

/// Locks the job's row in `tx` if `lease` still holds it. `None`: the lease
/// is lost, and the caller writes nothing (dropping `tx` rolls it back).
pub async fn fence<'t>(
    tx: &'t mut PgConnection,
    lease: &Lease,
) -> sqlx::Result<Option<Fenced<'t>>> {
    let held: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT 1 FROM jobs WHERE {HELD} FOR NO KEY UPDATE"
    ))
    .bind(lease.job_id)
    .bind(&lease.worker)
    .bind(lease.attempt)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(held.map(|_| Fenced {
        conn: tx,
        job_id: lease.job_id,
    }))
}

/// Whether `lease` still holds its job (asked before writing files the
/// job's later attempts read).
pub async fn holds(pool: &PgPool, lease: &Lease) -> sqlx::Result<bool> {
    sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM jobs WHERE {HELD})"))
        .bind(lease.job_id)
        .bind(&lease.worker)
        .bind(lease.attempt)
        .fetch_one(pool)
        .await
}

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

/// What one pass of the reaper did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Put back in the queue for another attempt.
    pub requeued: u64,
    /// Failed: the lease expired on their last allowed attempt.
    pub failed: u64,
}

/// Deals with jobs whose lease expired (their worker vanished, froze or lost
/// Postgres): cancels those whose cancellation was asked for, fails those on
/// their last allowed attempt and puts the others back in the queue, waking
/// idle workers. Their open runs end as `lost`.
pub async fn reap_expired(pool: &PgPool) -> sqlx::Result<Reaped> {
    const EXPIRED: &str = "status = 'running' AND lease_expires_at < now()";
    let mut tx = begin(pool).await?;
    sqlx::query(&format!(
        "UPDATE runs SET outcome = 'lost', finished_at = now(), error = 'worker lease expired'
         WHERE outcome IS NULL AND job_id IN (SELECT id FROM jobs WHERE {EXPIRED})"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL, progress = NULL
         WHERE {EXPIRED} AND cancel_requested"
    ))
    .execute(&mut *tx)
    .await?;
    let failed = sqlx::query(&format!(
        "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL, progress = NULL,
             error = format('the worker was lost (lease expired) on attempt %s of %s', attempts, max_attempts)
         WHERE {EXPIRED} AND attempts >= max_attempts"
    ))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let requeued: Vec<Uuid> = sqlx::query_scalar(&format!(
        "UPDATE jobs SET status = 'queued', updated_at = now(),
             lease_owner = NULL, lease_expires_at = NULL, progress = NULL
         WHERE {EXPIRED}
         RETURNING id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for id in &requeued {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(JOBS_CHANNEL)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Reaped {
        requeued: requeued.len() as u64,
        failed,
    })
}

/// Claims the most urgent queued job (or one whose worker's lease expired)
/// for `worker`, holding a lease of `lease_secs`. The attempt it starts
/// (`attempts`, raised by one) is the new lease's fencing token; a run the
/// previous holder left open ends as `lost`.
pub async fn claim(pool: &PgPool, worker: &str, lease_secs: f64) -> sqlx::Result<Option<JobRow>> {
    // One statement, so no transaction is left open between its parts.
    sqlx::query_as(&format!(
        "WITH claimed AS (
             UPDATE jobs SET status = 'running', attempts = attempts + 1,
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
             RETURNING {COLUMNS}),
         superseded AS (
             UPDATE runs SET outcome = 'lost', finished_at = now(),
                 error = 'the lease expired; a later attempt took the job over'
             WHERE outcome IS NULL AND job_id IN (SELECT id FROM claimed))
         SELECT * FROM claimed"
    ))
    .bind(worker)
    .bind(lease_secs)
    .fetch_optional(pool)
    .await
}

/// Renews the lease. `false` means the lease was lost (expired, taken over,
/// or the job was changed under us): the worker must stop and write nothing
/// more. An expired lease is not renewed even if nobody took it yet.
pub async fn heartbeat(pool: &PgPool, lease: &Lease, lease_secs: f64) -> sqlx::Result<bool> {
    let renewed = sqlx::query(&format!(
        "WITH seen AS (UPDATE workers SET heartbeat_at = now() WHERE id = $2)
         UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
         WHERE {HELD}"
    ))
    .bind(lease.job_id)
    .bind(&lease.worker)
    .bind(lease.attempt)
    .bind(lease_secs)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// Ends a job the worker holds with a terminal `status`. A worker calls it
/// inside its [`fence`], after the other writes of the outcome, as this
/// clears the lease.
pub async fn finish(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    worker: &str,
    status: JobStatus,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    debug_assert!(status.is_terminal());
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
pub async fn set_test_metrics(fenced: &mut Fenced<'_>, metrics: Value) -> sqlx::Result<()> {
    sqlx::query("UPDATE jobs SET test_metrics = $2 WHERE id = $1")
        .bind(fenced.job_id)
        .bind(Json(metrics))
        .execute(&mut **fenced)
        .await
        .map(drop)
}

/// Starts the run row of the lease's attempt. `None`: the lease is lost.
pub async fn start_run(
    pool: &PgPool,
    lease: &Lease,
    device: &str,
    resumed_from_epoch: Option<i64>,
) -> sqlx::Result<Option<Uuid>> {
    let mut tx = begin(pool).await?;
    let Some(mut fenced) = fence(&mut tx, lease).await? else {
        return Ok(None);
    };
    let run_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO runs (id, job_id, attempt, worker, device, resumed_from_epoch)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(run_id)
    .bind(lease.job_id)
    .bind(lease.attempt)
    .bind(&lease.worker)
    .bind(device)
    .bind(resumed_from_epoch.map(|e| e as i32))
    .execute(&mut *fenced)
    .await?;
    tx.commit().await?;
    Ok(Some(run_id))
}

/// Ends a run of the fenced job.
pub async fn finish_run(
    fenced: &mut Fenced<'_>,
    run_id: Uuid,
    outcome: RunOutcome,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE runs SET outcome = $3, error = $4, finished_at = now()
         WHERE id = $1 AND job_id = $2",
    )
    .bind(run_id)
    .bind(fenced.job_id)
    .bind(outcome)
    .bind(error)
    .execute(&mut **fenced)
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

/// Puts the fenced job back in the queue without spending an attempt (the
/// next claim raises the count back: the releasing worker has stopped, so its
/// token is not reused while it could still write).
pub async fn release(fenced: &mut Fenced<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0),
             lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(fenced.job_id)
    .execute(&mut **fenced)
    .await?;
    Ok(())
}

/// Records in-epoch progress of a job the worker holds. `false`: its lease
/// expired or passed to another worker, and nothing was written. (Progress
/// names no checkpoint; the owner alone guards it, as a worker runs one job
/// at a time.)
pub async fn set_progress(
    pool: &PgPool,
    id: Uuid,
    worker: &str,
    progress: &Value,
) -> sqlx::Result<bool> {
    let written = sqlx::query(
        "UPDATE jobs SET progress = $3
         WHERE id = $1 AND lease_owner = $2 AND status = 'running' AND lease_expires_at > now()",
    )
    .bind(id)
    .bind(worker)
    .bind(Json(progress))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(written == 1)
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

/// What the run found when training started. `false`: the lease is lost.
pub async fn set_run_started(
    pool: &PgPool,
    lease: &Lease,
    run_id: Uuid,
    cached: bool,
    precision: &str,
) -> sqlx::Result<bool> {
    let mut tx = begin(pool).await?;
    let Some(mut fenced) = fence(&mut tx, lease).await? else {
        return Ok(false);
    };
    sqlx::query("UPDATE runs SET cached_features = $2, precision = $3 WHERE id = $1")
        .bind(run_id)
        .bind(cached)
        .bind(precision)
        .execute(&mut *fenced)
        .await?;
    tx.commit().await?;
    Ok(true)
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
    pub outcome: Option<RunOutcome>,
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
