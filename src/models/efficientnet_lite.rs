//! EfficientNet-Lite 0/1/2: MobileNetV2-style inverted residuals without
//! squeeze-excitation, ReLU6, TensorFlow "same" padding, BatchNorm epsilon
//! 1e-3, and the stem (32) and head (1280) channels fixed at every width.
//! Variable names follow the reference PyTorch port (`_conv_stem`,
//! `_blocks.N._expand_conv`, …), so its ImageNet checkpoints load by name.

use tch::nn::{self, ModuleT};

use super::efficientnet::STAGES;
use super::folded::{Activation, FoldedBlock, FoldedConv, FoldedNet, Padding, Variables};
use super::layers::{same_conv, Stage};

/// Channels of the pooled feature vector (the head is never scaled).
pub const FEATURE_DIM: i64 = 1280;
/// BatchNorm epsilon of the TensorFlow originals.
pub const BN_EPS: f64 = 1e-3;
const STEM_CHANNELS: i64 = 32;

/// Width and depth multipliers of one member of the family.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub width: f64,
    pub depth: f64,
}

pub const LITE0: Variant = Variant {
    width: 1.0,
    depth: 1.0,
};
pub const LITE1: Variant = Variant {
    width: 1.0,
    depth: 1.1,
};
pub const LITE2: Variant = Variant {
    width: 1.1,
    depth: 1.2,
};

/// One inverted-residual block's shape.
#[derive(Debug, Clone, Copy)]
struct Block {
    kernel: i64,
    stride: i64,
    expansion: i64,
    c_in: i64,
    c_out: i64,
}

impl Block {
    fn residual(&self) -> bool {
        self.stride == 1 && self.c_in == self.c_out
    }
}

/// Channels scaled by the width multiplier, rounded to a multiple of 8 and
/// never more than 10% below the exact value (TensorFlow's rule).
fn round_filters(filters: i64, width: f64) -> i64 {
    let exact = filters as f64 * width;
    let mut rounded = ((exact + 4.0) as i64 / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * exact {
        rounded += 8;
    }
    rounded
}

/// The blocks of each group. The first and last groups keep their repeats
/// and the first takes the fixed stem's 32 channels (Lite fixes stem and head).
fn groups(variant: Variant) -> Vec<Vec<Block>> {
    let last = STAGES.len() - 1;
    STAGES
        .iter()
        .enumerate()
        .map(|(i, &(expansion, kernel, stride, c_in, c_out, repeats))| {
            let fixed = i == 0 || i == last;
            let repeats = if fixed {
                repeats
            } else {
                (variant.depth * repeats as f64).ceil() as i64
            };
            let c_in = if i == 0 {
                STEM_CHANNELS
            } else {
                round_filters(c_in, variant.width)
            };
            let c_out = round_filters(c_out, variant.width);
            (0..repeats)
                .map(|r| Block {
                    kernel,
                    stride: if r == 0 { stride } else { 1 },
                    expansion,
                    c_in: if r == 0 { c_in } else { c_out },
                    c_out,
                })
                .collect()
        })
        .collect()
}

/// Same-padded conv + BatchNorm (eps 1e-3), then ReLU6 when `relu6`.
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    conv_path: nn::Path,
    bn_path: nn::Path,
    c_in: i64,
    c_out: i64,
    kernel: i64,
    stride: i64,
    groups: i64,
    relu6: bool,
) -> impl ModuleT {
    let config = nn::ConvConfig {
        stride,
        groups,
        bias: false,
        ..Default::default()
    };
    let conv = nn::conv2d(conv_path, c_in, c_out, kernel, config);
    let bn = nn::batch_norm2d(
        bn_path,
        c_out,
        nn::BatchNormConfig {
            eps: BN_EPS,
            ..Default::default()
        },
    );
    nn::func_t(move |xs, train| {
        let ys = same_conv(xs, &conv.ws, conv.bs.as_ref(), stride, groups).apply_t(&bn, train);
        if relu6 {
            ys.relu6()
        } else {
            ys
        }
    })
}

