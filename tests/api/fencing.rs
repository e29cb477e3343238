//! Fencing: a worker that lost its job's lease (frozen, partitioned, too slow)
//! writes nothing more for the job, however late it wakes up, and stops
//! training; expired leases are reaped even while every worker is busy.

use std::time::{Duration, Instant};

use finetuned::store::jobs;
use finetuned::store::metrics::{record_best_checkpoint, record_epoch, EpochMetrics};
use finetuned::train::Worker;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{encode, ran_status, render, torch_rng, TestApp};
use crate::processes::{epochs, job_state, log_of, wait_for, Finetuned};

/// An epoch's metrics, told apart by their training loss.
fn epoch_metrics(epoch: i32, train_loss: f64) -> EpochMetrics {
    EpochMetrics {
        epoch,
        train_loss,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5,
        val_macro_f1: 0.5,
        top_k: 3,
        val_top_k_accuracy: 1.0,
        learning_rate: 0.01,
        frozen_stages: 0,
        images_per_second: 10.0,
        seconds: 1.0,
        per_class: Vec::new(),
        confusion_matrix: Vec::new(),
    }
}

async fn expire_lease(app: &TestApp, job: Uuid) {
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(job)
        .execute(&app.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_under_a_superseded_attempt_is_refused() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = app.shapes_dataset(3, 32).await;
    let job = app
        .submit_job(json!({ "dataset_id": dataset, "epochs": 3 }))
        .await;
    let id = Uuid::parse_str(&job).unwrap();

    let first = jobs::claim(pool, "worker-a", 60.0)
        .await
        .unwrap()
        .expect("the job is claimed")
        .lease("worker-a");
    assert_eq!(first.attempt, 1);
    let run = jobs::start_run(pool, &first, "cpu", None)
        .await
        .unwrap()
        .expect("the lease holds");
    assert!(record_epoch(pool, &first, run, &epoch_metrics(1, 1.0))
        .await
        .unwrap());
    assert!(
        record_best_checkpoint(pool, &first, run, 1, "jobs/x/best.safetensors", 0.5)
            .await
            .unwrap()
    );

    // Expired, even with nobody else on the job: not renewed, no writes.
    expire_lease(&app, id).await;
    assert!(!jobs::heartbeat(pool, &first, 60.0).await.unwrap());
    assert!(!record_epoch(pool, &first, run, &epoch_metrics(2, 9.0))
        .await
        .unwrap());

    // The same worker id claims the job again: the attempt number alone
    // tells the old lease from the new.
    let second = jobs::claim(pool, "worker-a", 60.0)
        .await
        .unwrap()
        .expect("the expired job is claimed again")
        .lease("worker-a");
    assert_eq!((second.attempt, &second.worker), (2, &first.worker));
    assert!(!jobs::holds(pool, &first).await.unwrap());
    assert!(!jobs::heartbeat(pool, &first, 60.0).await.unwrap());
    assert!(!jobs::set_run_started(pool, &first, run, true, "fp32")
        .await
        .unwrap());
    assert!(!record_epoch(pool, &first, run, &epoch_metrics(2, 9.0))
        .await
        .unwrap());
    assert!(
        !record_best_checkpoint(pool, &first, run, 2, "jobs/x/best.safetensors", 0.9)
            .await
            .unwrap()
    );
    assert_eq!(
        jobs::start_run(pool, &first, "cpu", Some(1)).await.unwrap(),
        None
    );
    // The model, test metrics, deployment and outcome are written only
    // through a fence, which the old attempt cannot get.
    let mut tx = jobs::begin(pool).await.unwrap();
    assert!(jobs::fence(&mut tx, &first).await.unwrap().is_none());
    drop(tx);

    // The current attempt writes.
    let run2 = jobs::start_run(pool, &second, "cpu", Some(1))
        .await
        .unwrap()
        .expect("the new lease holds");
    assert!(jobs::heartbeat(pool, &second, 60.0).await.unwrap());
    assert!(record_epoch(pool, &second, run2, &epoch_metrics(2, 2.0))
        .await
        .unwrap());

    // What a user sees: each epoch once, from the attempt that held the job.
    let view = app.get(&format!("/jobs/{job}")).await.json;
    assert_eq!(view["attempts"], 2, "{view}");
    assert_eq!(view["epoch"], 2, "{view}");
    assert_eq!(view["best_epoch"], 1, "{view}");
    assert_eq!(view["best_val_accuracy"], 0.5, "{view}");
    let runs = view["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{view}");
    assert_eq!(runs[0]["attempt"], 1);
    assert_eq!(runs[0]["outcome"], "lost", "the takeover ended it");
    assert_eq!(runs[0]["cached_features"], Value::Null, "refused write");
    assert_eq!(runs[1]["attempt"], 2);
    assert_eq!(runs[1]["outcome"], Value::Null);
    let metrics = app.get(&format!("/jobs/{job}/metrics")).await.json;
    let recorded: Vec<(i64, f64)> = metrics["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["epoch"].as_i64().unwrap(),
                e["train_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(recorded, [(1, 1.0), (2, 2.0)]);
}

#[tokio::test]
async fn a_write_left_open_by_a_frozen_worker_holds_a_takeover_back_only_briefly() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let dataset = app.shapes_dataset(3, 32).await;
    let job = app
        .submit_job(json!({ "dataset_id": dataset, "epochs": 1 }))
        .await;
    let first = jobs::claim(pool, "worker-a", 1.0)
        .await
        .unwrap()
        .expect("the job is claimed")
        .lease("worker-a");
    // The worker freezes inside a fenced write: its transaction stays open
    // and the job's row locked while its lease runs out.
    let mut tx = jobs::begin(pool).await.unwrap();
    assert!(jobs::fence(&mut tx, &first).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = Instant::now();
    let taken = loop {
        if let Some(row) = jobs::claim(pool, "worker-b", 60.0).await.unwrap() {
            break row;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the stalled transaction still holds the job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let waited = started.elapsed();
    assert_eq!((taken.id.to_string(), taken.attempts), (job, 2));
    assert!(
        waited < Duration::from_secs(30),
        "took over after {waited:?}"
    );
    // Thawed, the first worker's write cannot land.
    assert!(tx.commit().await.is_err());
}

/// The job's checkpoint files and when each was last written.
fn checkpoint_files(app: &TestApp, job: Uuid) -> Vec<(String, std::time::SystemTime)> {
    let dir = app.artifacts.path(&format!("jobs/{job}"));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let modified = e.metadata().and_then(|m| m.modified()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), modified)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn a_worker_whose_job_is_taken_over_stops_training_and_writes_nothing_more() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(6, 40).await;
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": 40, "image_size": 48, "batch_size": 2,
            "freeze": "full",
        }))
        .await;
    let id = Uuid::parse_str(&job).unwrap();
    let worker = app.worker.clone();
    let running = tokio::spawn(async move { worker.try_execute_one(None).await });
    wait_for(&app, &job, Duration::from_secs(180), |s| s.epoch >= 1).await;

    // Another worker takes the job over as if this one's lease had expired
    // (the claim skips the row while a write of this worker locks it).
    let started = Instant::now();
    let taken = loop {
        expire_lease(&app, id).await;
        if let Some(row) = jobs::claim(&app.pool, "usurper", 3600.0).await.unwrap() {
            break row;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never claimable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(taken.id, id);

    // The worker learns it at its next write, stops its training thread
    // and ends the attempt without writing.
    let outcome = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("the worker gives the job up")
        .unwrap()
        .unwrap();
    assert_eq!(ran_status(outcome), "lost");
    let files = checkpoint_files(&app, id);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(checkpoint_files(&app, id), files, "the thread still writes");

    let view = app.get(&format!("/jobs/{job}")).await.json;
    assert_eq!(view["status"], "running", "{view}");
    assert_eq!(view["attempts"], 2, "{view}");
    assert_eq!(view["epoch"], taken.epoch, "no epoch after the takeover");
    assert_eq!(view["best_epoch"], json!(taken.best_epoch), "{view}");
    assert_eq!(view["model_id"], Value::Null, "{view}");
    assert_eq!(view["runs"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(view["runs"][0]["outcome"], "lost", "{view}");
    assert_eq!(
        epochs(&app, &job).await,
        (1..=taken.epoch).collect::<Vec<_>>()
    );
    assert_eq!(app.count("models").await, 0);
    assert_eq!(app.count("deployments").await, 0);
}

#[tokio::test]
async fn expired_leases_are_reaped_while_every_worker_is_busy() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(6, 40).await;
    let long = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": 500, "image_size": 48, "batch_size": 2,
            "freeze": "full",
        }))
        .await;
    // One worker, reaping every second (a third of its lease).
    let worker = Worker {
        lease: Duration::from_secs(3),
        ..app.worker.clone()
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(worker.run(stopped));
    wait_for(&app, &long, Duration::from_secs(60), |s| {
        s.status == "running"
    })
    .await;

    // Two jobs whose worker vanished right after claiming them: one with
    // an attempt left, one on its last.
    let mut orphans = Vec::new();
    for max_attempts in [2, 1] {
        let job = app
            .submit_job(json!({
                "dataset_id": dataset, "epochs": 1, "max_attempts": max_attempts,
            }))
            .await;
        let claimed = jobs::claim(&app.pool, "vanished", 1.0)
            .await
            .unwrap()
            .expect("claimed");
        assert_eq!(claimed.id.to_string(), job);
        orphans.push(job);
    }
    let requeued = wait_for(&app, &orphans[0], Duration::from_secs(30), |s| {
        s.status == "queued"
    })
    .await;
    assert_eq!(requeued.lease_owner, None);
    wait_for(&app, &orphans[1], Duration::from_secs(30), |s| {
        s.status == "failed"
    })
    .await;
    let failed = app.get(&format!("/jobs/{}", orphans[1])).await.json;
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("lease expired")),
        "{failed}"
    );
    let busy = job_state(&app, &long).await;
    assert_eq!(busy.status, "running", "the worker was busy all along");

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
}

