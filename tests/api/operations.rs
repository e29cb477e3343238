//! Operations: API keys and scopes, Prometheus metrics, readiness, request
//! ids, deadlines and CORS.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use finetuned::auth::{self, Scope};
use serde_json::json;

use crate::helpers::{shapes_zip, small_batching, Part, Reply, TestApp};

async fn with_token(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> Reply {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    app.send(request.body(Body::empty()).unwrap()).await
}

/// Longer than the key cache's lifetime, so the servers see a change.
const KEY_CACHE: Duration = Duration::from_millis(2100);

#[tokio::test]
async fn api_keys_guard_every_route_by_scope() {
    let app = TestApp::spawn().await;
    // No key created yet: open.
    assert_eq!(
        with_token(&app, "GET", "/jobs", None).await.status,
        StatusCode::OK
    );

    let admin = auth::create_key(&app.pool, "ops", Scope::Admin)
        .await
        .unwrap();
    let predict = auth::create_key(&app.pool, "app", Scope::Predict)
        .await
        .unwrap();
    // Only a hash of the secret is stored.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM api_keys WHERE id = $1")
        .bind(admin.row.id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!admin.token.as_bytes().windows(32).any(|w| w == stored));
    tokio::time::sleep(KEY_CACHE).await;

    // Without a key: 401 with a challenge, on reads and writes alike.
    for (method, path) in [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("POST", "/predict"),
        ("GET", "/models"),
    ] {
        let reply = with_token(&app, method, path, None).await;
        reply.assert_problem(StatusCode::UNAUTHORIZED);
        assert_eq!(
            reply.headers[header::WWW_AUTHENTICATE],
            "Bearer",
            "{method} {path}"
        );
    }
    // Operational routes stay open for probes and scrapers.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.yaml"] {
        assert_eq!(
            with_token(&app, "GET", path, None).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    // Wrong, malformed and forged tokens.
    let (prefix, _) = admin.token.rsplit_once('_').unwrap();
    for bad in [
        "nonsense",
        "ft_000000000000_secret",
        &format!("{prefix}_forged"),
    ] {
        with_token(&app, "GET", "/jobs", Some(bad))
            .await
            .assert_problem(StatusCode::UNAUTHORIZED);
    }
    let basic = app
        .send(
            Request::get("/jobs")
                .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    basic.assert_problem(StatusCode::UNAUTHORIZED);

    // The predict scope: predictions and model reads, nothing else.
    let p = Some(predict.token.as_str());
    assert_eq!(
        with_token(&app, "GET", "/models", p).await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_token(&app, "GET", "/backbones", p).await.status,
        StatusCode::OK
    );
    let no_model = with_token(&app, "POST", "/predict", p).await;
    assert!(
        !matches!(
            no_model.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ),
        "{:?}",
        no_model.json
    );
    for (method, path) in [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("POST", "/datasets"),
        ("GET", "/datasets"),
    ] {
        let reply = with_token(&app, method, path, p).await;
        reply.assert_problem(StatusCode::FORBIDDEN);
        assert!(reply.json["detail"].as_str().unwrap().contains("admin"));
    }

    // The admin scope: everything.
    let a = Some(admin.token.as_str());
    assert_eq!(
        with_token(&app, "GET", "/jobs", a).await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_token(&app, "GET", "/datasets", a).await.status,
        StatusCode::OK
    );
    // Recorded in the background, off the request's path.
    let mut used: Option<chrono::DateTime<chrono::Utc>> = None;
    for _ in 0..50 {
        used = sqlx::query_scalar("SELECT last_used_at FROM api_keys WHERE id = $1")
            .bind(admin.row.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if used.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(used.is_some(), "use of a key is recorded");

    // Revoked keys stop working; revoking every key does not reopen the API.
    assert!(finetuned::store::keys::revoke(&app.pool, &admin.row.prefix)
        .await
        .unwrap());
    assert!(
        finetuned::store::keys::revoke(&app.pool, &predict.row.id.to_string())
            .await
            .unwrap()
    );
    tokio::time::sleep(KEY_CACHE).await;
    with_token(&app, "GET", "/jobs", a)
        .await
        .assert_problem(StatusCode::UNAUTHORIZED);
    with_token(&app, "GET", "/jobs", None)
        .await
        .assert_problem(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn metrics_expose_requests_and_queue_depth() {
    let app = TestApp::spawn().await;
    let dataset = app.shapes_dataset(4, 32).await;
    for _ in 0..2 {
        app.submit_job(json!({ "dataset_id": dataset, "epochs": 1 }))
            .await;
    }
    app.get(&format!("/jobs/{}", uuid::Uuid::new_v4())).await;
    let reply = app.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type.starts_with("text/plain"));
    let text = String::from_utf8(reply.body).unwrap();
    // Labelled by route template, not by the id in the path.
    let not_found = text
        .lines()
        .find(|l| {
            l.starts_with("finetuned_http_requests_total{")
                && l.contains("route=\"/jobs/{id}\"")
                && l.contains("status=\"404\"")
        })
        .unwrap_or_else(|| panic!("no 404 counter for /jobs/{{id}} in:\n{text}"));
    let count: f64 = not_found.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0);
    assert!(text.contains("finetuned_http_request_duration_seconds_bucket{"));
    assert!(
        text.lines()
            .any(|l| l == "finetuned_jobs{status=\"queued\"} 2"),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l == "finetuned_jobs{status=\"running\"} 0"));
    assert!(text.contains("# TYPE finetuned_workers_seen gauge"));
}

#[tokio::test]
async fn readiness_fails_without_the_weights() {
    let empty = std::env::temp_dir().join(format!("no-weights-{}", uuid::Uuid::new_v4()));
    let app =
        TestApp::spawn_custom(small_batching(), |state| state.weights_dir = empty.clone()).await;
    let reply = app.get("/readyz").await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.json["detail"]
        .as_str()
        .unwrap()
        .contains("mobilenet_v2.safetensors"));
    // Liveness does not depend on it.
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let app = TestApp::spawn().await;
    let made = app.get("/healthz").await;
    let id = made.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let echoed = app
        .send(
            Request::get("/healthz")
                .header("x-request-id", "client-chosen-42")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(echoed.headers["x-request-id"], "client-chosen-42");
}

#[tokio::test]
async fn an_upload_past_its_deadline_is_refused_and_leaves_nothing() {
    let app = TestApp::spawn_custom(small_batching(), |state| {
        state.limits.upload_timeout = Duration::from_millis(1);
    })
    .await;
    let reply = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", "shapes.zip", shapes_zip(30, 64))],
        )
        .await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.json["detail"].as_str().unwrap().contains("limit"));
    // The ingest, still running when the request was dropped, cleans up.
    let mut left = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = [app.files_under("datasets"), app.files_under("tmp")].concat();
        if left.is_empty() {
            break;
        }
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    // Its row is removed in the background too.
    let mut rows = 1;
    for _ in 0..50 {
        rows = app.count("datasets").await;
        if rows == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows, 0);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn cors_is_off_unless_origins_are_configured() {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/models")
            .header(header::ORIGIN, "https://app.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET")
            .body(Body::empty())
            .unwrap()
    };
    let closed = TestApp::spawn().await;
    let reply = closed.send(preflight()).await;
    assert!(reply
        .headers
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());

    let open = TestApp::spawn_custom(small_batching(), |state| {
        state.limits.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let reply = open.send(preflight()).await;
    assert_eq!(
        reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
}
