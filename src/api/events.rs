//! `GET /jobs/{id}/events`: a Server-Sent Events stream of a job's life.
//!
//! Events, in order: `status` (on every change, with attempt and error),
//! `progress` (within an epoch), `epoch` (the metrics of each finished
//! epoch, once). The stream ends after the job's final `status`. It follows
//! Postgres, so it works whichever process trains.
//!
//! Streams are capped ([`EventStreams::new`]'s `max_streams`; more get 503 +
//! Retry-After). All streams of one job share a feed, which reads the job
//! when the store's one `LISTEN` connection says it changed (or after
//! [`FALLBACK_POLL`] without news, for a lost notification): Postgres work follows the
//! jobs' changes, not the number of streams open.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use super::jobs::find;
use super::AppState;
use crate::api::error::ApiError;
use crate::store::job_changes::JobChanges;
use crate::store::jobs::{self, JobRow};
use crate::store::metrics::{self, EpochMetrics};
use crate::store::{self, JobStatus, Pool};

/// A job is read again at least this often, notifications aside.
pub const FALLBACK_POLL: Duration = Duration::from_secs(5);

/// Changes of one job closer together than this are read together.
const MIN_READ_GAP: Duration = Duration::from_millis(250);

/// The event streams of this process. Cheap to clone.
#[derive(Clone)]
pub struct EventStreams {
    inner: Arc<Streams>,
}

struct Streams {
    pool: Pool,
    changes: JobChanges,
    slots: Arc<Semaphore>,
    max: usize,
    fallback_poll: Duration,
    /// One feed per job with streams open.
    feeds: Mutex<HashMap<Uuid, Feed>>,
    closing: watch::Sender<bool>,
}

/// What a job's feed read last; `None` until its first read.
type Feed = watch::Sender<Option<Arc<Snapshot>>>;

enum Snapshot {
    Job {
        job: Box<JobRow>,
        /// Every finished epoch so far.
        epochs: Arc<Vec<EpochMetrics>>,
    },
    Gone,
    Failed(String),
}

impl EventStreams {
    /// At most `max_streams` streams open at once.
    pub fn new(pool: Pool, max_streams: usize) -> Self {
        Self::with_fallback_poll(pool, max_streams, FALLBACK_POLL)
    }

    /// Tests stretch the fallback to tell notified changes from polled ones.
    pub fn with_fallback_poll(pool: Pool, max_streams: usize, fallback_poll: Duration) -> Self {
        Self {
            inner: Arc::new(Streams {
                changes: JobChanges::new(pool.clone()),
                pool,
                slots: Arc::new(Semaphore::new(max_streams)),
                max: max_streams,
                fallback_poll,
                feeds: Mutex::new(HashMap::new()),
                closing: watch::channel(false).0,
            }),
        }
    }

    /// Ends every stream and refuses new ones (at shutdown: the drain then
    /// does not wait for their clients to leave).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if *self.inner.closing.borrow() {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        self.inner.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::Overloaded(format!(
                "{} event streams are open, the most this server allows; retry shortly",
                self.inner.max
            ))
        })
    }

    /// The job's feed, started if no stream follows the job yet.
    fn subscribe(&self, job: Uuid) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut feeds = self.inner.feeds.lock().expect("event feeds");
        let mut feed = match feeds.get(&job) {
            Some(feed) => feed.subscribe(),
            None => {
                let (tx, rx) = watch::channel(None);
                feeds.insert(job, tx.clone());
                tokio::spawn(run_feed(self.inner.clone(), job, tx));
                rx
            }
        };
        // The current snapshot is news to a new stream.
        feed.mark_changed();
        feed
    }
}

pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Before any database work: refusing must stay cheap.
    let slot = state.events.slot()?;
    let job = find(&state, &id).await?;
    let watcher = Watcher {
        feed: state.events.subscribe(job.id),
        _slot: slot,
        status: None,
        attempts: 0,
        epoch: 0,
        progress: None,
        pending: VecDeque::new(),
        finished: false,
    };
    let stream = stream::unfold(watcher, |mut w| async move {
        loop {
            if let Some(event) = w.pending.pop_front() {
                return Some((Ok(event), w));
            }
            // A feed ends after its job's last snapshot, or at shutdown.
            if w.finished || w.feed.changed().await.is_err() {
                return None;
            }
            let snapshot = w.feed.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                w.apply(&snapshot);
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Reads the job on every notification (or fallback tick) until it ends,
/// its last stream leaves, or the server shuts down.
async fn run_feed(streams: Arc<Streams>, job_id: Uuid, tx: Feed) {
    let mut changes = streams.changes.watch(job_id);
    let mut closing = streams.closing.subscribe();
    let mut epochs = Arc::default();
    loop {
        let read_at = Instant::now();
        let snapshot = read(&streams.pool, job_id, &mut epochs).await;
        let last = !matches!(&snapshot, Snapshot::Job { job, .. }
            if !job.status.is_terminal());
        tx.send_replace(Some(Arc::new(snapshot)));
        if last {
            break;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(streams.fallback_poll) => {}
            _ = closing.wait_for(|closing| *closing) => break,
            _ = tx.closed() => {
                if streams.retire(job_id, &tx, true) {
                    return;
                }
            }
        }
        tokio::time::sleep_until(read_at + MIN_READ_GAP).await;
    }
    streams.retire(job_id, &tx, false);
}

impl Streams {
    /// Forgets the job's feed (only when no stream is left, if
    /// `when_unused`); `false` if a stream still follows it.
    fn retire(&self, job: Uuid, tx: &Feed, when_unused: bool) -> bool {
        // Under the lock no stream subscribes meanwhile.
        let mut feeds = self.feeds.lock().expect("event feeds");
        if when_unused && tx.receiver_count() > 0 {
            return false;
        }
        if feeds.get(&job).is_some_and(|feed| feed.same_channel(tx)) {
            feeds.remove(&job);
        }
        true
    }
}

/// The job and the epochs finished since the last read, added to `epochs`.
async fn read(pool: &Pool, job_id: Uuid, epochs: &mut Arc<Vec<EpochMetrics>>) -> Snapshot {
    // The job first: once it is final, every epoch it had is recorded.
    let job = match jobs::get(pool, job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return Snapshot::Gone,
        Err(err) => return failed(err),
    };
    let after = epochs.last().map_or(0, |m| m.epoch);
    match metrics::for_job(pool, job_id, after).await {
        Ok(new) if new.is_empty() => {}
        Ok(new) => Arc::make_mut(epochs).extend(new),
        Err(err) => return failed(err),
    }
    Snapshot::Job {
        job: Box::new(job),
        epochs: epochs.clone(),
    }
}

fn failed(err: store::Error) -> Snapshot {
    tracing::warn!(error = %err, "job events: reading the job failed");
    Snapshot::Failed("reading the job failed; the server log has the details".into())
}

/// One client's stream: what it has been sent so far.
struct Watcher {
    feed: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Held while the stream is open.
    _slot: OwnedSemaphorePermit,
    status: Option<JobStatus>,
    attempts: i32,
    /// Last epoch whose metrics were sent.
    epoch: i32,
    progress: Option<Value>,
    pending: VecDeque<Event>,
    finished: bool,
}

impl Watcher {
    fn apply(&mut self, snapshot: &Snapshot) {
        let (job, epochs) = match snapshot {
            Snapshot::Job { job, epochs } => (job, epochs),
            Snapshot::Gone => {
                self.finished = true;
                return;
            }
            Snapshot::Failed(err) => {
                self.pending
                    .push_back(Event::default().event("error").data(err));
                self.finished = true;
                return;
            }
        };
        let status_changed = self.status != Some(job.status) || self.attempts != job.attempts;
        let terminal = job.status.is_terminal();
        if status_changed && !terminal {
            self.push_status(job);
        }
        let sent = self.epoch;
        for m in epochs.iter().filter(|m| m.epoch > sent) {
            self.epoch = m.epoch;
            self.push(
                "epoch",
                &serde_json::to_value(m).expect("metrics serialize"),
            );
        }
        let progress = job.progress.as_ref().map(|p| p.0.clone());
        if let Some(p) = progress
            .as_ref()
            .filter(|p| self.progress.as_ref() != Some(*p))
        {
            self.push("progress", p);
        }
        self.progress = progress;
        if terminal {
            self.push_status(job);
            self.finished = true;
        }
    }

    fn push_status(&mut self, job: &JobRow) {
        self.status = Some(job.status);
        self.attempts = job.attempts;
        let data = json!({
            "status": job.status, "attempt": job.attempts, "epoch": job.epoch,
            "best_epoch": job.best_epoch, "error": job.error, "model_id": job.model_id,
        });
        self.push("status", &data);
    }

    fn push(&mut self, kind: &str, data: &Value) {
        self.pending
            .push_back(Event::default().event(kind).data(data.to_string()));
    }
}
