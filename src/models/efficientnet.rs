//! EfficientNet-B0…B7 with torchvision's variable names (`features.0.0`,
//! `features.N.M.block.K.0`, `…block.K.fc1`, `features.8.0`), so a
//! torchvision state dict a user imports loads by name. Unlike the Lite
//! family these have squeeze-excitation in every block, SiLU, PyTorch's
//! symmetric padding, and stem and head channels that scale with the width.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::folded::{
    Activation, FoldedBlock, FoldedConv, FoldedNet, Padding, SqueezeExcite, Variables,
};
use super::layers::{Stage, TORCH_BN_EPS};

/// Width and depth multipliers, and BatchNorm's epsilon and momentum
/// (B5–B7 were ported from TensorFlow with 1e-3 and 0.01).
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub width: f64,
    pub depth: f64,
    pub bn_eps: f64,
    pub bn_momentum: f64,
}

const fn variant(width: f64, depth: f64, ported: bool) -> Variant {
    Variant {
        width,
        depth,
        bn_eps: if ported { 1e-3 } else { TORCH_BN_EPS },
        bn_momentum: if ported { 0.01 } else { 0.1 },
    }
}

pub const B0: Variant = variant(1.0, 1.0, false);
pub const B1: Variant = variant(1.0, 1.1, false);
pub const B2: Variant = variant(1.1, 1.2, false);
pub const B3: Variant = variant(1.2, 1.4, false);
pub const B4: Variant = variant(1.4, 1.8, false);
pub const B5: Variant = variant(1.6, 2.2, true);
pub const B6: Variant = variant(1.8, 2.6, true);
pub const B7: Variant = variant(2.0, 3.1, true);

/// Largest stochastic-depth drop probability (the last block's), as
/// torchvision trains these networks.
const STOCHASTIC_DEPTH: f64 = 0.2;

/// (expansion, kernel, first stride, input, output, repeats) per stage, at
/// width and depth 1: the EfficientNet-B0 table, which Lite shares.
pub const STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// Channels rounded to a multiple of 8, never more than 10% below the exact
/// value (torchvision's `_make_divisible`).
const fn make_divisible(exact: f64) -> i64 {
    let mut rounded = (exact + 4.0) as i64 / 8 * 8;
    if rounded < 8 {
        rounded = 8;
    }
    if (rounded as f64) < 0.9 * exact {
        rounded += 8;
    }
    rounded
}

impl Variant {
    const fn channels(&self, c: i64) -> i64 {
        make_divisible(c as f64 * self.width)
    }

    fn stem_channels(&self) -> i64 {
        self.channels(STAGES[0].3)
    }

    /// Channels of the pooled feature vector: four times the last stage's.
    pub const fn feature_dim(&self) -> i64 {
        4 * self.channels(STAGES[STAGES.len() - 1].4)
    }

    fn bn(&self, p: nn::Path, c: i64) -> nn::BatchNorm {
        let config = nn::BatchNormConfig {
            eps: self.bn_eps,
            momentum: self.bn_momentum,
            ..Default::default()
        };
        nn::batch_norm2d(p, c, config)
    }
}

/// One MBConv block's shape.
#[derive(Debug, Clone, Copy)]
struct Block {
    expansion: i64,
    kernel: i64,
    stride: i64,
    c_in: i64,
    c_out: i64,
    /// Probability of dropping the residual branch while training.
    drop: f64,
}

impl Block {
    fn hidden(&self) -> i64 {
        make_divisible((self.c_in * self.expansion) as f64)
    }

    fn squeeze(&self) -> i64 {
        (self.c_in / 4).max(1)
    }

    fn residual(&self) -> bool {
        self.stride == 1 && self.c_in == self.c_out
    }

    /// Index of the depthwise conv inside `block` (after the expansion).
    fn depthwise_index(&self) -> usize {
        usize::from(self.hidden() != self.c_in)
    }
}

fn stages_of(variant: Variant) -> Vec<Vec<Block>> {
    let repeats = |n: i64| (n as f64 * variant.depth).ceil() as i64;
    let total: i64 = STAGES.iter().map(|s| repeats(s.5)).sum();
    let mut index = 0;
    STAGES
        .iter()
        .map(|&(expansion, kernel, stride, c_in, c_out, n)| {
            let (c_in, c_out) = (variant.channels(c_in), variant.channels(c_out));
            (0..repeats(n))
                .map(|r| {
                    let block = Block {
                        expansion,
                        kernel,
                        stride: if r == 0 { stride } else { 1 },
                        c_in: if r == 0 { c_in } else { c_out },
                        c_out,
                        drop: STOCHASTIC_DEPTH * index as f64 / total as f64,
                    };
                    index += 1;
                    block
                })
                .collect()
        })
        .collect()
}

/// Conv (no bias, symmetric padding) + BatchNorm, then SiLU when `silu`
/// (torchvision's `Conv2dNormActivation`: `{p}.0` and `{p}.1`).
fn conv_bn(
    p: nn::Path,
    variant: Variant,
    (c_in, c_out): (i64, i64),
    kernel: i64,
    stride: i64,
    groups: i64,
    silu: bool,
) -> impl ModuleT {
    let config = nn::ConvConfig {
        stride,
        padding: (kernel - 1) / 2,
        groups,
        bias: false,
        ..Default::default()
    };
    let conv = nn::conv2d(&p / 0, c_in, c_out, kernel, config);
    let bn = variant.bn(&p / 1, c_out);
    nn::func_t(move |xs, train| {
        let ys = xs.apply(&conv).apply_t(&bn, train);
        if silu {
            ys.silu()
        } else {
            ys
        }
    })
}

