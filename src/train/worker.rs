//! A worker takes jobs from the Postgres queue and trains them on its device.
//!
//! The async side claims a job, holds its lease by heartbeat, watches for
//! cancellation and writes progress to Postgres; the training itself runs on
//! a dedicated OS thread that owns every tensor and reports through a channel.
//!
//! Every write for a job is fenced by the attempt's lease ([`jobs::Lease`]):
//! once a write is refused or the heartbeat fails past the lease, the thread
//! is stopped at its next batch and the worker writes nothing more for the
//! job, as another attempt may own it by then.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tch::Device;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use uuid::Uuid;

use super::backbone;
use super::config::JobConfig;
use super::trainer::{
    self, Resume, TrainError, TrainEvent, TrainSpec, TrainSummary, BEST_CHECKPOINT,
};
use crate::artifacts::Artifacts;
use crate::data::preprocess::Normalization;
use crate::models;
use crate::store::jobs::{self, Lease};
use crate::store::wakeups::JobWakeups;
use crate::store::{self, datasets, JobStatus, Pool, RunOutcome};
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

/// Why a training thread was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    Shutdown,
    /// The lease passed to another attempt or expired: nothing more may be
    /// written for the job.
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
            &crate::device::device_name(self.device),
        )
        .await?;
        let mut wakeups = JobWakeups::listen(&self.pool).await?;
        tracing::info!(worker = %self.id, device = %crate::device::device_name(self.device), "worker started");
        // On a timer, not only between jobs: a lost worker's job goes back to
        // the queue even while every worker here is busy.
        let reaper = tokio::spawn(reap_every(self.pool.clone(), reap_period(self.lease)));
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
        let Some(job) = jobs::claim(&self.pool, &self.id, self.lease.as_secs_f64()).await? else {
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
        job: jobs::JobRow,
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
        let ended = match jobs::start_run(&self.pool, &lease, &device, resumed_from).await? {
            None => {
                tracing::warn!("the lease was lost before the run started: nothing written");
                None
            }
            Some(run_id) => {
                tracing::info!(resumed_from, "claimed");
                let result = match prepared {
                    Ok((spec, card)) => {
                        self.train(&lease, claimed_at, run_id, spec, card, shutdown)
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

    async fn prepare(&self, job: &jobs::JobRow) -> anyhow::Result<(TrainSpec, ModelCard)> {
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

    /// Runs `work` while renewing the lease: fetching a large dataset can
    /// outlast it. (A renewal refused here shows when the run starts.)
    async fn renewing<T>(&self, lease: &Lease, work: impl std::future::Future<Output = T>) -> T {
        let mut heartbeat = tokio::time::interval(self.lease / 3);
        heartbeat.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = heartbeat.tick() => {
                    if let Err(err) = jobs::heartbeat(&self.pool, lease, self.lease.as_secs_f64()).await {
                        tracing::warn!(error = %err, "heartbeat failed; retrying");
                    }
                }
            }
        }
    }

    /// Runs the training thread, recording its events, renewing the lease and
    /// watching for cancellation and shutdown until the thread has ended:
    /// whatever the outcome, no training thread outlives this call.
    async fn train(
        &self,
        lease: &Lease,
        claimed_at: Instant,
        run_id: Uuid,
        spec: TrainSpec,
        card: ModelCard,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> Result<Finished, RunError> {
        let mut stopper = Stopper::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let thread_stop = stopper.flag.clone();
        let job_dir = spec.job_dir.clone();
        std::thread::Builder::new()
            .name(format!("train-{}", lease.job_id))
            .spawn(move || {
                let events = tx.clone();
                let result =
                    trainer::train(&spec, &thread_stop, &mut |event| report(&events, event));
                let _ = tx.send(Message::Done(result));
            })
            .map_err(|err| {
                RunError::Failed(format!("could not start the training thread: {err}"))
            })?;

        let mut heartbeat = tokio::time::interval(self.lease / 3);
        let mut renewed_at = claimed_at;
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        let mut shutdown = shutdown.cloned();
        // A write that failed for good: the job's outcome once the thread stops.
        let mut failure: Option<RunError> = None;
        loop {
            let lost = stopper.reason == Some(StopReason::LeaseLost);
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Message::Event(event, handled)) => {
                        if !lost && failure.is_none() {
                            match self.record(lease, run_id, event).await {
                                Ok(()) => {}
                                Err(RunError::Stopped(reason)) => stopper.request(reason),
                                Err(err) => {
                                    tracing::warn!("a write failed for good: stopping training at the next batch");
                                    stopper.flag.store(true, Ordering::Relaxed);
                                    failure = Some(err);
                                }
                            }
                        }
                        // Only now (the stop flag raised if need be) does the
                        // thread go on to write its next file.
                        drop(handled);
                    }
                    Some(Message::Done(result)) => {
                        return self.ended(lease, &job_dir, card, result, failure, stopper.reason).await;
                    }
                    None => return Err(RunError::Stopped(stopper.reason.unwrap_or(StopReason::Shutdown))),
                },
                _ = heartbeat.tick(), if !lost => {
                    metrics::counter!(telemetry::WORKER_HEARTBEATS, "worker" => self.id.clone()).increment(1);
                    let sent = Instant::now();
                    match jobs::heartbeat(&self.pool, lease, self.lease.as_secs_f64()).await {
                        Ok(true) => renewed_at = sent,
                        Ok(false) => stopper.request(StopReason::LeaseLost),
                        // The lease may already be another worker's.
                        Err(err) if renewed_at.elapsed() >= self.lease => {
                            tracing::warn!(error = %err, "heartbeat failing past the lease");
                            stopper.request(StopReason::LeaseLost);
                        }
                        Err(err) => tracing::warn!(error = %err, "heartbeat failed; retrying"),
                    }
                }
                _ = cancel_poll.tick(), if stopper.reason.is_none() => {
                    if jobs::cancel_requested(&self.pool, lease.job_id).await.unwrap_or(false) {
                        stopper.request(StopReason::Cancelled);
                    }
                }
                _ = wait_for_shutdown(&mut shutdown) => {
                    stopper.request(StopReason::Shutdown);
                    shutdown = None;
                }
            }
        }
    }

    /// What a run came to once its thread ended. A finished run's model card
    /// is written and published only while the lease still holds.
    async fn ended(
        &self,
        lease: &Lease,
        job_dir: &std::path::Path,
        card: ModelCard,
        result: Result<TrainSummary, TrainError>,
        failure: Option<RunError>,
        stopped: Option<StopReason>,
    ) -> Result<Finished, RunError> {
        if let Some(err) = failure {
            return Err(err);
        }
        let summary = match result {
            Ok(_) if stopped == Some(StopReason::LeaseLost) => {
                tracing::info!(
                    "training thread ended before it saw the stop; the job is another attempt's"
                );
                return Err(RunError::Stopped(StopReason::LeaseLost));
            }
            Ok(summary) => summary,
            Err(TrainError::Stopped) => {
                let reason = stopped.unwrap_or(StopReason::Shutdown);
                tracing::info!(reason = reason.name(), "training thread stopped");
                return Err(RunError::Stopped(reason));
            }
            Err(err) => return Err(RunError::Failed(err.to_string())),
        };
        let held = store::retry(DB_PATIENCE, || jobs::holds(&self.pool, lease))
            .await
            .map_err(|err| RunError::Failed(format!("checking the lease failed: {err}")))?;
        if !held {
            return Err(RunError::Stopped(StopReason::LeaseLost));
        }
        write_model_card(job_dir, &card).map_err(|e| RunError::Failed(e.to_string()))?;
        let key = Artifacts::job_key(lease.job_id);
        for file in [BEST_CHECKPOINT, MODEL_CARD_FILE] {
            self.artifacts
                .publish(&format!("{key}/{file}"))
                .await
                .map_err(|err| RunError::Failed(format!("publishing the model failed: {err}")))?;
        }
        Ok(Finished { summary, card })
    }

    /// Records one event under the lease. `Stopped(LeaseLost)`: the write was
    /// refused, as the lease passed to another attempt or expired.
    async fn record(&self, lease: &Lease, run_id: Uuid, event: TrainEvent) -> Result<(), RunError> {
        let pool = &self.pool;
        let written = match event {
            TrainEvent::Started {
                cached_features,
                precision,
            } => {
                store::retry(DB_PATIENCE, || {
                    jobs::set_run_started(pool, lease, run_id, cached_features, precision.name())
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
                    jobs::set_progress(pool, lease.job_id, &lease.worker, &progress)
                })
                .await
            }
            TrainEvent::Checkpointing { .. } => {
                store::retry(DB_PATIENCE, || jobs::holds(pool, lease)).await
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

    /// Writes the job's final state, in one transaction fenced by the lease;
    /// a worker that lost it writes nothing. Returns the job's status, or
    /// `None` when the job is no longer this worker's.
    async fn conclude(
        &self,
        job: &jobs::JobRow,
        lease: &Lease,
        run_id: Uuid,
        result: &Result<Finished, RunError>,
    ) -> anyhow::Result<Option<JobStatus>> {
        let mut tx = jobs::begin(&self.pool).await?;
        let Some(mut fenced) = jobs::fence(&mut tx, lease).await? else {
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
                let key = format!("{}/{BEST_CHECKPOINT}", Artifacts::job_key(id));
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
                    jobs::set_test_metrics(&mut fenced, serde_json::to_value(test)?).await?;
                }
                store::models::deploy_if_first(&mut fenced, model_id).await?;
                jobs::finish_run(&mut fenced, run_id, RunOutcome::Succeeded, None).await?;
                jobs::finish(&mut fenced, id, worker, JobStatus::Succeeded, None).await?;
                Some(JobStatus::Succeeded)
            }
            Err(RunError::Failed(reason)) => {
                tracing::warn!(%reason, "job failed");
                jobs::finish_run(&mut fenced, run_id, RunOutcome::Failed, Some(reason)).await?;
                jobs::finish(&mut fenced, id, worker, JobStatus::Failed, Some(reason)).await?;
                Some(JobStatus::Failed)
            }
            Err(RunError::Stopped(StopReason::Cancelled)) => {
                jobs::finish_run(&mut fenced, run_id, RunOutcome::Cancelled, None).await?;
                jobs::finish(&mut fenced, id, worker, JobStatus::Cancelled, None).await?;
                Some(JobStatus::Cancelled)
            }
            Err(RunError::Stopped(StopReason::Shutdown)) => {
                // Hand the job back; the next attempt resumes from the last epoch.
                let why = Some("the worker shut down");
                jobs::finish_run(&mut fenced, run_id, RunOutcome::Lost, why).await?;
                jobs::release(&mut fenced).await?;
                Some(JobStatus::Queued)
            }
            // Given up by the local clock, though no one took the job yet:
            // the reaper queues it again once the lease has expired.
            Err(RunError::Stopped(StopReason::LeaseLost)) => {
                let why = Some("the lease expired");
                jobs::finish_run(&mut fenced, run_id, RunOutcome::Lost, why).await?;
                None
            }
        };
        tx.commit().await?;
        Ok(status)
    }
}

/// Puts expired leases back in the queue every `period`, for good.
async fn reap_every(pool: Pool, period: Duration) {
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        if let Err(err) = reap(&pool).await {
            tracing::warn!(error = %err, "reaping expired leases failed");
        }
    }
}

/// Often enough that a job waits little longer than its lease once its
/// worker is lost.
fn reap_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_secs(1))
}

