//! MobileNetV2's feature extractor with torchvision's variable names
//! (`features.N…`), so torchvision's ImageNet weights load by name.

use tch::nn::{self, ModuleT};

use super::folded::{Activation, FoldedBlock, FoldedConv, FoldedNet, Padding, Variables};
use super::layers::{global_average_pool, Stage, TORCH_BN_EPS};

/// Channels of the pooled feature vector.
pub const FEATURE_DIM: i64 = 1280;

/// (expansion, output channels, repeats, first stride) per stage.
const INVERTED_RESIDUALS: [(i64, i64, i64, i64); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Conv + BatchNorm + ReLU6.
fn conv_bn_relu6(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    kernel: i64,
    stride: i64,
    groups: i64,
) -> nn::SequentialT {
    let config = nn::ConvConfig {
        stride,
        padding: (kernel - 1) / 2,
        groups,
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(&p / 0, c_in, c_out, kernel, config))
        .add(nn::batch_norm2d(&p / 1, c_out, Default::default()))
        .add_fn(|xs| xs.relu6())
}

fn inverted_residual(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    stride: i64,
    expansion: i64,
) -> impl ModuleT {
    let hidden = expansion * c_in;
    let mut conv = nn::seq_t();
    let mut id = 0;
    if expansion != 1 {
        conv = conv.add(conv_bn_relu6(&p / id, c_in, hidden, 1, 1, 1));
        id += 1;
    }
    conv = conv
        .add(conv_bn_relu6(&p / id, hidden, hidden, 3, stride, hidden))
        .add(nn::conv2d(&p / (id + 1), hidden, c_out, 1, nn::no_bias()))
        .add(nn::batch_norm2d(&p / (id + 2), c_out, Default::default()));
    let residual = stride == 1 && c_in == c_out;
    nn::func_t(move |xs, train| {
        let ys = xs.apply_t(&conv, train);
        if residual {
            xs + ys
        } else {
            ys
        }
    })
}

/// Builds the feature extractor under `root` (names start with `features.`)
/// as its stages, first to last: the stem, the seven inverted-residual
/// groups, the final 1×1 conv. Stage `i` creates its variables in optimizer
/// group `i`, so each stage can have its own learning rate.
pub fn stages(root: &nn::Path) -> Vec<Stage> {
    let mut stages = Vec::new();
    let stem = &root.set_group(0) / "features";
    stages.push(Stage::new(
        "stem",
        vec!["features.0".into()],
        conv_bn_relu6(&stem / 0, 3, 32, 3, 2, 1),
    ));
    let mut c_in = 32;
    let mut id = 1;
    for (group, (expansion, c_out, repeats, stride)) in INVERTED_RESIDUALS.into_iter().enumerate() {
        let f = &root.set_group(group + 1) / "features";
        let mut layers = nn::seq_t();
        let mut prefixes = Vec::new();
        for i in 0..repeats {
            let stride = if i == 0 { stride } else { 1 };
            layers = layers.add(inverted_residual(
                &f / id / "conv",
                c_in,
                c_out,
                stride,
                expansion,
            ));
            prefixes.push(format!("features.{id}"));
            c_in = c_out;
            id += 1;
        }
        stages.push(Stage::new(&format!("block{}", group + 1), prefixes, layers));
    }
    let last = &root.set_group(INVERTED_RESIDUALS.len() + 1) / "features";
    stages.push(Stage::new(
        "head_conv",
        vec![format!("features.{id}")],
        conv_bn_relu6(&last / id, c_in, FEATURE_DIM, 1, 1, 1),
    ));
    stages
}

/// The whole feature extractor as one module: stages, then global average
/// pooling to `[N, 1280]` (torchvision's `features` + pooling).
pub fn features(root: &nn::Path) -> impl ModuleT {
    let stages = stages(root);
    nn::func_t(move |xs, train| {
        let x = stages
            .iter()
            .fold(xs.shallow_clone(), |x, s| s.forward_t(&x, train));
        global_average_pool(&x)
    })
}

/// The network with BatchNorm folded into its convolutions, for serving:
/// the same blocks as [`stages`], read from a checkpoint's variables.
pub fn folded(vars: &Variables) -> Result<FoldedNet, String> {
    let single = |conv: FoldedConv| FoldedBlock::plain(vec![conv], false);
    let mut blocks = vec![single(FoldedConv::new(
        vars,
        "features.0.0",
        "features.0.1",
        2,
        1,
        Activation::Relu6,
        TORCH_BN_EPS,
        Padding::Symmetric,
    )?)];
    let mut c_in = 32;
    let mut id = 1;
    for (expansion, c_out, repeats, first_stride) in INVERTED_RESIDUALS {
        for i in 0..repeats {
            let stride = if i == 0 { first_stride } else { 1 };
            let p = format!("features.{id}.conv");
            let hidden = expansion * c_in;
            let mut convs = Vec::new();
            let mut k = 0;
            if expansion != 1 {
                convs.push(FoldedConv::new(
                    vars,
                    &format!("{p}.0.0"),
                    &format!("{p}.0.1"),
                    1,
                    1,
                    Activation::Relu6,
                    TORCH_BN_EPS,
                    Padding::Symmetric,
                )?);
                k = 1;
            }
            convs.push(FoldedConv::new(
                vars,
                &format!("{p}.{k}.0"),
                &format!("{p}.{k}.1"),
                stride,
                hidden,
                Activation::Relu6,
                TORCH_BN_EPS,
                Padding::Symmetric,
            )?);
            convs.push(FoldedConv::new(
                vars,
                &format!("{p}.{}", k + 1),
                &format!("{p}.{}", k + 2),
                1,
                1,
                Activation::None,
                TORCH_BN_EPS,
                Padding::Symmetric,
            )?);
            blocks.push(FoldedBlock::plain(convs, stride == 1 && c_in == c_out));
            c_in = c_out;
            id += 1;
        }
    }
    blocks.push(single(FoldedConv::new(
        vars,
        &format!("features.{id}.0"),
        &format!("features.{id}.1"),
        1,
        1,
        Activation::Relu6,
        TORCH_BN_EPS,
        Padding::Symmetric,
    )?));
    FoldedNet::new(blocks, vars)
}
