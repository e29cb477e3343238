//! The `datasets` table.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::DatasetStatus;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DatasetRow {
    pub id: Uuid,
    pub name: String,
    pub status: DatasetStatus,
    pub classes: Json<Vec<String>>,
    pub counts: Json<Value>,
    pub num_train: i32,
    pub num_val: i32,
    pub num_test: i32,
    /// Side the images are stored at (shorter side resized to it, then the
    /// centre square).
    pub stored_size: i32,
    pub bytes: i64,
    #[serde(skip)]
    pub artifact_key: String,
    pub report: Json<Value>,
    /// While ingesting: `{stage, done, total}`.
    pub progress: Option<Json<Value>>,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub updated_at: DateTime<Utc>,
}

/// What a finished ingest found.
pub struct Ingested<'a> {
    pub classes: &'a [String],
    pub counts: Value,
    pub num_train: i32,
    pub num_val: i32,
    pub num_test: i32,
    pub report: Value,
}

/// Records an upload whose ingest is starting: visible, but not usable.
pub async fn insert_ingesting(
    pool: &PgPool,
    id: Uuid,
    name: &str,
    bytes: i64,
    stored_size: i32,
    artifact_key: &str,
) -> sqlx::Result<DatasetRow> {
    sqlx::query_as(
        "INSERT INTO datasets (id, name, status, classes, counts, num_train, num_val, bytes, artifact_key, stored_size, progress)
         VALUES ($1, $2, 'ingesting', '[]', '{}', 0, 0, $3, $4, $5, '{\"stage\": \"reading\", \"done\": 0, \"total\": 0}')
         RETURNING *",
    )
    .bind(id)
    .bind(name)
    .bind(bytes)
    .bind(artifact_key)
    .bind(stored_size)
    .fetch_one(pool)
    .await
}

/// Records an ingest's progress (and that it is alive).
pub async fn set_progress(pool: &PgPool, id: Uuid, progress: Value) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE datasets SET progress = $2, updated_at = now() WHERE id = $1 AND status = 'ingesting'",
    )
    .bind(id)
    .bind(Json(progress))
    .execute(pool)
    .await
    .map(drop)
}

/// Makes an ingested dataset ready; `None` when its row went away meanwhile
/// (deleted during the ingest).
pub async fn finish_ingest(
    pool: &PgPool,
    id: Uuid,
    done: Ingested<'_>,
) -> sqlx::Result<Option<DatasetRow>> {
    sqlx::query_as(
        "UPDATE datasets SET status = 'ready', classes = $2, counts = $3, num_train = $4,
                num_val = $5, num_test = $6, report = $7, progress = NULL, updated_at = now()
         WHERE id = $1 AND status = 'ingesting'
         RETURNING *",
    )
    .bind(id)
    .bind(Json(done.classes))
    .bind(Json(done.counts))
    .bind(done.num_train)
    .bind(done.num_val)
    .bind(done.num_test)
    .bind(Json(done.report))
    .fetch_optional(pool)
    .await
}

/// Removes the row of an ingest that failed or was abandoned.
pub async fn discard_ingesting(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM datasets WHERE id = $1 AND status = 'ingesting'")
        .bind(id)
        .execute(pool)
        .await
        .map(drop)
}

/// Removes `ingesting` rows whose ingest stopped moving `stale_secs` ago
/// (its process died); returns their ids.
pub async fn discard_stalled_ingests(pool: &PgPool, stale_secs: f64) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "DELETE FROM datasets WHERE status = 'ingesting'
           AND updated_at < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(stale_secs)
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<DatasetRow>> {
    sqlx::query_as("SELECT * FROM datasets WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<DatasetRow>> {
    sqlx::query_as("SELECT * FROM datasets WHERE status <> 'deleted' ORDER BY created_at DESC")
        .fetch_all(pool)
        .await
}

/// Every dataset id.
pub async fn ids(pool: &PgPool) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar("SELECT id FROM datasets")
        .fetch_all(pool)
        .await
}

/// What deleting a dataset did.
pub enum Deletion {
    /// Nothing referred to it: the row is gone.
    Removed,
    /// Jobs or models refer to it: the row stays, `deleted`, for lineage.
    Retired,
    /// Queued or running jobs use it: nothing was changed.
    InUse(Vec<Uuid>),
}

/// Deletes a dataset unless a queued or running job uses it; `None` when
/// there is no such dataset (or it was already deleted).
pub async fn delete(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Deletion>> {
    let mut tx = pool.begin().await?;
    // Locks the row: a job inserted meanwhile waits for this decision.
    let found: Option<DatasetStatus> =
        sqlx::query_scalar("SELECT status FROM datasets WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none_or(|status| status == DatasetStatus::Deleted) {
        return Ok(None);
    }
    let active: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE dataset_id = $1 AND status IN ('queued', 'running') ORDER BY created_at",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    if !active.is_empty() {
        return Ok(Some(Deletion::InUse(active)));
    }
    let referenced: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE dataset_id = $1)
             OR EXISTS (SELECT 1 FROM models WHERE dataset_id = $1)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let outcome = if referenced {
        sqlx::query("UPDATE datasets SET status = 'deleted' WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Deletion::Retired
    } else {
        sqlx::query("DELETE FROM datasets WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Deletion::Removed
    };
    tx.commit().await?;
    Ok(Some(outcome))
}
