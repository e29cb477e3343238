//! The model a job trains: a backbone (a catalogue network or an uploaded
//! TorchScript module) under a new linear head, with its leading stages
//! frozen or not.

use std::collections::HashSet;
use std::path::Path;

use tch::nn::{self, Module};
use tch::Tensor;

use super::catalogue::BackboneSpec;
use super::layers::{global_average_pool, Stage, HEAD_PREFIX};
use super::script;

/// The layers under the head: catalogue modules, or an uploaded
/// TorchScript module.
enum Base {
    Native(Vec<Stage>),
    Script(script::ScriptBase),
}

/// A backbone with a new linear head over the dataset's classes.
pub struct Classifier {
    base: Base,
    head: nn::Linear,
    /// Leading stages that are frozen: no gradients, and (unless
    /// `frozen_batchnorm` is off) BatchNorm statistics left as pretrained.
    frozen: usize,
    frozen_batchnorm: bool,
}

/// Dropout before the head, as torchvision's MobileNetV2 classifier has.
const HEAD_DROPOUT: f64 = 0.2;

impl Classifier {
    /// Builds the model in `vs`. With `pretrained`, the backbone's weights are
    /// loaded from that file before the head exists (the file's own 1000-class
    /// head is ignored); a missing or mismatched file is an error. The head's
    /// variables are in optimizer group `num_stages()`.
    pub fn new(
        vs: &mut nn::VarStore,
        spec: &BackboneSpec,
        num_classes: i64,
        pretrained: Option<&Path>,
    ) -> Result<Self, tch::TchError> {
        let stages = spec.arch.stages(&vs.root());
        if let Some(path) = pretrained {
            vs.load(path)?;
        }
        let head_path = vs.root().set_group(stages.len()) / HEAD_PREFIX;
        let head = nn::linear(head_path, spec.feature_dim, num_classes, Default::default());
        Ok(Self {
            base: Base::Native(stages),
            head,
            frozen: 0,
            frozen_batchnorm: true,
        })
    }

    /// Builds the model on an uploaded TorchScript backbone (its own
    /// weights); the head's variables are in optimizer group `num_stages()`.
    pub fn from_script(
        vs: &nn::VarStore,
        spec: &script::ScriptSpec,
        num_classes: i64,
    ) -> Result<Self, String> {
        let base = spec.load_into(vs)?;
        let head_path = vs.root().set_group(base.num_stages()) / HEAD_PREFIX;
        let head = nn::linear(head_path, spec.feature_dim, num_classes, Default::default());
        Ok(Self {
            base: Base::Script(base),
            head,
            frozen: 0,
            frozen_batchnorm: true,
        })
    }

    pub fn num_stages(&self) -> usize {
        match &self.base {
            Base::Native(stages) => stages.len(),
            Base::Script(base) => base.num_stages(),
        }
    }

    /// Freezes the first `n` stages and unfreezes the rest (and the head).
    /// Only trainable variables are touched: BatchNorm running statistics
    /// never take gradients.
    pub fn set_frozen_stages(&mut self, vs: &nn::VarStore, n: usize) {
        let n = n.min(self.num_stages());
        self.frozen = n;
        let stages = match &self.base {
            Base::Native(stages) => stages,
            Base::Script(base) => return base.set_frozen_stages(n),
        };
        let trainable: HashSet<usize> = vs
            .trainable_variables()
            .iter()
            .map(|t| t.data_ptr() as usize)
            .collect();
        for (name, var) in vs.variables() {
            if !trainable.contains(&(var.data_ptr() as usize)) {
                continue;
            }
            let stage = stages.iter().position(|s| s.owns(&name));
            let trainable = stage.is_none_or(|i| i >= n);
            let _ = var.set_requires_grad(trainable);
        }
    }

    pub fn frozen_stages(&self) -> usize {
        self.frozen
    }

    /// Whether frozen stages keep their BatchNorm statistics (the default)
    /// or update them from the new data while training.
    pub fn set_frozen_batchnorm(&mut self, frozen: bool) {
        self.frozen_batchnorm = frozen;
    }

    /// Logits `[N, classes]` for model input `[N, 3, H, W]`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head_t(&self.features_t(xs, train), train)
    }

    /// The backbone's pooled features `[N, feature_dim]`.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let stages = match &self.base {
            Base::Native(stages) => stages,
            Base::Script(base) => {
                return base.features(xs, !train || self.frozen == base.num_stages())
            }
        };
        let (frozen, trainable) = stages.split_at(self.frozen);
        let frozen_train = train && !self.frozen_batchnorm;
        let mut x = tch::no_grad(|| {
            frozen
                .iter()
                .fold(xs.shallow_clone(), |x, s| s.forward_t(&x, frozen_train))
        });
        for stage in trainable {
            x = stage.forward_t(&x, train);
        }
        global_average_pool(&x)
    }

    /// Logits from pooled features (dropout, then the linear head).
    pub fn head_t(&self, features: &Tensor, train: bool) -> Tensor {
        self.head.forward(&features.dropout(HEAD_DROPOUT, train))
    }
}
