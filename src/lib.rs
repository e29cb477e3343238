//! finetuned: transfer learning for image classification over HTTP.
//!
//! # Layout
//!
//! - [`config`]: every setting, from flags and environment variables.
//! - [`auth`]: API keys: bearer tokens with a scope, made and checked.
//! - [`validation`]: [`validation::FieldError`], what any layer reports of a bad input.
//! - [`api`]: the axum router, one module per resource, and its middleware;
//!   never holds a tensor. The only module that knows HTTP.
//! - [`store`]: Postgres through sqlx (one module per table group), the job
//!   queue, and the embedded private cluster used when no `DATABASE_URL` is
//!   set. The only module that speaks SQL.
//! - [`artifacts`]: where uploaded archives, decoded datasets and checkpoints live.
//! - [`durable`]: files written whole or not at all, surviving power loss.
//! - [`data`]: archive ingest, validation, train/val split, and the one
//!   preprocessing path shared by training, evaluation and prediction.
//! - [`models`]: the backbone catalogue, backbone networks, classifier heads.
//! - [`device`]: `--device` names to libtorch devices and back.
//! - [`train`]: job configuration, the training loop, metrics, the worker pool.
//! - [`sandbox`]: the confined child process that first runs uploaded code.
//! - [`serve`]: the inference thread that loads checkpoints and predicts.
//! - [`telemetry`]: the Prometheus recorder and every metric's name.
//! - [`app`]: wiring: start the database, workers and HTTP server together.
//!
//! Dependencies point down: `api` → `store`, `train`, `serve`, `data` →
//! `models` → `data`; `data` and `models` know neither HTTP nor the
//! database (`tests/layering.rs` keeps it so).

pub mod api;
pub mod app;
pub mod artifacts;
pub mod auth;
pub mod config;
pub mod data;
pub mod device;
pub mod durable;
pub mod models;
pub mod native;
pub mod sandbox;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod train;
pub mod validation;

/// The per-user cache `scripts/setup` fills (torch, weights, sample
/// photos): `FINETUNED_CACHE`, else `$XDG_CACHE_HOME/finetuned`, else
/// `~/.cache/finetuned`, as `scripts/env.sh` decides it.
pub fn setup_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("FINETUNED_CACHE") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("finetuned")
}

/// The weights `scripts/setup` installed: `FINETUNED_WEIGHTS_DIR`, else the
/// setup cache's `weights/` (what the tools and benchmarks read).
pub fn setup_weights_dir() -> std::path::PathBuf {
    std::env::var_os("FINETUNED_WEIGHTS_DIR")
        .map(Into::into)
        .unwrap_or_else(|| setup_cache_dir().join("weights"))
}

/// The message of a caught panic (libtorch errors surface as panics in tch).
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown error".to_string())
}
