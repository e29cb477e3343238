//! The `api_keys` table. Rows hold a key's public prefix and the SHA-256 of
//! its secret; [`crate::auth`] makes and checks the tokens.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct KeyRow {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub prefix: String,
    #[serde(skip)]
    pub secret_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, scope, prefix, secret_hash, created_at, last_used_at, revoked_at";

pub async fn insert(
    pool: &PgPool,
    name: &str,
    scope: &str,
    prefix: &str,
    secret_hash: &[u8],
) -> sqlx::Result<KeyRow> {
    sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, name, scope, prefix, secret_hash)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(name)
    .bind(scope)
    .bind(prefix)
    .bind(secret_hash)
    .fetch_one(pool)
    .await
}

pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<KeyRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys ORDER BY created_at"
    ))
    .fetch_all(pool)
    .await
}

/// The unrevoked key with this prefix.
pub async fn active_by_prefix(pool: &PgPool, prefix: &str) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL"
    ))
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

/// Whether any key was ever created. Revoking every key does not reopen
/// the API.
pub async fn any(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
        .fetch_one(pool)
        .await
}

/// Revokes a key by id or prefix; false when none was active.
pub async fn revoke(pool: &PgPool, id_or_prefix: &str) -> sqlx::Result<bool> {
    let id = Uuid::parse_str(id_or_prefix).ok();
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now()
         WHERE (id = $1 OR prefix = $2) AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(id_or_prefix)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn touch(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}
