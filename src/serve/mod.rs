//! Inference: one dedicated thread owns the loaded models and runs every
//! forward pass; the HTTP side holds a cheap, cloneable [`Predictor`] handle
//! and sends it already-decoded images (never tensors).
//!
//! Requests wait in a bounded queue (a full queue is refused at once, so
//! overload never piles up memory). The thread gathers the requests that
//! arrive within a short window, up to a maximum batch, and runs each
//! model's share as one forward pass.

use crossbeam_channel as channel;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::data::preprocess::{self, Normalization};
use crate::models::folded::{FoldedNet, Variables};
use crate::models::script::{self, ScriptSpec};
use crate::models::{self, Classifier};
use crate::telemetry;

/// Everything needed to load a model's checkpoint.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: Uuid,
    pub checkpoint: PathBuf,
    pub backbone: String,
    pub labels: Vec<String>,
    pub image_size: i64,
    /// Side requests are decoded to (the side its dataset was stored at).
    pub stored_size: u32,
    pub normalization: Normalization,
    /// The uploaded TorchScript backbone, when the model was trained on one.
    pub script: Option<ScriptSpec>,
}

impl ModelSpec {
    /// The spec of a registered model, its checkpoint under `artifacts`.
    pub fn of(
        model: &crate::store::models::ModelRow,
        artifacts: &crate::artifacts::Artifacts,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: model.id,
            checkpoint: artifacts.path(&model.artifact_key),
            backbone: model.backbone.clone(),
            labels: model.labels.0.clone(),
            image_size: i64::from(model.image_size),
            stored_size: model.stored_size as u32,
            normalization: serde_json::from_value(model.normalization.0.clone())?,
            script: None,
        })
    }
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
    #[error("the prediction queue is full")]
    Overloaded,
    #[error("the inference thread is gone")]
    Stopped,
}

/// How the inference thread batches and queues.
#[derive(Debug, Clone)]
pub struct BatchingConfig {
    pub device: Device,
    /// Inference threads, each with its own copy of the models in use.
    pub threads: usize,
    /// Cores the inference threads share for libtorch's intra-op threads: a
    /// forward pass running alone uses all of them, concurrent ones split
    /// them (0: leave libtorch's default).
    pub torch_threads: usize,
    /// Loaded models kept in memory, at most.
    pub cache_capacity: usize,
    /// Bytes of loaded models' tensors kept in memory, at most (the model
    /// in use always stays).
    pub cache_bytes: usize,
    /// How long the first request of a batch waits for company.
    pub window: Duration,
    /// Most images in one forward pass.
    pub max_batch: usize,
    /// Requests that may wait; more are refused.
    pub queue: usize,
}

struct Request {
    model: ModelSpec,
    /// Canonical images from [`preprocess::decode_canonical`].
    images: Vec<Vec<u8>>,
    top_k: usize,
    reply: oneshot::Sender<Result<Vec<Vec<Prediction>>, ServeError>>,
}

/// Handle to the inference threads. They share one bounded queue, so a
/// request waits only until any thread is free; each thread has its own
/// model cache and libtorch thread count, and a private line for warm-ups.
#[derive(Clone)]
pub struct Predictor {
    queue: channel::Sender<Request>,
    warm_ups: std::sync::Arc<Vec<channel::Sender<Request>>>,
}

impl Predictor {
    /// Starts the inference threads.
    pub fn start(config: BatchingConfig) -> std::io::Result<Self> {
        let (queue, inbox) = channel::bounded::<Request>(config.queue.max(1));
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut warm_ups = Vec::new();
        for i in 0..config.threads.max(1) {
            let (warm_up, own) = channel::bounded::<Request>(4);
            let (inbox, config, busy) = (inbox.clone(), config.clone(), busy.clone());
            std::thread::Builder::new()
                .name(format!("inference-{i}"))
                .spawn(move || {
                    lower_priority();
                    let mut cache = ModelCache {
                        capacity: config.cache_capacity.max(1),
                        max_bytes: config.cache_bytes,
                        device: config.device,
                        entries: Vec::new(),
                    };
                    while let Some(batch) = next_batch(&inbox, &own, &config) {
                        let running = busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        // libtorch's intra-op thread count is per OS thread:
                        // alone, a forward pass takes every core; under load
                        // the passes split them instead of oversubscribing.
                        if config.torch_threads > 0 {
                            tch::set_num_threads((config.torch_threads / running).max(1) as i32);
                        }
                        cache.run(batch);
                        busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })?;
            warm_ups.push(warm_up);
        }
        Ok(Self {
            queue,
            warm_ups: std::sync::Arc::new(warm_ups),
        })
    }

    /// Top-`top_k` labels with softmax scores for each image, best first.
    pub async fn predict(
        &self,
        model: ModelSpec,
        images: Vec<Vec<u8>>,
        top_k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ServeError> {
        let (reply, answer) = oneshot::channel();
        send(
            &self.queue,
            Request {
                model,
                images,
                top_k,
                reply,
            },
        )?;
        answer.await.map_err(|_| ServeError::Stopped)?
    }

    /// Loads a model on every inference thread now (with a warm-up forward
    /// pass) so no first request is slow.
    pub async fn warm_up(&self, model: ModelSpec) -> Result<(), ServeError> {
        for line in self.warm_ups.iter() {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                model: model.clone(),
                images: vec![vec![0; preprocess::stored_bytes(model.stored_size)]],
                top_k: 1,
                reply,
            };
            send(line, request)?;
            answer.await.map_err(|_| ServeError::Stopped)??;
        }
        Ok(())
    }
}

/// Forward passes yield the cores to the HTTP threads when both want them,
/// so a saturated server still reads requests, answers 503s and writes
/// replies at once (measured: a tighter latency tail under load). The
/// libtorch threads this thread starts inherit it.
fn lower_priority() {
    // Linux: a thread's nice value is its own; raising it needs no privilege.
    let tid = unsafe { libc::gettid() };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, INFERENCE_NICE) } != 0 {
        tracing::debug!("could not lower the inference thread's priority");
    }
}

