//! Strings Postgres cannot store and requests from other web sites: each
//! refused with a 4xx problem naming what was wrong, nothing stored, and
//! the server still answering.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;

use crate::helpers::{shapes_zip, Part, TestApp};

#[tokio::test]
async fn a_nul_in_a_path_query_json_string_or_form_field_is_a_4xx_naming_it() {
    let app = TestApp::spawn().await;

    for path in [
        "/backbones/%00",
        "/backbones/a%00b",
        "/datasets/%00/samples",
    ] {
        let reply = app.get(path).await;
        assert!(reply.status.is_client_error(), "{path}: {}", reply.status);
        reply.assert_problem(reply.status);
        assert!(
            reply.json["detail"].as_str().unwrap().contains("NUL"),
            "{path}"
        );
    }
    // An id that is no id is not echoed back whole.
    let long = app.get(&format!("/jobs/{}/events", "x".repeat(5000))).await;
    long.assert_problem(StatusCode::NOT_FOUND);
    assert!(long.body.len() < 1024, "{} bytes", long.body.len());
    let delete = app
        .send(
            Request::delete("/backbones/%00")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(delete.status.is_client_error());

    let predict = app
        .post_bytes("/predict?model=%00&top_k=3", "image/jpeg", vec![0xff, 0xd8])
        .await;
    let errors = predict.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "query:model");

    let job = app
        .post_json(
            "/jobs",
            &json!({"dataset_id": uuid::Uuid::new_v4(), "backbone": "a\u{0}"}),
        )
        .await;
    let errors = job.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "body/backbone");
    assert_eq!(app.count("jobs").await, 0);

    // Multipart text fields: NUL, and longer than any field needs to be.
    let long = "x".repeat(5000);
    for (field, value) in [("val_fraction", "0.2\u{0}"), ("seed", long.as_str())] {
        let upload = app
            .post_multipart(
                "/datasets",
                &[
                    Part::text(field, value),
                    Part::file("file", "shapes.zip", shapes_zip(2, 32)),
                ],
            )
            .await;
        let errors = upload.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(errors[0]["path"], field);
        assert!(upload.body.len() < 4096, "the answer echoes no long input");
        app.assert_no_dataset_stored().await;
    }
    let named = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", "sha\u{0}pes.zip", shapes_zip(2, 32))],
        )
        .await;
    // Many tiny fields: refused once past a form's worth, before the file.
    let mut many: Vec<Part> = (0..5000)
        .map(|i| Part::text(&format!("f{i}"), "x"))
        .collect();
    many.push(Part::file("file", "shapes.zip", shapes_zip(2, 32)));
    let flooded = app.post_multipart("/datasets", &many).await;
    let errors = flooded.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "form");
    assert!(
        flooded.body.len() < 16 * 1024,
        "{} bytes",
        flooded.body.len()
    );
    app.assert_no_dataset_stored().await;

    // Refused where the form is read: a NUL is no valid header character.
    named.assert_problem(StatusCode::BAD_REQUEST);
    app.assert_no_dataset_stored().await;
    let long_name = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", &"n".repeat(300), shapes_zip(2, 32))],
        )
        .await;
    let errors = long_name.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file");
    app.assert_no_dataset_stored().await;
}

#[tokio::test]
async fn a_page_on_another_origin_cannot_drive_the_api() {
    let app = TestApp::spawn().await;
    let from = |origin: &str, site: Option<&str>| {
        let mut request = Request::post("/jobs")
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ORIGIN, origin);
        if let Some(site) = site {
            request = request.header("sec-fetch-site", site);
        }
        request
            .body(Body::from(
                json!({"dataset_id": uuid::Uuid::new_v4()}).to_string(),
            ))
            .unwrap()
    };
    for (origin, site) in [
        ("https://evil.example", Some("cross-site")),
        ("http://localhost:3000", Some("same-site")),
        ("null", None),
    ] {
        let reply = app.send(from(origin, site)).await;
        reply.assert_problem(StatusCode::FORBIDDEN);
        assert!(
            reply.json["detail"]
                .as_str()
                .unwrap()
                .contains("--cors-origins"),
            "{origin}"
        );
    }
    // A form post from another site carries no Origin in some browsers'
    // modes but does carry fetch metadata.
    let form = app
        .send(
            Request::post("/datasets")
                .header("sec-fetch-site", "cross-site")
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=x")
                .body(Body::from("--x--\r\n"))
                .unwrap(),
        )
        .await;
    form.assert_problem(StatusCode::FORBIDDEN);
    app.assert_no_dataset_stored().await;

    // The server's own pages and clients without an Origin still work.
    let own = app
        .send(from("http://127.0.0.1:8080", Some("same-origin")))
        .await;
    let errors = own.assert_problem(StatusCode::UNPROCESSABLE_ENTITY); // no such dataset
    assert_eq!(errors[0]["path"], "dataset_id");
    assert_eq!(app.get("/jobs").await.status, StatusCode::OK);
}
