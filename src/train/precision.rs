//! Mixed precision: bf16 autocast for the training steps on CUDA devices
//! that support it. bf16 keeps fp32's exponent range, so no loss scaling is
//! needed; the CPU always trains in fp32.

use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16Autocast,
}

impl Precision {
    /// bf16 autocast when `wanted` on a CUDA device that computes in bf16;
    /// sets autocast's dtype for the calling thread (the training thread).
    pub fn choose(device: Device, wanted: bool) -> Self {
        match device {
            Device::Cuda(_) if wanted && computes_bf16(device) => {
                crate::native::autocast_cuda_bf16();
                Precision::Bf16Autocast
            }
            _ => Precision::Fp32,
        }
    }

    /// As the run row records it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16Autocast => "bf16-autocast",
        }
    }

    /// Runs a forward pass in this precision; the result is fp32.
    pub fn forward(self, forward: impl FnOnce() -> Tensor) -> Tensor {
        match self {
            Precision::Fp32 => forward(),
            Precision::Bf16Autocast => tch::autocast(true, forward).to_kind(Kind::Float),
        }
    }
}

/// Whether a bf16 matrix product runs on the device.
fn computes_bf16(device: Device) -> bool {
    std::panic::catch_unwind(|| {
        let a = Tensor::ones([8, 8], (Kind::BFloat16, device));
        a.f_matmul(&a).is_ok()
    })
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_trains_in_fp32() {
        let precision = Precision::choose(Device::Cpu, true);
        assert_eq!(precision, Precision::Fp32);
        let x = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(precision.forward(|| x.matmul(&x)).kind(), Kind::Float);
    }
}
