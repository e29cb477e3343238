//! `openapi.yaml` is the contract: every operation it lists is routed.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = TestApp::spawn().await;
    let spec: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../../openapi.yaml")).expect("openapi.yaml parses");
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut checked = 0;
    for (path, operations) in paths {
        let path = path
            .as_str()
            .unwrap()
            .replace("{id}", &uuid::Uuid::new_v4().to_string());
        for (method, _) in operations.as_mapping().unwrap() {
            let method =
                Method::from_bytes(method.as_str().unwrap().to_uppercase().as_bytes()).unwrap();
            let reply = app
                .send(
                    Request::builder()
                        .method(method.clone())
                        .uri(&path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await;
            let detail = reply.json["detail"].as_str().unwrap_or_default();
            assert_ne!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert!(
                !detail.starts_with("no route"),
                "{method} {path} is not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} operations in openapi.yaml");

    // And the router refuses what the contract does not list, as problem+json.
    app.get("/nowhere")
        .await
        .assert_problem(StatusCode::NOT_FOUND);
    app.send(Request::delete("/healthz").body(Body::empty()).unwrap())
        .await
        .assert_problem(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn health_readiness_and_catalogue() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.json["status"], "ok");
    assert_eq!(app.get("/readyz").await.json["status"], "ready");
    let backbones = app.get("/backbones").await;
    let mobilenet = backbones
        .json
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "mobilenet_v2")
        .cloned();
    let mobilenet = mobilenet.expect("mobilenet_v2 listed");
    assert_eq!(
        mobilenet["weights"],
        Value::Bool(true),
        "run scripts/setup to install the weights"
    );
    assert_eq!(mobilenet["default_image_size"], 224);
    let spec = app.get("/openapi.yaml").await;
    assert!(String::from_utf8(spec.body)
        .unwrap()
        .starts_with("openapi: 3.1.0"));
}

/// The routes `src/api/mod.rs` declares, as (METHOD, path) pairs, read from
/// its `.route("path", get(..).post(..))` calls.
fn declared_routes() -> std::collections::BTreeSet<(String, String)> {
    // Whitespace removed, so rustfmt's line breaks do not matter.
    let source: String = include_str!("../../src/api/mod.rs")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let mut routes = std::collections::BTreeSet::new();
    for call in source.split(".route(\"").skip(1) {
        let (path, rest) = call.split_once('"').unwrap();
        let call = &rest[..rest.find("))").map_or(rest.len(), |i| i + 2)];
        for method in ["get", "post", "put", "patch", "delete"] {
            if [",", "."]
                .iter()
                .any(|before| call.contains(&format!("{before}{method}(")))
            {
                routes.insert((method.to_uppercase(), path.to_string()));
            }
        }
    }
    routes
}

#[test]
fn the_router_and_the_contract_list_the_same_operations() {
    let spec: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../../openapi.yaml")).expect("openapi.yaml parses");
    let mut documented = std::collections::BTreeSet::new();
    for (path, operations) in spec["paths"].as_mapping().unwrap() {
        for (method, _) in operations.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if ["get", "post", "put", "patch", "delete"].contains(&method) {
                documented.insert((method.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    let routed = declared_routes();
    assert!(routed.len() >= 15, "parsed only {routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routed but not in openapi.yaml: {undocumented:?}; in openapi.yaml but not routed: {unrouted:?}"
    );
}
