//! MobileNetV2's feature extractor with torchvision's variable names
//! (`features.N…`), so torchvision's ImageNet weights load by name.

use tch::nn::{self, ModuleT};
use tch::Tensor;

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
        .add_fn(|xs| xs.relu().clamp_max(6.))
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

/// Builds the feature extractor under `p` (pass the root path: names start
/// with `features.`). Its output is the globally average-pooled `[N, 1280]`.
pub fn features(p: &nn::Path) -> impl ModuleT {
    let f = p / "features";
    let mut c_in = 32;
    let mut layers = nn::seq_t().add(conv_bn_relu6(&f / 0, 3, c_in, 3, 2, 1));
    let mut id = 1;
    for (expansion, c_out, repeats, stride) in INVERTED_RESIDUALS {
        for i in 0..repeats {
            let stride = if i == 0 { stride } else { 1 };
            layers = layers.add(inverted_residual(
                &f / id / "conv",
                c_in,
                c_out,
                stride,
                expansion,
            ));
            c_in = c_out;
            id += 1;
        }
    }
    layers = layers.add(conv_bn_relu6(&f / id, c_in, FEATURE_DIM, 1, 1, 1));
    nn::func_t(move |xs: &Tensor, train| {
        xs.apply_t(&layers, train)
            .mean_dim(Some([2i64, 3].as_slice()), false, tch::Kind::Float)
    })
}
