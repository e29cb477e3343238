use clap::{Parser, Subcommand};

/// jemalloc for every allocation in the process, libtorch's included: with
/// glibc's malloc a serving process fragments its heap as batch sizes shift
/// and grows by hundreds of MiB over minutes (measured with
/// scripts/bench-predict).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use finetuned::auth::{self, Scope};
use finetuned::config::{Config, LogFormat};
use finetuned::models::{self, verify};
use finetuned::{app, store};
use tracing_subscriber::EnvFilter;

/// Transfer learning for image classification over HTTP.
#[derive(Parser)]
#[command(name = "finetuned", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API, plus in-process training workers unless --workers 0.
    Serve(Config),
    /// Run training workers only, for extra hosts sharing DATABASE_URL.
    Worker(Config),
    /// Apply the database migrations and exit.
    Migrate(Config),
    /// Create, list and revoke API keys.
    Keys {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// List the backbone catalogue, and verify installed weights against PyTorch.
    Weights {
        #[command(subcommand)]
        action: WeightsAction,
    },
}

#[derive(Subcommand)]
enum WeightsAction {
    /// The catalogue, and whether each backbone's weights are installed.
    List {
        #[command(flatten)]
        config: Config,
    },
    /// Install pretrained weights for an architecture of the catalogue from
    /// a torchvision state dict (.pth, zip or legacy format) or safetensors,
    /// after checking every tensor's name and shape.
    Import {
        file: std::path::PathBuf,
        /// The architecture, e.g. resnet50.
        #[arg(long)]
        arch: String,
        /// Python with torch, to read .pth files.
        #[arg(long, env = "FINETUNED_PYTHON")]
        python: Option<std::path::PathBuf>,
        #[command(flatten)]
        config: Config,
    },
    /// Compare each installed backbone's (or NAME's) ImageNet logits on real
    /// photos with its reference PyTorch implementation's; fails unless they
    /// agree within 1e-4 with the same top-5.
    Verify {
        name: Option<String>,
        /// Folder of the sample photos (scripts/setup fetches them).
        #[arg(long, env = "FINETUNED_PHOTOS_DIR")]
        photos: Option<std::path::PathBuf>,
        /// Python with torch (and the reference model code) installed.
        #[arg(long, env = "FINETUNED_PYTHON")]
        python: Option<std::path::PathBuf>,
        #[command(flatten)]
        config: Config,
    },
}

impl WeightsAction {
    fn config(&self) -> &Config {
        match self {
            Self::List { config } | Self::Import { config, .. } | Self::Verify { config, .. } => {
                config
            }
        }
    }
}

#[derive(Subcommand)]
enum KeyAction {
    /// Create a key and print its token (shown only this once).
    Create {
        /// `admin` (everything) or `predict` (/predict and model reads).
        #[arg(long)]
        scope: String,
        /// A label to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        config: Config,
    },
    /// List keys (never their secrets).
    List {
        #[command(flatten)]
        config: Config,
    },
    /// Revoke a key by id or prefix.
    Revoke {
        key: String,
        #[command(flatten)]
        config: Config,
    },
}

