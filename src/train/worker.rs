//! A worker takes jobs from the Postgres queue and trains them on its device.
//!
//! The loop lives here: claim a job, prepare it (configuration, dataset,
//! backbone, resume point), run one attempt (`attempt.rs`: the training
//! thread, on its own OS thread that owns every tensor, supervised), and
//! conclude it in one fenced transaction. Holding the lease is `lease.rs`'s
//! job, recording the run's events `record.rs`'s.
//!
//! Every write for a job is fenced by the attempt's lease ([`Lease`]): once
//! a write is refused or the heartbeat fails past the lease, the thread is
//! stopped at its next batch and the worker writes nothing more for the
//! job, as another attempt may own it by then.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tch::Device;
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use super::attempt::{Finished, RunError, StopReason};
use super::backbone;
use super::config::JobConfig;
use super::lease::{reap, reap_every, reap_period};
use super::trainer::{self, Resume, TrainSpec};
use crate::artifacts::Artifacts;
use crate::data::preprocess::Normalization;
use crate::models;
use crate::store::jobs::JobRow;
use crate::store::leases::{self, Lease};
use crate::store::wakeups::JobWakeups;
use crate::store::{self, datasets, runs, JobStatus, Pool, RunOutcome};
use crate::telemetry;

/// File name of the labels and preprocessing facts beside the checkpoint.
pub const MODEL_CARD_FILE: &str = "model.json";
/// How long a worker keeps retrying its writes while Postgres is down before
/// it gives the job up (its lease then expires and another attempt resumes).
pub(super) const DB_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Worker {
    pub id: String,
    pub pool: Pool,
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
    /// `queued` (handed back at shutdown) or [`LOST`] (another worker took it).
    Ran { job_id: Uuid, status: String },
}

/// What [`Outcome::Ran`] and the ended-jobs metric say of a job that is no
/// longer this worker's (its status is whatever the new holder makes it).
pub const LOST: &str = "lost";

