//! A private PostgreSQL cluster under the data directory, started from the
//! machine's own Postgres binaries when no `DATABASE_URL` is given.
//!
//! The cluster listens on a Unix socket inside its own directory only (no TCP
//! port, so nothing can clash with another server) and keeps its data across
//! restarts. Postgres refuses to run as root; when we are root the server
//! commands run as the `postgres` system user, which owns the cluster.
//!
//! Every process on the data directory (`serve`, `worker`, the subcommands)
//! shares the one cluster: `lock` decides who may stop it, `supervisor`
//! starts it again when it dies under a serving process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};

mod lock;
mod supervisor;

pub use supervisor::{outage, Supervisor};

const SUPERUSER: &str = "finetuned";
const DATABASE: &str = "finetuned";
const PORT: u16 = 5432;

/// One process's use of the cluster. Several processes (`serve`, `worker`,
/// the subcommands) share one cluster; only the one that started it stops
/// it, and only once no other uses it (see `lock`).
pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin_dir: PathBuf,
    /// `Some(user)` when the server commands must run as another user.
    run_as: Option<String>,
    /// Held shared for as long as this process uses the cluster.
    users: File,
    /// The postmaster this process started, the one it may stop.
    started: Mutex<Option<u32>>,
    /// Set by `stop`: a restart already under way must not follow it.
    left: AtomicBool,
}

impl EmbeddedPostgres {
    /// Initialises the cluster in `dir` if needed and starts it (or adopts a
    /// server already running there). Returns once it accepts connections.
    pub fn start(dir: &Path, bin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let bin_dir = match bin_dir {
            Some(dir) => dir.to_path_buf(),
            None => find_bin_dir()?,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        // The socket path must fit in sun_path (107 bytes).
        if dir.as_os_str().len() > 90 {
            bail!(
                "the Postgres directory {} is too long for a Unix socket path; use a shorter --data-dir or set DATABASE_URL",
                dir.display()
            );
        }
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some("postgres".to_string())
        } else {
            None
        };
        let _control = lock::control(&dir).context("locking the embedded Postgres")?;
        let pg = Self {
            users: lock::join(&dir).context("locking the embedded Postgres")?,
            dir,
            bin_dir,
            run_as,
            started: Mutex::new(None),
            left: AtomicBool::new(false),
        };
        pg.hand_over_dir()?;
        if !pg.dir.join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        if postmaster_pid(&pg.dir).is_none() {
            *pg.started.lock().unwrap() = Some(pg.launch()?);
        }
        pg.ensure_database()?;
        Ok(pg)
    }

    /// The connection URL for a database of this cluster.
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{database}?host={}",
            self.dir.display()
        )
    }

    /// The connection URL of the service's own database.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the server again if it died; `true` when this call did (this
    /// process then owns it), `false` when it was running.
    pub fn ensure_running(&self) -> anyhow::Result<bool> {
        if postmaster_pid(&self.dir).is_some() {
            return Ok(false);
        }
        let _control = lock::control(&self.dir).context("locking the embedded Postgres")?;
        if self.left.load(Ordering::SeqCst) || postmaster_pid(&self.dir).is_some() {
            return Ok(false);
        }
        *self.started.lock().unwrap() = Some(self.launch()?);
        Ok(true)
    }

    /// Ends this process's use of the cluster (call once, last): stops the
    /// server, waiting for a clean shutdown, if this process started it (or
    /// was handed it) and no other process uses it. A starter leaving before
    /// the others hands the server on to them instead.
    pub fn stop(&self) -> anyhow::Result<()> {
        let _control = lock::control(&self.dir).context("locking the embedded Postgres")?;
        self.left.store(true, Ordering::SeqCst);
        let running = postmaster_pid(&self.dir);
        let ours = running.is_some()
            && (running == *self.started.lock().unwrap()
                || running == lock::handed_over(&self.dir));
        let alone = lock::leave(&self.users)?;
        match (running, ours, alone) {
            (Some(_), true, true) => {
                self.pg_ctl(&["stop", "-w", "-m", "fast"])?;
                lock::clear_hand_over(&self.dir);
            }
            (Some(pid), true, false) => {
                tracing::info!(
                    "other processes use the embedded Postgres: leaving it running for them"
                );
                lock::hand_over(&self.dir, pid)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Runs `pg_ctl start` (under the start lock) and returns the new
    /// postmaster's pid.
    fn launch(&self) -> anyhow::Result<u32> {
        lock::clear_hand_over(&self.dir);
        let log = self.dir.join("server.log");
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -p {PORT}",
            self.dir.display()
        );
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            &log.to_string_lossy(),
            "-o",
            &opts,
        ])
        .with_context(|| format!("starting the embedded Postgres (see {})", log.display()))?;
        postmaster_pid(&self.dir)
            .context("the embedded Postgres started but left no postmaster.pid")
    }

    fn initdb(&self) -> anyhow::Result<()> {
        tracing::info!(dir = %self.dir.display(), "initialising the embedded Postgres cluster");
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&self.dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Creates the service database; one that already exists is fine.
    fn ensure_database(&self) -> anyhow::Result<()> {
        let out = self
            .command("createdb")
            .args(["-h", &self.dir.to_string_lossy(), "-p", &PORT.to_string()])
            .args(["-U", SUPERUSER, DATABASE])
            .output()
            .context("running createdb")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("already exists") {
            bail!("createdb failed: {stderr}");
        }
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(args)
            .output()
            .context("running pg_ctl")?;
        if !out.status.success() {
            bail!(
                "pg_ctl {} failed: {}{}",
                args[0],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin_dir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// When running as root, the cluster directory must belong to the user
    /// the server runs as.
    fn hand_over_dir(&self) -> anyhow::Result<()> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        let status = Command::new("chown")
            .args(["-R", &format!("{user}:")])
            .arg(&self.dir)
            .status()
            .context("running chown")?;
        if !status.success() {
            bail!("could not hand {} to the {user} user", self.dir.display());
        }
        std::fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let reachable = Command::new("runuser")
            .args(["-u", user, "--", "test", "-x"])
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !reachable {
            bail!(
                "the {user} user cannot reach {} (a parent directory is private); use a --data-dir it can reach or set DATABASE_URL",
                self.dir.display()
            );
        }
        Ok(())
    }
}

/// The pid of the cluster's live postmaster, from its `postmaster.pid`.
fn postmaster_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A killed postmaster stays a zombie while its parent (often the
    // container's init) does not reap it.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(matches!(state, 'Z' | 'X'))
        })
        .unwrap_or(false);
    (exists && !zombie).then_some(pid as u32)
}

/// Finds initdb/pg_ctl: on PATH, else the newest /usr/lib/postgresql/N/bin.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                // Resolve symlinks: Debian links initdb into /usr/local/bin alone.
                let real = dir.join("initdb").canonicalize()?;
                return Ok(real.parent().unwrap_or(&dir).to_path_buf());
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server binaries found (initdb, pg_ctl); run scripts/setup, install postgresql, or set DATABASE_URL",
    )
}
