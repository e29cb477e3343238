//! The real binary as operators run it: `serve` stopping on SIGTERM, and
//! two `worker` processes sharing one database while one of them is killed.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::helpers::{free_port, ran_status, torch_rng, weights_dir, TestApp};

/// A child process of the test, killed if the test ends early.
pub(crate) struct Finetuned(Child);

impl Finetuned {
    pub(crate) fn start(args: &[&str], app: &TestApp, log: &str) -> Self {
        let log = std::fs::File::create(app.data_dir().join(log)).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_finetuned"))
            .args(args)
            .env("DATABASE_URL", app.database_url())
            .env("FINETUNED_DATA_DIR", app.data_dir())
            .env("FINETUNED_WEIGHTS_DIR", weights_dir())
            .env("FINETUNED_TORCH_THREADS", "1")
            .env("FINETUNED_DEVICE", "cpu")
            .env("HOSTNAME", "testhost")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("the finetuned binary starts");
        Self(child)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    pub(crate) fn signal(&self, signal: i32) {
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits for the process to exit, at most `limit`.
    pub(crate) async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "process {} did not exit within {limit:?}",
                self.pid()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Finetuned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) struct JobState {
    pub(crate) status: String,
    pub(crate) epoch: i32,
    pub(crate) lease_owner: Option<String>,
}

pub(crate) async fn job_state(app: &TestApp, id: &str) -> JobState {
    let (status, epoch, lease_owner): (String, i32, Option<String>) =
        sqlx::query_as("SELECT status, epoch, lease_owner FROM jobs WHERE id = $1")
            .bind(Uuid::parse_str(id).unwrap())
            .fetch_one(&app.pool)
            .await
            .expect("job row");
    JobState {
        status,
        epoch,
        lease_owner,
    }
}

/// Polls until `done` holds for the job, at most `limit`.
pub(crate) async fn wait_for(
    app: &TestApp,
    id: &str,
    limit: Duration,
    done: impl Fn(&JobState) -> bool,
) -> JobState {
    let started = Instant::now();
    loop {
        let state = job_state(app, id).await;
        if done(&state) {
            return state;
        }
        assert!(
            started.elapsed() < limit,
            "job {id} still {} at epoch {} after {limit:?}; logs in {}",
            state.status,
            state.epoch,
            app.data_dir().display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn epochs(app: &TestApp, id: &str) -> Vec<i32> {
    sqlx::query_scalar("SELECT epoch FROM epoch_metrics WHERE job_id = $1 ORDER BY epoch")
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

pub(crate) fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[tokio::test]
async fn sigterm_stops_serve_cleanly_and_hands_the_job_back() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(10, 48).await;
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": 40, "image_size": 64, "batch_size": 2,
            "freeze": "full",
        }))
        .await;

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Finetuned::start(
        &[
            "serve",
            "--listen",
            &listen,
            "--workers",
            "1",
            "--shutdown-grace-secs",
            "2",
        ],
        &app,
        "serve.log",
    );
    let running = wait_for(&app, &job, Duration::from_secs(120), |s| {
        s.status == "running" && s.epoch >= 1
    })
    .await;
    // A client following the job's events: the drain must not wait for it.
    let mut events = tokio::net::TcpStream::connect(&listen)
        .await
        .expect("server listens");
    let request = format!("GET /jobs/{job}/events HTTP/1.1\r\nHost: {listen}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut events, request.as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = tokio::io::AsyncReadExt::read(&mut events, &mut head)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    server.signal(libc::SIGTERM);
    let status = server.wait(Duration::from_secs(30)).await;
    let log = log_of(app.data_dir(), "serve.log");
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    drop(events);

    // Stopped at a batch boundary, handed back without spending the attempt.
    let after = job_state(&app, &job).await;
    assert_eq!(after.status, "queued", "log:\n{log}");
    assert_eq!(after.lease_owner, None);
    assert!(after.epoch >= running.epoch);
    let (outcome, error): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT outcome, error FROM runs WHERE job_id = $1 ORDER BY started_at DESC LIMIT 1",
    )
    .bind(Uuid::parse_str(&job).unwrap())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("lost"));
    assert_eq!(error.as_deref(), Some("the worker shut down"));

    // The next attempt resumes from the saved epoch: no epoch twice, none missing.
    let saved = after.epoch;
    sqlx::query(
        "UPDATE jobs SET config = jsonb_set(config, '{epochs}', to_jsonb($2::int)) WHERE id = $1",
    )
    .bind(Uuid::parse_str(&job).unwrap())
    .bind(saved + 2)
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        ran_status(app.worker.try_execute_one(None).await.unwrap()),
        "succeeded"
    );
    assert_eq!(
        epochs(&app, &job).await,
        (1..=saved + 2).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn two_worker_processes_share_the_queue_and_survive_a_kill() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(6, 32).await;
    let epochs_per_job = 3;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(
            app.submit_job(json!({
                "dataset_id": dataset, "epochs": epochs_per_job, "image_size": 48,
                "batch_size": 2, "max_attempts": 3, "freeze": "full",
            }))
            .await,
        );
    }
    // A lease the survivor keeps through the load of a CI machine.
    let args = ["worker", "--workers", "1", "--lease-secs", "6"];
    let mut workers = vec![
        Finetuned::start(&args, &app, "worker-a.log"),
        Finetuned::start(&args, &app, "worker-b.log"),
    ];

    // Kill whichever worker holds a job past its first epoch.
    let started = Instant::now();
    let (victim_job, victim_pid) = 'found: loop {
        for job in &jobs {
            let s = job_state(&app, job).await;
            if s.status == "running" && s.epoch >= 1 {
                let owner = s.lease_owner.expect("a running job has an owner");
                let pid: u32 = owner.split('-').nth(1).unwrap().parse().unwrap();
                break 'found (job.clone(), pid);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no job reached epoch 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim = workers
        .iter()
        .position(|w| w.pid() == victim_pid)
        .expect("owner is ours");
    let mut killed = workers.remove(victim);
    killed.signal(libc::SIGKILL);
    killed.wait(Duration::from_secs(10)).await;

    // The survivor runs everything to the end, the killed job resumed.
    for job in &jobs {
        let end = wait_for(&app, job, Duration::from_secs(240), |s| {
            !["queued", "running"].contains(&s.status.as_str())
        })
        .await;
        assert_eq!(
            end.status,
            "succeeded",
            "job {job}; logs in {}",
            app.data_dir().display()
        );
        assert_eq!(
            epochs(&app, job).await,
            (1..=epochs_per_job).collect::<Vec<_>>(),
            "job {job}"
        );
    }
    let models: Vec<Uuid> = sqlx::query_scalar("SELECT job_id FROM models ORDER BY job_id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        models.len(),
        jobs.len(),
        "every job produced exactly one model"
    );
    let runs: Vec<(Option<i32>, Option<String>)> = sqlx::query_as(
        "SELECT resumed_from_epoch, outcome FROM runs WHERE job_id = $1 ORDER BY started_at",
    )
    .bind(Uuid::parse_str(&victim_job).unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].1.as_deref(), Some("lost"));
    assert!(
        runs[1].0.is_some_and(|e| e >= 1),
        "the second attempt resumed: {runs:?}"
    );
    assert_eq!(runs[1].1.as_deref(), Some("succeeded"));

    // The survivor exits cleanly on SIGTERM.
    let survivor = &mut workers[0];
    survivor.signal(libc::SIGTERM);
    assert!(survivor.wait(Duration::from_secs(30)).await.success());
}
