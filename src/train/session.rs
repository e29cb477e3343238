//! One training run's state on the training thread, and its steps: set-up
//! (splits, network, optimizer, feature cache), an epoch of optimizer
//! steps, validation, checkpoints, and the best checkpoint's test.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use super::config::{ClassWeights, JobConfig, Optimizer};
use super::evaluate::evaluate;
use super::feature_cache::FeatureCache;
use super::layout::Layout;
use super::metrics::macro_f1;
use super::precision::Precision;
use super::threads::ThreadTuner;
use super::trainer::{
    epoch_checkpoint, TestMetrics, TrainError, TrainEvent, TrainSpec, BEST_CHECKPOINT,
    PROGRESS_INTERVAL,
};
use crate::data::{self, preprocess};
use crate::models::{self, Classifier};
use crate::store::metrics::EpochMetrics;

/// A run once set up: the splits in memory, the network (resumed from the
/// last epoch an earlier attempt saved) with its optimizer, and how it
/// trains. Lives on the training thread.
pub(super) struct Session<'a> {
    spec: &'a TrainSpec,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    vs: nn::VarStore,
    model: Classifier,
    norm: preprocess::Normalization,
    opt: nn::Optimizer,
    layout: Layout,
    /// The backbone's stages (the optimizer has one more group, the head's).
    stages: usize,
    class_weights: Option<Tensor>,
    pub(super) cache: Option<FeatureCache>,
    pub(super) precision: Precision,
    /// Chooses the CPU steps' intra-op thread count (`None` on a GPU or
    /// with one thread).
    threads: Option<ThreadTuner>,
    /// 1, or the epoch after the one an earlier attempt saved.
    pub(super) first_epoch: i64,
    /// When the feature cache began to be built: the first epoch's time
    /// includes it.
    pub(super) cache_started: Instant,
}

/// What training an epoch gave, before validation.
pub(super) struct EpochTraining {
    loss_sum: f64,
    correct: i64,
    /// The learning rate of the epoch's last step.
    learning_rate: f64,
    started: Instant,
    seconds: f64,
}

impl<'a> Session<'a> {
    /// Loads the splits and builds the network, its optimizer and, when it
    /// pays, the feature cache.
    pub(super) fn set_up(spec: &'a TrainSpec) -> Result<Self, TrainError> {
        let cfg = &spec.config;
        // A catalogue backbone, or (when `script` is set) an uploaded one.
        let backbone = match &spec.script {
            Some(_) => None,
            None => Some(
                models::find(&cfg.backbone)
                    .ok_or_else(|| TrainError::UnknownBackbone(cfg.backbone.clone()))?,
            ),
        };
        let (train_x, train_y) = data::load_split(&spec.dataset_dir, data::TRAIN_FILE)?;
        let (val_x, val_y) = data::load_split(&spec.dataset_dir, data::VAL_FILE)?;
        if val_y.size()[0] == 0 {
            return Err(TrainError::NoValidation);
        }

        let first_epoch = spec.resume.as_ref().map_or(1, |r| r.epoch + 1);
        // The new head's initial weights come from the job's seed.
        tch::manual_seed(cfg.seed);
        let mut vs = nn::VarStore::new(spec.device);
        let num_classes = spec.labels.len() as i64;
        let (mut model, norm) = build_classifier(spec, backbone, &mut vs, num_classes)?;
        if first_epoch > 1 {
            vs.load(epoch_checkpoint(&spec.job_dir, first_epoch - 1))?;
        }
        let layout = Layout::for_device(spec.device);
        layout.apply_to_weights(&vs);
        model.set_frozen_batchnorm(cfg.frozen_batchnorm);
        let opt = build_optimizer(cfg, &vs)?;
        let stages = model.num_stages();
        let class_weights = class_weights(cfg, &train_y, num_classes, spec.device);

        let cache_started = Instant::now();
        model.set_frozen_stages(&vs, cfg.frozen_stages(first_epoch, stages));
        let cache = FeatureCache::build(&model, cfg, &train_x, &val_x, spec.device, &norm, layout);
        let precision = Precision::choose(spec.device, cfg.mixed_precision);
        Ok(Self {
            spec,
            train_x,
            train_y,
            val_x,
            val_y,
            vs,
            model,
            norm,
            opt,
            layout,
            stages,
            class_weights,
            cache,
            precision,
            threads: ThreadTuner::new(spec.device),
            first_epoch,
            cache_started,
        })
    }

