//! A model written as a standalone TorchScript module: the serving network
//! traced together with the preprocessing that follows decoding.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::loading;
use super::ModelSpec;

/// Writes the model as a TorchScript module that takes canonical images
/// (uint8 `[N, 3, S, S]`, S the model's stored size) and returns softmax
/// scores `[N, classes]`.
pub fn export_torchscript(spec: &ModelSpec, out: &Path) -> Result<(), String> {
    let model = loading::load(spec, Device::Cpu)?;
    let side = i64::from(spec.stored_size);
    let example = Tensor::zeros([1, 3, side, side], (Kind::Uint8, Device::Cpu));
    let traced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| {
            tch::CModule::create_by_tracing("finetuned", "forward", &[example], &mut |inputs| {
                vec![model.probabilities(&inputs[0])]
            })
        })
    }))
    .map_err(|panic| crate::panic_message(&panic))?
    .map_err(|e| e.to_string())?;
    traced.save(out).map_err(|e| e.to_string())
}
