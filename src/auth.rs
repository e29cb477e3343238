//! API keys: bearer tokens `ft_<prefix>_<secret>` with a scope.
//!
//! Postgres keeps the prefix and a SHA-256 of the secret; the token itself is
//! printed once by `finetuned keys create`. Auth is on once any key has been
//! created; before that the API is open (and `serve` refuses non-loopback
//! addresses unless told otherwise). Which route needs which scope, and the
//! middleware asking, are the API's (`api::auth`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::store::keys::{self, KeyRow};
use crate::store::{self, Pool};

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

    /// Whether a key of this scope may do what needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not shaped like a token we issue, unknown, revoked, or a wrong secret.
    #[error("unknown or revoked API key")]
    UnknownKey,
    /// The keys could not be read.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// A key as created: the row, and the token shown to the user once.
pub struct NewKey {
    pub row: KeyRow,
    pub token: String,
}

pub async fn create_key(pool: &Pool, name: &str, scope: Scope) -> store::Result<NewKey> {
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
    pool: Pool,
    cache: Arc<Mutex<Cache>>,
}

impl Auth {
    pub fn new(pool: Pool) -> Self {
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
    pub async fn enabled(&self) -> store::Result<bool> {
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
    pub async fn authenticate(&self, token: &str) -> Result<Scope, AuthError> {
        let (prefix, secret) = split_token(token).ok_or(AuthError::UnknownKey)?;
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
        let key = key.ok_or(AuthError::UnknownKey)?;
        if bool::from(hash(secret).ct_eq(&key.secret_hash)) {
            Ok(key.scope)
        } else {
            Err(AuthError::UnknownKey)
        }
    }

    /// A fresh cache entry for the prefix: `Some(None)` is a known miss.
    fn cached(&self, prefix: &str) -> Option<Option<CachedKey>> {
        let cache = self.cache();
        let (key, at) = cache.keys.get(prefix)?;
        (at.elapsed() < CACHE_TTL).then(|| key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