    /// Trains one epoch over a fresh shuffle, reporting progress at most
    /// every [`PROGRESS_INTERVAL`] and stopping between batches when asked.
    pub(super) fn train_epoch(
        &mut self,
        epoch: i64,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<EpochTraining, TrainError> {
        let cfg = &self.spec.config;
        let n_train = self.train_y.size()[0];
        let steps = (n_train + cfg.batch_size - 1) / cfg.batch_size;
        // Each epoch draws from its own seed, so a resumed run continues the
        // same random sequence it would have had.
        tch::manual_seed(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch));
        self.model
            .set_frozen_stages(&self.vs, cfg.frozen_stages(epoch, self.stages));
        let started = Instant::now();
        let mut last_report = Instant::now();
        let order = Tensor::randperm(n_train, (Kind::Int64, Device::Cpu));
        let (mut loss_sum, mut correct) = (0.0, 0i64);
        let mut lr = cfg.learning_rate;
        for step in 0..steps {
            still_going(stop)?;
            let start = step * cfg.batch_size;
            let len = cfg.batch_size.min(n_train - start);
            lr = cfg.learning_rate * cfg.lr_factor((epoch - 1) as f64 + step as f64 / steps as f64);
            set_learning_rates(&mut self.opt, cfg, lr, self.stages);

            if let Some(threads) = &self.threads {
                threads.before_step();
            }
            let began = Instant::now();
            let (loss, hits) = self.step(epoch, &order.narrow(0, start, len))?;
            if let Some(threads) = &mut self.threads {
                threads.after_step(began.elapsed(), len);
            }
            loss_sum += loss * len as f64;
            correct += hits;
            if last_report.elapsed() >= PROGRESS_INTERVAL {
                last_report = Instant::now();
                let images_per_second = (start + len) as f64 / started.elapsed().as_secs_f64();
                let remaining = (n_train - start - len) + (cfg.epochs - epoch) * n_train;
                on_event(TrainEvent::Progress {
                    epoch,
                    step: step + 1,
                    steps,
                    images_per_second,
                    eta_seconds: remaining as f64 / images_per_second,
                    loss: loss_sum / (start + len) as f64,
                });
            }
        }
        Ok(EpochTraining {
            loss_sum,
            correct,
            learning_rate: lr,
            started,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One optimizer step on the training images `idx`: the batch's mean
    /// loss and how many of it the model got right.
    fn step(&mut self, epoch: i64, idx: &Tensor) -> Result<(f64, i64), TrainError> {
        let spec = self.spec;
        let cfg = &spec.config;
        let ys = self.train_y.index_select(0, idx).to_device(spec.device);
        let logits = self.precision.forward(|| match &self.cache {
            Some(cache) => self.model.head_t(&cache.train_batch(idx), true),
            None => {
                let xs = self.train_x.index_select(0, idx).to_device(spec.device);
                let input =
                    preprocess::normalize(&cfg.augmentation.apply(&xs, cfg.image_size), &self.norm);
                self.model.forward_t(&self.layout.input(&input), true)
            }
        });
        let loss = logits.cross_entropy_loss(
            &ys,
            self.class_weights.as_ref(),
            Reduction::Mean,
            -100,
            cfg.label_smoothing,
        );
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(TrainError::NonFinite { epoch, value });
        }
        match cfg.gradient_clip_norm {
            Some(max) => self.opt.backward_step_clip_norm(&loss, max),
            None => self.opt.backward_step(&loss),
        }
        let correct = logits
            .argmax(-1, false)
            .eq_tensor(&ys)
            .sum(Kind::Int64)
            .int64_value(&[]);
        Ok((value, correct))
    }

    /// The epoch's metrics: its training figures and its scores on the
    /// validation split. `extra_seconds` of one-off work count in its time.
    pub(super) fn validate(
        &self,
        epoch: i64,
        trained: EpochTraining,
        extra_seconds: f64,
    ) -> EpochMetrics {
        let spec = self.spec;
        let cfg = &spec.config;
        let n_train = self.train_y.size()[0];
        let val_logits = |start: i64, len: i64| match &self.cache {
            Some(cache) => self.model.head_t(&cache.val.narrow(0, start, len), false),
            None => {
                let xs = self.val_x.narrow(0, start, len).to_device(spec.device);
                let input = preprocess::model_input(&xs, cfg.image_size, &self.norm);
                self.model.forward_t(&self.layout.input(&input), false)
            }
        };
        let eval = evaluate(val_logits, &self.val_y, spec, self.class_weights.as_ref());
        let per_class = eval.confusion.per_class(&spec.labels);
        EpochMetrics {
            epoch: epoch as i32,
            train_loss: trained.loss_sum / n_train as f64,
            train_accuracy: trained.correct as f64 / n_train as f64,
            val_loss: eval.loss,
            val_accuracy: eval.confusion.accuracy(),
            val_macro_f1: macro_f1(&per_class),
            top_k: eval.k as i32,
            val_top_k_accuracy: eval.top_k_accuracy,
            learning_rate: trained.learning_rate,
            frozen_stages: self.model.frozen_stages() as i32,
            images_per_second: n_train as f64 / trained.seconds,
            seconds: trained.started.elapsed().as_secs_f64() + extra_seconds,
            per_class,
            confusion_matrix: eval.confusion.matrix,
        }
    }

    /// Saves the epoch's checkpoint, to resume from (the one two epochs back
    /// goes), and reports its metrics. The worker may stop the run before
    /// anything is written.
    pub(super) fn save_epoch(
        &self,
        epoch: i64,
        metrics: EpochMetrics,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), TrainError> {
        let job_dir = &self.spec.job_dir;
        on_event(TrainEvent::Checkpointing { epoch });
        still_going(stop)?;
        save_checkpoint(&self.vs, &epoch_checkpoint(job_dir, epoch))?;
        let _ = std::fs::remove_file(epoch_checkpoint(job_dir, epoch - 2));
        on_event(TrainEvent::Epoch(metrics));
        Ok(())
    }

    /// Saves the current weights as the best checkpoint.
    pub(super) fn save_best(&self, stop: &AtomicBool) -> Result<(), TrainError> {
        // Not over the best checkpoint of an attempt that took the job over.
        still_going(stop)?;
        save_checkpoint(&self.vs, &self.spec.job_dir.join(BEST_CHECKPOINT))
    }

    /// The best checkpoint's scores on the test split, when the dataset has
    /// one.
    pub(super) fn test(&mut self, best_epoch: i32) -> Result<Option<TestMetrics>, TrainError> {
        let spec = self.spec;
        let cfg = &spec.config;
        if !spec.dataset_dir.join(data::TEST_FILE).exists() {
            return Ok(None);
        }
        self.vs.load(spec.job_dir.join(BEST_CHECKPOINT))?;
        let (test_x, test_y) = data::load_split(&spec.dataset_dir, data::TEST_FILE)?;
        let logits = |start: i64, len: i64| {
            let xs = test_x.narrow(0, start, len).to_device(spec.device);
            let input = preprocess::model_input(&xs, cfg.image_size, &self.norm);
            self.model.forward_t(&self.layout.input(&input), false)
        };
        let eval = evaluate(logits, &test_y, spec, self.class_weights.as_ref());
        let per_class = eval.confusion.per_class(&spec.labels);
        Ok(Some(TestMetrics {
            epoch: best_epoch,
            images: test_y.size()[0],
            loss: eval.loss,
            accuracy: eval.confusion.accuracy(),
            macro_f1: macro_f1(&per_class),
            top_k: eval.k,
            top_k_accuracy: eval.top_k_accuracy,
            per_class,
            confusion_matrix: eval.confusion.matrix,
        }))
    }
}

/// The network: the catalogue `backbone` (its pretrained weights loaded
/// when the job asks) or the job's uploaded one, under a new head of
/// `num_classes`; and the normalization its inputs take.
fn build_classifier(
    spec: &TrainSpec,
    backbone: Option<&models::BackboneSpec>,
    vs: &mut nn::VarStore,
    num_classes: i64,
) -> Result<(Classifier, preprocess::Normalization), TrainError> {
    let cfg = &spec.config;
    match (backbone, &spec.script) {
        (Some(backbone), _) => {
            let weights = backbone.weights_path(&spec.weights_dir);
            if cfg.pretrained && !weights.exists() {
                return Err(TrainError::MissingWeights {
                    backbone: cfg.backbone.clone(),
                    path: weights.display().to_string(),
                });
            }
            let pretrained = cfg.pretrained.then_some(weights.as_path());
            let model = Classifier::new(vs, backbone, num_classes, pretrained)?;
            Ok((model, backbone.normalization))
        }
        (None, Some(script)) => Ok((
            Classifier::from_script(vs, script, num_classes).map_err(TrainError::ScriptBackbone)?,
            script.normalization,
        )),
        (None, None) => unreachable!("no script means a catalogue backbone"),
    }
}

fn build_optimizer(cfg: &JobConfig, vs: &nn::VarStore) -> Result<nn::Optimizer, tch::TchError> {
    let (lr, wd) = (cfg.learning_rate, cfg.weight_decay);
    match cfg.optimizer {
        Optimizer::Sgd => nn::Sgd {
            momentum: cfg.momentum,
            dampening: 0.0,
            wd,
            nesterov: cfg.nesterov && cfg.momentum > 0.0,
        }
        .build(vs, lr),
        Optimizer::Adam => nn::Adam::default().wd(wd).build(vs, lr),
        Optimizer::Adamw => nn::AdamW::default().wd(wd).build(vs, lr),
    }
}

/// Stage `g` of `stages` learns at `lr × factor^(stages - g)`; the head (group
/// `stages`) at `lr`.
fn set_learning_rates(opt: &mut nn::Optimizer, cfg: &JobConfig, lr: f64, stages: usize) {
    if cfg.lr_stage_factor == 1.0 {
        opt.set_lr(lr);
        return;
    }
    for group in 0..=stages {
        opt.set_lr_group(
            group,
            lr * cfg.lr_stage_factor.powi((stages - group) as i32),
        );
    }
}

/// Inverse-frequency weights `n / (classes × n_c)` with `class_weights: auto`.
fn class_weights(cfg: &JobConfig, labels: &Tensor, classes: i64, device: Device) -> Option<Tensor> {
    if cfg.class_weights != ClassWeights::Auto {
        return None;
    }
    let counts = labels
        .bincount::<Tensor>(None, classes)
        .to_kind(Kind::Float)
        .clamp_min(1.0);
    let n = labels.size()[0] as f64;
    Some((counts.reciprocal() * (n / classes as f64)).to_device(device))
}

/// `Stopped` once the worker asked the thread to stop.
fn still_going(stop: &AtomicBool) -> Result<(), TrainError> {
    if stop.load(Ordering::Relaxed) {
        return Err(TrainError::Stopped);
    }
    Ok(())
}

/// Writes the checkpoint whole or not at all (durably: a reader never sees
/// half a file, even after a power loss). Tensors are written in the
/// standard layout whatever the training layout.
fn save_checkpoint(vs: &nn::VarStore, path: &Path) -> Result<(), TrainError> {
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect();
    crate::durable::write_with(path, |partial| {
        Tensor::write_safetensors(&tensors, partial).map_err(std::io::Error::other)
    })?;
    Ok(())
}