/// Nice value of the inference threads (0 is normal, 19 the lowest).
const INFERENCE_NICE: libc::c_int = 5;

fn send(queue: &channel::Sender<Request>, request: Request) -> Result<(), ServeError> {
    queue.try_send(request).map_err(|err| match err {
        channel::TrySendError::Full(_) => ServeError::Overloaded,
        channel::TrySendError::Disconnected(_) => ServeError::Stopped,
    })
}

/// The next batch for this thread: a warm-up of its own, or requests from
/// the shared queue. `None` when every handle is gone.
fn next_batch(
    inbox: &channel::Receiver<Request>,
    own: &channel::Receiver<Request>,
    config: &BatchingConfig,
) -> Option<Vec<Request>> {
    channel::select! {
        recv(own) -> warm_up => warm_up.ok().map(|r| vec![r]),
        recv(inbox) -> first => gather(first.ok()?, inbox, config),
    }
}

/// Gathers what arrives within the window after `first`, up to the maximum
/// batch.
fn gather(
    first: Request,
    inbox: &channel::Receiver<Request>,
    config: &BatchingConfig,
) -> Option<Vec<Request>> {
    let deadline = Instant::now() + config.window;
    let mut images = first.images.len();
    let mut batch = vec![first];
    while images < config.max_batch {
        match inbox.recv_deadline(deadline) {
            Ok(request) => {
                images += request.images.len();
                batch.push(request);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Loaded models kept in memory, least recently used first out.
struct ModelCache {
    capacity: usize,
    max_bytes: usize,
    device: Device,
    /// Most recently used last.
    entries: Vec<(Uuid, LoadedModel)>,
}

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

struct LoadedModel {
    net: ServingNet,
    spec: ModelSpec,
    /// The normalization's mean and std, on the model's device.
    mean: Tensor,
    std: Tensor,
    /// Memory its tensors take, for the cache's bound.
    bytes: usize,
}

impl LoadedModel {
    /// Softmax scores for canonical images: the evaluation's preprocessing
    /// steps, then the folded network.
    fn probabilities(&self, canonical: &Tensor) -> Tensor {
        let view = preprocess::center_view(canonical, self.spec.image_size);
        let input = preprocess::normalize_with(&view, &self.mean, &self.std);
        self.net.forward(&input).softmax(-1, Kind::Float)
    }
}

impl ModelCache {
    /// Runs a gathered batch: one forward pass per model, then each request
    /// gets its own rows.
    fn run(&mut self, batch: Vec<Request>) {
        let mut pending = batch;
        while !pending.is_empty() {
            let model_id = pending[0].model.id;
            let (group, rest): (Vec<Request>, Vec<Request>) =
                pending.into_iter().partition(|r| r.model.id == model_id);
            pending = rest;
            let images: Vec<Vec<u8>> = group
                .iter()
                .flat_map(|r| r.images.iter().cloned())
                .collect();
            let max_k = group.iter().map(|r| r.top_k).max().unwrap_or(1);
            metrics::histogram!(telemetry::PREDICT_BATCH_SIZE).record(images.len() as f64);
            metrics::counter!(telemetry::PREDICT_IMAGES).increment(images.len() as u64);
            let started = Instant::now();
            let result = self.predict(&group[0].model, &images, max_k);
            tracing::debug!(
                requests = group.len(),
                images = images.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "forward pass"
            );
            match result {
                Ok(mut rows) => {
                    for request in group {
                        let rest = rows.split_off(request.images.len());
                        let mine = std::mem::replace(&mut rows, rest);
                        let mine = mine.into_iter().map(|mut p| {
                            p.truncate(request.top_k);
                            p
                        });
                        let _ = request.reply.send(Ok(mine.collect()));
                    }
                }
                Err(err) => {
                    for request in group {
                        let _ = request.reply.send(Err(match &err {
                            ServeError::Load { id, reason } => ServeError::Load {
                                id: *id,
                                reason: reason.clone(),
                            },
                            other => ServeError::Inference(other.to_string()),
                        }));
                    }
                }
            }
        }
    }

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
            let (scores, indices) = tch::no_grad(|| {
                let batch = preprocess::stack_canonical(images).to_device(device);
                let probs = model.probabilities(&batch);
                probs.topk(k, -1, true, true)
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
                            label: model.spec.labels[index as usize].clone(),
                            score: f64::from(score),
                        })
                        .collect()
                })
                .collect()
        }));
        result.map_err(|panic| ServeError::Inference(crate::panic_message(&panic)))
    }

    /// The loaded model for `spec`, loading and warming it up (and evicting
    /// the least recently used) on a miss.
    fn get(&mut self, spec: &ModelSpec) -> Result<&LoadedModel, ServeError> {
        if let Some(pos) = self.entries.iter().position(|(id, _)| *id == spec.id) {
            let entry = self.entries.remove(pos);
            self.entries.push(entry);
            metrics::counter!(telemetry::MODEL_CACHE, "result" => "hit").increment(1);
        } else {
            metrics::counter!(telemetry::MODEL_CACHE, "result" => "load").increment(1);
            let started = Instant::now();
            let loaded = load(spec, self.device).map_err(|reason| ServeError::Load {
                id: spec.id,
                reason,
            })?;
            let mut held: usize = self.entries.iter().map(|(_, m)| m.bytes).sum();
            while !self.entries.is_empty()
                && (self.entries.len() >= self.capacity || held + loaded.bytes > self.max_bytes)
            {
                let (id, evicted) = self.entries.remove(0);
                held -= evicted.bytes;
                tracing::info!(model_id = %id, "model evicted from the cache");
            }
            tracing::info!(model_id = %spec.id, ms = started.elapsed().as_millis() as u64, "model loaded");
            self.entries.push((spec.id, loaded));
        }
        Ok(&self.entries.last().expect("just pushed").1)
    }
}

