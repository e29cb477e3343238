use clap::{Parser, Subcommand};

/// jemalloc for every allocation in the process, libtorch's included: with
/// glibc's malloc a serving process fragments its heap as batch sizes shift
/// and grows by hundreds of MiB over minutes (measured with
/// scripts/bench-predict).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use finetuned::app;
use finetuned::config::Config;
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Serve(c) | Command::Worker(c) | Command::Migrate(c) => c.clone(),
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
    }
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
