//! ResNet-18/34/50/101 with torchvision's variable names (`conv1`,
//! `layer1.0.conv1`, `layer2.0.downsample.0`, …), so a torchvision state
//! dict a user imports loads by name.

use tch::nn::{self, ModuleT};

use super::folded::{Activation, FoldedBlock, FoldedConv, FoldedNet, Padding, Shortcut, Variables};
use super::layers::{Stage, TORCH_BN_EPS};

/// Depth and block kind of one ResNet.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// Blocks per layer.
    pub blocks: [usize; 4],
    /// Bottleneck blocks (1×1, 3×3, 1×1 with 4× expansion) or basic ones.
    pub bottleneck: bool,
}

pub const RESNET18: Variant = Variant {
    blocks: [2, 2, 2, 2],
    bottleneck: false,
};
pub const RESNET34: Variant = Variant {
    blocks: [3, 4, 6, 3],
    bottleneck: false,
};
pub const RESNET50: Variant = Variant {
    blocks: [3, 4, 6, 3],
    bottleneck: true,
};
pub const RESNET101: Variant = Variant {
    blocks: [3, 4, 23, 3],
    bottleneck: true,
};

const PLANES: [i64; 4] = [64, 128, 256, 512];

impl Variant {
    pub const fn feature_dim(&self) -> i64 {
        if self.bottleneck {
            2048
        } else {
            512
        }
    }
}

/// One block's shape.
#[derive(Debug, Clone, Copy)]
struct Block {
    c_in: i64,
    planes: i64,
    stride: i64,
    bottleneck: bool,
}

impl Block {
    fn c_out(&self) -> i64 {
        self.planes * if self.bottleneck { 4 } else { 1 }
    }

    fn downsample(&self) -> bool {
        self.stride != 1 || self.c_in != self.c_out()
    }

    /// (kernel, stride, in, out) of the main path's convolutions, in order
    /// (torchvision v1.5: the stride sits on the 3×3).
    fn convs(&self) -> Vec<(i64, i64, i64, i64)> {
        if self.bottleneck {
            vec![
                (1, 1, self.c_in, self.planes),
                (3, self.stride, self.planes, self.planes),
                (1, 1, self.planes, self.c_out()),
            ]
        } else {
            vec![
                (3, self.stride, self.c_in, self.planes),
                (3, 1, self.planes, self.planes),
            ]
        }
    }
}

fn layers(variant: Variant) -> Vec<Vec<Block>> {
    let mut c_in = 64;
    PLANES
        .iter()
        .zip(variant.blocks)
        .enumerate()
        .map(|(i, (&planes, count))| {
            (0..count)
                .map(|b| {
                    let block = Block {
                        c_in,
                        planes,
                        stride: if b == 0 && i > 0 { 2 } else { 1 },
                        bottleneck: variant.bottleneck,
                    };
                    c_in = block.c_out();
                    block
                })
                .collect()
        })
        .collect()
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, config)
}

fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

fn block(p: nn::Path, b: Block) -> impl ModuleT {
    let main: Vec<(nn::Conv2D, nn::BatchNorm)> = b
        .convs()
        .into_iter()
        .enumerate()
        .map(|(i, (kernel, stride, c_in, c_out))| {
            (
                conv(&p / format!("conv{}", i + 1), c_in, c_out, kernel, stride),
                bn(&p / format!("bn{}", i + 1), c_out),
            )
        })
        .collect();
    let downsample = b.downsample().then(|| {
        (
            conv(&p / "downsample" / 0, b.c_in, b.c_out(), 1, b.stride),
            bn(&p / "downsample" / 1, b.c_out()),
        )
    });
    nn::func_t(move |xs, train| {
        let last = main.len() - 1;
        let mut y = xs.shallow_clone();
        for (i, (c, n)) in main.iter().enumerate() {
            y = y.apply(c).apply_t(n, train);
            if i < last {
                y = y.relu();
            }
        }
        let shortcut = match &downsample {
            Some((c, n)) => xs.apply(c).apply_t(n, train),
            None => xs.shallow_clone(),
        };
        (y + shortcut).relu()
    })
}

/// The feature extractor as stages: the stem (7×7 conv, BatchNorm, ReLU,
/// max pool) and the four layers.
pub fn stages(root: &nn::Path, variant: Variant) -> Vec<Stage> {
    let stem_path = root.set_group(0);
    let stem_conv = conv(&stem_path / "conv1", 3, 64, 7, 2);
    let stem_bn = bn(&stem_path / "bn1", 64);
    let mut stages = vec![Stage::new(
        "stem",
        vec!["conv1".into(), "bn1".into()],
        nn::func_t(move |xs, train| {
            xs.apply(&stem_conv)
                .apply_t(&stem_bn, train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
        }),
    )];
    for (i, blocks) in layers(variant).into_iter().enumerate() {
        let name = format!("layer{}", i + 1);
        let p = root.set_group(i + 1) / name.as_str();
        let mut seq = nn::seq_t();
        for (b, shape) in blocks.into_iter().enumerate() {
            seq = seq.add(block(&p / b, shape));
        }
        stages.push(Stage::new(&name, vec![name.clone()], seq));
    }
    stages
}

/// The network with BatchNorm folded into its convolutions, for serving.
pub fn folded(vars: &Variables, variant: Variant) -> Result<FoldedNet, String> {
    let conv = |conv: &str, bn: &str, stride, activation| {
        FoldedConv::new(
            vars,
            conv,
            bn,
            stride,
            1,
            activation,
            TORCH_BN_EPS,
            Padding::Symmetric,
        )
    };
    let mut blocks = vec![FoldedBlock {
        convs: vec![conv("conv1", "bn1", 2, Activation::Relu)?],
        squeeze_excite: None,
        shortcut: Shortcut::None,
        after: Activation::None,
        max_pool: true,
    }];
    for (i, layer) in layers(variant).into_iter().enumerate() {
        for (b, shape) in layer.into_iter().enumerate() {
            let p = format!("layer{}.{b}", i + 1);
            let specs = shape.convs();
            let last = specs.len() - 1;
            let convs = specs
                .iter()
                .enumerate()
                .map(|(k, &(_, stride, _, _))| {
                    let activation = if k < last {
                        Activation::Relu
                    } else {
                        Activation::None
                    };
                    conv(
                        &format!("{p}.conv{}", k + 1),
                        &format!("{p}.bn{}", k + 1),
                        stride,
                        activation,
                    )
                })
                .collect::<Result<Vec<_>, String>>()?;
            let shortcut = if shape.downsample() {
                Shortcut::Conv(conv(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    shape.stride,
                    Activation::None,
                )?)
            } else {
                Shortcut::Identity
            };
            blocks.push(FoldedBlock {
                convs,
                squeeze_excite: None,
                shortcut,
                after: Activation::Relu,
                max_pool: false,
            });
        }
    }
    FoldedNet::new(blocks, vars)
}
