//! Wake-ups for idle workers: `LISTEN` on [`JOBS_CHANNEL`], which queuing a
//! job (or putting one back) `NOTIFY`s.

use sqlx::postgres::PgListener;
use sqlx::PgPool;

use super::JOBS_CHANNEL;

/// A connection listening for queued jobs.
pub struct JobWakeups(PgListener);

impl JobWakeups {
    pub async fn listen(pool: &PgPool) -> sqlx::Result<Self> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(JOBS_CHANNEL).await?;
        Ok(Self(listener))
    }

    /// Resolves on the next notification. An error means the connection
    /// dropped; the next call reconnects.
    pub async fn recv(&mut self) -> sqlx::Result<()> {
        self.0.recv().await.map(drop)
    }
}
