//! Prometheus metrics: one recorder per process and the metric names in one
//! place. (The HTTP middleware counting requests is `api::telemetry`.)

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "finetuned_http_requests_total";
pub const HTTP_SECONDS: &str = "finetuned_http_request_duration_seconds";
/// Rendered by the `/metrics` handler from Postgres, not recorded here.
pub const JOBS: &str = "finetuned_jobs";
pub const JOBS_STARTED: &str = "finetuned_jobs_started_total";
pub const JOBS_ENDED: &str = "finetuned_jobs_ended_total";
pub const TRAIN_IMAGES_PER_SECOND: &str = "finetuned_training_images_per_second";
pub const EPOCH_SECONDS: &str = "finetuned_training_epoch_seconds";
pub const WORKER_HEARTBEATS: &str = "finetuned_worker_heartbeats_total";
pub const WORKERS_SEEN: &str = "finetuned_workers_seen";
pub const PREDICT_BATCH_SIZE: &str = "finetuned_predict_batch_size";
pub const PREDICT_SECONDS: &str = "finetuned_predict_duration_seconds";
pub const PREDICT_IMAGES: &str = "finetuned_predict_images_total";
pub const MODEL_CACHE: &str = "finetuned_model_cache_total";

/// Latency buckets (seconds) for requests, predictions and epochs.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The process's recorder, installed on first use. Histograms keep raw
/// samples until drained, so a task drains them even when nobody scrapes.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(PREDICT_BATCH_SIZE.into()),
                    BATCH_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("the only metrics recorder of the process");
        describe();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let upkeep = handle.clone();
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
        }
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by method, route and status");
    describe_histogram!(HTTP_SECONDS, Unit::Seconds, "HTTP request latency by route");
    describe_counter!(
        JOBS_STARTED,
        "Job attempts started by this process's workers"
    );
    describe_counter!(
        JOBS_ENDED,
        "Job attempts ended by this process's workers, by outcome"
    );
    describe_gauge!(
        TRAIN_IMAGES_PER_SECOND,
        "Training throughput of each worker's last epoch"
    );
    describe_histogram!(EPOCH_SECONDS, Unit::Seconds, "Seconds per training epoch");
    describe_counter!(WORKER_HEARTBEATS, "Lease heartbeats sent by each worker");
    describe_histogram!(PREDICT_BATCH_SIZE, "Images per inference forward pass");
    describe_histogram!(
        PREDICT_SECONDS,
        Unit::Seconds,
        "Seconds per /predict request, decode to reply"
    );
    describe_counter!(PREDICT_IMAGES, "Images predicted");
    describe_counter!(MODEL_CACHE, "Inference model lookups: hit or load");
}
