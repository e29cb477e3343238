//! The training configuration of a job: what `POST /jobs` accepts, validated
//! into a complete [`JobConfig`] (every default filled in) that is stored
//! with the job and read by the worker.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::FieldError;
use crate::models;

/// The body of `POST /jobs`. Everything but `dataset_id` is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub dataset_id: Uuid,
    pub backbone: Option<String>,
    pub epochs: Option<i64>,
    pub batch_size: Option<i64>,
    pub learning_rate: Option<f64>,
    pub image_size: Option<i64>,
    pub freeze: Option<String>,
    pub optimizer: Option<String>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
    pub horizontal_flip: Option<bool>,
    pub priority: Option<i32>,
    pub max_attempts: Option<i32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Freeze {
    /// Only the new head trains; the backbone is frozen, BatchNorm included.
    Head,
    /// Every layer trains.
    Full,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adam,
    Adamw,
}

/// A validated training configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobConfig {
    pub backbone: String,
    pub epochs: i64,
    pub batch_size: i64,
    pub learning_rate: f64,
    pub image_size: i64,
    pub freeze: Freeze,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub seed: i64,
    pub horizontal_flip: bool,
}

/// A validated job submission.
#[derive(Debug)]
pub struct ValidJob {
    pub dataset_id: Uuid,
    pub config: JobConfig,
    pub priority: i32,
    pub max_attempts: i32,
}

impl JobRequest {
    /// Fills defaults and checks every field, reporting all problems at once.
    /// A backbone whose weights are not installed in `weights_dir` is refused.
    pub fn validate(self, weights_dir: &Path) -> Result<ValidJob, Vec<FieldError>> {
        let mut errors = Vec::new();
        let backbone = self.backbone.unwrap_or_else(|| "mobilenet_v2".to_string());
        let spec = models::find(&backbone);
        match spec {
            None => errors.push(FieldError::new(
                "backbone",
                format!(
                    "unknown backbone {backbone:?}; choose one of: {}",
                    models::CATALOGUE.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
                ),
            )),
            Some(spec) if !spec.weights_path(weights_dir).exists() => errors.push(FieldError::new(
                "backbone",
                format!(
                    "pretrained weights for {backbone} are not installed ({} missing; scripts/setup installs them)",
                    spec.weights_path(weights_dir).display()
                ),
            )),
            Some(_) => {}
        }
        let default_size = spec.map_or(224, |s| s.default_image_size);
        let mut int = |name: &str, value: Option<i64>, default: i64, min: i64, max: i64| {
            let value = value.unwrap_or(default);
            if !(min..=max).contains(&value) {
                errors.push(FieldError::new(
                    name,
                    format!("{value} is outside {min}..={max}"),
                ));
            }
            value
        };
        let epochs = int("epochs", self.epochs, 5, 1, 1000);
        let batch_size = int("batch_size", self.batch_size, 32, 1, 4096);
        let image_size = int("image_size", self.image_size, default_size, 32, 1024);
        let seed = int("seed", self.seed, 0, 0, i64::MAX);
        let priority = int("priority", self.priority.map(i64::from), 0, -1000, 1000) as i32;
        let max_attempts = int("max_attempts", self.max_attempts.map(i64::from), 3, 1, 20) as i32;

        let learning_rate = self.learning_rate.unwrap_or(1e-3);
        if !(learning_rate > 0.0 && learning_rate <= 10.0) {
            errors.push(FieldError::new(
                "learning_rate",
                format!("{learning_rate} must be in (0, 10]"),
            ));
        }
        let weight_decay = self.weight_decay.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&weight_decay) {
            errors.push(FieldError::new(
                "weight_decay",
                format!("{weight_decay} must be in [0, 1]"),
            ));
        }
        let freeze = match self.freeze.as_deref().unwrap_or("head") {
            "head" => Freeze::Head,
            "full" => Freeze::Full,
            other => {
                errors.push(FieldError::new(
                    "freeze",
                    format!("{other:?} is not one of: head, full"),
                ));
                Freeze::Head
            }
        };
        let optimizer = match self.optimizer.as_deref().unwrap_or("adam") {
            "adam" => Optimizer::Adam,
            "adamw" => Optimizer::Adamw,
            other => {
                errors.push(FieldError::new(
                    "optimizer",
                    format!("{other:?} is not one of: adam, adamw"),
                ));
                Optimizer::Adam
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ValidJob {
            dataset_id: self.dataset_id,
            config: JobConfig {
                backbone,
                epochs,
                batch_size,
                learning_rate,
                image_size,
                freeze,
                optimizer,
                weight_decay,
                seed,
                horizontal_flip: self.horizontal_flip.unwrap_or(true),
            },
            priority,
            max_attempts,
        })
    }
}
