//! A worker takes jobs from the Postgres queue and trains them on its device.
//!
//! The async side claims a job, holds its lease by heartbeat and writes
//! progress to Postgres; the training itself runs on a dedicated OS thread
//! that owns every tensor and reports through a channel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tch::Device;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use uuid::Uuid;

use super::config::JobConfig;
use super::trainer::{self, TrainError, TrainEvent, TrainSpec, TrainSummary};
use crate::artifacts::Artifacts;
use crate::models;
use crate::store::{self, datasets, jobs, metrics};

/// File name of a job's best checkpoint inside its artifact directory.
pub const CHECKPOINT_FILE: &str = "best.safetensors";
/// File name of the labels and preprocessing facts beside the checkpoint.
pub const MODEL_CARD_FILE: &str = "model.json";

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
    /// A job was run to this final status (`succeeded`, `failed`, or
    /// `queued` when it was handed back).
    Ran { job_id: Uuid, status: String },
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
            match self.try_execute_one(Some(&shutdown)).await {
                Ok(Outcome::Ran { .. }) => continue,
                Ok(Outcome::Idle) => {}
                Err(err) => tracing::error!(worker = %self.id, error = ?err, "worker step failed"),
            }
            tokio::select! {
                _ = listener.recv() => {}
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
        let lease = self.lease.as_secs_f64();
        let Some(job) = jobs::claim(&self.pool, &self.id, lease).await? else {
            return Ok(Outcome::Idle);
        };
        let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempts);
        self.run_claimed(job, shutdown).instrument(span).await
    }

    async fn run_claimed(
        &self,
        job: jobs::JobRow,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> anyhow::Result<Outcome> {
        tracing::info!("claimed");
        let run_id = jobs::start_run(
            &self.pool,
            &job,
            &self.id,
            &models::device_name(self.device),
        )
        .await?;

        let result = match self.prepare(&job).await {
            Ok((spec, card)) => self.train(&job, run_id, spec, card, shutdown).await,
            Err(err) => Err(RunError::Failed(format!("{err:#}"))),
        };
        let status = self.conclude(&job, run_id, result).await?;
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
        let backbone = models::find(&config.backbone).context("unknown backbone")?;
        let job_dir = self.artifacts.path(&Artifacts::job_key(job.id));
        let card = ModelCard {
            backbone: config.backbone.clone(),
            labels: dataset.classes.0.clone(),
            image_size: config.image_size,
            normalization: backbone.normalization,
        };
        let spec = TrainSpec {
            labels: dataset.classes.0,
            dataset_dir: self.artifacts.path(&dataset.artifact_key),
            weights_dir: self.weights_dir.clone(),
            checkpoint: job_dir.join(CHECKPOINT_FILE),
            device: self.device,
            config,
        };
        Ok((spec, card))
    }

    /// Runs the training thread, recording its events and renewing the lease
    /// until it ends.
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
        let checkpoint = spec.checkpoint.clone();
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
        let mut shutdown = shutdown.cloned();
        let mut lease_lost = false;
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Message::Event(TrainEvent::Epoch(m))) => {
                        tracing::info!(epoch = m.epoch, val_accuracy = m.val_accuracy, train_loss = m.train_loss, "epoch done");
                        metrics::record_epoch(&self.pool, job.id, run_id, &m).await.map_err(RunError::store)?;
                    }
                    Some(Message::Event(TrainEvent::NewBest { epoch, metric })) => {
                        let key = format!("{}/{CHECKPOINT_FILE}", Artifacts::job_key(job.id));
                        metrics::record_best_checkpoint(&self.pool, job.id, run_id, epoch, &key, metric)
                            .await
                            .map_err(RunError::store)?;
                    }
                    Some(Message::Done(Ok(summary))) => {
                        write_model_card(&checkpoint, &card).map_err(|e| RunError::Failed(e.to_string()))?;
                        return Ok(Finished { summary, card });
                    }
                    Some(Message::Done(Err(TrainError::Stopped))) | None => {
                        return Err(if lease_lost { RunError::LeaseLost } else { RunError::Interrupted });
                    }
                    Some(Message::Done(Err(err))) => return Err(RunError::Failed(err.to_string())),
                },
                _ = heartbeat.tick() => {
                    match jobs::heartbeat(&self.pool, job.id, &self.id, self.lease.as_secs_f64()).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!("lease lost; stopping");
                            lease_lost = true;
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(err) => tracing::warn!(error = %err, "heartbeat failed; retrying"),
                    }
                }
                _ = wait_for_shutdown(&mut shutdown) => {
                    tracing::info!("shutting down; stopping training at the next batch");
                    stop.store(true, Ordering::Relaxed);
                    shutdown = None;
                }
            }
        }
    }

    /// Writes the job's final state. Returns its status.
    async fn conclude(
        &self,
        job: &jobs::JobRow,
        run_id: Uuid,
        result: Result<Finished, RunError>,
    ) -> anyhow::Result<&'static str> {
        let mut tx = self.pool.begin().await?;
        let status = match result {
            Ok(Finished { summary, card }) => {
                let best = &summary.best;
                let key = format!("{}/{CHECKPOINT_FILE}", Artifacts::job_key(job.id));
                store::models::insert(
                    &mut tx,
                    store::models::NewModel {
                        job_id: job.id,
                        dataset_id: job.dataset_id,
                        backbone: &card.backbone,
                        labels: &card.labels,
                        image_size: card.image_size as i32,
                        normalization: serde_json::to_value(card.normalization)?,
                        artifact_key: &key,
                        epoch: best.epoch,
                        metrics: serde_json::to_value(best)?,
                    },
                )
                .await?;
                jobs::finish(&mut tx, job.id, &self.id, "succeeded", None).await?;
                jobs::finish_run(&mut tx, run_id, "succeeded", None).await?;
                "succeeded"
            }
            Err(RunError::Failed(reason)) => {
                tracing::warn!(%reason, "job failed");
                jobs::finish(&mut tx, job.id, &self.id, "failed", Some(&reason)).await?;
                jobs::finish_run(&mut tx, run_id, "failed", Some(&reason)).await?;
                "failed"
            }
            Err(RunError::Interrupted) => {
                // Hand the job back so another worker (or this one, after a
                // restart) runs it again.
                jobs::release(&mut tx, job.id, &self.id).await?;
                jobs::finish_run(&mut tx, run_id, "lost", Some("the worker shut down")).await?;
                "queued"
            }
            Err(RunError::LeaseLost) => {
                jobs::finish_run(&mut tx, run_id, "lost", Some("the lease expired")).await?;
                "lost"
            }
        };
        tx.commit().await?;
        Ok(status)
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
    /// The worker is shutting down.
    Interrupted,
    /// Another worker owns the job now.
    LeaseLost,
}

impl RunError {
    fn store(err: sqlx::Error) -> Self {
        RunError::Failed(format!("recording progress failed: {err}"))
    }
}

/// What a checkpoint needs beside its weights to be used on its own.
#[derive(serde::Serialize)]
struct ModelCard {
    backbone: String,
    labels: Vec<String>,
    image_size: i64,
    normalization: crate::data::preprocess::Normalization,
}

fn write_model_card(checkpoint: &std::path::Path, card: &ModelCard) -> std::io::Result<()> {
    let path = checkpoint.with_file_name(MODEL_CARD_FILE);
    std::fs::write(
        path,
        serde_json::to_vec_pretty(card).map_err(std::io::Error::other)?,
    )
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
