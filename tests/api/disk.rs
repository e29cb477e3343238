//! The free-space floor: below it, uploads and new jobs are refused with
//! 507 before anything is written, readiness says why, reads still work.

use axum::http::StatusCode;
use serde_json::json;

use finetuned::train::Outcome;

use crate::helpers::{shapes_zip, small_batching, Part, TestApp};

#[tokio::test]
async fn below_the_free_space_floor_uploads_and_jobs_are_507_and_readiness_says_why() {
    let app = TestApp::spawn_custom(small_batching(), |state| {
        // A floor no disk meets: as if the disk were full.
        state.artifacts = state.artifacts.clone().with_min_free(u64::MAX / 4);
    })
    .await;
    let upload = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", "shapes.zip", shapes_zip(2, 32))],
        )
        .await;
    upload.assert_problem(StatusCode::INSUFFICIENT_STORAGE);
    let detail = upload.json["detail"].as_str().unwrap();
    assert!(detail.contains("--min-free-disk-mib"), "{detail}");
    app.assert_no_dataset_stored().await;

    let job = app
        .post_json("/jobs", &json!({"dataset_id": uuid::Uuid::new_v4()}))
        .await;
    job.assert_problem(StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(app.count("jobs").await, 0);

    let module = app
        .post_multipart("/backbones", &[Part::file("file", "m.pt", vec![0; 16])])
        .await;
    // Uploaded modules are off by default; the floor is checked after that.
    module.assert_problem(StatusCode::FORBIDDEN);

    let ready = app.get("/readyz").await;
    ready.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json["detail"].as_str().unwrap().contains("floor"));
    assert_eq!(app.get("/models").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_worker_below_the_floor_takes_no_job_and_the_job_stays_queued() {
    let mut app = TestApp::spawn().await;
    let dataset_id = app.shapes_dataset(4, 32).await;
    let job_id = app
        .submit_job(json!({"dataset_id": dataset_id, "epochs": 1}))
        .await;
    app.worker.artifacts = app.artifacts.clone().with_min_free(u64::MAX / 4);
    let outcome = app.worker.try_execute_one(None).await.expect("worker step");
    assert!(matches!(outcome, Outcome::Idle), "it claimed a job");
    let job = app.get(&format!("/jobs/{job_id}")).await.json;
    assert_eq!(job["status"], "queued", "{job:?}");
    assert_eq!(job["attempts"], 0, "{job:?}");
}
