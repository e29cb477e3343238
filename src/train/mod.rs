//! Training: job configuration, the loop, its metrics, and the workers that
//! take jobs from the queue.

mod attempt;
pub mod augment;
pub mod backbone;
pub mod config;
mod evaluate;
mod feature_cache;
mod layout;
mod lease;
pub mod metrics;
pub mod precision;
mod record;
mod session;
mod threads;
pub mod trainer;
pub mod worker;

pub use config::{JobConfig, JobRequest};
pub use worker::{Outcome, Worker};