/// What the workers wrote for a job: epoch rows and checkpoint rows with the
/// attempt that wrote them, models, deployments and runs.
#[derive(Debug, PartialEq)]
struct Written {
    epochs: Vec<(i32, i32, String)>,
    checkpoints: Vec<(i32, i32, bool, String)>,
    models: Vec<(Uuid, i32, String)>,
    deployments: Vec<(String, Uuid, String)>,
    runs: Vec<(i32, String, Option<String>, Option<String>)>,
    job: (String, i32, Option<i32>, Option<String>),
}

async fn written(app: &TestApp, job: Uuid) -> Written {
    let pool = &app.pool;
    Written {
        epochs: sqlx::query_as(
            "SELECT e.epoch, r.attempt, e.created_at::text FROM epoch_metrics e
             JOIN runs r ON r.id = e.run_id WHERE e.job_id = $1 ORDER BY e.epoch",
        )
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap(),
        checkpoints: sqlx::query_as(
            "SELECT c.epoch, r.attempt, c.is_best, c.created_at::text FROM checkpoints c
             JOIN runs r ON r.id = c.run_id WHERE c.job_id = $1 ORDER BY c.created_at",
        )
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap(),
        models: sqlx::query_as(
            "SELECT id, epoch, created_at::text FROM models WHERE job_id = $1 ORDER BY id",
        )
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap(),
        deployments: sqlx::query_as(
            "SELECT alias, model_id, deployed_at::text FROM deployments ORDER BY alias",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        runs: sqlx::query_as(
            "SELECT attempt, worker, outcome, finished_at::text FROM runs
             WHERE job_id = $1 ORDER BY started_at",
        )
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap(),
        job: sqlx::query_as(
            "SELECT status, epoch, best_epoch, test_metrics::text FROM jobs WHERE id = $1",
        )
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap(),
    }
}

/// The messages of a worker's JSON log.
fn messages(app: &TestApp, log: &str) -> Vec<Value> {
    log_of(app.data_dir(), log)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|line| line["fields"].clone())
        .collect()
}

