//! Recording a training run's events under the attempt's lease: the run's
//! start, in-epoch progress, each epoch's metrics and checkpoint, the best
//! checkpoint. Checkpoints are published to the shared store before the row
//! that names them is written, so another host can resume from them.

use serde_json::json;
use uuid::Uuid;

use super::attempt::{RunError, StopReason};
use super::trainer::{self, TrainEvent, BEST_CHECKPOINT};
use super::worker::{Worker, DB_PATIENCE};
use crate::artifacts::Artifacts;
use crate::store::leases::{self, Lease};
use crate::store::{self, runs};
use crate::telemetry;

impl Worker {
    /// Records one event under the lease. `Stopped(LeaseLost)`: the write was
    /// refused, as the lease passed to another attempt or expired.
    pub(super) async fn record(
        &self,
        lease: &Lease,
        run_id: Uuid,
        event: TrainEvent,
    ) -> Result<(), RunError> {
        let pool = &self.pool;
        let written = match event {
            TrainEvent::Started {
                cached_features,
                precision,
            } => {
                store::retry(DB_PATIENCE, || {
                    runs::set_run_started(pool, lease, run_id, cached_features, precision.name())
                })
                .await
            }
            TrainEvent::Progress {
                epoch,
                step,
                steps,
                images_per_second,
                eta_seconds,
                loss,
            } => {
                let progress = json!({
                    "epoch": epoch, "step": step, "steps": steps,
                    "images_per_second": images_per_second, "eta_seconds": eta_seconds,
                    "loss": loss,
                });
                store::retry(DB_PATIENCE, || {
                    leases::set_progress(pool, lease.job_id, &lease.worker, &progress)
                })
                .await
            }
            TrainEvent::Checkpointing { .. } => {
                store::retry(DB_PATIENCE, || leases::holds(pool, lease)).await
            }
            TrainEvent::Epoch(m) => {
                metrics::gauge!(telemetry::TRAIN_IMAGES_PER_SECOND, "worker" => self.id.clone())
                    .set(m.images_per_second);
                metrics::histogram!(telemetry::EPOCH_SECONDS, "worker" => self.id.clone())
                    .record(m.seconds);
                tracing::info!(
                    epoch = m.epoch,
                    val_accuracy = m.val_accuracy,
                    train_loss = m.train_loss,
                    "epoch done"
                );
                // The row names the checkpoint the next attempt resumes from:
                // written once that file is published.
                let epoch = i64::from(m.epoch);
                self.publish_epoch(lease.job_id, epoch).await?;
                let recorded = store::retry(DB_PATIENCE, || {
                    store::metrics::record_epoch(pool, lease, run_id, &m)
                })
                .await;
                if let Ok(true) = recorded {
                    self.unpublish_epoch(lease.job_id, epoch - 2).await?;
                }
                recorded
            }
            TrainEvent::NewBest { epoch, metric } => {
                let key = format!("{}/{BEST_CHECKPOINT}", Artifacts::job_key(lease.job_id));
                self.artifacts
                    .publish(&key)
                    .await
                    .map_err(|err| RunError::Failed(format!("publishing {key} failed: {err}")))?;
                store::retry(DB_PATIENCE, || {
                    store::metrics::record_best_checkpoint(pool, lease, run_id, epoch, &key, metric)
                })
                .await
            }
            TrainEvent::EarlyStopped { epoch } => {
                tracing::info!(
                    epoch,
                    "early stopping: the selection metric stopped improving"
                );
                Ok(true)
            }
        };
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err(RunError::Stopped(StopReason::LeaseLost)),
            Err(err) => Err(RunError::Failed(format!(
                "recording progress failed: {err}"
            ))),
        }
    }

    /// Publishes an epoch's checkpoint, so an attempt on another host can
    /// resume from it.
    async fn publish_epoch(&self, job_id: Uuid, epoch: i64) -> Result<(), RunError> {
        self.artifacts
            .publish_if_present(&epoch_key(job_id, epoch))
            .await
            .map_err(|err| {
                RunError::Failed(format!(
                    "publishing the epoch {epoch} checkpoint failed: {err}"
                ))
            })
    }

    /// Withdraws a checkpoint the trainer no longer keeps.
    async fn unpublish_epoch(&self, job_id: Uuid, epoch: i64) -> Result<(), RunError> {
        self.artifacts
            .unpublish(&epoch_key(job_id, epoch))
            .await
            .map_err(|err| {
                RunError::Failed(format!(
                    "withdrawing the epoch {epoch} checkpoint failed: {err}"
                ))
            })
    }
}

fn epoch_key(job_id: Uuid, epoch: i64) -> String {
    let job_dir = Artifacts::job_key(job_id);
    trainer::epoch_checkpoint(std::path::Path::new(&job_dir), epoch)
        .to_string_lossy()
        .into_owned()
}
