//! The `models` table: the best checkpoint of each succeeded job.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: Uuid,
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub backbone: String,
    pub labels: Json<Vec<String>>,
    pub image_size: i32,
    pub normalization: Json<Value>,
    #[serde(skip)]
    pub artifact_key: String,
    pub epoch: i32,
    pub metrics: Json<Value>,
    pub created_at: DateTime<Utc>,
}

pub struct NewModel<'a> {
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub backbone: &'a str,
    pub labels: &'a [String],
    pub image_size: i32,
    pub normalization: Value,
    pub artifact_key: &'a str,
    pub epoch: i32,
    pub metrics: Value,
}

pub async fn insert(tx: &mut sqlx::PgConnection, new: NewModel<'_>) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO models (id, job_id, dataset_id, backbone, labels, image_size, normalization,
             artifact_key, epoch, metrics)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(new.job_id)
    .bind(new.dataset_id)
    .bind(new.backbone)
    .bind(Json(new.labels))
    .bind(new.image_size)
    .bind(Json(new.normalization))
    .bind(new.artifact_key)
    .bind(new.epoch)
    .bind(Json(new.metrics))
    .execute(tx)
    .await?;
    Ok(id)
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as("SELECT * FROM models WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn for_job(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as("SELECT * FROM models WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(pool)
        .await
}

/// The model `/predict` serves when none is named: the newest one.
pub async fn latest(pool: &PgPool) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as("SELECT * FROM models ORDER BY created_at DESC LIMIT 1")
        .fetch_optional(pool)
        .await
}
