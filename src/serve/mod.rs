//! Inference: one dedicated thread owns the loaded models and runs every
//! forward pass; the HTTP side holds a cheap, cloneable [`Predictor`] handle
//! and sends it already-decoded images (never tensors).

use std::path::PathBuf;
use std::sync::mpsc;

use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::data::preprocess::{self, Normalization};
use crate::models::{self, Classifier};

/// Everything needed to load a model's checkpoint.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: Uuid,
    pub checkpoint: PathBuf,
    pub backbone: String,
    pub labels: Vec<String>,
    pub image_size: i64,
    pub normalization: Normalization,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub score: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("model {id} could not be loaded: {reason}")]
    Load { id: Uuid, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the inference thread is gone")]
    Stopped,
}

struct Request {
    model: ModelSpec,
    /// Canonical images from [`preprocess::decode_canonical`].
    images: Vec<Vec<u8>>,
    top_k: usize,
    reply: oneshot::Sender<Result<Vec<Vec<Prediction>>, ServeError>>,
}

#[derive(Clone)]
pub struct Predictor {
    requests: mpsc::Sender<Request>,
}

/// Loaded models kept in memory, least recently used first out.
struct ModelCache {
    capacity: usize,
    device: Device,
    /// Most recently used last.
    entries: Vec<(Uuid, LoadedModel)>,
}

struct LoadedModel {
    _vs: VarStore,
    classifier: Classifier,
    spec: ModelSpec,
}

impl Predictor {
    /// Starts the inference thread on `device`, keeping up to `capacity` models loaded.
    pub fn start(device: Device, capacity: usize) -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let mut cache = ModelCache {
                    capacity: capacity.max(1),
                    device,
                    entries: Vec::new(),
                };
                for request in inbox {
                    let result = cache.predict(&request.model, &request.images, request.top_k);
                    let _ = request.reply.send(result);
                }
            })?;
        Ok(Self { requests })
    }

    /// Top-`top_k` labels with softmax scores for each image, best first.
    pub async fn predict(
        &self,
        model: ModelSpec,
        images: Vec<Vec<u8>>,
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ServeError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                model,
                images,
                top_k,
                reply,
            })
            .map_err(|_| ServeError::Stopped)?;
        answer.await.map_err(|_| ServeError::Stopped)?
    }
}

impl ModelCache {
    fn predict(
        &mut self,
        spec: &ModelSpec,
        images: &[Vec<u8>],
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ServeError> {
        let device = self.device;
        let model = self.get(spec)?;
        let k = top_k.clamp(1, model.spec.labels.len()) as i64;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tch::no_grad(|| {
                let batch = preprocess::stack_canonical(images).to_device(device);
                let input = preprocess::model_input(
                    &batch,
                    model.spec.image_size,
                    &model.spec.normalization,
                );
                let probs = model
                    .classifier
                    .forward_t(&input, false)
                    .softmax(-1, Kind::Float);
                let (scores, indices) = probs.topk(k, -1, true, true);
                let scores =
                    Vec::<Vec<f32>>::try_from(scores.to_device(Device::Cpu)).expect("float scores");
                let indices = Vec::<Vec<i64>>::try_from(indices.to_device(Device::Cpu))
                    .expect("int64 indices");
                scores
                    .iter()
                    .zip(&indices)
                    .map(|(s, i)| {
                        s.iter()
                            .zip(i)
                            .map(|(&score, &index)| Prediction {
                                label: model.spec.labels[index as usize].clone(),
                                score: f64::from(score),
                            })
                            .collect()
                    })
                    .collect()
            })
        }));
        result.map_err(|panic| ServeError::Inference(crate::panic_message(&panic)))
    }

    /// The loaded model for `spec`, loading it (and evicting the least
    /// recently used) on a miss.
    fn get(&mut self, spec: &ModelSpec) -> Result<&LoadedModel, ServeError> {
        if let Some(pos) = self.entries.iter().position(|(id, _)| *id == spec.id) {
            let entry = self.entries.remove(pos);
            self.entries.push(entry);
        } else {
            let loaded = load(spec, self.device).map_err(|reason| ServeError::Load {
                id: spec.id,
                reason,
            })?;
            if self.entries.len() >= self.capacity {
                self.entries.remove(0);
            }
            tracing::info!(model_id = %spec.id, "model loaded");
            self.entries.push((spec.id, loaded));
        }
        Ok(&self.entries.last().expect("just pushed").1)
    }
}

fn load(spec: &ModelSpec, device: Device) -> Result<LoadedModel, String> {
    let backbone = models::find(&spec.backbone)
        .ok_or_else(|| format!("unknown backbone {}", spec.backbone))?;
    let mut vs = VarStore::new(device);
    let classifier = Classifier::new(&mut vs, backbone, spec.labels.len() as i64, None)
        .map_err(|e| e.to_string())?;
    vs.load(&spec.checkpoint).map_err(|e| e.to_string())?;
    Ok(LoadedModel {
        _vs: vs,
        classifier,
        spec: spec.clone(),
    })
}
