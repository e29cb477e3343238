//! One attempt of a claimed job, supervised: the training thread is started,
//! its events recorded as they come, and it is told to stop at its next
//! batch on cancellation, shutdown, a lost lease or a write that failed for
//! good. Whatever the outcome, no training thread outlives the attempt; a
//! finished run's model card is written and published while the lease holds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::lease::Heartbeat;
use super::trainer::{self, TrainError, TrainEvent, TrainSpec, TrainSummary, BEST_CHECKPOINT};
use super::worker::{write_model_card, ModelCard, Worker, DB_PATIENCE, MODEL_CARD_FILE};
use crate::artifacts::Artifacts;
use crate::store::leases::{self, Lease};
use crate::store::{self, jobs};

/// How often a running job checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(500);

/// Why a training thread was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StopReason {
    Cancelled,
    Shutdown,
    /// The lease passed to another attempt or expired: nothing more may be
    /// written for the job.
    LeaseLost,
}

impl StopReason {
    pub(super) fn name(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::Shutdown => "shutdown",
            StopReason::LeaseLost => "lease lost",
        }
    }
}

/// Why an attempt did not finish.
pub(super) enum RunError {
    /// The job cannot succeed; the reason is shown to the user.
    Failed(String),
    /// The training thread was told to stop.
    Stopped(StopReason),
}

/// A finished run: its best epoch and the model card written beside it.
pub(super) struct Finished {
    pub(super) summary: TrainSummary,
    pub(super) card: ModelCard,
}

impl Worker {
    /// Runs the training thread, recording its events, renewing the lease and
    /// watching for cancellation and shutdown until the thread has ended:
    /// whatever the outcome, no training thread outlives this call.
    pub(super) async fn run_attempt(
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

        let mut heartbeat = Heartbeat::new(self.lease, claimed_at);
        let mut cancel_poll = tokio::time::interval(CANCEL_POLL);
        let mut shutdown = shutdown.cloned();
        // A write that failed for good: the job's outcome once the thread stops.
        let mut failure: Option<RunError> = None;
        // The event being recorded, and whom to tell when it is: the lease is
        // renewed meanwhile, as an upload may wait out a store outage.
        let mut recording: Option<Recording<'_>> = None;
        let mut handled: Option<oneshot::Sender<()>> = None;
        loop {
            let lost = stopper.reason == Some(StopReason::LeaseLost);
            tokio::select! {
                message = rx.recv(), if recording.is_none() => match message {
                    Some(Message::Event(event, reply)) => {
                        if !lost && failure.is_none() {
                            recording = Some(Box::pin(self.record(lease, run_id, event)));
                        }
                        // Told once the event is recorded (at once if it is
                        // not): only then does the thread write its next file.
                        handled = reply;
                    }
                    Some(Message::Done(result)) => {
                        return self.ended(lease, run_id, &job_dir, card, result, failure, stopper.reason).await;
                    }
                    None => return Err(RunError::Stopped(stopper.reason.unwrap_or(StopReason::Shutdown))),
                },
                written = async { recording.as_mut().expect("guarded").await }, if recording.is_some() => {
                    recording = None;
                    match written {
                        Ok(()) => {}
                        Err(RunError::Stopped(reason)) => stopper.request(reason),
                        Err(err) => {
                            tracing::warn!("a write failed for good: stopping training at the next batch");
                            stopper.flag.store(true, Ordering::Relaxed);
                            failure = Some(err);
                        }
                    }
                },
                _ = heartbeat.due(), if !lost => {
                    if !self.renew(&mut heartbeat, lease).await {
                        stopper.request(StopReason::LeaseLost);
                        // An upload still under way could land after the next
                        // attempt's files: it is abandoned with the lease.
                        recording = None;
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
            if recording.is_none() {
                // The stop flag is raised if need be: the thread may go on.
                drop(handled.take());
            }
        }
    }

    /// What a run came to once its thread ended. A finished run's model card
    /// is written and published only while the lease still holds.
    #[allow(clippy::too_many_arguments)]
    async fn ended(
        &self,
        lease: &Lease,
        run_id: Uuid,
        job_dir: &Path,
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
        let held = store::retry(DB_PATIENCE, || leases::holds(&self.pool, lease))
            .await
            .map_err(|err| RunError::Failed(format!("checking the lease failed: {err}")))?;
        if !held {
            return Err(RunError::Stopped(StopReason::LeaseLost));
        }
        write_model_card(job_dir, &card).map_err(|e| RunError::Failed(e.to_string()))?;
        // The model is the best checkpoint under a name of this run's own:
        // `best.safetensors` is shared by the job's attempts, and an upload a
        // cut-off earlier attempt had already sent can still land on it.
        let model_file = model_file(run_id);
        crate::durable::copy(&job_dir.join(BEST_CHECKPOINT), &job_dir.join(&model_file))
            .map_err(|e| RunError::Failed(format!("writing the model file failed: {e}")))?;
        let key = Artifacts::job_key(lease.job_id);
        for file in [model_file.as_str(), MODEL_CARD_FILE] {
            self.artifacts
                .publish(&format!("{key}/{file}"))
                .await
                .map_err(|err| RunError::Failed(format!("publishing the model failed: {err}")))?;
        }
        Ok(Finished { summary, card })
    }
}

/// An event's recording in progress.
type Recording<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RunError>> + Send + 'a>>;

enum Message {
    /// An event, and (but for progress) whom to tell once it is dealt with.
    Event(TrainEvent, Option<oneshot::Sender<()>>),
    Done(Result<TrainSummary, TrainError>),
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

/// The finished model's file in the job's directory: the best checkpoint,
/// named for the run that made it, so nothing else ever writes that key.
pub(super) fn model_file(run_id: Uuid) -> String {
    format!("model-{run_id}.safetensors")
}
