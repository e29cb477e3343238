//! Wiring: the database (embedded or external), workers and the HTTP server,
//! run together and shut down together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tch::Device;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::artifacts::Artifacts;
use crate::auth::Auth;
use crate::config::Config;
use crate::models;
use crate::serve::Predictor;
use crate::store::embedded::Supervisor;
use crate::store::{self, EmbeddedPostgres};
use crate::train::Worker;

/// An idle worker looks at the queue at least this often, notifications aside.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// The database the service runs on, and the embedded server if it uses one.
pub struct Database {
    pub pool: store::Pool,
    pub embedded: Option<Arc<EmbeddedPostgres>>,
    /// Restarts the embedded server should it die while this process runs.
    supervisor: Option<Supervisor>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the private cluster under the
    /// data directory; migrations are applied either way.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        if let Some(url) = &config.database_url {
            let pool = store::connect(url)
                .await
                .context("connecting to DATABASE_URL")?;
            tracing::info!("using the Postgres server at DATABASE_URL");
            return Ok(Self {
                pool,
                embedded: None,
                supervisor: None,
            });
        }
        let dir = config.data_dir.join("postgres");
        let bin_dir = config.pg_bin_dir.clone();
        let pg =
            tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, bin_dir.as_deref()))
                .await??;
        tracing::info!(dir = %pg.dir().display(), "no DATABASE_URL: using the embedded Postgres under the data directory");
        let pool = store::connect(&pg.url())
            .await
            .context("connecting to the embedded Postgres")?;
        let pg = Arc::new(pg);
        Ok(Self {
            pool,
            supervisor: Some(Supervisor::start(pg.clone())),
            embedded: Some(pg),
        })
    }

    /// Closes the pool and stops the embedded server if this process
    /// started it and no other process uses it.
    pub async fn close(self) {
        drop(self.supervisor);
        self.pool.close().await;
        if let Some(pg) = self.embedded {
            match tokio::task::spawn_blocking(move || pg.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %format!("{err:#}"), "stopping the embedded Postgres failed")
                }
                Err(err) => tracing::warn!(error = %err, "stopping the embedded Postgres failed"),
            }
        }
    }
}

/// The devices workers train on: every CUDA device for `auto`, else the CPU.
pub fn worker_devices(config: &Config) -> anyhow::Result<Vec<Device>> {
    let device = crate::device::parse_device(&config.device).map_err(anyhow::Error::msg)?;
    let cuda = tch::Cuda::device_count() as usize;
    Ok((0..config.workers)
        .map(|i| match (config.device.as_str(), device) {
            ("auto", Device::Cuda(_)) if cuda > 0 => Device::Cuda(i % cuda),
            _ => device,
        })
        .collect())
}

fn artifacts(config: &Config) -> anyhow::Result<Artifacts> {
    let root = config.data_dir.join("artifacts");
    let artifacts = match &config.artifact_url {
        None => Artifacts::open(root).context("opening the artifacts directory")?,
        Some(url) => {
            tracing::info!(%url, "artifacts published to an object store, cached locally");
            Artifacts::open_with_remote(root, url).context("opening the artifact store")?
        }
    };
    Ok(artifacts.with_min_free(config.min_free_disk_mib.saturating_mul(1024 * 1024)))
}

fn spawn_workers(
    config: &Config,
    pool: &store::Pool,
    artifacts: &Artifacts,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let devices = worker_devices(config)?;
    Ok(devices
        .into_iter()
        .enumerate()
        .map(|(i, device)| {
            let worker = Worker {
                id: format!("{host}-{}-{i}", std::process::id()),
                pool: pool.clone(),
                artifacts: artifacts.clone(),
                weights_dir: config.weights_dir(),
                device,
                // Heartbeats come every third of it.
                lease: Duration::from_secs(config.lease_secs.max(3)),
                idle_poll: IDLE_POLL,
            };
            tokio::spawn(worker.run(shutdown.clone()))
        })
        .collect())
}

fn prepare_torch(config: &Config) {
    tch::set_num_threads(config.torch_threads() as i32);
    tracing::info!(
        threads = config.torch_threads(),
        cuda_devices = tch::Cuda::device_count(),
        "libtorch ready"
    );
}

