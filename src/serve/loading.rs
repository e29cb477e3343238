//! A checkpoint loaded as the serving network (BatchNorm folded for
//! catalogue backbones, the trained parameters put into an uploaded
//! TorchScript backbone), with the preprocessing that follows decoding and
//! the top-k forward pass.

use tch::{Device, Kind, Tensor};

use super::{ModelSpec, Prediction, ServeError};
use crate::data::preprocess;
use crate::models::folded::{FoldedNet, Variables};
use crate::models::script;
use crate::models::{self, Classifier};

/// The network a model is served with.
enum ServingNet {
    /// A catalogue backbone with BatchNorm folded, and the head.
    Folded(FoldedNet),
    /// An uploaded TorchScript backbone with the trained parameters, and
    /// the head.
    Script {
        module: tch::CModule,
        head_weight: Tensor,
        head_bias: Tensor,
    },
}

impl ServingNet {
    /// Logits. A failing TorchScript module panics, as libtorch errors do
    /// (callers catch both).
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            ServingNet::Folded(net) => net.forward(xs),
            ServingNet::Script {
                module,
                head_weight,
                head_bias,
            } => script::served_features(module, xs)
                .unwrap_or_else(|e| panic!("the TorchScript backbone failed: {e}"))
                .linear(head_weight, Some(head_bias)),
        }
    }

    fn classes(&self) -> i64 {
        match self {
            ServingNet::Folded(net) => net.head_weight.size()[0],
            ServingNet::Script { head_weight, .. } => head_weight.size()[0],
        }
    }

    /// Memory its tensors take.
    fn bytes(&self) -> Result<usize, String> {
        let size = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            ServingNet::Folded(net) => Ok(net.bytes()),
            ServingNet::Script {
                module,
                head_weight,
                head_bias,
            } => {
                let params = module.named_parameters().map_err(|e| e.to_string())?;
                Ok(params.iter().map(|(_, t)| size(t)).sum::<usize>()
                    + size(head_weight)
                    + size(head_bias))
            }
        }
    }
}

/// A model ready to serve on one device.
pub(super) struct LoadedModel {
    net: ServingNet,
    spec: ModelSpec,
    device: Device,
    /// The normalization's mean and std, on the model's device.
    mean: Tensor,
    std: Tensor,
    /// Memory its tensors take, for the cache's bound.
    pub bytes: usize,
}

impl LoadedModel {
    /// Softmax scores for canonical images: the evaluation's preprocessing
    /// steps, then the serving network.
    pub fn probabilities(&self, canonical: &Tensor) -> Tensor {
        let view = preprocess::center_view(canonical, self.spec.image_size);
        let input = preprocess::normalize_with(&view, &self.mean, &self.std);
        self.net.forward(&input).softmax(-1, Kind::Float)
    }

    /// The `top_k` best labels with their scores for each canonical image,
    /// best first.
    pub fn top_k(
        &self,
        images: &[Vec<u8>],
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ServeError> {
        let labels = &self.spec.labels;
        let k = top_k.clamp(1, labels.len()) as i64;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (scores, indices) = tch::no_grad(|| {
                let batch = preprocess::stack_canonical(images).to_device(self.device);
                self.probabilities(&batch).topk(k, -1, true, true)
            });
            let scores =
                Vec::<Vec<f32>>::try_from(scores.to_device(Device::Cpu)).expect("float scores");
            let indices =
                Vec::<Vec<i64>>::try_from(indices.to_device(Device::Cpu)).expect("int64 indices");
            scores
                .iter()
                .zip(&indices)
                .map(|(s, i)| {
                    s.iter()
                        .zip(i)
                        .map(|(&score, &index)| Prediction {
                            label: labels[index as usize].clone(),
                            score: f64::from(score),
                        })
                        .collect()
                })
                .collect()
        }));
        result.map_err(|panic| ServeError::Inference(crate::panic_message(&panic)))
    }
}

/// Loads a checkpoint as the serving network on `device`.
pub(super) fn load(spec: &ModelSpec, device: Device) -> Result<LoadedModel, String> {
    let tensors = Tensor::read_safetensors(&spec.checkpoint).map_err(|e| e.to_string())?;
    let vars = Variables(
        tensors
            .into_iter()
            .map(|(name, t)| (name, t.to_device(device)))
            .collect(),
    );
    let net = match &spec.script {
        Some(script) => {
            let (head_weight, head_bias) = vars.head()?;
            ServingNet::Script {
                module: script.load_trained(&vars, device)?,
                head_weight,
                head_bias,
            }
        }
        None => {
            let backbone = models::find(&spec.backbone)
                .ok_or_else(|| format!("unknown backbone {}", spec.backbone))?;
            ServingNet::Folded(tch::no_grad(|| backbone.folded(&vars))?)
        }
    };
    let classes = net.classes();
    if classes != spec.labels.len() as i64 {
        return Err(format!(
            "the checkpoint has {classes} outputs for {} labels",
            spec.labels.len()
        ));
    }
    let bytes = net.bytes()?;
    let (mean, std) = spec.normalization.tensors(device);
    Ok(LoadedModel {
        net,
        spec: spec.clone(),
        device,
        mean,
        std,
        bytes,
    })
}

/// Softmax scores for canonical images through the unfolded training-time
/// classifier: the evaluation path, the reference served scores must match.
pub fn forward_probabilities(
    classifier: &Classifier,
    spec: &ModelSpec,
    canonical: &Tensor,
) -> Tensor {
    let input = preprocess::model_input(canonical, spec.image_size, &spec.normalization);
    classifier.forward_t(&input, false).softmax(-1, Kind::Float)
}
