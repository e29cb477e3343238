//! `epoch_metrics` and `checkpoints`: the record of each training epoch.
//! Workers write them under their lease ([`leases::fence`]).

use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use super::leases::{self, Lease};

/// Precision, recall and F1 of one class on the validation split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: i64,
}

/// What one finished epoch measured. Plain data: the training thread makes
/// it, this module stores and reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: i32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    pub top_k: i32,
    /// Share of validation images whose label is among the top `top_k`.
    pub val_top_k_accuracy: f64,
    /// Learning rate of the head at the epoch's last step.
    pub learning_rate: f64,
    pub frozen_stages: i32,
    pub images_per_second: f64,
    pub seconds: f64,
    pub per_class: Vec<ClassMetrics>,
    /// Rows are true labels, columns predicted labels, in label order.
    pub confusion_matrix: Vec<Vec<i64>>,
}

/// An `epoch_metrics` row as read, its JSON columns still wrapped.
#[derive(sqlx::FromRow)]
struct EpochRow {
    epoch: i32,
    train_loss: f64,
    train_accuracy: f64,
    val_loss: f64,
    val_accuracy: f64,
    val_macro_f1: f64,
    top_k: i32,
    val_top_k_accuracy: f64,
    learning_rate: f64,
    frozen_stages: i32,
    images_per_second: f64,
    seconds: f64,
    per_class: Json<Vec<ClassMetrics>>,
    confusion_matrix: Json<Vec<Vec<i64>>>,
}

impl From<EpochRow> for EpochMetrics {
    fn from(row: EpochRow) -> Self {
        Self {
            epoch: row.epoch,
            train_loss: row.train_loss,
            train_accuracy: row.train_accuracy,
            val_loss: row.val_loss,
            val_accuracy: row.val_accuracy,
            val_macro_f1: row.val_macro_f1,
            top_k: row.top_k,
            val_top_k_accuracy: row.val_top_k_accuracy,
            learning_rate: row.learning_rate,
            frozen_stages: row.frozen_stages,
            images_per_second: row.images_per_second,
            seconds: row.seconds,
            per_class: row.per_class.0,
            confusion_matrix: row.confusion_matrix.0,
        }
    }
}

/// Records an epoch and makes it the job's last (whose checkpoint the next
/// attempt resumes from); a retried attempt overwrites the epoch it repeats.
/// `false`: the lease is lost, and nothing was written.
pub async fn record_epoch(
    pool: &PgPool,
    lease: &Lease,
    run_id: Uuid,
    m: &EpochMetrics,
) -> sqlx::Result<bool> {
    let mut tx = leases::begin(pool).await?;
    let Some(mut fenced) = leases::fence(&mut tx, lease).await? else {
        return Ok(false);
    };
    let job_id = fenced.job_id();
    sqlx::query(
        "INSERT INTO epoch_metrics (job_id, epoch, run_id, train_loss, train_accuracy, val_loss,
             val_accuracy, val_macro_f1, top_k, val_top_k_accuracy, learning_rate, frozen_stages,
             images_per_second, seconds, per_class, confusion_matrix)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         ON CONFLICT (job_id, epoch) DO UPDATE SET
             run_id = EXCLUDED.run_id, train_loss = EXCLUDED.train_loss,
             train_accuracy = EXCLUDED.train_accuracy, val_loss = EXCLUDED.val_loss,
             val_accuracy = EXCLUDED.val_accuracy, val_macro_f1 = EXCLUDED.val_macro_f1,
             top_k = EXCLUDED.top_k, val_top_k_accuracy = EXCLUDED.val_top_k_accuracy,
             frozen_stages = EXCLUDED.frozen_stages, learning_rate = EXCLUDED.learning_rate, images_per_second = EXCLUDED.images_per_second,
             seconds = EXCLUDED.seconds, per_class = EXCLUDED.per_class,
             confusion_matrix = EXCLUDED.confusion_matrix, created_at = now()",
    )
    .bind(job_id)
    .bind(m.epoch)
    .bind(run_id)
    .bind(m.train_loss)
    .bind(m.train_accuracy)
    .bind(m.val_loss)
    .bind(m.val_accuracy)
    .bind(m.val_macro_f1)
    .bind(m.top_k)
    .bind(m.val_top_k_accuracy)
    .bind(m.learning_rate)
    .bind(m.frozen_stages)
    .bind(m.images_per_second)
    .bind(m.seconds)
    .bind(Json(&m.per_class))
    .bind(Json(&m.confusion_matrix))
    .execute(&mut *fenced)
    .await?;
    sqlx::query("UPDATE jobs SET epoch = $2, progress = NULL, updated_at = now() WHERE id = $1")
        .bind(job_id)
        .bind(m.epoch)
        .execute(&mut *fenced)
        .await?;
    tx.commit().await?;
    Ok(true)
}

const COLUMNS: &str =
    "epoch, train_loss, train_accuracy, val_loss, val_accuracy, val_macro_f1, top_k, \
     val_top_k_accuracy, learning_rate, frozen_stages, images_per_second, seconds, per_class, \
     confusion_matrix";

/// The job's epochs after `after` (0 for all), in order.
pub async fn for_job(pool: &PgPool, job_id: Uuid, after: i32) -> sqlx::Result<Vec<EpochMetrics>> {
    let rows: Vec<EpochRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM epoch_metrics WHERE job_id = $1 AND epoch > $2 ORDER BY epoch"
    ))
    .bind(job_id)
    .bind(after)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(EpochMetrics::from).collect())
}

pub async fn epoch(pool: &PgPool, job_id: Uuid, epoch: i32) -> sqlx::Result<Option<EpochMetrics>> {
    let row: Option<EpochRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM epoch_metrics WHERE job_id = $1 AND epoch = $2"
    ))
    .bind(job_id)
    .bind(epoch)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(EpochMetrics::from))
}

/// Records a new best checkpoint, once its file is durable: it becomes the
/// job's only `is_best` one. `false`: the lease is lost, and nothing was
/// written.
pub async fn record_best_checkpoint(
    pool: &PgPool,
    lease: &Lease,
    run_id: Uuid,
    epoch: i32,
    artifact_key: &str,
    metric: f64,
) -> sqlx::Result<bool> {
    let mut tx = leases::begin(pool).await?;
    let Some(mut fenced) = leases::fence(&mut tx, lease).await? else {
        return Ok(false);
    };
    let job_id = fenced.job_id();
    sqlx::query("UPDATE checkpoints SET is_best = false WHERE job_id = $1 AND is_best")
        .bind(job_id)
        .execute(&mut *fenced)
        .await?;
    sqlx::query(
        "INSERT INTO checkpoints (id, job_id, run_id, epoch, artifact_key, metric, is_best)
         VALUES ($1, $2, $3, $4, $5, $6, true)",
    )
    .bind(Uuid::new_v4())
    .bind(job_id)
    .bind(run_id)
    .bind(epoch)
    .bind(artifact_key)
    .bind(metric)
    .execute(&mut *fenced)
    .await?;
    sqlx::query(
        "UPDATE jobs SET best_epoch = $2, best_metric = $3, updated_at = now() WHERE id = $1",
    )
    .bind(job_id)
    .bind(epoch)
    .bind(metric)
    .execute(&mut *fenced)
    .await?;
    tx.commit().await?;
    Ok(true)
}
