//! A worker takes jobs from the Postgres queue and trains them on its device.
//!
//! The async side claims a job, holds its lease by heartbeat, watches for
//! cancellation and writes progress to Postgres; the training itself runs on
//! a dedicated OS thread that owns every tensor and reports through a channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tch::Device;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use uuid::Uuid;

use super::config::JobConfig;
use super::trainer::{
    self, Resume, TrainError, TrainEvent, TrainSpec, TrainSummary, BEST_CHECKPOINT,
};
use crate::artifacts::Artifacts;
use crate::data::preprocess::Normalization;
use crate::models;
use crate::store::{self, datasets, jobs};
use crate::telemetry;

/// File name of the labels and preprocessing facts beside the checkpoint.
pub const MODEL_CARD_FILE: &str = "model.json";
/// How long a worker keeps retrying its writes while Postgres is down before
/// it gives the job up (its lease then expires and another attempt resumes).
const DB_PATIENCE: Duration = Duration::from_secs(60);
/// How often a running job checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Worker {
    pub id: String,
    pub pool: PgPool,
    pub artifacts: Artifacts,
    pub weights_dir: PathBuf,
    pub device: Device,
    /// How long a claim stays valid without a heartbeat.
    pub lease: Duration,
    /// How long an idle worker waits for a notification before looking again.
    pub idle_poll: Duration,
}

/// What one step of the worker did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The queue had nothing to claim.
    Idle,
    /// A job was run to this status: `succeeded`, `failed`, `cancelled`,
    /// `queued` (handed back at shutdown) or `lost` (another worker took it).
    Ran { job_id: Uuid, status: String },
}

/// Why a training thread was told to stop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    Shutdown,
    LeaseLost,
}

