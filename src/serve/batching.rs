//! The queue and the inference threads. Requests wait in a bounded queue (a
//! full queue is refused at once, so overload never piles up memory). Each
//! thread gathers the requests that arrive within a short window, up to a
//! maximum batch, and runs each model's share as one forward pass.
//!
//! A request carrying many images reaches the queue as several items of at
//! most `max_batch` images each, each queued as soon as its images are
//! decoded (see [`super::Predictor::predict_as_ready`]), so the threads
//! share its images as they share single-image requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel as channel;
use tch::Device;
use tokio::sync::oneshot;

use super::cache::ModelCache;
use super::{ModelSpec, Prediction, ServeError};
use crate::telemetry;

/// How the inference threads batch and queue.
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
    /// Queue items (a request's groups of at most `max_batch` images) that
    /// may wait; a request that does not fit is refused whole.
    pub queue: usize,
}

/// One caller's images for one model, and where its answer goes.
pub(super) struct Request {
    pub model: ModelSpec,
    /// Canonical images from [`crate::data::preprocess::decode_canonical`].
    pub images: Vec<Vec<u8>>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<Vec<Vec<Prediction>>, ServeError>>,
}

/// A sender of requests to one inference thread (its warm-up line).
pub(super) type Line = channel::Sender<Request>;

/// The queue the inference threads share.
///
/// Admission counts items, not requests: a request of N images is N / `max_batch`
/// items (rounded up), each counted against `--predict-queue`, and it is
/// admitted whole or refused whole (never half queued, so a 503 wastes no
/// forward pass). A request larger than the whole queue is admitted when
/// nothing waits, so it is never refused forever.
#[derive(Clone)]
pub(super) struct Queue {
    line: channel::Sender<Request>,
    /// Items sent and not yet taken by a thread.
    waiting: Arc<AtomicUsize>,
    capacity: usize,
}

impl Queue {
    /// Holds room for `items` queue items, or refuses at once when they do
    /// not fit. The room is taken before the request's images are decoded,
    /// so an overloaded server refuses cheaply and a request admitted never
    /// finds the queue full halfway.
    pub(super) fn reserve(&self, items: usize) -> Result<Reservation, ServeError> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                (waiting == 0 || waiting + items <= self.capacity).then_some(waiting + items)
            })
            .map_err(|_| ServeError::Overloaded)?;
        Ok(Reservation {
            queue: self.clone(),
            unsent: items,
        })
    }
}

/// Room held in the queue for one request's items; what is left unused
/// (images that failed to decode, a request given up) is given back when it
/// drops.
pub(super) struct Reservation {
    queue: Queue,
    unsent: usize,
}