fn said(messages: &[Value], text: &str) -> bool {
    messages
        .iter()
        .any(|m| m["message"].as_str().is_some_and(|m| m.contains(text)))
}

#[tokio::test]
async fn a_frozen_worker_thawed_after_a_takeover_writes_nothing() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(8, 48).await;
    let total = 6;
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": total, "image_size": 64, "batch_size": 2,
            "freeze": "full", "max_attempts": 3,
        }))
        .await;
    let id = Uuid::parse_str(&job).unwrap();
    let args = [
        "worker",
        "--workers",
        "1",
        "--lease-secs",
        // Long enough that the loaded CI machine (fsync stalls, two tests
        // training at once) does not cost the second worker its lease too.
        "10",
        "--log-format",
        "json",
    ];
    let mut first = Finetuned::start(&args, &app, "first.log");
    wait_for(&app, &job, Duration::from_secs(180), |s| {
        s.status == "running" && s.epoch >= 1
    })
    .await;
    first.signal(libc::SIGSTOP);

    // Another worker takes the job over once the frozen one's lease expires,
    // resumes from its last recorded epoch and finishes.
    let mut second = Finetuned::start(&args, &app, "second.log");
    let end = wait_for(&app, &job, Duration::from_secs(300), |s| {
        !["queued", "running"].contains(&s.status.as_str())
    })
    .await;
    assert_eq!(
        end.status,
        "succeeded",
        "logs in {}",
        app.data_dir().display()
    );
    let before = written(&app, id).await;

    // Thawed, the first finds its lease gone: it stops its training thread
    // and ends its attempt without writing, then waits for work again.
    first.signal(libc::SIGCONT);
    let started = Instant::now();
    let log = loop {
        let log = messages(&app, "first.log");
        if log
            .iter()
            .any(|m| m["message"] == "job ended" && m["status"] == "lost")
        {
            break log;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the thawed worker did not give the job up; log:\n{}",
            log_of(app.data_dir(), "first.log")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(said(&log, "stopping training at the next batch"), "{log:?}");
    assert!(said(&log, "training thread stopped"), "{log:?}");
    // Time for any late write to land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(written(&app, id).await, before, "the thawed worker wrote");
    assert_eq!(
        unsafe { libc::kill(first.pid() as i32, 0) },
        0,
        "it runs on"
    );

    // One attempt per worker; epochs 1..N once each, every one of the first
    // attempt's before the second's; one model, deployed.
    assert_eq!(epochs(&app, &job).await, (1..=total).collect::<Vec<_>>());
    let attempts: Vec<i32> = before.epochs.iter().map(|e| e.1).collect();
    let resumed_after = attempts.iter().filter(|&&a| a == 1).count();
    assert!(resumed_after >= 1, "{:?}", before.epochs);
    assert_eq!(
        attempts,
        [
            vec![1; resumed_after],
            vec![2; total as usize - resumed_after]
        ]
        .concat(),
        "{:?}",
        before.epochs
    );
    let runs = &before.runs;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs[0].1.contains(&format!("-{}-", first.pid())),
        "{runs:?}"
    );
    assert_eq!((runs[0].0, runs[0].2.as_deref()), (1, Some("lost")));
    assert!(
        runs[1].1.contains(&format!("-{}-", second.pid())),
        "{runs:?}"
    );
    assert_eq!((runs[1].0, runs[1].2.as_deref()), (2, Some("succeeded")));
    assert_eq!(before.models.len(), 1, "{:?}", before.models);
    let model = before.models[0].0;
    assert_eq!(
        before
            .deployments
            .iter()
            .map(|d| (d.0.as_str(), d.1))
            .collect::<Vec<_>>(),
        [("default", model)]
    );
    let best: Vec<_> = before.checkpoints.iter().filter(|c| c.2).collect();
    assert_eq!(best.len(), 1, "{:?}", before.checkpoints);
    assert_eq!(
        Some(best[0].0),
        before.job.2,
        "the best row names the job's best epoch"
    );
    let view = app.get(&format!("/jobs/{job}")).await.json;
    assert_eq!(view["model_id"], model.to_string());
    let models = app.get("/models").await.json;
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models[0]["aliases"], json!(["default"]));
    // The deployed model serves.
    let image = encode(&render(0, 99, 48), image::ImageFormat::Png);
    let predictions = app.predict_one(None, "disc.png", image).await;
    assert_eq!(predictions.len(), 3);

    for worker in [&mut first, &mut second] {
        worker.signal(libc::SIGTERM);
        assert!(worker.wait(Duration::from_secs(60)).await.success());
    }
}
