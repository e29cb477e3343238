//! Postgres through sqlx: connection, migrations, one module per table group.
//!
//! The only layer that speaks SQL or names sqlx: the others hold a [`Pool`],
//! call these functions and get plain rows, [`status`] enums and [`Error`].
//! Queries are checked at run time (`query_as`), so building the crate needs
//! no database; the integration tests run every one of them.

pub mod backbones;
pub mod datasets;
pub mod embedded;
pub mod job_changes;
pub mod jobs;
pub mod keys;
pub mod leases;
pub mod metrics;
pub mod models;
pub mod runs;
pub mod stats;
pub mod status;
pub mod wakeups;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use embedded::EmbeddedPostgres;
pub use status::{DatasetStatus, JobStatus, RunOutcome};

/// A pool of Postgres connections; cheap to clone.
pub type Pool = PgPool;
/// What a database call can fail with (logged, never shown to clients).
pub type Error = sqlx::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The channel `LISTEN`ed to by idle workers; a new job `NOTIFY`s it.
pub const JOBS_CHANNEL: &str = "finetuned_jobs";

/// Connects a pool and applies the migrations in `migrations/`.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The migrations in `migrations/`, built into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Whether an error means Postgres was unreachable (restart, failover,
/// network) rather than that the statement was wrong: worth retrying.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exceptions; 57P0x: admin/crash shutdown, cannot connect now.
            code.starts_with("08") || code.starts_with("57P")
        }),
        _ => false,
    }
}

/// Errors that may say Postgres was unreachable.
pub trait MaybeTransient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl MaybeTransient for sqlx::Error {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }
}

impl MaybeTransient for anyhow::Error {
    fn is_transient(&self) -> bool {
        self.downcast_ref::<sqlx::Error>().is_some_and(is_transient)
    }
}

/// Runs database work again while Postgres is unreachable, for up to
/// `patience` (a restart or failover), so that workers keep their jobs
/// through it.
pub async fn retry<T, E, F, Fut>(patience: Duration, mut attempt: F) -> Result<T, E>
where
    E: MaybeTransient,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match attempt().await {
            Err(err) if err.is_transient() && started.elapsed() < patience => {
                tracing::warn!(error = %err, "Postgres unreachable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The built-in migrations the database has not applied (`version_name`),
/// in order: empty once it is up to date.
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<String>> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{}_{}", m.version, m.description))
        .collect())
}
