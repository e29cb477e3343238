//! The training loop: runs on a dedicated OS thread, owns every tensor, and
//! reports progress through a callback.
//!
//! This file holds the loop's contract (what a run needs, what it reports,
//! how it ends) and its outline: set up, then per epoch train, validate,
//! checkpoint, keep the best and stop early when it stops improving, then
//! test the best. The steps are in `session.rs`; beside them are
//! `evaluate.rs` (scores of a split), `feature_cache.rs` (a frozen
//! backbone's features, computed once), `layout.rs` (channels-last on
//! the CPU) and `threads.rs` (the CPU steps' intra-op thread count, by
//! measurement).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tch::Device;

use super::config::JobConfig;
use super::precision::Precision;
use super::session::Session;
use crate::data;
use crate::models;
use crate::store::metrics::EpochMetrics;

/// Everything one training run needs, resolved by the worker.
pub struct TrainSpec {
    pub config: JobConfig,
    pub labels: Vec<String>,
    pub dataset_dir: PathBuf,
    pub weights_dir: PathBuf,
    /// The job's artifact directory: best and last checkpoints go here.
    pub job_dir: PathBuf,
    pub device: Device,
    /// Where an earlier attempt stopped, if it saved an epoch.
    pub resume: Option<Resume>,
    /// The uploaded TorchScript backbone, when the job's backbone is one.
    pub script: Option<models::script::ScriptSpec>,
}

/// The state an earlier attempt left: its last recorded epoch (whose weights
/// are in [`epoch_checkpoint`]) and the best value of the selection metric.
/// Optimizer moments are not restored (tch cannot save them); the optimizer
/// starts afresh at the scheduled learning rate.
#[derive(Debug, Clone)]
pub struct Resume {
    pub epoch: i64,
    pub best_epoch: Option<i32>,
    pub best_metric: Option<f64>,
}

/// Weights of the best epoch so far, by the selection metric.
pub const BEST_CHECKPOINT: &str = "best.safetensors";
/// Weights after a finished epoch, to resume from; the two newest are kept.
pub fn epoch_checkpoint(job_dir: &Path, epoch: i64) -> PathBuf {
    job_dir.join(format!("epoch-{epoch}.safetensors"))
}

pub enum TrainEvent {
    /// Training is about to start: whether it trains on cached features,
    /// and in which precision.
    Started {
        cached_features: bool,
        precision: Precision,
    },
    /// Within an epoch: `step` of `steps` batches done (sent at most every
    /// [`PROGRESS_INTERVAL`]).
    Progress {
        epoch: i64,
        step: i64,
        steps: i64,
        images_per_second: f64,
        /// Estimated seconds to the end of the last epoch.
        eta_seconds: f64,
        /// Mean training loss of the epoch so far (what a live curve shows
        /// moving within the epoch).
        loss: f64,
    },
    /// The epoch's checkpoints are about to be written. Like every event but
    /// `Progress`, the callback returns once the worker has dealt with it; a
    /// worker that no longer holds the job sets `stop` first, so a superseded
    /// attempt writes no file the job's current attempt reads.
    Checkpointing { epoch: i64 },
    /// An epoch finished and its checkpoint is saved; its metrics.
    Epoch(EpochMetrics),
    /// The best checkpoint now holds this epoch's weights.
    NewBest { epoch: i32, metric: f64 },
    /// Early stopping ended the run after this epoch.
    EarlyStopped { epoch: i64 },
}

/// How often in-epoch progress is reported.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// The best epoch of a finished run.
pub struct TrainSummary {
    pub best_epoch: i32,
    pub best_metric: f64,
    /// The best checkpoint's scores on the dataset's test split, if it has one.
    pub test: Option<TestMetrics>,
}

/// Scores of the best checkpoint on the held-out test split, measured once
/// at the end of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestMetrics {
    pub epoch: i32,
    pub images: i64,
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub top_k: i64,
    pub top_k_accuracy: f64,
    pub per_class: Vec<crate::store::metrics::ClassMetrics>,
    pub confusion_matrix: Vec<Vec<i64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("unknown backbone {0}")]
    UnknownBackbone(String),
    #[error("loading the TorchScript backbone: {0}")]
    ScriptBackbone(String),
    #[error(
        "pretrained weights for {backbone} are missing at {path} (scripts/setup installs them)"
    )]
    MissingWeights { backbone: String, path: String },
    #[error("loading the dataset: {0}")]
    Data(#[from] data::DataError),
    #[error("the dataset has no validation images")]
    NoValidation,
    #[error("the training loss became {value} at epoch {epoch}; lower the learning rate")]
    NonFinite { epoch: i64, value: f64 },
    #[error("stopped before finishing")]
    Stopped,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("libtorch failed: {0}")]
    Crashed(String),
    #[error("writing a checkpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs `train_inner`, turning a libtorch panic (out of memory, a shape
/// error) into an error so the worker thread's caller carries on.
pub fn train(
    spec: &TrainSpec,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_inner(spec, stop, on_event)
    }))
    .unwrap_or_else(|panic| Err(TrainError::Crashed(crate::panic_message(&panic))))
}

fn train_inner(
    spec: &TrainSpec,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    let cfg = &spec.config;
    let mut session = Session::set_up(spec)?;
    on_event(TrainEvent::Started {
        cached_features: session.cache.is_some(),
        precision: session.precision,
    });
    // The one-off cost of the cache is part of the first epoch's time.
    let mut extra_seconds = session.cache_started.elapsed().as_secs_f64();
    let mut best = spec
        .resume
        .as_ref()
        .and_then(|r| Some((r.best_epoch?, r.best_metric?)));
    let mut since_best = 0;
    for epoch in session.first_epoch..=cfg.epochs {
        let trained = session.train_epoch(epoch, stop, on_event)?;
        let metrics = session.validate(epoch, trained, std::mem::take(&mut extra_seconds));
        let value = selection_value(cfg, &metrics);
        let improved = best.is_none_or(|(_, b)| cfg.selection_metric.improves(value, b));
        session.save_epoch(epoch, metrics, stop, on_event)?;
        if improved {
            session.save_best(stop)?;
            best = Some((epoch as i32, value));
            since_best = 0;
            on_event(TrainEvent::NewBest {
                epoch: epoch as i32,
                metric: value,
            });
        } else {
            since_best += 1;
        }
        if cfg.early_stopping_patience.is_some_and(|p| since_best >= p) && epoch < cfg.epochs {
            on_event(TrainEvent::EarlyStopped { epoch });
            break;
        }
    }
    let (best_epoch, best_metric) = best.ok_or(TrainError::Stopped)?;
    let test = session.test(best_epoch)?;
    Ok(TrainSummary {
        best_epoch,
        best_metric,
        test,
    })
}

/// The selection metric's value in an epoch's metrics.
pub fn selection_value(cfg: &JobConfig, m: &EpochMetrics) -> f64 {
    use super::config::SelectionMetric::*;
    match cfg.selection_metric {
        ValAccuracy => m.val_accuracy,
        ValLoss => m.val_loss,
        ValMacroF1 => m.val_macro_f1,
    }
}
