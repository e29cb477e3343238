//! Which jobs changed, from Postgres `NOTIFY`: one `LISTEN` connection per
//! process, however many job event streams wait on it.
//!
//! Migration 0008's trigger notifies [`JOB_EVENTS_CHANNEL`] with a job's id
//! whenever its status, attempt, epoch or progress changes, in whichever
//! process wrote it. A notification only says "look again": the state is
//! read from the table, so a lost one costs latency, not correctness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

/// The channel migration 0008's trigger notifies.
pub const JOB_EVENTS_CHANNEL: &str = "finetuned_job_events";

/// Pause before listening again after the connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// The process's job notifications. Cheap to clone; the `LISTEN`
/// connection is opened on the first [`JobChanges::watch`] and closed when
/// the last clone goes (or the pool closes).
#[derive(Clone)]
pub struct JobChanges {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    watched: Mutex<HashMap<Uuid, watch::Sender<()>>>,
    started: Once,
    /// Dropped with the last clone: stops the listening task.
    alive: watch::Sender<()>,
}

impl JobChanges {
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                watched: Mutex::new(HashMap::new()),
                started: Once::new(),
                alive: watch::channel(()).0,
            }),
        }
    }

    /// Wakes on every change of `job` from now on (several changes before
    /// the next wait wake it once).
    pub fn watch(&self, job: Uuid) -> JobWatch {
        self.inner.started.call_once(|| {
            let (inner, stop) = (Arc::downgrade(&self.inner), self.inner.alive.subscribe());
            tokio::spawn(listen(inner, self.inner.pool.clone(), stop));
        });
        let changes = self
            .inner
            .watched
            .lock()
            .expect("job watchers")
            .entry(job)
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        JobWatch {
            changes,
            job,
            inner: self.inner.clone(),
        }
    }
}

/// One job's wake-ups; see [`JobChanges::watch`].
pub struct JobWatch {
    changes: watch::Receiver<()>,
    job: Uuid,
    inner: Arc<Inner>,
}

impl JobWatch {
    /// Resolves once the job changed since the last call (or since the
    /// listener reconnected: notifications may have been lost meanwhile).
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // The sender lives while this watch does; never reached.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        let mut watched = self.inner.watched.lock().expect("job watchers");
        // Under the lock no watch is added meanwhile; 1 is this one.
        if watched
            .get(&self.job)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            watched.remove(&self.job);
        }
    }
}

impl Inner {
    fn wake(&self, job: Uuid) {
        if let Some(tx) = self.watched.lock().expect("job watchers").get(&job) {
            tx.send_replace(());
        }
    }

    fn wake_all(&self) {
        for tx in self.watched.lock().expect("job watchers").values() {
            tx.send_replace(());
        }
    }
}

/// Listens until every [`JobChanges`] clone is gone or the pool closes,
/// reconnecting after failures.
async fn listen(inner: Weak<Inner>, pool: PgPool, mut stop: watch::Receiver<()>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            ended = follow(&inner, &pool) => match ended {
                Ok(()) | Err(sqlx::Error::PoolClosed) => return,
                Err(err) => tracing::warn!(error = %err, "job notifications interrupted; event streams fall back to polling"),
            },
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

/// Forwards notifications to the watchers of their job. `Ok` once the last
/// [`JobChanges`] is gone.
async fn follow(inner: &Weak<Inner>, pool: &PgPool) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(JOB_EVENTS_CHANNEL).await?;
    loop {
        // Whatever changed before `LISTEN` took effect, or while the
        // connection was down, was not notified: every watcher looks again.
        let Some(hub) = inner.upgrade() else {
            return Ok(());
        };
        hub.wake_all();
        drop(hub);
        while let Some(notification) = listener.try_recv().await? {
            let Some(hub) = inner.upgrade() else {
                return Ok(());
            };
            if let Ok(job) = notification.payload().parse() {
                hub.wake(job);
            }
        }
    }
}
