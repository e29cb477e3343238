//! The `runs` table: one row per attempt of a job (its worker, device,
//! precision, the epoch it resumed from, how it ended), started and ended
//! under the attempt's lease.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::leases::{begin, fence, Fenced, Lease};
use super::RunOutcome;

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
    .bind(fenced.job_id())
    .bind(outcome)
    .bind(error)
    .execute(&mut **fenced)
    .await?;
    Ok(())
}
