//! Early stopping, cancellation, resumption after a lost or stopped worker,
//! and the live event stream.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use finetuned::train::Outcome;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::helpers::{ran_status, torch_rng, TestApp};

async fn metrics(app: &TestApp, job_id: &str) -> Vec<Value> {
    app.get(&format!("/jobs/{job_id}/metrics")).await.json["epochs"]
        .as_array()
        .unwrap()
        .clone()
}

fn epochs_of(rows: &[Value]) -> Vec<i64> {
    rows.iter().map(|r| r["epoch"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn early_stopping_ends_the_run_when_the_metric_stalls() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(4, 40).await;
    // A learning rate this small leaves the validation loss where it is.
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": 8, "image_size": 32, "learning_rate": 1e-8,
            "early_stopping_patience": 2, "selection_metric": "val_loss",
            "augmentation": { "enabled": false }
        }))
        .await;
    let outcome = app.worker.try_execute_one(None).await.unwrap();
    assert_eq!(ran_status(outcome), "succeeded");
    let rows = metrics(&app, &job).await;
    assert!(rows.len() < 8, "ran all {} epochs", rows.len());
    assert!(rows.len() >= 3);
    let view = app.get(&format!("/jobs/{job}")).await.json;
    assert_eq!(view["status"], "succeeded");
    assert!(view["model_id"].is_string());
}

#[tokio::test]
async fn cancelling_a_queued_job_takes_it_out_of_the_queue() {
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(4, 32).await;
    let job = app
        .submit_job(json!({ "dataset_id": dataset, "epochs": 1 }))
        .await;
    let reply = app.post_empty(&format!("/jobs/{job}/cancel")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json["status"], "cancelled");
    assert_eq!(
        app.worker.try_execute_one(None).await.unwrap(),
        Outcome::Idle
    );
    let again = app.post_empty(&format!("/jobs/{job}/cancel")).await;
    again.assert_problem(StatusCode::CONFLICT);
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_and_keeps_its_epochs() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(8, 48).await;
    let job = app
        .submit_job(
            json!({ "dataset_id": dataset, "epochs": 200, "image_size": 64, "batch_size": 4 }),
        )
        .await;
    let worker = app.worker.clone();
    let running = tokio::spawn(async move { worker.try_execute_one(None).await });
    wait_until(&app, &job, |j| j["epoch"].as_i64() >= Some(1)).await;
    let reply = app.post_empty(&format!("/jobs/{job}/cancel")).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    assert_eq!(reply.json["cancel_requested"], true);
    let outcome = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("stops promptly");
    assert_eq!(ran_status(outcome.unwrap().unwrap()), "cancelled");
    let view = app.get(&format!("/jobs/{job}")).await.json;
    assert_eq!(view["status"], "cancelled");
    assert!(view["model_id"].is_null());
    let rows = metrics(&app, &job).await;
    assert!(!rows.is_empty() && rows.len() < 200);
}

#[tokio::test]
async fn a_stopped_worker_hands_the_job_back_and_the_next_attempt_resumes() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(6, 40).await;
    let job = app
        .submit_job(
            json!({ "dataset_id": dataset, "epochs": 4, "image_size": 32, "batch_size": 2 }),
        )
        .await;
    let (stop, stop_rx) = watch::channel(false);
    let worker = app.worker.clone();
    let first = tokio::spawn(async move { worker.try_execute_one(Some(&stop_rx)).await });
    wait_until(&app, &job, |j| j["epoch"].as_i64() >= Some(2)).await;
    stop.send(true).unwrap();
    let outcome = first.await.unwrap().unwrap();
    assert_eq!(ran_status(outcome), "queued");
    let stopped_at = app.get(&format!("/jobs/{job}")).await.json["epoch"]
        .as_i64()
        .unwrap();
    assert!(
        (2..4).contains(&stopped_at),
        "stopped after epoch {stopped_at}"
    );

    let outcome = app.worker.try_execute_one(None).await.unwrap();
    assert_eq!(ran_status(outcome), "succeeded");
    assert_eq!(epochs_of(&metrics(&app, &job).await), [1, 2, 3, 4]);
    let resumed: Option<i32> =
        sqlx::query_scalar("SELECT resumed_from_epoch FROM runs ORDER BY started_at DESC LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(resumed, Some(stopped_at as i32));
    assert_eq!(app.count("runs").await, 2);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_by_another_worker() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(4, 32).await;
    let job = app
        .submit_job(
            json!({ "dataset_id": dataset, "epochs": 1, "image_size": 32, "max_attempts": 2 }),
        )
        .await;
    // A worker claims the job and vanishes.
    let claimed = finetuned::store::jobs::claim(&app.pool, "vanished-worker", 60.0)
        .await
        .unwrap();
    assert!(claimed.is_some());
    assert_eq!(
        app.worker.try_execute_one(None).await.unwrap(),
        Outcome::Idle,
        "lease still held"
    );
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let outcome = app.worker.try_execute_one(None).await.unwrap();
    assert_eq!(ran_status(outcome), "succeeded");
    assert_eq!(app.get(&format!("/jobs/{job}")).await.json["attempts"], 2);
}

#[tokio::test]
async fn the_event_stream_reports_status_progress_and_epochs_in_order() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(6, 40).await;
    let job = app
        .submit_job(
            json!({ "dataset_id": dataset, "epochs": 3, "image_size": 48, "batch_size": 2 }),
        )
        .await;
    let response = open_events(&app, &job).await;
    let worker = app.worker.clone();
    let run = tokio::spawn(async move { worker.try_execute_one(None).await });
    let body = tokio::time::timeout(Duration::from_secs(120), response.into_body().collect())
        .await
        .expect("the stream ends with the job")
        .unwrap()
        .to_bytes();
    run.await.unwrap().unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let kind = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((kind.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"status"), "{kinds:?}");
    // The worker may claim the job before the stream's first look.
    assert!(["queued", "running"].contains(&events[0].1["status"].as_str().unwrap()));
    let (last_kind, last) = events.last().unwrap();
    assert_eq!(
        (last_kind.as_str(), last["status"].as_str()),
        ("status", Some("succeeded"))
    );
    let epochs: Vec<i64> = events
        .iter()
        .filter(|(k, _)| k == "epoch")
        .map(|(_, v)| v["epoch"].as_i64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
    assert!(
        events
            .iter()
            .any(|(k, v)| k == "status" && v["status"] == "running"),
        "{kinds:?}"
    );
}

/// Polls the job until `done` holds (or fails the test after a minute).
async fn wait_until(app: &TestApp, job: &str, done: impl Fn(&Value) -> bool) {
    for _ in 0..600 {
        let view = app.get(&format!("/jobs/{job}")).await.json;
        if done(&view) {
            return;
        }
        assert!(
            !["failed", "succeeded"].contains(&view["status"].as_str().unwrap()),
            "{view:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job} did not get there in time");
}

/// Opens the job's event stream; the body streams until the job ends.
async fn open_events(app: &TestApp, job: &str) -> axum::response::Response {
    use tower::ServiceExt;
    let request = Request::get(format!("/jobs/{job}/events"))
        .body(Body::empty())
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response
}
