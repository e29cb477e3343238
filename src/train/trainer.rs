//! The training loop: runs on a dedicated OS thread, owns every tensor, and
//! reports each epoch through a callback.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sqlx::types::Json;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use super::config::{Freeze, JobConfig, Optimizer};
use super::metrics::{macro_f1, Confusion};
use crate::data::{self, preprocess};
use crate::models::{self, Classifier};
use crate::store::metrics::EpochMetrics;

/// Everything one training run needs, resolved by the worker.
pub struct TrainSpec {
    pub config: JobConfig,
    pub labels: Vec<String>,
    pub dataset_dir: PathBuf,
    pub weights_dir: PathBuf,
    /// Where the best checkpoint (safetensors) is written.
    pub checkpoint: PathBuf,
    pub device: Device,
}

pub enum TrainEvent {
    /// An epoch finished; its metrics.
    Epoch(EpochMetrics),
    /// The checkpoint file now holds this epoch's weights, the best so far.
    NewBest { epoch: i32, metric: f64 },
}

/// The best epoch of a finished run.
pub struct TrainSummary {
    pub best: EpochMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("unknown backbone {0}")]
    UnknownBackbone(String),
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
    #[error("writing the checkpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Batch size of evaluation passes (no gradients, so it can be large).
const EVAL_BATCH: i64 = 64;

pub fn train(
    spec: &TrainSpec,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    let cfg = &spec.config;
    let backbone = models::find(&cfg.backbone)
        .ok_or_else(|| TrainError::UnknownBackbone(cfg.backbone.clone()))?;
    let weights = backbone.weights_path(&spec.weights_dir);
    if !weights.exists() {
        return Err(TrainError::MissingWeights {
            backbone: cfg.backbone.clone(),
            path: weights.display().to_string(),
        });
    }
    let (train_x, train_y) = data::load_split(&spec.dataset_dir, data::TRAIN_FILE)?;
    let (val_x, val_y) = data::load_split(&spec.dataset_dir, data::VAL_FILE)?;
    if val_y.size()[0] == 0 {
        return Err(TrainError::NoValidation);
    }

    tch::manual_seed(cfg.seed);
    let mut vs = nn::VarStore::new(spec.device);
    let num_classes = spec.labels.len() as i64;
    let mut model = Classifier::new(&mut vs, backbone, num_classes, Some(&weights))?;
    model.set_backbone_trainable(&vs, cfg.freeze == Freeze::Full);
    let mut opt = match cfg.optimizer {
        Optimizer::Adam => nn::Adam::default()
            .wd(cfg.weight_decay)
            .build(&vs, cfg.learning_rate)?,
        Optimizer::Adamw => nn::AdamW::default()
            .wd(cfg.weight_decay)
            .build(&vs, cfg.learning_rate)?,
    };
    let norm = backbone.normalization;

    let n_train = train_y.size()[0];
    let mut best: Option<EpochMetrics> = None;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        let order = Tensor::randperm(n_train, (Kind::Int64, Device::Cpu));
        let (mut loss_sum, mut correct) = (0.0, 0i64);
        for start in (0..n_train).step_by(cfg.batch_size as usize) {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Stopped);
            }
            let len = cfg.batch_size.min(n_train - start);
            let idx = order.narrow(0, start, len);
            let xs = train_x.index_select(0, &idx).to_device(spec.device);
            let ys = train_y.index_select(0, &idx).to_device(spec.device);
            let mut input = preprocess::model_input(&xs, cfg.image_size, &norm);
            if cfg.horizontal_flip {
                input = random_horizontal_flip(&input);
            }
            let logits = model.forward_t(&input, true);
            let loss = logits.cross_entropy_for_logits(&ys);
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(TrainError::NonFinite { epoch, value });
            }
            opt.backward_step(&loss);
            loss_sum += value * len as f64;
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&ys)
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
        let train_seconds = started.elapsed().as_secs_f64();

        let (val_loss, confusion) = evaluate(&model, &val_x, &val_y, spec, &norm);
        let per_class = confusion.per_class(&spec.labels);
        let metrics = EpochMetrics {
            epoch: epoch as i32,
            train_loss: loss_sum / n_train as f64,
            train_accuracy: correct as f64 / n_train as f64,
            val_loss,
            val_accuracy: confusion.accuracy(),
            val_macro_f1: macro_f1(&per_class),
            learning_rate: cfg.learning_rate,
            images_per_second: n_train as f64 / train_seconds,
            seconds: started.elapsed().as_secs_f64(),
            per_class: Json(per_class),
            confusion_matrix: Json(confusion.matrix),
        };
        let improved = best
            .as_ref()
            .is_none_or(|b| metrics.val_accuracy > b.val_accuracy);
        on_event(TrainEvent::Epoch(metrics.clone()));
        if improved {
            save_checkpoint(&vs, &spec.checkpoint)?;
            on_event(TrainEvent::NewBest {
                epoch: metrics.epoch,
                metric: metrics.val_accuracy,
            });
            best = Some(metrics);
        }
    }
    Ok(TrainSummary {
        best: best.expect("at least one epoch ran"),
    })
}

/// Mean validation loss and the confusion matrix, without gradients.
fn evaluate(
    model: &Classifier,
    images: &Tensor,
    labels: &Tensor,
    spec: &TrainSpec,
    norm: &preprocess::Normalization,
) -> (f64, Confusion) {
    let n = labels.size()[0];
    let mut confusion = Confusion::new(spec.labels.len());
    let mut loss_sum = 0.0;
    tch::no_grad(|| {
        for start in (0..n).step_by(EVAL_BATCH as usize) {
            let len = EVAL_BATCH.min(n - start);
            let xs = images.narrow(0, start, len).to_device(spec.device);
            let ys = labels.narrow(0, start, len).to_device(spec.device);
            let logits = model.forward_t(
                &preprocess::model_input(&xs, spec.config.image_size, norm),
                false,
            );
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            let predicted = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))
                .expect("int64 predictions");
            let truth = Vec::<i64>::try_from(ys.to_device(Device::Cpu)).expect("int64 labels");
            confusion.add(&truth, &predicted);
        }
    });
    (loss_sum / n as f64, confusion)
}

/// Flips each image left-right with probability one half.
fn random_horizontal_flip(batch: &Tensor) -> Tensor {
    let n = batch.size()[0];
    let flip = Tensor::rand([n, 1, 1, 1], (Kind::Float, batch.device())).lt(0.5);
    batch.flip([3]).where_self(&flip, batch)
}

/// Writes the checkpoint beside its final name and renames it into place,
/// so a reader never sees half a file.
fn save_checkpoint(vs: &nn::VarStore, path: &std::path::Path) -> Result<(), TrainError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("partial.safetensors");
    vs.save(&partial)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}
