//! Figures read at scrape time, the same from every process: jobs by status
//! and the workers alive.

use sqlx::PgPool;

use super::JobStatus;

/// How many jobs have each status (every status, zeros included).
pub async fn jobs_by_status(pool: &PgPool) -> sqlx::Result<Vec<(JobStatus, i64)>> {
    let counts: Vec<(JobStatus, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(pool)
            .await?;
    Ok(JobStatus::ALL
        .iter()
        .map(|&status| {
            let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |c| c.1);
            (status, n)
        })
        .collect())
}

/// Workers with a heartbeat in the last minute.
pub async fn live_workers(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM workers WHERE heartbeat_at > now() - interval '1 minute'",
    )
    .fetch_one(pool)
    .await
}