impl Reservation {
    /// Queues an item in the room held for it.
    pub(super) fn send(&mut self, item: Request) -> Result<(), ServeError> {
        debug_assert!(self.unsent > 0, "more items sent than reserved");
        self.unsent = self.unsent.saturating_sub(1);
        self.queue.line.send(item).map_err(|_| {
            self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
            ServeError::Stopped
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.unsent > 0 {
            self.queue.waiting.fetch_sub(self.unsent, Ordering::SeqCst);
        }
    }
}

/// The threads' end of the shared queue.
#[derive(Clone)]
struct Inbox {
    line: channel::Receiver<Request>,
    waiting: Arc<AtomicUsize>,
}

impl Inbox {
    fn taken(&self, item: Request) -> Request {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        item
    }
}

/// Starts the inference threads: returns the shared queue and each thread's
/// private warm-up line.
pub(super) fn spawn(config: BatchingConfig) -> std::io::Result<(Queue, Vec<Line>)> {
    // Unbounded underneath: `Queue::reserve` enforces the bound.
    let (line, receiver) = channel::unbounded::<Request>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        line,
        waiting: waiting.clone(),
        capacity: config.queue.max(1),
    };
    let inbox = Inbox {
        line: receiver,
        waiting,
    };
    let mut warm_ups = Vec::new();
    for i in 0..config.threads.max(1) {
        let (warm_up, own) = channel::bounded::<Request>(4);
        let (inbox, config) = (inbox.clone(), config.clone());
        std::thread::Builder::new()
            .name(format!("inference-{i}"))
            .spawn(move || {
                lower_priority();
                // libtorch's intra-op thread count is per OS thread: the
                // cores are shared out once. Changing it per batch (every
                // core for a pass that runs alone) gave each inference thread
                // its own OpenMP team, whose idle threads spin while another
                // team works: one client's latency went from 15 to 43 ms.
                if config.torch_threads > 0 {
                    let share = config.torch_threads / config.threads.max(1);
                    tch::set_num_threads(share.max(1) as i32);
                }
                let mut cache =
                    ModelCache::new(config.cache_capacity, config.cache_bytes, config.device);
                while let Some(batch) = next_batch(&inbox, &own, &config) {
                    run(&mut cache, batch);
                }
            })?;
        warm_ups.push(warm_up);
    }
    Ok((queue, warm_ups))
}

/// Queues a request, refusing it at once when the line is full.
pub(super) fn send(line: &Line, request: Request) -> Result<(), ServeError> {
    line.try_send(request).map_err(|err| match err {
        channel::TrySendError::Full(_) => ServeError::Overloaded,
        channel::TrySendError::Disconnected(_) => ServeError::Stopped,
    })
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

/// The next batch for this thread: a warm-up of its own, or requests from
/// the shared queue. `None` when every handle is gone.
fn next_batch(
    inbox: &Inbox,
    own: &channel::Receiver<Request>,
    config: &BatchingConfig,
) -> Option<Vec<Request>> {
    channel::select! {
        recv(own) -> warm_up => warm_up.ok().map(|r| vec![r]),
        recv(inbox.line) -> first => gather(inbox.taken(first.ok()?), inbox, config),
    }
}

/// Gathers what arrives within the window after `first`, up to the maximum
/// batch.
fn gather(first: Request, inbox: &Inbox, config: &BatchingConfig) -> Option<Vec<Request>> {
    let deadline = Instant::now() + config.window;
    let mut images = first.images.len();
    let mut batch = vec![first];
    while images < config.max_batch {
        match inbox.line.recv_deadline(deadline) {
            Ok(request) => {
                let request = inbox.taken(request);
                images += request.images.len();
                batch.push(request);
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Runs a gathered batch: one forward pass per model, then each request
/// gets its own rows.
fn run(cache: &mut ModelCache, batch: Vec<Request>) {
    // A caller that gave up (its request timed out or failed elsewhere)
    // needs no forward pass.
    let mut pending: Vec<Request> = batch.into_iter().filter(|r| !r.reply.is_closed()).collect();
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
        let result = cache
            .get(&group[0].model)
            .and_then(|model| model.top_k(&images, max_k));
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
                        ServeError::Inference(reason) => ServeError::Inference(reason.clone()),
                        other => ServeError::Inference(other.to_string()),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::Normalization;

    fn item() -> Request {
        Request {
            model: ModelSpec {
                id: uuid::Uuid::nil(),
                checkpoint: "unused".into(),
                backbone: "mobilenet_v2".into(),
                labels: vec![],
                image_size: 32,
                stored_size: 32,
                normalization: Normalization::IMAGENET,
                script: None,
            },
            images: vec![],
            top_k: 1,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn room_held_and_not_used_is_given_back() {
        let (line, receiver) = channel::unbounded();
        let waiting = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            line,
            waiting: waiting.clone(),
            capacity: 4,
        };
        let inbox = Inbox {
            line: receiver,
            waiting: waiting.clone(),
        };

        // Three images admitted; one decodes and is queued, two fail.
        let mut room = queue.reserve(3).unwrap();
        assert!(matches!(queue.reserve(2), Err(ServeError::Overloaded)));
        room.send(item()).unwrap();
        drop(room);
        assert_eq!(waiting.load(Ordering::SeqCst), 1, "the queued item waits");
        inbox.taken(inbox.line.recv().unwrap());
        assert_eq!(waiting.load(Ordering::SeqCst), 0);

        // The whole queue is free again; a request larger than it is still
        // admitted when nothing waits, and then nothing else is.
        let all = queue.reserve(4).unwrap();
        drop(all);
        let oversized = queue.reserve(9).unwrap();
        assert!(matches!(queue.reserve(1), Err(ServeError::Overloaded)));
        drop(oversized);
        assert_eq!(waiting.load(Ordering::SeqCst), 0);
    }
}
