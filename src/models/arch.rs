//! Which network a catalogue entry is: the [`Arch`] each entry carries, and
//! the one place that turns it into the training network's stages or the
//! folded serving network, by architecture rather than by name.

use tch::nn;

use super::folded::{FoldedNet, Variables};
use super::layers::Stage;
use super::{efficientnet, efficientnet_lite, mobilenet_v2, resnet};

/// A backbone architecture, with the variant's shape where the family has
/// several members.
#[derive(Debug, Clone, Copy)]
pub enum Arch {
    MobileNetV2,
    EfficientNetLite(efficientnet_lite::Variant),
    ResNet(resnet::Variant),
    EfficientNet(efficientnet::Variant),
}

impl Arch {
    /// The family's name as users see it.
    pub fn family(self) -> &'static str {
        match self {
            Arch::MobileNetV2 => "MobileNetV2",
            Arch::EfficientNetLite(_) => "EfficientNet-Lite",
            Arch::ResNet(_) => "ResNet",
            Arch::EfficientNet(_) => "EfficientNet",
        }
    }

    /// Builds the feature extractor's stages under `root`; stage `i`
    /// creates its variables in optimizer group `i`.
    pub fn stages(self, root: &nn::Path) -> Vec<Stage> {
        match self {
            Arch::MobileNetV2 => mobilenet_v2::stages(root),
            Arch::EfficientNetLite(variant) => efficientnet_lite::stages(root, variant),
            Arch::ResNet(variant) => resnet::stages(root, variant),
            Arch::EfficientNet(variant) => efficientnet::stages(root, variant),
        }
    }

    /// The serving network of a checkpoint (BatchNorm folded).
    pub fn folded(self, vars: &Variables) -> Result<FoldedNet, String> {
        match self {
            Arch::MobileNetV2 => mobilenet_v2::folded(vars),
            Arch::EfficientNetLite(variant) => efficientnet_lite::folded(vars, variant),
            Arch::ResNet(variant) => resnet::folded(vars, variant),
            Arch::EfficientNet(variant) => efficientnet::folded(vars, variant),
        }
    }

    /// Variable-name prefix of the pretrained weights' own 1000-class
    /// ImageNet layer (which fine-tuning replaces).
    pub fn imagenet_classifier_prefix(self) -> &'static str {
        match self {
            Arch::MobileNetV2 | Arch::EfficientNet(_) => "classifier.1",
            Arch::EfficientNetLite(_) => "_fc",
            Arch::ResNet(_) => "fc",
        }
    }
}