impl Worker {
    /// Runs until `shutdown` turns true, sleeping on `LISTEN` when idle.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        leases::upsert_worker(
            &self.pool,
            &self.id,
            &host,
            &crate::device::device_name(self.device),
        )
        .await?;
        let mut wakeups = JobWakeups::listen(&self.pool).await?;
        tracing::info!(worker = %self.id, device = %crate::device::device_name(self.device), "worker started");
        // On a timer, not only between jobs: a lost worker's job goes back to
        // the queue even while every worker here is busy.
        let reaper = tokio::spawn(reap_every(self.pool.clone(), reap_period(self.lease)));
        while !*shutdown.borrow() {
            if let Err(err) = leases::worker_seen(&self.pool, &self.id).await {
                tracing::warn!(error = %err, "recording the worker's heartbeat failed");
            }
            match self.try_execute_one(Some(&shutdown)).await {
                Ok(Outcome::Ran { .. }) => continue,
                Ok(Outcome::Idle) => {}
                Err(err) => tracing::error!(worker = %self.id, error = ?err, "worker step failed"),
            }
            tokio::select! {
                notification = wakeups.recv() => {
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
        reaper.abort();
        tracing::info!(worker = %self.id, "worker stopped");
        Ok(())
    }

    /// Claims and runs at most one job. Tests call this to step the queue.
    pub async fn try_execute_one(
        &self,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> anyhow::Result<Outcome> {
        reap(&self.pool).await?;
        // Below the free-space floor a job could not write its checkpoints:
        // it stays queued (readiness says why) rather than failing midway.
        if let Err(low) = self.artifacts.room() {
            tracing::warn!(reason = %low, "taking no job until disk space is freed");
            return Ok(Outcome::Idle);
        }
        // The lease runs from the claim (a local bound on when it expires).
        let claimed_at = Instant::now();
        let Some(job) = leases::claim(&self.pool, &self.id, self.lease.as_secs_f64()).await? else {
            return Ok(Outcome::Idle);
        };
        metrics::counter!(telemetry::JOBS_STARTED).increment(1);
        let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempts);
        self.run_claimed(job, claimed_at, shutdown)
            .instrument(span)
            .await
    }

    async fn run_claimed(
        &self,
        job: JobRow,
        claimed_at: Instant,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> anyhow::Result<Outcome> {
        let lease = job.lease(&self.id);
        let prepared = self.renewing(&lease, self.prepare(&job)).await;
        let resumed_from = prepared
            .as_ref()
            .ok()
            .and_then(|(spec, _)| spec.resume.as_ref().map(|r| r.epoch));
        let device = crate::device::device_name(self.device);
        let ended = match runs::start_run(&self.pool, &lease, &device, resumed_from).await? {
            None => {
                tracing::warn!("the lease was lost before the run started: nothing written");
                None
            }
            Some(run_id) => {
                tracing::info!(resumed_from, "claimed");
                let result = match prepared {
                    Ok((spec, card)) => {
                        self.run_attempt(&lease, claimed_at, run_id, spec, card, shutdown)
                            .await
                    }
                    Err(err) => Err(RunError::Failed(format!("{err:#}"))),
                };
                // Retried while Postgres is unreachable: the outcome is not
                // lost to a database restart.
                store::retry(DB_PATIENCE, || self.conclude(&job, &lease, run_id, &result)).await?
            }
        };
        let status = ended.map_or(LOST, JobStatus::as_str);
        metrics::counter!(telemetry::JOBS_ENDED, "status" => status).increment(1);
        tracing::info!(status, "job ended");
        Ok(Outcome::Ran {
            job_id: job.id,
            status: status.to_string(),
        })
    }

    async fn prepare(&self, job: &JobRow) -> anyhow::Result<(TrainSpec, ModelCard)> {
        let config: JobConfig = serde_json::from_value(job.config.0.clone())
            .context("reading the job's configuration")?;
        let dataset = datasets::get(&self.pool, job.dataset_id)
            .await?
            .context("the job's dataset no longer exists")?;
        let (script, normalization) = match models::find(&config.backbone) {
            Some(spec) => (None, spec.normalization),
            None => {
                let row = backbone::uploaded(&self.pool, &config.backbone)
                    .await?
                    .context("the job's backbone no longer exists")?;
                self.artifacts.fetch(&row.artifact_key).await?;
                let spec = backbone::script_spec(&row, &self.artifacts);
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

    /// Writes the job's final state, in one transaction fenced by the lease;
    /// a worker that lost it writes nothing. Returns the job's status, or
    /// `None` when the job is no longer this worker's.
    async fn conclude(
        &self,
        job: &JobRow,
        lease: &Lease,
        run_id: Uuid,
        result: &Result<Finished, RunError>,
    ) -> anyhow::Result<Option<JobStatus>> {
        let mut tx = leases::begin(&self.pool).await?;
        let Some(mut fenced) = leases::fence(&mut tx, lease).await? else {
            tracing::warn!(
                "the lease passed to another attempt or expired: this worker writes nothing more for the job"
            );
            return Ok(None);
        };
        let (id, worker) = (lease.job_id, lease.worker.as_str());
        let status = match result {
            Ok(Finished { summary, card }) => {
                let best = store::metrics::epoch(&self.pool, id, summary.best_epoch)
                    .await?
                    .context("the best epoch's metrics are missing")?;
                let key = format!(
                    "{}/{}",
                    Artifacts::job_key(id),
                    super::attempt::model_file(run_id)
                );
                let model_id = store::models::insert(
                    &mut fenced,
                    store::models::NewModel {
                        job_id: id,
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
                    leases::set_test_metrics(&mut fenced, serde_json::to_value(test)?).await?;
                }
                store::models::deploy_if_first(&mut fenced, model_id).await?;
                runs::finish_run(&mut fenced, run_id, RunOutcome::Succeeded, None).await?;
                leases::finish(&mut fenced, id, worker, JobStatus::Succeeded, None).await?;
                Some(JobStatus::Succeeded)
            }
            Err(RunError::Failed(reason)) => {
                tracing::warn!(%reason, "job failed");
                runs::finish_run(&mut fenced, run_id, RunOutcome::Failed, Some(reason)).await?;
                leases::finish(&mut fenced, id, worker, JobStatus::Failed, Some(reason)).await?;
                Some(JobStatus::Failed)
            }
            Err(RunError::Stopped(StopReason::Cancelled)) => {
                runs::finish_run(&mut fenced, run_id, RunOutcome::Cancelled, None).await?;
                leases::finish(&mut fenced, id, worker, JobStatus::Cancelled, None).await?;
                Some(JobStatus::Cancelled)
            }
            Err(RunError::Stopped(StopReason::Shutdown)) => {
                // Hand the job back; the next attempt resumes from the last epoch.
                let why = Some("the worker shut down");
                runs::finish_run(&mut fenced, run_id, RunOutcome::Lost, why).await?;
                leases::release(&mut fenced).await?;
                Some(JobStatus::Queued)
            }
            // Given up by the local clock, though no one took the job yet:
            // the reaper queues it again once the lease has expired.
            Err(RunError::Stopped(StopReason::LeaseLost)) => {
                let why = Some("the lease expired");
                runs::finish_run(&mut fenced, run_id, RunOutcome::Lost, why).await?;
                None
            }
        };
        tx.commit().await?;
        Ok(status)
    }
}

/// What a checkpoint needs beside its weights to be used on its own.
#[derive(serde::Serialize)]
pub(super) struct ModelCard {
    pub(super) backbone: String,
    pub(super) labels: Vec<String>,
    pub(super) image_size: i64,
    /// Side of the stored images the model learnt from.
    pub(super) stored_size: i32,
    pub(super) normalization: Normalization,
}

pub(super) fn write_model_card(job_dir: &std::path::Path, card: &ModelCard) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(card).map_err(std::io::Error::other)?;
    crate::durable::write_bytes(&job_dir.join(MODEL_CARD_FILE), &json)
}