impl KeyAction {
    fn config(&self) -> &Config {
        match self {
            Self::Create { config, .. } | Self::List { config } | Self::Revoke { config, .. } => {
                config
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The confined check of an uploaded module: no configuration, no logs.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(finetuned::sandbox::SUBCOMMAND) {
        std::process::exit(finetuned::sandbox::child_main(&args[2..]));
    }
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Serve(c) | Command::Worker(c) | Command::Migrate(c) => c.clone(),
        Command::Keys { action } => action.config().clone(),
        Command::Weights { action } => action.config().clone(),
    };
    init_tracing(config.log_format);
    tracing::debug!(?config, "configuration");
    match cli.command {
        Command::Serve(config) => app::serve(config, app::shutdown_signal()).await,
        Command::Worker(config) => app::work(config, app::shutdown_signal()).await,
        Command::Migrate(config) => {
            let db = app::Database::open(&config).await?;
            tracing::info!("migrations applied");
            db.close().await;
            Ok(())
        }
        Command::Keys { action } => {
            let db = app::Database::open(action.config()).await?;
            let result = keys(&db.pool, action).await;
            db.close().await;
            result
        }
        Command::Weights { action } => tokio::task::spawn_blocking(move || weights(action)).await?,
    }
}

fn weights(action: WeightsAction) -> anyhow::Result<()> {
    let weights_dir = action.config().weights_dir();
    match action {
        WeightsAction::List { .. } => {
            println!(
                "{:<20} {:<18} {:>11} {:>6} {:>8}  weights",
                "name", "family", "parameters", "input", "top-1"
            );
            for spec in models::CATALOGUE {
                let installed = spec.weights_path(&weights_dir).exists();
                println!(
                    "{:<20} {:<18} {:>11} {:>6} {:>7.1}%  {}",
                    spec.name,
                    spec.family(),
                    spec.parameters,
                    spec.default_image_size,
                    spec.imagenet_top1,
                    if installed { "installed" } else { "missing" }
                );
            }
            Ok(())
        }
        WeightsAction::Import {
            file, arch, python, ..
        } => {
            let spec = models::find(&arch).ok_or_else(|| {
                anyhow::anyhow!(
                    "no architecture {arch:?}; choose one of: {}",
                    models::CATALOGUE
                        .iter()
                        .map(|s| s.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let python = python.unwrap_or_else(verify::default_python);
            let imported = models::import::import_weights(&file, spec, &weights_dir, &python)
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "installed {} ({} tensors{}) as {}",
                spec.name,
                imported.tensors,
                if imported.imagenet_classifier {
                    ", with its ImageNet classifier: `finetuned weights verify` can check it"
                } else {
                    ""
                },
                spec.weights_path(&weights_dir).display()
            );
            Ok(())
        }
        WeightsAction::Verify {
            name,
            photos,
            python,
            ..
        } => {
            let chosen: Vec<&'static models::BackboneSpec> = match &name {
                Some(name) => vec![models::find(name)
                    .ok_or_else(|| anyhow::anyhow!("no backbone named {name:?}"))?],
                None => models::CATALOGUE
                    .iter()
                    .filter(|s| s.weights_path(&weights_dir).exists())
                    .collect(),
            };
            let photos = photos.unwrap_or_else(|| finetuned::setup_cache_dir().join("fixtures"));
            let python = python.unwrap_or_else(verify::default_python);
            let mut failed = Vec::new();
            for spec in chosen {
                let report = verify::against_pytorch(spec, &weights_dir, &photos, &python)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
                println!(
                    "{:<20} {} photos  max |logit difference| {:.2e}  top-5 {}  {}",
                    spec.name,
                    report.photos,
                    report.max_abs_difference,
                    if report.top5_mismatches.is_empty() {
                        "identical".to_string()
                    } else {
                        format!("differs on {:?}", report.top5_mismatches)
                    },
                    if report.passed() { "ok" } else { "FAILED" }
                );
                if !report.passed() {
                    failed.push(spec.name);
                }
            }
            anyhow::ensure!(failed.is_empty(), "verification failed for {failed:?}");
            Ok(())
        }
    }
}

async fn keys(pool: &store::Pool, action: KeyAction) -> anyhow::Result<()> {
    match action {
        KeyAction::Create { scope, name, .. } => {
            let scope = Scope::parse(&scope).ok_or_else(|| {
                anyhow::anyhow!("--scope must be `admin` or `predict`, not {scope:?}")
            })?;
            let key = auth::create_key(pool, &name, scope).await?;
            eprintln!(
                "created {} key {} ({}); the token below is not stored and is shown only once:",
                scope.as_str(),
                key.row.prefix,
                key.row.id
            );
            println!("{}", key.token);
        }
        KeyAction::List { .. } => {
            println!(
                "{:<36}  {:<12}  {:<8}  {:<20}  {:<8}  name",
                "id", "prefix", "scope", "created", "state"
            );
            for key in store::keys::list(pool).await? {
                println!(
                    "{:<36}  {:<12}  {:<8}  {:<20}  {:<8}  {}",
                    key.id,
                    key.prefix,
                    key.scope,
                    key.created_at.format("%Y-%m-%d %H:%M:%S"),
                    if key.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    key.name
                );
            }
        }
        KeyAction::Revoke { key, .. } => {
            if !store::keys::revoke(pool, &key).await? {
                anyhow::bail!("no active key with id or prefix {key:?}");
            }
            eprintln!("revoked {key}; servers refuse it within seconds");
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    // Logs go to stderr: stdout carries command output (a new key's token).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}
