//! The training configuration of a job: what `POST /jobs` accepts, validated
//! into a complete [`JobConfig`] (every default filled in) that is stored
//! with the job and read by the worker.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::augment::Augmentation;
use crate::models::{self, script::ScriptSpec};
use crate::validation::FieldError;

/// The body of `POST /jobs`. Everything but `dataset_id` is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub dataset_id: Uuid,
    pub backbone: Option<String>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub image_size: Option<i64>,
    pub seed: Option<i64>,
    pub learning_rate: Option<f64>,
    pub pretrained: Option<bool>,
    pub freeze: Option<String>,
    pub trainable_stages: Option<i64>,
    pub unfreeze_every: Option<i64>,
    pub frozen_batchnorm: Option<bool>,
    pub lr_stage_factor: Option<f64>,
    pub optimizer: Option<String>,
    pub momentum: Option<f64>,
    pub nesterov: Option<bool>,
    pub weight_decay: Option<f64>,
    pub gradient_clip_norm: Option<f64>,
    pub schedule: Option<String>,
    pub step_size: Option<i64>,
    pub step_gamma: Option<f64>,
    pub warmup_epochs: Option<f64>,
    pub label_smoothing: Option<f64>,
    pub class_weights: Option<String>,
    pub augmentation: Option<Augmentation>,
    pub cache_features: Option<bool>,
    pub mixed_precision: Option<bool>,
    pub early_stopping_patience: Option<i64>,
    pub selection_metric: Option<String>,
    pub priority: Option<i32>,
    pub max_attempts: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Freeze {
    /// Only the new head trains.
    Head,
    /// The last `trainable_stages` backbone stages train with the head.
    LastN,
    /// Every layer trains.
    Full,
    /// The head alone first; one more stage (from the top) every `unfreeze_every` epochs.
    Gradual,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Sgd,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Multiply by `step_gamma` every `step_size` epochs.
    Step,
    /// Cosine decay to zero over the run.
    Cosine,
    /// Ramp up to the learning rate over the first 30 %, then anneal (cosine).
    OneCycle,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeights {
    None,
    /// Inverse class frequency in the training split.
    Auto,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SelectionMetric {
    ValAccuracy,
    ValLoss,
    ValMacroF1,
}

/// Smallest change of the selection metric that counts as an improvement
/// (for early stopping and the best checkpoint).
const MIN_DELTA: f64 = 1e-4;

impl SelectionMetric {
    /// Whether `candidate` beats `best` by more than [`MIN_DELTA`].
    pub fn improves(self, candidate: f64, best: f64) -> bool {
        match self {
            SelectionMetric::ValLoss => candidate < best - MIN_DELTA,
            _ => candidate > best + MIN_DELTA,
        }
    }
}

/// A validated training configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobConfig {
    pub backbone: String,
    pub epochs: i64,
    pub batch_size: i64,
    pub image_size: i64,
    pub seed: i64,
    pub learning_rate: f64,
    /// Start from the backbone's ImageNet weights (the point of the
    /// service); `false` trains from random initialization, as a baseline.
    #[serde(default = "yes")]
    pub pretrained: bool,
    pub freeze: Freeze,
    pub trainable_stages: i64,
    pub unfreeze_every: i64,
    pub frozen_batchnorm: bool,
    /// Learning rate of stage `i` of `n` is `learning_rate × factor^(n - i)`.
    pub lr_stage_factor: f64,
    pub optimizer: Optimizer,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub gradient_clip_norm: Option<f64>,
    pub schedule: Schedule,
    pub step_size: i64,
    pub step_gamma: f64,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    pub class_weights: ClassWeights,
    pub augmentation: Augmentation,
    /// With a backbone frozen for the whole run and only flips (or no)
    /// augmentation, compute its features once and train the head on them.
    pub cache_features: bool,
    /// On CUDA devices that support it, bf16 autocast in the training
    /// steps (the CPU always trains in fp32).
    #[serde(default = "yes")]
    pub mixed_precision: bool,
    pub early_stopping_patience: Option<i64>,
    pub selection_metric: SelectionMetric,
}

/// A validated job submission.
#[derive(Debug)]
pub struct ValidJob {
    pub dataset_id: Uuid,
    pub config: JobConfig,
    pub priority: i32,
    pub max_attempts: i32,
}

/// Collects every problem of a submission.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn int(&mut self, name: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let value = value.unwrap_or(default);
        if !(min..=max).contains(&value) {
            self.errors.push(FieldError::new(
                name,
                format!("{value} is outside {min}..={max}"),
            ));
        }
        value
    }

    fn float(&mut self, name: &str, value: Option<f64>, default: f64, min: f64, max: f64) -> f64 {
        let value = value.unwrap_or(default);
        if !(value.is_finite() && (min..=max).contains(&value)) {
            self.errors.push(FieldError::new(
                name,
                format!("{value} is outside [{min}, {max}]"),
            ));
        }
        value
    }

    fn choice<T: Copy>(
        &mut self,
        name: &str,
        value: Option<&str>,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        let Some(value) = value else { return default };
        match options.iter().find(|(key, _)| *key == value) {
            Some((_, choice)) => *choice,
            None => {
                let keys: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
                self.errors.push(FieldError::new(
                    name,
                    format!("{value:?} is not one of: {}", keys.join(", ")),
                ));
                default
            }
        }
    }
}

