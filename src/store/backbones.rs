//! The `script_backbones` table: TorchScript backbones users uploaded.
//!
//! Rows are plain data; turning one into what training and serving load is
//! the caller's (`train::backbone`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;

use crate::data::preprocess::Normalization;
use crate::models::script::ScriptStage;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScriptBackboneRow {
    pub name: String,
    pub image_size: i32,
    pub normalization: Json<Normalization>,
    pub feature_dim: i32,
    pub parameters: i64,
    pub stages: Json<Vec<ScriptStage>>,
    pub removed_layer: Option<String>,
    pub source_file: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    #[serde(skip)]
    pub artifact_key: String,
    pub created_at: DateTime<Utc>,
}

/// A checked upload, its module already under `artifact_key`.
pub struct NewScriptBackbone {
    pub name: String,
    pub image_size: i32,
    pub normalization: Normalization,
    pub feature_dim: i32,
    pub parameters: i64,
    pub stages: Vec<ScriptStage>,
    pub removed_layer: Option<String>,
    pub source_file: Option<String>,
    pub bytes: i64,
    pub sha256: String,
    pub artifact_key: String,
}

/// Records an upload; `None` when a backbone of that name exists already.
pub async fn insert(
    pool: &PgPool,
    row: &NewScriptBackbone,
) -> sqlx::Result<Option<ScriptBackboneRow>> {
    let inserted = sqlx::query_as(
        "INSERT INTO script_backbones (name, image_size, normalization, feature_dim, parameters, stages, removed_layer, source_file, bytes, sha256, artifact_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING *",
    )
    .bind(&row.name)
    .bind(row.image_size)
    .bind(Json(row.normalization))
    .bind(row.feature_dim)
    .bind(row.parameters)
    .bind(Json(&row.stages))
    .bind(&row.removed_layer)
    .bind(&row.source_file)
    .bind(row.bytes)
    .bind(&row.sha256)
    .bind(&row.artifact_key)
    .fetch_one(pool)
    .await;
    match inserted {
        Ok(row) => Ok(Some(row)),
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(None),
        Err(err) => Err(err),
    }
}

pub async fn get(pool: &PgPool, name: &str) -> sqlx::Result<Option<ScriptBackboneRow>> {
    sqlx::query_as("SELECT * FROM script_backbones WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<ScriptBackboneRow>> {
    sqlx::query_as("SELECT * FROM script_backbones ORDER BY created_at, name")
        .fetch_all(pool)
        .await
}

/// Jobs not yet finished and models that need the backbone.
pub async fn users(pool: &PgPool, name: &str) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM jobs WHERE config->>'backbone' = $1 AND status IN ('queued', 'running')),
           (SELECT count(*) FROM models WHERE backbone = $1)",
    )
    .bind(name)
    .fetch_one(pool)
    .await
}

/// Removes the row; false when there was none.
pub async fn delete(pool: &PgPool, name: &str) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM script_backbones WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