fn squeeze_excite(p: nn::Path, channels: i64, squeezed: i64) -> impl ModuleT {
    let fc1 = nn::conv2d(&p / "fc1", channels, squeezed, 1, Default::default());
    let fc2 = nn::conv2d(&p / "fc2", squeezed, channels, 1, Default::default());
    nn::func_t(move |xs, _train| {
        let scale = xs
            .mean_dim(Some([2i64, 3].as_slice()), true, xs.kind())
            .apply(&fc1)
            .silu()
            .apply(&fc2)
            .sigmoid();
        xs * scale
    })
}

/// Drops the whole residual branch of each sample with probability `p`
/// while training, scaling survivors by `1/(1-p)` (torchvision's "row"
/// stochastic depth).
fn stochastic_depth(ys: Tensor, p: f64, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return ys;
    }
    let survival = 1.0 - p;
    let keep = Tensor::empty([ys.size()[0], 1, 1, 1], (ys.kind(), ys.device()))
        .bernoulli_float_(survival)
        / survival;
    ys * keep
}

fn block(p: nn::Path, variant: Variant, b: Block) -> impl ModuleT {
    let p = &p / "block";
    let hidden = b.hidden();
    let d = b.depthwise_index();
    let expand = (d == 1).then(|| conv_bn(&p / 0, variant, (b.c_in, hidden), 1, 1, 1, true));
    let depthwise = conv_bn(
        &p / d,
        variant,
        (hidden, hidden),
        b.kernel,
        b.stride,
        hidden,
        true,
    );
    let se = squeeze_excite(&p / (d + 1), hidden, b.squeeze());
    let project = conv_bn(&p / (d + 2), variant, (hidden, b.c_out), 1, 1, 1, false);
    nn::func_t(move |xs, train| {
        let x = match &expand {
            Some(expand) => xs.apply_t(expand, train),
            None => xs.shallow_clone(),
        };
        let ys = x
            .apply_t(&depthwise, train)
            .apply_t(&se, train)
            .apply_t(&project, train);
        if b.residual() {
            stochastic_depth(ys, b.drop, train) + xs
        } else {
            ys
        }
    })
}

/// The feature extractor as stages, first to last: the stem, the seven
/// block stages, the 1×1 head conv. Stage `i` creates its variables in
/// optimizer group `i`.
pub fn stages(root: &nn::Path, variant: Variant) -> Vec<Stage> {
    let features = |i: usize| root.set_group(i) / "features" / i;
    let prefix = |i: usize| vec![format!("features.{i}")];
    let stem = variant.stem_channels();
    let mut stages = vec![Stage::new(
        "stem",
        prefix(0),
        conv_bn(features(0), variant, (3, stem), 3, 2, 1, true),
    )];
    let mut c_last = stem;
    for (s, blocks) in stages_of(variant).into_iter().enumerate() {
        let index = s + 1;
        let p = features(index);
        let mut seq = nn::seq_t();
        for (b, shape) in blocks.into_iter().enumerate() {
            seq = seq.add(block(&p / b, variant, shape));
            c_last = shape.c_out;
        }
        stages.push(Stage::new(&format!("block{index}"), prefix(index), seq));
    }
    let head = STAGES.len() + 1;
    stages.push(Stage::new(
        "head_conv",
        prefix(head),
        conv_bn(
            features(head),
            variant,
            (c_last, variant.feature_dim()),
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
    let conv = |p: &str, stride, groups, silu: bool| {
        let activation = if silu {
            Activation::Silu
        } else {
            Activation::None
        };
        FoldedConv::new(
            vars,
            &format!("{p}.0"),
            &format!("{p}.1"),
            stride,
            groups,
            activation,
            variant.bn_eps,
            Padding::Symmetric,
        )
    };
    let mut blocks = vec![FoldedBlock::plain(
        vec![conv("features.0", 2, 1, true)?],
        false,
    )];
    for (s, stage) in stages_of(variant).into_iter().enumerate() {
        for (b, shape) in stage.into_iter().enumerate() {
            let p = format!("features.{}.{b}.block", s + 1);
            let d = shape.depthwise_index();
            let mut convs = Vec::new();
            if d == 1 {
                convs.push(conv(&format!("{p}.0"), 1, 1, true)?);
            }
            convs.push(conv(
                &format!("{p}.{d}"),
                shape.stride,
                shape.hidden(),
                true,
            )?);
            convs.push(conv(&format!("{p}.{}", d + 2), 1, 1, false)?);
            let mut block = FoldedBlock::plain(convs, shape.residual());
            block.squeeze_excite = Some(SqueezeExcite::new(vars, &format!("{p}.{}", d + 1))?);
            blocks.push(block);
        }
    }
    blocks.push(FoldedBlock::plain(
        vec![conv(&format!("features.{}", STAGES.len() + 1), 1, 1, true)?],
        false,
    ));
    FoldedNet::new(blocks, vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_depths_follow_torchvision() {
        let repeats = |v| -> Vec<usize> { stages_of(v).iter().map(Vec::len).collect() };
        assert_eq!(repeats(B0), [1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(repeats(B4), [2, 4, 4, 6, 6, 8, 2]);
        assert_eq!(repeats(B7), [4, 7, 7, 10, 10, 13, 4]);
        let dims: Vec<i64> = [B0, B1, B2, B3, B4, B5, B6, B7]
            .iter()
            .map(|v| v.feature_dim())
            .collect();
        assert_eq!(dims, [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]);
        let stems: Vec<i64> = [B0, B3, B4, B6, B7]
            .iter()
            .map(|v| v.stem_channels())
            .collect();
        assert_eq!(stems, [32, 40, 48, 56, 64]);
    }
}