/// Runs the HTTP API and in-process workers until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    prepare_torch(&config);
    let db = Database::open(&config).await?;
    let artifacts = artifacts(&config)?;
    let device = crate::device::parse_device(&config.device).map_err(anyhow::Error::msg)?;
    let auth = Auth::new(db.pool.clone());
    check_exposure(&config, &auth).await?;
    let state = AppState {
        pool: db.pool.clone(),
        artifacts: artifacts.clone(),
        predictor: Predictor::start(config.batching(device))?,
        auth,
        predict_timeout: Duration::from_secs(config.predict_timeout_secs),
        decode_permits: std::sync::Arc::new(tokio::sync::Semaphore::new(config.decode_threads())),
        weights_dir: config.weights_dir(),
        limits: config.http_limits(),
        script_check: config.script_check()?,
        events: api::EventStreams::new(db.pool.clone(), config.max_event_streams),
    };
    for spec in models::CATALOGUE.iter().filter(|s| s.bundled) {
        if !spec.weights_path(&state.weights_dir).exists() {
            tracing::warn!(backbone = spec.name, path = %spec.weights_path(&state.weights_dir).display(),
                "pretrained weights missing: jobs on this backbone are refused (scripts/setup installs them)");
        }
    }

    sweep_interrupted_uploads(&state).await;
    warm_up_default_model(&state);
    let events = state.events.clone();
    // Built before the workers start: it installs the metrics recorder
    // their first events go to.
    let router = api::router(state);

    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = spawn_workers(&config, &db.pool, &artifacts, &stop_rx)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, workers = workers.len(), "serving");
    // On the signal: stop accepting, end the event streams (their clients
    // would otherwise hold the drain), and stop the workers at their next
    // batch at once (they save and hand back in parallel with the drain).
    let signalled = async move {
        shutdown.await;
        events.close();
        let _ = stop_tx.send(true);
    };
    // In-flight requests get a bounded drain.
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    api::server::serve(
        listener,
        router,
        config.connection_limits(),
        signalled,
        grace,
    )
    .await;

    tracing::info!("shutting down: waiting for workers to hand back their jobs");
    for worker in workers {
        if let Ok(Err(err)) = worker.await {
            tracing::error!(error = ?err, "worker ended with an error");
        }
    }
    db.close().await;
    Ok(())
}

/// Without API keys anyone who reaches the port can use the API: allowed on
/// loopback addresses, elsewhere only when asked for explicitly.
async fn check_exposure(config: &Config, auth: &Auth) -> anyhow::Result<()> {
    if auth.enabled().await? {
        tracing::info!("API keys exist: every route but health, readiness, metrics and the contract needs a bearer key");
        return Ok(());
    }
    if config.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.listen, "no API keys yet: the API is open, bound to a loopback address only; create one with `finetuned keys create --scope admin`");
        Ok(())
    } else if config.allow_unauthenticated {
        tracing::warn!(listen = %config.listen, "no API keys and --allow-unauthenticated: the API is OPEN to anyone who can reach this address");
        Ok(())
    } else {
        anyhow::bail!(
            "refusing to serve without API keys on the non-loopback address {}: create a key \
             (`finetuned keys create --scope admin`), listen on 127.0.0.1, or pass \
             --allow-unauthenticated",
            config.listen
        )
    }
}

/// Uploads and ingests cut short by a crash leave files but never a row;
/// they are removed at start once older than the longest upload.
/// Seconds without a heartbeat after which an `ingesting` dataset is dead.
const STALLED_INGEST_SECS: f64 = 30.0;

async fn sweep_interrupted_uploads(state: &AppState) {
    // An ingest heartbeats its row every second; one silent this long died
    // with its process. Its files go at once, not after the upload timeout.
    match store::datasets::discard_stalled_ingests(&state.pool, STALLED_INGEST_SECS).await {
        Ok(ids) => {
            for id in ids {
                let key = Artifacts::dataset_key(id);
                let _ = std::fs::remove_dir_all(state.artifacts.path(&key));
                let _ = state.artifacts.unpublish_dir(&key).await;
                tracing::info!(dataset_id = %id, "removed an ingest its process left unfinished");
            }
        }
        Err(err) => tracing::warn!(error = %err, "sweeping stalled ingests failed"),
    }
    let known = match store::datasets::ids(&state.pool).await {
        Ok(ids) => ids.into_iter().collect(),
        Err(err) => {
            tracing::warn!(error = %err, "listing datasets for the sweep failed");
            return;
        }
    };
    let (artifacts, age) = (state.artifacts.clone(), state.limits.upload_timeout);
    match tokio::task::spawn_blocking(move || artifacts.sweep(&known, age)).await {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(
                count = removed.len(),
                ?removed,
                "removed what interrupted uploads left"
            )
        }
        Ok(Err(err)) => tracing::warn!(error = %err, "sweeping interrupted uploads failed"),
        _ => {}
    }
}

/// Loads the default deployment in the background, so the first request
/// after a restart is not slow.
fn warm_up_default_model(state: &AppState) {
    let state = state.clone();
    tokio::spawn(async move {
        let model = match store::models::by_alias(&state.pool, store::models::DEFAULT_ALIAS).await {
            Ok(Some(model)) => model,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, "looking up the default model failed");
                return;
            }
        };
        // The same spec `/predict` builds (an uploaded backbone included).
        let result = match api::model_spec(&state, &model).await {
            Ok(spec) => state
                .predictor
                .warm_up(spec)
                .await
                .map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match result {
            Ok(()) => tracing::info!(model_id = %model.id, "default model loaded"),
            Err(err) => {
                tracing::warn!(model_id = %model.id, error = %err, "could not load the default model")
            }
        }
    });
}

/// Runs workers without the HTTP API (for extra GPU hosts).
pub async fn work(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    prepare_torch(&config);
    let db = Database::open(&config).await?;
    let artifacts = artifacts(&config)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = spawn_workers(&config, &db.pool, &artifacts, &stop_rx)?;
    tracing::info!(workers = workers.len(), "working");
    shutdown.await;
    let _ = stop_tx.send(true);
    for worker in workers {
        if let Ok(Err(err)) = worker.await {
            tracing::error!(error = ?err, "worker ended with an error");
        }
    }
    db.close().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = terminate => tracing::info!("SIGTERM received"),
    }
}
