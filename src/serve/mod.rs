//! Inference: dedicated OS threads own the loaded models and run every
//! forward pass; the HTTP side holds a cheap, cloneable [`Predictor`] handle
//! and sends it already-decoded images (never tensors).
//!
//! - this module: the handle, what a request names ([`ModelSpec`]) and what
//!   it gets back ([`Prediction`], [`ServeError`]).
//! - `batching`: the bounded queue and the inference threads that gather
//!   requests into batches and answer each.
//! - `cache`: each thread's loaded models, bounded by count and bytes.
//! - `loading`: a checkpoint loaded as the serving network, and its
//!   top-k forward pass.
//! - `export`: the serving network written as a TorchScript module.
//!
//! `serve` knows models, preprocessing and metric names only: callers build a
//! [`ModelSpec`] from whatever they store.

mod batching;
mod cache;
mod export;
mod loading;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::data::preprocess::{self, Normalization};
use crate::models::script::ScriptSpec;
use batching::{Line, Queue, Request};

pub use batching::BatchingConfig;
pub use export::export_torchscript;
pub use loading::forward_probabilities;

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

/// Handle to the inference threads. They share one bounded queue, so a
/// request waits only until any thread is free; each thread has its own
/// model cache and libtorch thread count, and a private line for warm-ups.
#[derive(Clone)]
pub struct Predictor {
    queue: Queue,
    /// Most images in one queue item: the maximum batch.
    chunk: usize,
    /// One line per thread, so a warm-up reaches every thread's cache.
    warm_ups: Arc<Vec<Line>>,
}

impl Predictor {
    /// Starts the inference threads.
    pub fn start(config: BatchingConfig) -> std::io::Result<Self> {
        let chunk = config.max_batch.max(1);
        let (queue, warm_ups) = batching::spawn(config)?;
        Ok(Self {
            queue,
            chunk,
            warm_ups: Arc::new(warm_ups),
        })
    }

    /// Top-`top_k` labels with softmax scores for images that are still
    /// being decoded: `ready` yields each image with its place in the
    /// request, in whatever order it finishes. Returns each image's
    /// predictions with its place.
    ///
    /// Room in the queue for `count` images is taken first, for all of them
    /// or none (refused at once when the queue is full, before any is
    /// decoded). The images are then queued in groups of at most the
    /// maximum batch (one image each on the CPU) as they become ready, so
    /// every free inference thread starts on the first while the rest still
    /// decode, as it would on as many single-image requests; on a GPU a
    /// thread still gathers groups into full batches.
    pub async fn predict_as_ready(
        &self,
        model: ModelSpec,
        top_k: usize,
        count: usize,
        ready: impl Stream<Item = (usize, Vec<u8>)>,
    ) -> Result<Vec<(usize, Vec<Prediction>)>, ServeError> {
        let mut room = self.queue.reserve(count.div_ceil(self.chunk))?;
        let mut ready = std::pin::pin!(ready);
        let mut answers = Vec::new();
        let mut group = Vec::new();
        loop {
            let next = ready.next().await;
            let ended = next.is_none();
            group.extend(next);
            if group.len() == self.chunk || (ended && !group.is_empty()) {
                let (places, images): (Vec<usize>, Vec<Vec<u8>>) =
                    std::mem::take(&mut group).into_iter().unzip();
                let (reply, answer) = oneshot::channel();
                room.send(Request {
                    model: model.clone(),
                    images,
                    top_k,
                    reply,
                })?;
                answers.push((places, answer));
            }
            if ended {
                break;
            }
        }
        drop(room);
        let mut predictions = Vec::new();
        for (places, answer) in answers {
            let rows = answer.await.map_err(|_| ServeError::Stopped)??;
            predictions.extend(places.into_iter().zip(rows));
        }
        Ok(predictions)
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
            batching::send(line, request)?;
            answer.await.map_err(|_| ServeError::Stopped)??;
        }
        Ok(())
    }
}
