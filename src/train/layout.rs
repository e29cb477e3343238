//! The memory layout of convolution weights and inputs while training.

use tch::{nn, Device, Tensor};

/// Memory layout of convolution weights and inputs while training. On the
/// CPU, channels-last (NHWC strides, NCHW shapes) lets oneDNN's
/// convolutions skip their layout conversions: measured 1.4× faster for
/// MobileNetV2 full fine-tuning steps on the development machine. Shapes,
/// values and checkpoints are unchanged.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    channels_last: bool,
}

impl Layout {
    pub(super) fn for_device(device: Device) -> Self {
        Self {
            channels_last: device == Device::Cpu,
        }
    }

    pub(super) fn apply_to_weights(self, vs: &nn::VarStore) {
        if !self.channels_last {
            return;
        }
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                if var.dim() == 4 {
                    let reordered = channels_last(&var);
                    var.set_data(&reordered);
                }
            }
        });
    }

    pub(super) fn input(self, xs: &Tensor) -> Tensor {
        if self.channels_last {
            channels_last(xs)
        } else {
            xs.shallow_clone()
        }
    }
}

/// The same 4-D tensor with channels-last strides.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}
