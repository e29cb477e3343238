//! API keys: bearer tokens `ft_<prefix>_<secret>` with a scope.
//!
//! Postgres keeps the prefix and a SHA-256 of the secret; the token itself is
//! printed once by `finetuned keys create`. Auth is on once any key has been
//! created; before that the API is open (and `serve` refuses non-loopback
//! addresses unless told otherwise).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::keys::{self, KeyRow};

/// How long a looked-up key (or "no keys exist") is trusted before Postgres
/// is asked again: a revocation takes effect within this time.
const CACHE_TTL: Duration = Duration::from_secs(2);
const TOKEN_PREFIX: &str = "ft_";
/// Hex digits of a key's prefix (`keys create` makes 6 random bytes).
const PREFIX_LEN: usize = 12;
/// Prefixes (known or not) remembered at once: unauthenticated traffic with
/// made-up prefixes costs bounded memory.
const CACHE_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: datasets, jobs, models, deployment, prediction.
    Admin,
    /// `/predict` and read-only model and backbone information.
    Predict,
}

impl Scope {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(Self::Admin),
            "predict" => Some(Self::Predict),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Predict => "predict",
        }
    }

    fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }
}

/// The scope a request needs, or `None` for the open operational routes.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (_, ["healthz" | "readyz" | "metrics" | "openapi.yaml"]) => None,
        (&Method::POST, ["predict"]) => Some(Scope::Predict),
        (&Method::GET | &Method::HEAD, ["models" | "backbones"] | ["models" | "backbones", _]) => {
            Some(Scope::Predict)
        }
        _ => Some(Scope::Admin),
    }
}

/// A key as created: the row, and the token shown to the user once.
pub struct NewKey {
    pub row: KeyRow,
    pub token: String,
}

pub async fn create_key(pool: &PgPool, name: &str, scope: Scope) -> sqlx::Result<NewKey> {
    let mut rng = rand::thread_rng();
    let mut prefix = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut prefix);
    rng.fill_bytes(&mut secret);
    let prefix: String = prefix.iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let row = keys::insert(pool, name, scope.as_str(), &prefix, &hash(&secret)).await?;
    Ok(NewKey {
        token: format!("{TOKEN_PREFIX}{prefix}_{secret}"),
        row,
    })
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Splits `ft_<prefix>_<secret>`; `None` for anything not shaped like a
/// token we issue (never looked up, never cached).
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (prefix, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let well_formed = prefix.len() == PREFIX_LEN
        && prefix.bytes().all(|b| b.is_ascii_hexdigit())
        && !secret.is_empty();
    well_formed.then_some((prefix, secret))
}

#[derive(Clone)]
struct CachedKey {
    id: Uuid,
    scope: Scope,
    secret_hash: Vec<u8>,
}

#[derive(Default)]
struct Cache {
    enabled: Option<(bool, Instant)>,
    keys: HashMap<String, (Option<CachedKey>, Instant)>,
}

impl Cache {
    /// Caches a lookup; when full, expired entries go first, then all of
    /// them (a flood of made-up prefixes must not grow the map).
    fn remember(&mut self, prefix: &str, key: Option<CachedKey>) {
        if self.keys.len() >= CACHE_ENTRIES {
            self.keys.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if self.keys.len() >= CACHE_ENTRIES {
                self.keys.clear();
            }
        }
        self.keys.insert(prefix.to_string(), (key, Instant::now()));
    }
}

/// Checks bearer tokens against Postgres, with a short-lived cache so the
/// prediction path does not query per request.
#[derive(Clone)]
pub struct Auth {
    pool: PgPool,
    cache: Arc<Mutex<Cache>>,
}

