//! Holding a job's lease: heartbeats while the job is prepared and while it
//! trains, the judgement that the lease is lost (refused, or failing past
//! its length by the local clock), and the reaper that puts the jobs of lost
//! workers back in the queue.

use std::time::{Duration, Instant};

use super::worker::Worker;
use crate::store::leases::{self, Lease};
use crate::store::{self, Pool};
use crate::telemetry;

impl Worker {
    /// Runs `work` while renewing the lease: fetching a large dataset can
    /// outlast it. (A renewal refused here shows when the run starts.)
    pub(super) async fn renewing<T>(
        &self,
        lease: &Lease,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let mut heartbeat = tokio::time::interval(self.lease / 3);
        heartbeat.tick().await;
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = heartbeat.tick() => {
                    if let Err(err) = leases::heartbeat(&self.pool, lease, self.lease.as_secs_f64()).await {
                        tracing::warn!(error = %err, "heartbeat failed; retrying");
                    }
                }
            }
        }
    }

    /// Renews the lease while the job trains. `false` once it is lost:
    /// refused (expired, or taken over), or failing for as long as the
    /// lease lasts, when it may already be another worker's.
    pub(super) async fn renew(&self, heartbeat: &mut Heartbeat, lease: &Lease) -> bool {
        metrics::counter!(telemetry::WORKER_HEARTBEATS, "worker" => self.id.clone()).increment(1);
        let sent = Instant::now();
        // A cut network makes the database wait for a connection far longer
        // than the lease: the judgement cannot wait for it.
        let left = self.lease.saturating_sub(heartbeat.renewed_at.elapsed());
        let renewal = leases::heartbeat(&self.pool, lease, self.lease.as_secs_f64());
        let answer = match tokio::time::timeout(left.max(Duration::from_millis(100)), renewal).await
        {
            Ok(answer) => answer.map_err(|err| err.to_string()),
            Err(_) => Err("no answer from the database".to_string()),
        };
        match answer {
            Ok(true) => {
                heartbeat.renewed_at = sent;
                true
            }
            Ok(false) => false,
            Err(err) if heartbeat.renewed_at.elapsed() >= self.lease => {
                tracing::warn!(error = %err, "heartbeat failing past the lease: giving the job up");
                false
            }
            Err(err) => {
                tracing::warn!(error = %err, "heartbeat failed; retrying");
                true
            }
        }
    }
}

/// When the lease of a training job is renewed, and when it last was.
pub(super) struct Heartbeat {
    /// A third of the lease; the first beat is due at once.
    timer: tokio::time::Interval,
    /// When the last accepted renewal was sent (at first, the claim): the
    /// local bound on when the lease lapses.
    renewed_at: Instant,
}

impl Heartbeat {
    pub(super) fn new(lease: Duration, claimed_at: Instant) -> Self {
        Self {
            timer: tokio::time::interval(lease / 3),
            renewed_at: claimed_at,
        }
    }

    /// Waits until the next renewal is due.
    pub(super) async fn due(&mut self) {
        self.timer.tick().await;
    }
}

/// Puts expired leases back in the queue every `period`, for good.
pub(super) async fn reap_every(pool: Pool, period: Duration) {
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        if let Err(err) = reap(&pool).await {
            tracing::warn!(error = %err, "reaping expired leases failed");
        }
    }
}

/// Often enough that a job waits little longer than its lease once its
/// worker is lost.
pub(super) fn reap_period(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_secs(1))
}

pub(super) async fn reap(pool: &Pool) -> store::Result<()> {
    let reaped = leases::reap_expired(pool).await?;
    if reaped.requeued > 0 {
        tracing::warn!(
            count = reaped.requeued,
            "queued again jobs whose workers were lost (lease expired)"
        );
    }
    if reaped.failed > 0 {
        tracing::warn!(
            count = reaped.failed,
            "failed jobs whose workers were lost on their last attempt"
        );
    }
    Ok(())
}