fn block(p: nn::Path, b: Block) -> impl ModuleT {
    let hidden = b.c_in * b.expansion;
    let expand = (b.expansion != 1).then(|| {
        conv_bn(
            &p / "_expand_conv",
            &p / "_bn0",
            b.c_in,
            hidden,
            1,
            1,
            1,
            true,
        )
    });
    let depthwise = conv_bn(
        &p / "_depthwise_conv",
        &p / "_bn1",
        hidden,
        hidden,
        b.kernel,
        b.stride,
        hidden,
        true,
    );
    let project = conv_bn(
        &p / "_project_conv",
        &p / "_bn2",
        hidden,
        b.c_out,
        1,
        1,
        1,
        false,
    );
    nn::func_t(move |xs, train| {
        let x = match &expand {
            Some(expand) => xs.apply_t(expand, train),
            None => xs.shallow_clone(),
        };
        let ys = x.apply_t(&depthwise, train).apply_t(&project, train);
        if b.residual() {
            xs + ys
        } else {
            ys
        }
    })
}

/// The feature extractor as stages, first to last: the stem, the seven
/// block groups, the 1×1 head conv. Stage `i` creates its variables in
/// optimizer group `i`.
pub fn stages(root: &nn::Path, variant: Variant) -> Vec<Stage> {
    let mut stages = vec![Stage::new(
        "stem",
        vec!["_conv_stem".into(), "_bn0".into()],
        conv_bn(
            root.set_group(0) / "_conv_stem",
            root.set_group(0) / "_bn0",
            3,
            STEM_CHANNELS,
            3,
            2,
            1,
            true,
        ),
    )];
    let mut index = 0;
    let mut c_last = STEM_CHANNELS;
    for (g, blocks) in groups(variant).into_iter().enumerate() {
        let p = root.set_group(g + 1) / "_blocks";
        let mut layers = nn::seq_t();
        let mut prefixes = Vec::new();
        for b in blocks {
            layers = layers.add(block(&p / index, b));
            prefixes.push(format!("_blocks.{index}"));
            c_last = b.c_out;
            index += 1;
        }
        stages.push(Stage::new(&format!("block{}", g + 1), prefixes, layers));
    }
    let head = root.set_group(STAGES.len() + 1);
    stages.push(Stage::new(
        "head_conv",
        vec!["_conv_head".into(), "_bn1".into()],
        conv_bn(
            &head / "_conv_head",
            &head / "_bn1",
            c_last,
            FEATURE_DIM,
            1,
            1,
            1,
            true,
        ),
    ));
    stages
}

/// The network with BatchNorm folded into its convolutions, for serving.
pub fn folded(vars: &Variables, variant: Variant) -> Result<FoldedNet, String> {
    let conv = |conv: &str, bn: &str, stride, groups, relu6| {
        let activation = Activation::relu6_if(relu6);
        FoldedConv::new(
            vars,
            conv,
            bn,
            stride,
            groups,
            activation,
            BN_EPS,
            Padding::Same,
        )
    };
    let mut blocks = vec![FoldedBlock::plain(
        vec![conv("_conv_stem", "_bn0", 2, 1, true)?],
        false,
    )];
    for (index, b) in groups(variant).into_iter().flatten().enumerate() {
        let p = format!("_blocks.{index}");
        let mut convs = Vec::new();
        if b.expansion != 1 {
            convs.push(conv(
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                1,
                1,
                true,
            )?);
        }
        let hidden = b.c_in * b.expansion;
        convs.push(conv(
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            b.stride,
            hidden,
            true,
        )?);
        convs.push(conv(
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            1,
            1,
            false,
        )?);
        blocks.push(FoldedBlock::plain(convs, b.residual()));
    }
    blocks.push(FoldedBlock::plain(
        vec![conv("_conv_head", "_bn1", 1, 1, true)?],
        false,
    ));
    FoldedNet::new(blocks, vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_depths_follow_the_reference_rules() {
        let channels = |v| -> Vec<i64> { groups(v).iter().map(|g| g[0].c_out).collect() };
        assert_eq!(channels(LITE0), [16, 24, 40, 80, 112, 192, 320]);
        assert_eq!(channels(LITE2), [16, 24, 48, 88, 120, 208, 352]);
        let repeats = |v| -> Vec<usize> { groups(v).iter().map(Vec::len).collect() };
        assert_eq!(repeats(LITE0), [1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(repeats(LITE1), [1, 3, 3, 4, 4, 5, 1]);
        assert_eq!(repeats(LITE2), [1, 3, 3, 4, 4, 5, 1]);
    }
}
