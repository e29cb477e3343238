//! Keeps a serving process's embedded cluster up: a postmaster that dies
//! (killed, OOM) is started again by whichever process notices first, and
//! readiness fails meanwhile. The pools reconnect on their own once it is
//! back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{postmaster_pid, EmbeddedPostgres};

const EVERY: Duration = Duration::from_secs(1);

/// The cluster supervised in this process, for readiness to look at its
/// postmaster directly: a pool query would sit out its reconnect attempts.
static SUPERVISED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Runs until dropped.
pub struct Supervisor {
    task: JoinHandle<()>,
}

impl Supervisor {
    pub fn start(pg: Arc<EmbeddedPostgres>) -> Self {
        *SUPERVISED.lock().unwrap() = Some(pg.dir().to_path_buf());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut down = false;
            loop {
                tick.tick().await;
                if postmaster_pid(pg.dir()).is_some() {
                    down = false;
                    continue;
                }
                if !down {
                    tracing::warn!(dir = %pg.dir().display(), "the embedded Postgres is not running: starting it again");
                    down = true;
                }
                let pg = pg.clone();
                match tokio::task::spawn_blocking(move || pg.ensure_running()).await {
                    Ok(Ok(true)) => tracing::info!("the embedded Postgres is running again"),
                    Ok(Ok(false)) => {
                        tracing::info!("another process started the embedded Postgres again")
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(error = %format!("{err:#}"), "starting the embedded Postgres failed; trying again")
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "the embedded Postgres restart panicked")
                    }
                }
            }
        });
        Self { task }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
        *SUPERVISED.lock().unwrap() = None;
    }
}

/// Why this process is not ready, when the cluster it supervises is down.
pub fn outage() -> Option<String> {
    let dir = SUPERVISED.lock().unwrap().clone()?;
    postmaster_pid(&dir).is_none().then(|| {
        format!(
            "the embedded Postgres under {} is not running; restarting it",
            dir.display()
        )
    })
}
