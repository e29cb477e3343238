//! The `datasets` table.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DatasetRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub classes: Json<Vec<String>>,
    pub counts: Json<Value>,
    pub num_train: i32,
    pub num_val: i32,
    pub bytes: i64,
    #[serde(skip)]
    pub artifact_key: String,
    pub report: Json<Value>,
    pub created_at: DateTime<Utc>,
}

pub struct NewDataset<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub classes: &'a [String],
    pub counts: Value,
    pub num_train: i32,
    pub num_val: i32,
    pub bytes: i64,
    pub artifact_key: &'a str,
    pub report: Value,
}

pub async fn insert(pool: &PgPool, new: NewDataset<'_>) -> sqlx::Result<DatasetRow> {
    sqlx::query_as(
        "INSERT INTO datasets (id, name, status, classes, counts, num_train, num_val, bytes, artifact_key, report)
         VALUES ($1, $2, 'ready', $3, $4, $5, $6, $7, $8, $9)
         RETURNING *",
    )
    .bind(new.id)
    .bind(new.name)
    .bind(Json(new.classes))
    .bind(Json(new.counts))
    .bind(new.num_train)
    .bind(new.num_val)
    .bind(new.bytes)
    .bind(new.artifact_key)
    .bind(Json(new.report))
    .fetch_one(pool)
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
    let found: Option<String> =
        sqlx::query_scalar("SELECT status FROM datasets WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none_or(|status| status == "deleted") {
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
