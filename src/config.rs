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
    #[arg(long, env = "FINETUNED_DEVICE", default_value = "auto", value_parser = device_arg)]
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

    /// Free disk space, in MiB, the data directory keeps: below it uploads
    /// and new jobs get 507, workers take no job, readiness says why.
    #[arg(long, env = "FINETUNED_MIN_FREE_DISK_MIB", default_value_t = 2048)]
    pub min_free_disk_mib: u64,

    /// Accept TorchScript backbones on `POST /backbones`. A module is code:
    /// each is checked (allowlisted tensor operations only, first run in a
    /// confined child process), then trained and served in-process.
    #[arg(long, env = "FINETUNED_ALLOW_SCRIPT_BACKBONES")]
    pub allow_script_backbones: bool,

    /// Memory an uploaded module's check may allocate, in MiB.
    #[arg(
        long,
        env = "FINETUNED_SCRIPT_CHECK_MEMORY_MIB",
        default_value_t = 4096
    )]
    pub script_check_memory_mib: u64,

    /// Seconds an uploaded module's check may run (wall clock and CPU).
    #[arg(
        long,
        env = "FINETUNED_SCRIPT_CHECK_TIMEOUT_SECS",
        default_value_t = 60
    )]
    pub script_check_timeout_secs: u64,

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

    /// Seconds a client has to send a request's head, from connecting or
    /// from the end of its previous response: it also closes idle
    /// keep-alive connections.
    #[arg(long, env = "FINETUNED_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// HTTP connections open at once; beyond it, new connections wait in
    /// the listen backlog until one closes.
    #[arg(long, env = "FINETUNED_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// `/jobs/{id}/events` streams open at once; more get 503 + Retry-After.
    /// Half the connection cap, so streams alone cannot fill it.
    #[arg(long, env = "FINETUNED_MAX_EVENT_STREAMS", default_value_t = 512)]
    pub max_event_streams: usize,

    /// Log format.
    #[arg(long, env = "FINETUNED_LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Refuses a `--device` that names no device at start, not at first use.
fn device_arg(value: &str) -> Result<String, String> {
    let value = value.trim().to_ascii_lowercase();
    let well_formed = matches!(value.as_str(), "auto" | "cpu" | "cuda")
        || value
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if well_formed {
        Ok(value)
    } else {
        Err(format!(
            "{value:?} is not a device; use auto, cpu, cuda or cuda:N"
        ))
    }
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

    /// How uploaded TorchScript backbones are checked, when they are allowed.
    pub fn script_check(&self) -> anyhow::Result<Option<crate::sandbox::ScriptCheck>> {
        if !self.allow_script_backbones {
            return Ok(None);
        }
        Ok(Some(crate::sandbox::ScriptCheck {
            program: std::env::current_exe()?,
            memory_bytes: self.script_check_memory_mib.saturating_mul(1024 * 1024),
            timeout: std::time::Duration::from_secs(self.script_check_timeout_secs.max(1)),
        }))
    }

    pub fn connection_limits(&self) -> crate::api::server::ConnectionLimits {
        crate::api::server::ConnectionLimits {
            header_read_timeout: std::time::Duration::from_secs(
                self.header_read_timeout_secs.max(1),
            ),
            max_connections: self.max_connections.max(1),
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
            .field("min_free_disk_mib", &self.min_free_disk_mib)
            .field("allow_script_backbones", &self.allow_script_backbones)
            .field("script_check_memory_mib", &self.script_check_memory_mib)
            .field("script_check_timeout_secs", &self.script_check_timeout_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("upload_timeout_secs", &self.upload_timeout_secs)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("max_concurrent_uploads", &self.max_concurrent_uploads)
            .field("cors_origins", &self.cors_origins)
            .field("lease_secs", &self.lease_secs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("header_read_timeout_secs", &self.header_read_timeout_secs)
            .field("max_connections", &self.max_connections)
            .field("max_event_streams", &self.max_event_streams)
            .finish()
    }
}
