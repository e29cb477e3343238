//! The backbone catalogue and the classifier built on a backbone.

pub mod mobilenet_v2;

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Tensor};

use crate::data::preprocess::Normalization;

/// A pretrained backbone finetuned can fine-tune.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BackboneSpec {
    pub name: &'static str,
    /// Parameters of the feature extractor alone.
    pub parameters: u64,
    pub feature_dim: i64,
    pub default_image_size: i64,
    pub normalization: Normalization,
    /// File under the weights directory, torchvision names, safetensors.
    pub weights_file: &'static str,
    /// Where the weights come from, and their terms.
    pub weights_source: &'static str,
}

pub const CATALOGUE: &[BackboneSpec] = &[BackboneSpec {
    name: "mobilenet_v2",
    parameters: 2_223_872,
    feature_dim: mobilenet_v2::FEATURE_DIM,
    default_image_size: 224,
    normalization: Normalization::IMAGENET,
    weights_file: "mobilenet_v2.safetensors",
    weights_source: "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (ImageNet-1k, 71.9% top-1); non-commercial research terms of ImageNet",
}];

pub fn find(name: &str) -> Option<&'static BackboneSpec> {
    CATALOGUE.iter().find(|b| b.name == name)
}

impl BackboneSpec {
    pub fn weights_path(&self, weights_dir: &Path) -> PathBuf {
        weights_dir.join(self.weights_file)
    }

    /// Builds the backbone's feature extractor under `root`.
    fn build(&self, root: &nn::Path) -> Box<dyn ModuleT + Send> {
        match self.name {
            "mobilenet_v2" => Box::new(mobilenet_v2::features(root)),
            other => unreachable!("backbone {other} is in the catalogue but has no builder"),
        }
    }
}

/// Prefix of the new head's variables; everything else is the backbone's.
pub const HEAD_PREFIX: &str = "head";

/// A backbone with a new linear head over the dataset's classes.
pub struct Classifier {
    backbone: Box<dyn ModuleT + Send>,
    head: nn::Linear,
    /// When false the backbone runs without gradients and with frozen
    /// BatchNorm statistics (eval mode) even while the head trains.
    backbone_trainable: bool,
}

/// Dropout before the head, as torchvision's MobileNetV2 classifier has.
const HEAD_DROPOUT: f64 = 0.2;

impl Classifier {
    /// Builds the model in `vs`. With `pretrained`, the backbone's weights are
    /// loaded from that file before the head exists (the file's own 1000-class
    /// head is ignored); a missing or mismatched file is an error.
    pub fn new(
        vs: &mut nn::VarStore,
        spec: &BackboneSpec,
        num_classes: i64,
        pretrained: Option<&Path>,
    ) -> Result<Self, tch::TchError> {
        let backbone = spec.build(&vs.root());
        if let Some(path) = pretrained {
            vs.load(path)?;
        }
        let head = nn::linear(
            vs.root() / HEAD_PREFIX,
            spec.feature_dim,
            num_classes,
            Default::default(),
        );
        Ok(Self {
            backbone,
            head,
            backbone_trainable: true,
        })
    }

    /// Freezes or unfreezes every backbone variable.
    pub fn set_backbone_trainable(&mut self, vs: &nn::VarStore, trainable: bool) {
        for (name, var) in vs.variables() {
            if !name.starts_with(HEAD_PREFIX) {
                let _ = var.set_requires_grad(trainable);
            }
        }
        self.backbone_trainable = trainable;
    }

    /// Logits `[N, classes]` for model input `[N, 3, H, W]`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let features = if self.backbone_trainable {
            self.backbone.forward_t(xs, train)
        } else {
            tch::no_grad(|| self.backbone.forward_t(xs, false))
        };
        self.head.forward(&features.dropout(HEAD_DROPOUT, train))
    }
}

/// Picks the device: `auto` is the first CUDA device when there is one.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {other:?}; use auto, cpu or cuda:N")),
    }
}

/// A device's name as users write it.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