impl Worker {
    /// Runs until `shutdown` turns true, sleeping on `LISTEN` when idle.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        jobs::upsert_worker(
            &self.pool,
            &self.id,
            &host,
            &models::device_name(self.device),
        )
        .await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(store::JOBS_CHANNEL).await?;
        tracing::info!(worker = %self.id, device = %models::device_name(self.device), "worker started");
        while !*shutdown.borrow() {
            if let Err(err) = jobs::worker_seen(&self.pool, &self.id).await {
                tracing::warn!(error = %err, "recording the worker's heartbeat failed");
            }
            match self.try_execute_one(Some(&shutdown)).await {
                Ok(Outcome::Ran { .. }) => continue,
                Ok(Outcome::Idle) => {}
                Err(err) => tracing::error!(worker = %self.id, error = ?err, "worker step failed"),
            }
            tokio::select! {
                notification = listener.recv() => {
                    if let Err(err) = notification {
                        // The listener reconnects on its next call; do not spin meanwhile.
                        tracing::warn!(error = %err, "job notifications interrupted");
                        tokio::time::sleep(self.idle_poll).await;
                    }
                }
                _ = tokio::time::sleep(self.idle_poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(worker = %self.id, "worker stopped");
        Ok(())
    }

    /// Claims and runs at most one job. Tests call this to step the queue.
    pub async fn try_execute_one(
        &self,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> anyhow::Result<Outcome> {
        let reaped = jobs::reap_expired(&self.pool).await?;
        if reaped > 0 {
            tracing::warn!(
                count = reaped,
                "failed jobs whose workers were lost on their last attempt"
            );
        }
        let Some(job) = jobs::claim(&self.pool, &self.id, self.lease.as_secs_f64()).await? else {
            return Ok(Outcome::Idle);
        };
        metrics::counter!(telemetry::JOBS_STARTED).increment(1);
        let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempts);
        self.run_claimed(job, shutdown).instrument(span).await
    }

    async fn run_claimed(
        &self,
        job: jobs::JobRow,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> anyhow::Result<Outcome> {
        let prepared = self.prepare(&job).await;
        let resumed_from = prepared
            .as_ref()
            .ok()
            .and_then(|(spec, _)| spec.resume.as_ref().map(|r| r.epoch));
        let device = models::device_name(self.device);
        let run_id = jobs::start_run(&self.pool, &job, &self.id, &device, resumed_from).await?;
        tracing::info!(resumed_from, "claimed");
        let result = match prepared {
            Ok((spec, card)) => self.train(&job, run_id, spec, card, shutdown).await,
            Err(err) => Err(RunError::Failed(format!("{err:#}"))),
        };
        // Retried while Postgres is unreachable: the outcome is not lost to
        // a database restart.
        let status = store::retry(DB_PATIENCE, || self.conclude(&job, run_id, &result)).await?;
        metrics::counter!(telemetry::JOBS_ENDED, "status" => status).increment(1);
        tracing::info!(status, "job ended");
        Ok(Outcome::Ran {
            job_id: job.id,
            status: status.to_string(),
        })
    }

    async fn prepare(&self, job: &jobs::JobRow) -> anyhow::Result<(TrainSpec, ModelCard)> {
        let config: JobConfig = serde_json::from_value(job.config.0.clone())
            .context("reading the job's configuration")?;
        let dataset = datasets::get(&self.pool, job.dataset_id)
            .await?
            .context("the job's dataset no longer exists")?;
        let (script, normalization) = match models::find(&config.backbone) {
            Some(spec) => (None, spec.normalization),
            None => {
                let row = store::backbones::uploaded(&self.pool, &config.backbone)
                    .await?
                    .context("the job's backbone no longer exists")?;
                self.artifacts.fetch(&row.artifact_key).await?;
                let spec = row.spec(&self.artifacts);
                let normalization = spec.normalization;
                (Some(spec), normalization)
            }
        };
        // Another host may have run earlier attempts, or ingested the data.
        let job_dir = self.artifacts.fetch(&Artifacts::job_key(job.id)).await?;
        self.artifacts.fetch(&dataset.artifact_key).await?;
        // An earlier attempt's recorded epoch, if its weights were kept.
        let resume = (job.epoch > 0
            && trainer::epoch_checkpoint(&job_dir, job.epoch.into()).exists())
        .then(|| Resume {
            epoch: job.epoch.into(),
            best_epoch: job.best_epoch,
            best_metric: job.best_metric,
        });
        let card = ModelCard {
            backbone: config.backbone.clone(),
            labels: dataset.classes.0.clone(),
            image_size: config.image_size,
            stored_size: dataset.stored_size,
            normalization,
        };
        let spec = TrainSpec {
            labels: dataset.classes.0,
            dataset_dir: self.artifacts.path(&dataset.artifact_key),
            weights_dir: self.weights_dir.clone(),
            job_dir,
            device: self.device,
            resume,
            config,
            script,
        };
        Ok((spec, card))
    }

    /// Runs the training thread, recording its events, renewing the lease and
    /// watching for cancellation and shutdown until it ends.
    async fn train(
        &self,
        job: &jobs::JobRow,
        run_id: Uuid,
        spec: TrainSpec,
        card: ModelCard,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> Result<Finished, RunError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let thread_stop = stop.clone();
        let job_dir = spec.job_dir.clone();
        std::thread::Builder::new()
            .name(format!("train-{}", job.id))
            .spawn(move || {
                let events = tx.clone();
                let result = trainer::train(&spec, &thread_stop, &mut |event| {
                    let _ = events.send(Message::Event(event));
                });
                let _ = tx.send(Message::Done(result));
            })
            .map_err(|err| {
                RunError::Failed(format!("could not start the training thread: {err}"))
            })?;

        let mut heartbeat = tokio::time::interval(self.lease / 3);
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        let mut shutdown = shutdown.cloned();
        let mut stopped: Option<StopReason> = None;
        let request_stop = |reason: StopReason, stopped: &mut Option<StopReason>| {
            if stopped.is_none() {
                tracing::info!(
                    reason = reason_name(reason),
                    "stopping training at the next batch"
                );
                *stopped = Some(reason);
                stop.store(true, Ordering::Relaxed);
            }
        };
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Message::Event(event)) => self.record(job, run_id, event).await?,
                    Some(Message::Done(Ok(summary))) => {
                        write_model_card(&job_dir, &card).map_err(|e| RunError::Failed(e.to_string()))?;
                        let key = Artifacts::job_key(job.id);
                        for file in [BEST_CHECKPOINT, MODEL_CARD_FILE] {
                            self.artifacts.publish(&format!("{key}/{file}")).await.map_err(|err| {
                                RunError::Failed(format!("publishing the model failed: {err}"))
                            })?;
                        }
                        return Ok(Finished { summary, card });
                    }
                    Some(Message::Done(Err(TrainError::Stopped))) | None => {
                        return Err(RunError::Stopped(stopped.unwrap_or(StopReason::Shutdown)));
                    }
                    Some(Message::Done(Err(err))) => return Err(RunError::Failed(err.to_string())),
                },
                _ = heartbeat.tick() => {
                    metrics::counter!(telemetry::WORKER_HEARTBEATS, "worker" => self.id.clone()).increment(1);
                    match jobs::heartbeat(&self.pool, job.id, &self.id, self.lease.as_secs_f64()).await {
                        Ok(true) => {}
                        Ok(false) => request_stop(StopReason::LeaseLost, &mut stopped),
                        Err(err) => tracing::warn!(error = %err, "heartbeat failed; retrying"),
                    }
                }
                _ = cancel_poll.tick(), if stopped.is_none() => {
                    if jobs::cancel_requested(&self.pool, job.id).await.unwrap_or(false) {
                        request_stop(StopReason::Cancelled, &mut stopped);
                    }
                }
                _ = wait_for_shutdown(&mut shutdown) => {
                    request_stop(StopReason::Shutdown, &mut stopped);
                    shutdown = None;
                }
            }
        }
    }

    async fn record(
        &self,
        job: &jobs::JobRow,
        run_id: Uuid,
        event: TrainEvent,
    ) -> Result<(), RunError> {
        let stored = match event {
            TrainEvent::Started {
                cached_features,
                precision,
            } => {
                store::retry(DB_PATIENCE, || {
                    jobs::set_run_started(&self.pool, run_id, cached_features, precision.name())
                })
                .await
            }
            TrainEvent::Progress {
                epoch,
                step,
                steps,
                images_per_second,
                eta_seconds,
            } => {
                let progress = json!({
                    "epoch": epoch, "step": step, "steps": steps,
                    "images_per_second": images_per_second, "eta_seconds": eta_seconds,
                });
                store::retry(DB_PATIENCE, || {
                    jobs::set_progress(&self.pool, job.id, &self.id, &progress)
                })
                .await
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
                let epoch = i64::from(m.epoch);
                let recorded = store::retry(DB_PATIENCE, || {
                    store::metrics::record_epoch(&self.pool, job.id, run_id, &m)
                })
                .await;
                self.publish_epoch(job.id, epoch).await?;
                recorded
            }
            TrainEvent::NewBest { epoch, metric } => {
                let key = format!("{}/{BEST_CHECKPOINT}", Artifacts::job_key(job.id));
                self.artifacts
                    .publish(&key)
                    .await
                    .map_err(|err| RunError::Failed(format!("publishing {key} failed: {err}")))?;
                store::retry(DB_PATIENCE, || {
                    store::metrics::record_best_checkpoint(
                        &self.pool, job.id, run_id, epoch, &key, metric,
                    )
                })
                .await
            }
            TrainEvent::EarlyStopped { epoch } => {
                tracing::info!(
                    epoch,
                    "early stopping: the selection metric stopped improving"
                );
                Ok(())
            }
        };
        stored.map_err(|err| RunError::Failed(format!("recording progress failed: {err}")))
    }

    /// Publishes an epoch's checkpoint, so an attempt on another host can
    /// resume from it, and withdraws the one the trainer no longer keeps.
    async fn publish_epoch(&self, job_id: Uuid, epoch: i64) -> Result<(), RunError> {
        let job_dir = Artifacts::job_key(job_id);
        let key = |epoch| {
            let file = trainer::epoch_checkpoint(std::path::Path::new(&job_dir), epoch);
            file.to_string_lossy().into_owned()
        };
        let failed = |err| {
            RunError::Failed(format!(
                "publishing the epoch {epoch} checkpoint failed: {err}"
            ))
        };
        self.artifacts
            .publish_if_present(&key(epoch))
            .await
            .map_err(failed)?;
        self.artifacts
            .unpublish(&key(epoch - 2))
            .await
            .map_err(failed)
    }

    /// Writes the job's final state. Returns its status.
    async fn conclude(
        &self,
        job: &jobs::JobRow,
        run_id: Uuid,
        result: &Result<Finished, RunError>,
    ) -> anyhow::Result<&'static str> {
        let mut tx = self.pool.begin().await?;
        let status = match result {
            Ok(Finished { summary, card }) => {
                let best = store::metrics::epoch(&self.pool, job.id, summary.best_epoch)
                    .await?
                    .context("the best epoch's metrics are missing")?;
                let key = format!("{}/{BEST_CHECKPOINT}", Artifacts::job_key(job.id));
                let model_id = store::models::insert(
                    &mut tx,
                    store::models::NewModel {
                        job_id: job.id,
                        dataset_id: job.dataset_id,
                        backbone: &card.backbone,
                        labels: &card.labels,
                        image_size: card.image_size as i32,
                        stored_size: card.stored_size,
                        normalization: serde_json::to_value(card.normalization)?,
                        artifact_key: &key,
                        epoch: summary.best_epoch,
                        metrics: serde_json::to_value(&best)?,
                    },
                )
                .await?;
                if let Some(test) = &summary.test {
                    jobs::set_test_metrics(&mut tx, job.id, serde_json::to_value(test)?).await?;
                }
                store::models::deploy_if_first(&mut tx, model_id).await?;
                jobs::finish(&mut tx, job.id, &self.id, "succeeded", None).await?;
                jobs::finish_run(&mut tx, run_id, "succeeded", None).await?;
                "succeeded"
            }
            Err(RunError::Failed(reason)) => {
                tracing::warn!(%reason, "job failed");
                jobs::finish(&mut tx, job.id, &self.id, "failed", Some(reason)).await?;
                jobs::finish_run(&mut tx, run_id, "failed", Some(reason)).await?;
                "failed"
            }
            Err(RunError::Stopped(StopReason::Cancelled)) => {
                jobs::finish(&mut tx, job.id, &self.id, "cancelled", None).await?;
                jobs::finish_run(&mut tx, run_id, "cancelled", None).await?;
                "cancelled"
            }
            Err(RunError::Stopped(StopReason::Shutdown)) => {
                // Hand the job back; the next attempt resumes from the last epoch.
                jobs::release(&mut tx, job.id, &self.id).await?;
                jobs::finish_run(&mut tx, run_id, "lost", Some("the worker shut down")).await?;
                "queued"
            }
            Err(RunError::Stopped(StopReason::LeaseLost)) => {
                jobs::finish_run(&mut tx, run_id, "lost", Some("the lease expired")).await?;
                "lost"
            }
        };
        tx.commit().await?;
        Ok(status)
    }
}

fn reason_name(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Cancelled => "cancelled",
        StopReason::Shutdown => "shutdown",
        StopReason::LeaseLost => "lease lost",
    }
}

enum Message {
    Event(TrainEvent),
    Done(Result<TrainSummary, TrainError>),
}

struct Finished {
    summary: TrainSummary,
    card: ModelCard,
}

enum RunError {
    /// The job cannot succeed; the reason is shown to the user.
    Failed(String),
    /// The training thread was told to stop.
    Stopped(StopReason),
}

/// What a checkpoint needs beside its weights to be used on its own.
#[derive(serde::Serialize)]
struct ModelCard {
    backbone: String,
    labels: Vec<String>,
    image_size: i64,
    /// Side of the stored images the model learnt from.
    stored_size: i32,
    normalization: Normalization,
}

fn write_model_card(job_dir: &std::path::Path, card: &ModelCard) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(card).map_err(std::io::Error::other)?;
    std::fs::write(job_dir.join(MODEL_CARD_FILE), json)
}

async fn wait_for_shutdown(shutdown: &mut Option<watch::Receiver<bool>>) {
    match shutdown {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
