//! What every backbone shares, and nothing else: the [`Stage`] a backbone is
//! built from, TensorFlow's "same" padding, global average pooling, and the
//! variable names and constants the training and serving networks agree on.
//! Depends on no other module of `models`.

use tch::nn::ModuleT;
use tch::Tensor;

/// torchvision's (and tch's) BatchNorm epsilon.
pub const TORCH_BN_EPS: f64 = 1e-5;

/// Prefix of the new head's variables; everything else is the backbone's.
pub const HEAD_PREFIX: &str = "head";

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

    /// Whether `variable` (a full variable name) belongs to this stage.
    pub(super) fn owns(&self, variable: &str) -> bool {
        self.prefixes.iter().any(|p| {
            variable
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
    }
}

/// `[N, C, H, W]` → `[N, C]`.
pub fn global_average_pool(x: &Tensor) -> Tensor {
    x.mean_dim(Some([2i64, 3].as_slice()), false, tch::Kind::Float)
}

/// Total zero padding of TensorFlow's "same" along a side of `n` pixels:
/// the output side is `ceil(n / stride)`.
fn same_total(n: i64, kernel: i64, stride: i64) -> i64 {
    (((n + stride - 1) / stride - 1) * stride + kernel - n).max(0)
}

/// Zero padding as TensorFlow's "same", the odd pixel on the bottom/right.
fn same_padding(x: &Tensor, kernel: i64, stride: i64) -> Tensor {
    let size = x.size();
    let (ph, pw) = (
        same_total(size[2], kernel, stride),
        same_total(size[3], kernel, stride),
    );
    if ph == 0 && pw == 0 {
        x.shallow_clone()
    } else {
        x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
    }
}

/// A convolution with "same" padding. When the padding is even on both
/// sides (every stride-1 convolution) the convolution pads by itself;
/// only the odd cases copy the input into a padded tensor.
pub fn same_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: i64,
    groups: i64,
) -> Tensor {
    let kernel = weight.size()[2];
    let size = x.size();
    let (ph, pw) = (
        same_total(size[2], kernel, stride),
        same_total(size[3], kernel, stride),
    );
    let (input, padding) = if ph % 2 == 0 && pw % 2 == 0 {
        (x.shallow_clone(), [ph / 2, pw / 2])
    } else {
        (same_padding(x, kernel, stride), [0, 0])
    };
    input.conv2d(weight, bias, [stride, stride], padding, [1, 1], groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_puts_the_odd_pixel_last() {
        let x = Tensor::ones([1, 1, 224, 224], (tch::Kind::Float, tch::Device::Cpu));
        // 3×3, stride 2 on an even side: one pixel, at the bottom and right.
        assert_eq!(same_padding(&x, 3, 2).size(), [1, 1, 225, 225]);
        assert_eq!(same_padding(&x, 3, 2).double_value(&[0, 0, 0, 0]), 1.0);
        assert_eq!(same_padding(&x, 3, 2).double_value(&[0, 0, 224, 224]), 0.0);
        assert_eq!(same_padding(&x, 5, 1).size(), [1, 1, 228, 228]);
    }
}