async fn reap(pool: &Pool) -> store::Result<()> {
    let reaped = jobs::reap_expired(pool).await?;
    if reaped.requeued > 0 {
        tracing::warn!(
            count = reaped.requeued,
            "queued again jobs whose workers were lost (lease expired)"
        );
    }
    if reaped.failed > 0 {
        tracing::warn!(
            count = reaped.failed,
            "failed jobs whose workers were lost on their last attempt"
        );
    }
    Ok(())
}

fn epoch_key(job_id: Uuid, epoch: i64) -> String {
    let job_dir = Artifacts::job_key(job_id);
    trainer::epoch_checkpoint(std::path::Path::new(&job_dir), epoch)
        .to_string_lossy()
        .into_owned()
}

/// Sends an event from the training thread and, except for progress, waits
/// until the worker has dealt with it: recorded it, or raised the stop flag.
fn report(events: &mpsc::UnboundedSender<Message>, event: TrainEvent) {
    if let TrainEvent::Progress { .. } = event {
        let _ = events.send(Message::Event(event, None));
        return;
    }
    let (handled, wait) = oneshot::channel();
    if events.send(Message::Event(event, Some(handled))).is_ok() {
        let _ = wait.blocking_recv();
    }
}

/// The training thread's stop flag, and why it was raised. Raised when
/// dropped too, so no early return leaves the thread training.
#[derive(Default)]
struct Stopper {
    flag: Arc<AtomicBool>,
    reason: Option<StopReason>,
}

impl Stopper {
    fn request(&mut self, reason: StopReason) {
        if self.reason.is_none() {
            tracing::info!(
                reason = reason.name(),
                "stopping training at the next batch"
            );
            self.reason = Some(reason);
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

impl StopReason {
    fn name(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::Shutdown => "shutdown",
            StopReason::LeaseLost => "lease lost",
        }
    }
}

enum Message {
    /// An event, and (but for progress) whom to tell once it is dealt with.
    Event(TrainEvent, Option<oneshot::Sender<()>>),
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
    crate::durable::write_bytes(&job_dir.join(MODEL_CARD_FILE), &json)
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
