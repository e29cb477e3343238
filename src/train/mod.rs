//! Training: job configuration, the loop, its metrics, and the workers that
//! take jobs from the queue.

pub mod augment;
pub mod backbone;
pub mod config;
pub mod metrics;
pub mod precision;
pub mod trainer;
pub mod worker;

pub use config::{JobConfig, JobRequest};
pub use worker::{Outcome, Worker};
