//! Postgres through sqlx: connection, migrations, one module per table group.
//!
//! Queries are checked at run time (`query_as`), so building the crate needs
//! no database; the integration tests run every one of them.

pub mod datasets;
pub mod embedded;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod models;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use embedded::EmbeddedPostgres;

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

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
