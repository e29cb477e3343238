use clap::{Parser, Subcommand};

/// jemalloc for every allocation in the process, libtorch's included: with
/// glibc's malloc a serving process fragments its heap as batch sizes shift
/// and grows by hundreds of MiB over minutes (measured with
/// scripts/bench-predict).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use finetuned::auth::{self, Scope};
use finetuned::config::Config;
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
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Serve(c) | Command::Worker(c) | Command::Migrate(c) => c.clone(),
        Command::Keys { action } => action.config().clone(),
    };
    init_tracing(&config.log_format);
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
    }
}

async fn keys(pool: &sqlx::PgPool, action: KeyAction) -> anyhow::Result<()> {
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

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    // Logs go to stderr: stdout carries command output (a new key's token).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
