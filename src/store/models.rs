//! The `models` table: the best checkpoint of each succeeded job.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::leases::Fenced;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ModelRow {
    pub id: Uuid,
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub backbone: String,
    pub labels: Json<Vec<String>>,
    pub image_size: i32,
    /// Side `/predict` decodes images to before the model's own crop and
    /// resize: the side its dataset was stored at.
    pub stored_size: i32,
    pub normalization: Json<Value>,
    #[serde(skip)]
    pub artifact_key: String,
    pub epoch: i32,
    pub metrics: Json<Value>,
    pub created_at: DateTime<Utc>,
    /// Aliases this model is deployed under.
    pub aliases: Vec<String>,
}

const COLUMNS: &str = "id, job_id, dataset_id, backbone, labels, image_size, stored_size, normalization, artifact_key, \
     epoch, metrics, created_at, \
     ARRAY(SELECT d.alias FROM deployments d WHERE d.model_id = models.id ORDER BY d.alias) AS aliases";

/// The alias `/predict` serves when no model is named.
pub const DEFAULT_ALIAS: &str = "default";

pub struct NewModel<'a> {
    pub job_id: Uuid,
    pub dataset_id: Uuid,
    pub backbone: &'a str,
    pub labels: &'a [String],
    pub image_size: i32,
    pub stored_size: i32,
    pub normalization: Value,
    pub artifact_key: &'a str,
    pub epoch: i32,
    pub metrics: Value,
}

/// Records the model of the fenced job (the worker holding its lease).
pub async fn insert(fenced: &mut Fenced<'_>, new: NewModel<'_>) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO models (id, job_id, dataset_id, backbone, labels, image_size, normalization,
             artifact_key, epoch, metrics, stored_size)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
    .bind(new.stored_size)
    .execute(&mut **fenced)
    .await?;
    Ok(id)
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<ModelRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM models ORDER BY created_at DESC"
    ))
    .fetch_all(pool)
    .await
}

/// The model deployed under `alias`.
pub async fn by_alias(pool: &PgPool, alias: &str) -> sqlx::Result<Option<ModelRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM models WHERE id = (SELECT model_id FROM deployments WHERE alias = $1)"
    ))
    .bind(alias)
    .fetch_optional(pool)
    .await
}

/// Points `alias` at `model_id`; returns the model it served before, if any.
pub async fn deploy(pool: &PgPool, model_id: Uuid, alias: &str) -> sqlx::Result<Option<Uuid>> {
    let mut tx = pool.begin().await?;
    let previous: Option<Uuid> =
        sqlx::query_scalar("SELECT model_id FROM deployments WHERE alias = $1 FOR UPDATE")
            .bind(alias)
            .fetch_optional(&mut *tx)
            .await?;
    sqlx::query(
        "INSERT INTO deployments (alias, model_id) VALUES ($1, $2)
         ON CONFLICT (alias) DO UPDATE SET model_id = EXCLUDED.model_id, deployed_at = now()",
    )
    .bind(alias)
    .bind(model_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(previous)
}

/// Deploys the fenced job's new model as the default when no model is
/// deployed yet, so the first trained model serves `/predict` right away.
pub async fn deploy_if_first(fenced: &mut Fenced<'_>, model_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO deployments (alias, model_id)
         SELECT $1, id FROM models WHERE id = $2 AND job_id = $3
         ON CONFLICT (alias) DO NOTHING",
    )
    .bind(DEFAULT_ALIAS)
    .bind(model_id)
    .bind(fenced.job_id())
    .execute(&mut **fenced)
    .await?;
    Ok(())
}
