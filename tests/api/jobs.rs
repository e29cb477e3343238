use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;

use crate::helpers::{shapes_zip, TestApp};

async fn dataset(app: &TestApp) -> String {
    let reply = app.upload_dataset(shapes_zip(4, 32)).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    reply.json["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn invalid_job_configurations_name_every_bad_field_and_queue_nothing() {
    let app = TestApp::spawn().await;
    let dataset_id = dataset(&app).await;

    let reply = app
        .post_json(
            "/jobs",
            &json!({
                "dataset_id": dataset_id, "epochs": 0, "backbone": "resnet9000",
                "learning_rate": -1.0, "freeze": "some"
            }),
        )
        .await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let mut paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, ["backbone", "epochs", "freeze", "learning_rate"]);

    // From scratch with a frozen base would train nothing.
    let scratch = app
        .post_json(
            "/jobs",
            &json!({ "dataset_id": dataset_id, "pretrained": false, "freeze": "head" }),
        )
        .await;
    let errors = scratch.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "pretrained");

    let typo = app
        .post_json("/jobs", &json!({ "dataset_id": dataset_id, "epoch": 3 }))
        .await;
    let errors = typo.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        errors[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown field `epoch`"),
        "{errors:?}"
    );

    let missing = app
        .post_json("/jobs", &json!({ "dataset_id": uuid::Uuid::new_v4() }))
        .await;
    let errors = missing.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "dataset_id");

    let not_json = app
        .send(
            Request::post("/jobs")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    not_json.assert_problem(StatusCode::BAD_REQUEST);

    assert_eq!(app.count("jobs").await, 0);
}

#[tokio::test]
async fn a_reused_idempotency_key_returns_the_same_job() {
    let app = TestApp::spawn().await;
    let dataset_id = dataset(&app).await;
    let submit = || {
        Request::post("/jobs")
            .header(header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", "nightly-2026-11-28")
            .body(Body::from(
                json!({ "dataset_id": dataset_id, "epochs": 2 }).to_string(),
            ))
            .unwrap()
    };
    let first = app.send(submit()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.json);
    assert_eq!(first.json["status"], "queued");
    assert_eq!(first.json["config"]["epochs"], 2);
    assert_eq!(first.json["config"]["backbone"], "mobilenet_v2");
    let second = app.send(submit()).await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(first.json["id"], second.json["id"]);
    assert_eq!(app.count("jobs").await, 1);

    let id = first.json["id"].as_str().unwrap();
    assert_eq!(
        first.location.as_deref(),
        Some(format!("/jobs/{id}").as_str())
    );
    let fetched = app.get(&format!("/jobs/{id}")).await;
    assert_eq!(fetched.json["status"], "queued");
    let metrics = app.get(&format!("/jobs/{id}/metrics")).await;
    assert_eq!(metrics.json["epochs"], json!([]));
    app.get(&format!("/jobs/{}", uuid::Uuid::new_v4()))
        .await
        .assert_problem(StatusCode::NOT_FOUND);
}