impl Auth {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            cache: Arc::default(),
        }
    }

    /// The cache; a panic elsewhere while it was held leaves nothing half
    /// written (each update is one assignment), so a poisoned lock is used.
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether requests must carry a key: once any key was created.
    pub async fn enabled(&self) -> sqlx::Result<bool> {
        if let Some((enabled, at)) = self.cache().enabled {
            if enabled || at.elapsed() < CACHE_TTL {
                return Ok(enabled);
            }
        }
        let enabled = keys::any(&self.pool).await?;
        self.cache().enabled = Some((enabled, Instant::now()));
        Ok(enabled)
    }

    /// The scope of a valid, unrevoked token.
    pub async fn authenticate(&self, token: &str) -> Result<Scope, ApiError> {
        let unknown = || ApiError::Unauthorized("unknown or revoked API key".into());
        let (prefix, secret) = split_token(token).ok_or_else(unknown)?;
        let key = match self.cached(prefix) {
            Some(key) => key,
            None => {
                let row = keys::active_by_prefix(&self.pool, prefix).await?;
                let key = row.and_then(|row| {
                    Some(CachedKey {
                        id: row.id,
                        scope: Scope::parse(&row.scope)?,
                        secret_hash: row.secret_hash,
                    })
                });
                if let Some(key) = &key {
                    // Recorded on a cache miss only: at most every CACHE_TTL.
                    let (pool, id) = (self.pool.clone(), key.id);
                    tokio::spawn(async move { keys::touch(&pool, id).await });
                }
                self.cache().remember(prefix, key.clone());
                key
            }
        };
        let key = key.ok_or_else(unknown)?;
        if bool::from(hash(secret).ct_eq(&key.secret_hash)) {
            Ok(key.scope)
        } else {
            Err(unknown())
        }
    }

    /// A fresh cache entry for the prefix: `Some(None)` is a known miss.
    fn cached(&self, prefix: &str) -> Option<Option<CachedKey>> {
        let cache = self.cache();
        let (key, at) = cache.keys.get(prefix)?;
        (at.elapsed() < CACHE_TTL).then(|| key.clone())
    }
}

/// Middleware: lets a request through when its route is open, auth is off,
/// or its bearer token's scope covers the route.
pub async fn require_key(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let Some(needed) = required_scope(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    // Owned copies: the request body is not `Sync`, so no borrow of the
    // request may live across an await.
    let route = format!("{} {}", request.method(), request.uri().path());
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("").to_string());
    match check(&auth, needed, &route, header).await {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

async fn check(
    auth: &Auth,
    needed: Scope,
    route: &str,
    header: Option<String>,
) -> Result<(), ApiError> {
    if !auth.enabled().await? {
        return Ok(());
    }
    let header = header.ok_or_else(|| {
        ApiError::Unauthorized(
            "this route needs an API key: send `Authorization: Bearer <key>`".into(),
        )
    })?;
    let token = header.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into())
    })?;
    let scope = auth.authenticate(token.trim()).await?;
    if scope.allows(needed) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "a `{}` key cannot {route}; it needs an `{}` key",
            scope.as_str(),
            needed.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_by_route() {
        let admin = Some(Scope::Admin);
        let predict = Some(Scope::Predict);
        assert_eq!(required_scope(&Method::GET, "/healthz"), None);
        assert_eq!(required_scope(&Method::GET, "/metrics"), None);
        assert_eq!(required_scope(&Method::POST, "/predict"), predict);
        assert_eq!(required_scope(&Method::GET, "/models"), predict);
        assert_eq!(required_scope(&Method::GET, "/models/abc"), predict);
        assert_eq!(required_scope(&Method::GET, "/models/abc/export"), admin);
        assert_eq!(required_scope(&Method::POST, "/models/abc/deploy"), admin);
        assert_eq!(required_scope(&Method::POST, "/datasets"), admin);
        assert_eq!(required_scope(&Method::GET, "/jobs"), admin);
        assert_eq!(required_scope(&Method::GET, "/nowhere"), admin);
    }

    #[test]
    fn tokens_split_into_prefix_and_secret() {
        assert_eq!(
            split_token("ft_0a1b2c3d4e5f_se_cret"),
            Some(("0a1b2c3d4e5f", "se_cret"))
        );
        assert_eq!(split_token("0a1b2c3d4e5f_secret"), None);
        assert_eq!(split_token("ft_0a1b_secret"), None);
        assert_eq!(split_token("ft_0a1b2c3d4e5z_secret"), None);
        assert_eq!(split_token("ft_0a1b2c3d4e5f_"), None);
        assert!(Scope::Admin.allows(Scope::Predict));
        assert!(!Scope::Predict.allows(Scope::Admin));
    }

    #[test]
    fn the_key_cache_stays_bounded_under_made_up_prefixes() {
        let mut cache = Cache::default();
        for i in 0..20_000 {
            cache.remember(&format!("{i:012x}"), None);
            assert!(cache.keys.len() <= CACHE_ENTRIES);
        }
    }
}