/// Softmax scores for canonical images: the evaluation path's preprocessing
/// and forward pass.
pub fn forward_probabilities(
    classifier: &Classifier,
    spec: &ModelSpec,
    canonical: &Tensor,
) -> Tensor {
    let input = preprocess::model_input(canonical, spec.image_size, &spec.normalization);
    classifier.forward_t(&input, false).softmax(-1, Kind::Float)
}

/// Writes the model as a TorchScript module that takes canonical images
/// (uint8 `[N, 3, S, S]`, S the model's stored size) and returns softmax
/// scores `[N, classes]`: the
/// serving network traced with the preprocessing that follows decoding.
pub fn export_torchscript(spec: &ModelSpec, out: &std::path::Path) -> Result<(), String> {
    let model = load(spec, Device::Cpu)?;
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

/// Loads a checkpoint as the serving network (BatchNorm folded for
/// catalogue backbones).
fn load(spec: &ModelSpec, device: Device) -> Result<LoadedModel, String> {
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
        mean,
        std,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A randomly initialised checkpoint of `classes` outputs.
    fn checkpoint(dir: &std::path::Path, classes: usize) -> ModelSpec {
        let spec = models::find("mobilenet_v2").unwrap();
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        Classifier::new(&mut vs, spec, classes as i64, None).unwrap();
        let id = Uuid::new_v4();
        let path = dir.join(format!("{id}.safetensors"));
        vs.save(&path).unwrap();
        ModelSpec {
            id,
            checkpoint: path,
            backbone: spec.name.into(),
            labels: (0..classes).map(|i| format!("class{i}")).collect(),
            image_size: 64,
            stored_size: preprocess::STORED_SIZE,
            normalization: Normalization::IMAGENET,
            script: None,
        }
    }

    #[test]
    fn the_model_cache_is_bounded_by_memory_and_evicts_the_least_recent() {
        let dir = std::env::temp_dir().join(format!("model-cache-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let [a, b, c] = [3, 3, 3].map(|n| checkpoint(&dir, n));
        let one = load(&a, Device::Cpu).unwrap().bytes;
        assert!(one > 8 * 1024 * 1024, "MobileNetV2 holds {one} bytes");
        let mut cache = ModelCache {
            capacity: 10,
            max_bytes: one * 5 / 2,
            device: Device::Cpu,
            entries: Vec::new(),
        };
        let held = |cache: &ModelCache| cache.entries.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        cache.get(&a).unwrap();
        cache.get(&b).unwrap();
        assert_eq!(held(&cache), [a.id, b.id]);
        cache.get(&a).unwrap(); // a is now the most recent
        cache.get(&c).unwrap(); // room for two: b goes
        assert_eq!(held(&cache), [a.id, c.id]);
        // The count bound applies too.
        cache.capacity = 1;
        cache.get(&b).unwrap();
        assert_eq!(held(&cache), [b.id]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
