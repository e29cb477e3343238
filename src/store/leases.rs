//! A worker's hold on a job: claim with `SKIP LOCKED`, the lease and the
//! fence every write for the job takes (see [`Lease`]), renewal by
//! heartbeat, the job's end (finish, or release at shutdown), and the reaper
//! for leases whose worker vanished. Also the `workers` table, whose
//! heartbeat says which workers are alive.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::jobs::{JobRow, COLUMNS};
use super::{JobStatus, JOBS_CHANNEL};

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

/// The claim's search: the most urgent claimable job, locked (`SKIP LOCKED`:
/// claimers never wait for each other). Queued jobs and jobs whose lease
/// expired are each looked up in their own index (`jobs_queued`,
/// `jobs_leased`; migration 0009), so a claim reads a few index pages however
/// many jobs are queued or running. The candidate not taken is unlocked when
/// the statement ends.
const CLAIM_CANDIDATE: &str = "
    WITH queued AS (
        SELECT id, priority, created_at FROM jobs
        WHERE status = 'queued' AND NOT cancel_requested AND attempts < max_attempts
        ORDER BY priority DESC, created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED),
    expired AS (
        SELECT id, priority, created_at FROM jobs
        WHERE status = 'running' AND lease_expires_at < now()
          AND NOT cancel_requested AND attempts < max_attempts
        ORDER BY priority DESC, created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED)
    SELECT id FROM (SELECT * FROM queued UNION ALL SELECT * FROM expired) candidates
    ORDER BY priority DESC, created_at
    LIMIT 1";

/// Claims the most urgent queued job (or one whose worker's lease expired)
/// for `worker`, holding a lease of `lease_secs`. The attempt it starts
/// (`attempts`, raised by one) is the new lease's fencing token; a run the
/// previous holder left open ends as `lost`.
pub async fn claim(pool: &PgPool, worker: &str, lease_secs: f64) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&claim_sql())
        .bind(worker)
        .bind(lease_secs)
        .fetch_optional(pool)
        .await
}

/// The plan of [`claim`]'s statement as `EXPLAIN (ANALYZE, BUFFERS)` prints
/// it, one line per row: run for real (it claims a job for `worker`) inside a
/// transaction that is rolled back, so nothing changes.
pub async fn explain_claim(pool: &PgPool, worker: &str) -> sqlx::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let plan = sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {}", claim_sql()))
        .bind(worker)
        .bind(60.0_f64)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(plan)
}

/// [`claim`]'s statement: `$1` the worker, `$2` the lease in seconds. One
/// statement, so no transaction is left open between its parts.
fn claim_sql() -> String {
    format!(
        "WITH claimed AS (
             UPDATE jobs SET status = 'running', attempts = attempts + 1,
                 lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2),
                 started_at = coalesce(started_at, now()), updated_at = now(), error = NULL
             WHERE id = ({CLAIM_CANDIDATE})
             RETURNING {COLUMNS}),
         superseded AS (
             UPDATE runs SET outcome = 'lost', finished_at = now(),
                 error = 'the lease expired; a later attempt took the job over'
             WHERE outcome IS NULL AND job_id IN (SELECT id FROM claimed))
         SELECT * FROM claimed"
    )
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

/// Records the best checkpoint's test-split scores.
pub async fn set_test_metrics(fenced: &mut Fenced<'_>, metrics: Value) -> sqlx::Result<()> {
    sqlx::query("UPDATE jobs SET test_metrics = $2 WHERE id = $1")
        .bind(fenced.job_id)
        .bind(Json(metrics))
        .execute(&mut **fenced)
        .await
        .map(drop)
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