fn yes() -> bool {
    true
}

impl JobRequest {
    /// Fills defaults and checks every field, reporting all problems at once.
    /// A backbone whose weights are not installed in `weights_dir` is refused.
    /// `uploaded` is the uploaded TorchScript backbone of that name, if any.
    pub fn validate(
        self,
        weights_dir: &Path,
        uploaded: Option<&ScriptSpec>,
    ) -> Result<ValidJob, Vec<FieldError>> {
        let mut c = Checker { errors: Vec::new() };
        let backbone = self.backbone.unwrap_or_else(|| "mobilenet_v2".to_string());
        let spec = models::find(&backbone);
        if uploaded.is_some() && self.pretrained == Some(false) {
            c.errors.push(FieldError::new(
                "pretrained",
                "an uploaded TorchScript backbone always starts from its own weights",
            ));
        }
        match spec {
            None if uploaded.is_some() => {}
            None => c.errors.push(FieldError::new(
                "backbone",
                format!(
                    "unknown backbone {backbone:?}; choose one of (or upload one with POST /backbones): {}",
                    models::CATALOGUE
                        .iter()
                        .map(|b| b.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            Some(spec)
                if self.pretrained != Some(false) && !spec.weights_path(weights_dir).exists() =>
            {
                let remedy = if spec.bundled {
                    "scripts/setup installs them".to_string()
                } else {
                    format!("import them with `finetuned weights import FILE --arch {backbone}`")
                };
                c.errors.push(FieldError::new(
                    "backbone",
                    format!(
                        "pretrained weights for {backbone} are not installed ({} missing; {remedy})",
                        spec.weights_path(weights_dir).display()
                    ),
                ))
            }
            Some(_) => {}
        }
        let pretrained = self.pretrained.unwrap_or(true);
        if !pretrained && self.freeze.as_deref().unwrap_or("head") != "full" {
            c.errors.push(FieldError::new(
                "pretrained",
                "training from scratch (pretrained: false) needs freeze: full; a random frozen backbone learns nothing",
            ));
        }
        let (default_size, stages) = match (spec, uploaded) {
            (Some(s), _) => (s.default_image_size, s.stage_names().len() as i64),
            (None, Some(u)) => (u.image_size, u.stages.len() as i64),
            // Unknown backbone: already reported; no stage-count error.
            (None, None) => (224, 1000),
        };

        let epochs = c.int("epochs", self.epochs, 5, 1, 1000);
        let config = JobConfig {
            backbone,
            epochs,
            batch_size: c.int("batch_size", self.batch_size, 32, 1, 4096),
            image_size: c.int("image_size", self.image_size, default_size, 32, 1024),
            seed: c.int("seed", self.seed, 0, 0, i64::MAX),
            learning_rate: c.float("learning_rate", self.learning_rate, 1e-3, 1e-8, 10.0),
            pretrained,
            freeze: c.choice(
                "freeze",
                self.freeze.as_deref(),
                Freeze::Head,
                &[
                    ("head", Freeze::Head),
                    ("last_n", Freeze::LastN),
                    ("full", Freeze::Full),
                    ("gradual", Freeze::Gradual),
                ],
            ),
            trainable_stages: c.int("trainable_stages", self.trainable_stages, 2, 1, stages),
            unfreeze_every: c.int("unfreeze_every", self.unfreeze_every, 1, 1, 1000),
            frozen_batchnorm: self.frozen_batchnorm.unwrap_or(true),
            lr_stage_factor: c.float("lr_stage_factor", self.lr_stage_factor, 1.0, 0.01, 1.0),
            optimizer: c.choice(
                "optimizer",
                self.optimizer.as_deref(),
                Optimizer::Adam,
                &[
                    ("sgd", Optimizer::Sgd),
                    ("adam", Optimizer::Adam),
                    ("adamw", Optimizer::Adamw),
                ],
            ),
            momentum: c.float("momentum", self.momentum, 0.9, 0.0, 0.999),
            nesterov: self.nesterov.unwrap_or(false),
            weight_decay: c.float("weight_decay", self.weight_decay, 0.0, 0.0, 1.0),
            gradient_clip_norm: self
                .gradient_clip_norm
                .map(|v| c.float("gradient_clip_norm", Some(v), v, 1e-6, 1e6)),
            schedule: c.choice(
                "schedule",
                self.schedule.as_deref(),
                Schedule::Constant,
                &[
                    ("constant", Schedule::Constant),
                    ("step", Schedule::Step),
                    ("cosine", Schedule::Cosine),
                    ("one_cycle", Schedule::OneCycle),
                ],
            ),
            step_size: c.int("step_size", self.step_size, (epochs / 3).max(1), 1, 1000),
            step_gamma: c.float("step_gamma", self.step_gamma, 0.1, 1e-4, 1.0),
            warmup_epochs: c.float("warmup_epochs", self.warmup_epochs, 0.0, 0.0, epochs as f64),
            label_smoothing: c.float("label_smoothing", self.label_smoothing, 0.0, 0.0, 0.5),
            class_weights: c.choice(
                "class_weights",
                self.class_weights.as_deref(),
                ClassWeights::None,
                &[("none", ClassWeights::None), ("auto", ClassWeights::Auto)],
            ),
            augmentation: self.augmentation.unwrap_or_default(),
            cache_features: self.cache_features.unwrap_or(true),
            mixed_precision: self.mixed_precision.unwrap_or(true),
            early_stopping_patience: self
                .early_stopping_patience
                .map(|p| c.int("early_stopping_patience", Some(p), p, 1, 1000)),
            selection_metric: c.choice(
                "selection_metric",
                self.selection_metric.as_deref(),
                SelectionMetric::ValAccuracy,
                &[
                    ("val_accuracy", SelectionMetric::ValAccuracy),
                    ("val_loss", SelectionMetric::ValLoss),
                    ("val_macro_f1", SelectionMetric::ValMacroF1),
                ],
            ),
        };
        for (field, reason) in config.augmentation.problems() {
            c.errors.push(FieldError::new(field, reason));
        }
        let priority = c.int("priority", self.priority.map(i64::from), 0, -1000, 1000) as i32;
        let max_attempts = c.int("max_attempts", self.max_attempts.map(i64::from), 3, 1, 20) as i32;
        if !c.errors.is_empty() {
            return Err(c.errors);
        }
        Ok(ValidJob {
            dataset_id: self.dataset_id,
            config,
            priority,
            max_attempts,
        })
    }
}

impl JobConfig {
    /// How many leading backbone stages (of `stages`) are frozen in `epoch` (1-based).
    pub fn frozen_stages(&self, epoch: i64, stages: usize) -> usize {
        let stages_i = stages as i64;
        let trainable = match self.freeze {
            Freeze::Head => 0,
            Freeze::Full => stages_i,
            Freeze::LastN => self.trainable_stages.min(stages_i),
            Freeze::Gradual => ((epoch - 1) / self.unfreeze_every).min(stages_i),
        };
        (stages_i - trainable) as usize
    }

    /// Learning-rate multiplier at `progress` epochs into the run (fractional).
    pub fn lr_factor(&self, progress: f64) -> f64 {
        let total = self.epochs as f64;
        if self.warmup_epochs > 0.0 && progress < self.warmup_epochs {
            return (progress + 1e-3).min(self.warmup_epochs) / self.warmup_epochs;
        }
        let t = ((progress - self.warmup_epochs) / (total - self.warmup_epochs).max(1e-9))
            .clamp(0.0, 1.0);
        let cosine = |t: f64| 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Step => self
                .step_gamma
                .powi((progress / self.step_size as f64).floor() as i32),
            Schedule::Cosine => cosine(t),
            Schedule::OneCycle => {
                const PEAK: f64 = 0.3;
                const START: f64 = 1.0 / 25.0;
                const END: f64 = 1e-4;
                if t < PEAK {
                    START + (1.0 - START) * (1.0 - cosine(t / PEAK))
                } else {
                    END + (1.0 - END) * cosine((t - PEAK) / (1.0 - PEAK))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A weights directory where mobilenet_v2's file exists (validation only
    /// checks that it is there).
    fn weights_dir() -> PathBuf {
        let dir = std::env::temp_dir().join("finetuned-config-tests");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mobilenet_v2.safetensors"), b"").unwrap();
        dir
    }

    fn validate(body: serde_json::Value) -> Result<ValidJob, Vec<FieldError>> {
        let mut body = body;
        body["dataset_id"] = serde_json::json!(Uuid::nil());
        serde_json::from_value::<JobRequest>(body)
            .unwrap()
            .validate(&weights_dir(), None)
    }

    fn sample() -> JobConfig {
        validate(serde_json::json!({})).unwrap().config
    }

    #[test]
    fn defaults_are_the_classic_recipe() {
        let c = sample();
        assert_eq!(c.backbone, "mobilenet_v2");
        assert_eq!(c.freeze, Freeze::Head);
        assert_eq!(c.image_size, 224);
        assert!(c.augmentation.enabled && c.augmentation.horizontal_flip);
        assert_eq!(c.augmentation.rotation_degrees, 20.0);
        assert_eq!(c.selection_metric, SelectionMetric::ValAccuracy);
    }

    #[test]
    fn freeze_policies_count_frozen_stages() {
        let stages = 9;
        let mut c = sample();
        assert_eq!(c.frozen_stages(1, stages), 9);
        c.freeze = Freeze::Full;
        assert_eq!(c.frozen_stages(1, stages), 0);
        c.freeze = Freeze::LastN;
        c.trainable_stages = 3;
        assert_eq!(c.frozen_stages(4, stages), 6);
        c.freeze = Freeze::Gradual;
        c.unfreeze_every = 2;
        let frozen: Vec<usize> = (1..=6).map(|e| c.frozen_stages(e, stages)).collect();
        assert_eq!(frozen, [9, 9, 8, 8, 7, 7]);
    }

    #[test]
    fn schedules_shape_the_learning_rate() {
        let mut c = sample();
        c.epochs = 10;
        c.schedule = Schedule::Step;
        c.step_size = 3;
        c.step_gamma = 0.5;
        assert_eq!(c.lr_factor(0.0), 1.0);
        assert_eq!(c.lr_factor(3.0), 0.5);
        assert_eq!(c.lr_factor(9.5), 0.125);
        c.schedule = Schedule::Cosine;
        assert!((c.lr_factor(0.0) - 1.0).abs() < 1e-12);
        assert!((c.lr_factor(5.0) - 0.5).abs() < 1e-12);
        assert!(c.lr_factor(10.0) < 1e-12);
        c.schedule = Schedule::OneCycle;
        assert!((c.lr_factor(0.0) - 0.04).abs() < 1e-12);
        assert!((c.lr_factor(3.0) - 1.0).abs() < 1e-12);
        assert!(c.lr_factor(10.0) < 1e-3);
        c.schedule = Schedule::Constant;
        c.warmup_epochs = 2.0;
        assert!(c.lr_factor(0.0) < 0.01);
        assert!((c.lr_factor(1.0) - 0.5).abs() < 1e-3);
        assert_eq!(c.lr_factor(2.0), 1.0);
    }

    #[test]
    fn every_invalid_field_is_named() {
        let errors = validate(serde_json::json!({
            "epochs": 0, "schedule": "linear", "label_smoothing": 0.9, "backbone": "vgg",
            "augmentation": { "zoom": 2.0 }
        }))
        .unwrap_err();
        let mut paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "augmentation.zoom",
                "backbone",
                "epochs",
                "label_smoothing",
                "schedule"
            ]
        );
    }
}
