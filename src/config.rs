//! Every setting of the service, from flags with environment fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Settings shared by `serve` and `worker`.
#[derive(Args, Clone)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "FINETUNED_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory for the embedded Postgres cluster, artifacts and weights.
    #[arg(long, env = "FINETUNED_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Postgres server to use. Without it, a private cluster is started
    /// under `<data-dir>/postgres` from the machine's Postgres binaries.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Directory holding pretrained backbone weights (`<backbone>.safetensors`).
    /// Defaults to `<data-dir>/weights`.
    #[arg(long, env = "FINETUNED_WEIGHTS_DIR")]
    pub weights_dir: Option<PathBuf>,

    /// Object store shared by every host (`s3://bucket/prefix`, or
    /// `file:///mnt/shared` for a shared mount); `<data-dir>/artifacts` then
    /// caches it. S3 settings come from `AWS_*` variables (`AWS_ENDPOINT`
    /// for MinIO). Unset: `<data-dir>/artifacts` is the store.
    #[arg(long, env = "FINETUNED_ARTIFACT_URL")]
    pub artifact_url: Option<String>,

    /// Directory of the Postgres server binaries (initdb, pg_ctl) for the
    /// embedded cluster. Found on PATH or under /usr/lib/postgresql when unset.
    #[arg(long, env = "FINETUNED_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// Training workers run by this process (0: API only).
    #[arg(long, env = "FINETUNED_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Device for training and inference: `auto` (CUDA when present), `cpu`, or `cuda:N`.
    #[arg(long, env = "FINETUNED_DEVICE", default_value = "auto")]
    pub device: String,

    /// libtorch intra-op threads. 0 shares the cores among the workers
    /// (cores / workers, at least 1); `cargo bench --bench torch_threads`
    /// measures the choice on a given machine.
    #[arg(long, env = "FINETUNED_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,

    /// Largest accepted dataset upload, in bytes.
    #[arg(long, env = "FINETUNED_MAX_UPLOAD_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub max_upload_bytes: usize,

    /// Largest accepted `/predict` request, in bytes.
    #[arg(long, env = "FINETUNED_MAX_PREDICT_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_predict_bytes: usize,

    /// How long the first `/predict` request of a batch waits for others to
    /// join its forward pass, in milliseconds.
    #[arg(long, env = "FINETUNED_BATCH_WINDOW_MS", default_value_t = 2)]
    pub batch_window_ms: u64,

    /// Most images in one inference forward pass. 0: 1 on the CPU (measured:
    /// batching only adds waiting there) and 16 on a GPU.
    #[arg(long, env = "FINETUNED_MAX_BATCH", default_value_t = 0)]
    pub max_batch: usize,

    /// Inference threads for `/predict`, sharing one queue, each with its
    /// own copy of the models in use. A forward pass running alone uses every
    /// core; concurrent ones split the cores. 0: one per core on the CPU
    /// (measured: more throughput than one thread using every core), one on
    /// a GPU.
    #[arg(long, env = "FINETUNED_INFERENCE_THREADS", default_value_t = 0)]
    pub inference_threads: usize,

    /// Models kept loaded for `/predict`, at most (least recently used out).
    #[arg(long, env = "FINETUNED_MODEL_CACHE_MODELS", default_value_t = 4)]
    pub model_cache_models: usize,

    /// Memory for loaded models' weights, in MiB (least recently used out).
    #[arg(long, env = "FINETUNED_MODEL_CACHE_MIB", default_value_t = 1024)]
    pub model_cache_mib: usize,

    /// `/predict` requests that may wait for the model; more get 503 + Retry-After.
    #[arg(long, env = "FINETUNED_PREDICT_QUEUE", default_value_t = 64)]
    pub predict_queue: usize,

    /// Longest a `/predict` request may take, in seconds (503 after).
    #[arg(long, env = "FINETUNED_PREDICT_TIMEOUT_SECS", default_value_t = 30)]
    pub predict_timeout_secs: u64,

    /// Images `/predict` decodes at once. 0: the cores libtorch's threads
    /// leave free, at least 1.
    #[arg(long, env = "FINETUNED_DECODE_THREADS", default_value_t = 0)]
    pub decode_threads: usize,

    /// Serve without API keys on a non-loopback address. Without keys and
    /// without this flag, `serve` only binds loopback addresses.
    #[arg(long, env = "FINETUNED_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Longest a JSON request may take, in seconds (503 after).
    #[arg(long, env = "FINETUNED_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Longest a dataset upload and its ingest may take, in seconds.
    #[arg(long, env = "FINETUNED_UPLOAD_TIMEOUT_SECS", default_value_t = 3600)]
    pub upload_timeout_secs: u64,

    /// Requests handled at once; more get 503 + Retry-After at once.
    #[arg(long, env = "FINETUNED_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Dataset uploads ingested at once (each decodes on every core).
    #[arg(long, env = "FINETUNED_MAX_CONCURRENT_UPLOADS", default_value_t = 2)]
    pub max_concurrent_uploads: usize,

    /// Origins allowed to call the API from a browser, comma-separated, or
    /// `*`. Empty (the default): no CORS headers, browsers refuse.
    #[arg(long, env = "FINETUNED_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Seconds a worker's claim on a job lasts without a heartbeat; a job
    /// whose worker vanished is resumed elsewhere after it.
    #[arg(long, env = "FINETUNED_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "FINETUNED_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "FINETUNED_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Config {
    pub fn batching(&self, device: tch::Device) -> crate::serve::BatchingConfig {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match (self.inference_threads, device) {
            (0, tch::Device::Cpu) => cores,
            (0, _) => 1,
            (n, _) => n,
        };
        crate::serve::BatchingConfig {
            device,
            threads,
            torch_threads: match device {
                tch::Device::Cpu => cores,
                _ => 0,
            },
            cache_capacity: self.model_cache_models.max(1),
            cache_bytes: self.model_cache_mib.saturating_mul(1024 * 1024),
            window: std::time::Duration::from_millis(self.batch_window_ms),
            max_batch: match (self.max_batch, device) {
                (0, tch::Device::Cpu) => 1,
                (0, _) => 16,
                (n, _) => n,
            },
            queue: self.predict_queue.max(1),
        }
    }

    pub fn http_limits(&self) -> crate::api::HttpLimits {
        crate::api::HttpLimits {
            max_upload_bytes: self.max_upload_bytes,
            max_predict_bytes: self.max_predict_bytes,
            request_timeout: std::time::Duration::from_secs(self.request_timeout_secs),
            upload_timeout: std::time::Duration::from_secs(self.upload_timeout_secs),
            max_concurrent_requests: self.max_concurrent_requests.max(1),
            max_concurrent_uploads: self.max_concurrent_uploads.max(1),
            cors_origins: self.cors_origins.clone(),
        }
    }

    pub fn weights_dir(&self) -> PathBuf {
        self.weights_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("weights"))
    }

    pub fn decode_threads(&self) -> usize {
        if self.decode_threads > 0 {
            return self.decode_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(self.torch_threads()).max(1)
    }

    pub fn torch_threads(&self) -> usize {
        if self.torch_threads > 0 {
            return self.torch_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.workers.max(1)).max(1)
    }
}

/// The database URL carries a password; never print it.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("weights_dir", &self.weights_dir())
            .field("artifact_url", &self.artifact_url)
            .field("workers", &self.workers)
            .field("device", &self.device)
            .field("torch_threads", &self.torch_threads())
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("max_predict_bytes", &self.max_predict_bytes)
            .field("batch_window_ms", &self.batch_window_ms)
            .field("max_batch", &self.max_batch)
            .field("predict_queue", &self.predict_queue)
            .field("inference_threads", &self.inference_threads)
            .field("model_cache_models", &self.model_cache_models)
            .field("model_cache_mib", &self.model_cache_mib)
            .field("predict_timeout_secs", &self.predict_timeout_secs)
            .field("decode_threads", &self.decode_threads())
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("upload_timeout_secs", &self.upload_timeout_secs)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("max_concurrent_uploads", &self.max_concurrent_uploads)
            .field("cors_origins", &self.cors_origins)
            .field("lease_secs", &self.lease_secs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .finish()
    }
}
