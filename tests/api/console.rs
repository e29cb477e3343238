//! The web console: served by the binary at `/` and `/ui/…`, open without a
//! key, under a strict Content-Security-Policy, its assets embedded, typed
//! and cached, nothing fetched from elsewhere, its scripts valid JavaScript.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use finetuned::auth::{self, Scope};
use serde_json::json;

use crate::helpers::{Reply, TestApp};

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn assert_page(reply: &Reply, path: &str) {
    assert_eq!(reply.status, StatusCode::OK, "{path}");
    assert_eq!(reply.content_type, "text/html; charset=utf-8", "{path}");
    let csp = reply.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{path}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{path}: {csp}");
    assert_eq!(reply.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let html = String::from_utf8_lossy(&reply.body);
    assert!(html.starts_with("<!doctype html>"), "{path}");
    assert!(html.contains(r#"<main id="main""#), "{path}");
}

/// The `src`/`href` values of the page that start with `/`.
fn local_references(html: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for piece in html.split(attribute).skip(1) {
            let value = &piece[..piece.find('"').unwrap()];
            if value.starts_with("/ui/assets/") {
                refs.push(value.to_string());
            }
        }
    }
    refs
}

#[tokio::test]
async fn the_console_is_served_with_its_assets() {
    let app = TestApp::spawn().await;
    for path in ["/", "/ui", "/ui/", "/ui/jobs/x", "/ui/datasets/abc/def"] {
        assert_page(&app.get(path).await, path);
    }
    let page = app.get("/").await;
    let html = String::from_utf8(page.body.clone()).unwrap();
    assert_eq!(page.headers[header::CACHE_CONTROL], "no-cache");

    let assets = local_references(&html);
    assert!(assets.len() >= 4, "{assets:?}");
    for path in &assets {
        let reply = app.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        let expected = match Path::new(path).extension().and_then(|e| e.to_str()) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            other => panic!("{path}: an asset of an unexpected kind {other:?}"),
        };
        assert_eq!(reply.content_type, expected, "{path}");
        assert!(reply.headers.contains_key(header::CONTENT_SECURITY_POLICY));
        let cache = reply.headers[header::CACHE_CONTROL].to_str().unwrap();
        assert!(
            cache.contains("max-age=31536000") && cache.contains("immutable"),
            "{path}: {cache}"
        );
        // Served as embedded: the file under console/ (path after the version).
        let (_, rest) = path["/ui/assets/".len()..].split_once('/').unwrap();
        let on_disk = std::fs::read(console_dir().join(rest)).unwrap();
        assert!(reply.body == on_disk, "{path} differs from console/{rest}");

        // Revalidation by ETag.
        let etag = reply.headers[header::ETAG].to_str().unwrap().to_string();
        let again = app
            .send(
                Request::get(path.as_str())
                    .header(header::IF_NONE_MATCH, &etag)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(again.body.is_empty());
    }
    // Another build's assets, and names that are no asset, are not found.
    let (_, rest) = assets[0]["/ui/assets/".len()..].split_once('/').unwrap();
    app.get(&format!("/ui/assets/000000000000/{rest}"))
        .await
        .assert_problem(StatusCode::NOT_FOUND);
    let version = assets[0]["/ui/assets/".len()..].split_once('/').unwrap().0;
    for missing in ["index.html", "../Cargo.toml", "vendor/uplot/LICENSE"] {
        app.get(&format!("/ui/assets/{version}/{missing}"))
            .await
            .assert_problem(StatusCode::NOT_FOUND);
    }
    // The API around it is unchanged.
    app.get("/nowhere")
        .await
        .assert_problem(StatusCode::NOT_FOUND);
    assert_eq!(app.get("/datasets").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_page_needs_no_key_but_the_api_does() {
    let app = TestApp::spawn().await;
    let admin = auth::create_key(&app.pool, "console", Scope::Admin)
        .await
        .unwrap();
    let predict = auth::create_key(&app.pool, "app", Scope::Predict)
        .await
        .unwrap();
    // Longer than the key cache's lifetime.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let page = app.get("/ui/predict").await;
    assert_page(&page, "/ui/predict");
    let html = String::from_utf8(page.body).unwrap();
    for asset in local_references(&html) {
        assert_eq!(app.get(&asset).await.status, StatusCode::OK, "{asset}");
    }
    // The page's calls carry the key; without one the API refuses.
    app.get("/datasets")
        .await
        .assert_problem(StatusCode::UNAUTHORIZED);
    let bearer = |token: &str, path: &str| {
        Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        app.send(bearer(&admin.token, "/datasets")).await.status,
        StatusCode::OK
    );
    // A predict key: models yes, datasets no (the page then hides them).
    let refused = app.send(bearer(&predict.token, "/datasets")).await;
    refused.assert_problem(StatusCode::FORBIDDEN);
    assert!(
        refused.json["detail"]
            .as_str()
            .unwrap()
            .contains("`predict` key"),
        "the console recognises a predict key by this: {:?}",
        refused.json
    );
    assert_eq!(
        app.send(bearer(&predict.token, "/models")).await.status,
        StatusCode::OK
    );
    // Only reads of the console are open.
    let post = app
        .send(Request::post("/ui/jobs").body(Body::empty()).unwrap())
        .await;
    post.assert_problem(StatusCode::UNAUTHORIZED);
}

/// What a page served from `host` sends: its own origin passes the
/// cross-site check, another origin does not.
#[tokio::test]
async fn same_origin_console_writes_pass_the_origin_check() {
    let app = TestApp::spawn().await;
    let host = "127.0.0.1:8080";
    let from = |origin: &str, method: &str, path: &str, body: Option<String>| {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(header::ORIGIN, origin)
            .header("sec-fetch-site", "same-origin");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        request
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap()
    };
    let job = json!({"dataset_id": uuid::Uuid::new_v4(), "epochs": 0}).to_string();
    let own = format!("http://{host}");

    // The console's own requests reach the handlers (and their validation).
    let reply = app
        .send(from(&own, "POST", "/jobs", Some(job.clone())))
        .await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(errors.iter().any(|e| e["path"] == "epochs"), "{errors:?}");
    let missing = format!("/datasets/{}", uuid::Uuid::new_v4());
    app.send(from(&own, "DELETE", &missing, None))
        .await
        .assert_problem(StatusCode::NOT_FOUND);

    // Another site's page is refused before any handler.
    for (method, path, body) in [
        ("POST", "/jobs", Some(job)),
        ("DELETE", missing.as_str(), None),
    ] {
        app.send(from("http://evil.example", method, path, body))
            .await
            .assert_problem(StatusCode::FORBIDDEN);
    }
}

/// Files of `console/` whose text is code (licence and notice files aside).
fn console_sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&console_dir(), &mut files);
    files.retain(|p| {
        let name = p.file_name().unwrap().to_str().unwrap();
        !(name.starts_with("LICENSE") || name == "README.md" || name == "NOTICE")
    });
    files.sort();
    files
}

/// The text without comments: `/* */` (JS, CSS), `<!-- -->` (HTML) and JS
/// line comments (`//` at a line's start or after a space: not `https://`).
fn without_comments(text: &str) -> String {
    fn strip(text: &str, open: &str, close: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find(open) {
            out.push_str(&rest[..start]);
            rest = rest[start + open.len()..]
                .find(close)
                .map_or("", |end| &rest[start + open.len() + end + close.len()..]);
        }
        out.push_str(rest);
        out
    }
    let text = strip(&strip(text, "/*", "*/"), "<!--", "-->");
    text.lines()
        .map(|line| {
            let cut = line
                .match_indices("//")
                .find(|(i, _)| *i == 0 || line[..*i].ends_with([' ', '\t']))
                .map_or(line.len(), |(i, _)| i);
            &line[..cut]
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_console_file_fetches_from_elsewhere() {
    let files = console_sources();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = without_comments(&text);
        for scheme in ["http://", "https://", "//cdn", "url(//"] {
            if let Some(at) = code.find(scheme) {
                let around: String = code[at.saturating_sub(60)..].chars().take(140).collect();
                panic!("{} references an external URL: {around}", file.display());
            }
        }
    }
    // The check itself: comments are skipped, code is not.
    assert!(!without_comments("/*! https://x */ a // https://y").contains("https"));
    assert!(without_comments("fetch('https://x')").contains("https"));
}

#[test]
fn the_console_scripts_parse() {
    let Ok(version) = std::process::Command::new("node").arg("--version").output() else {
        eprintln!("node is not installed: the console's scripts are not checked");
        return;
    };
    assert!(version.status.success());
    let scripts: Vec<PathBuf> = console_sources()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "js"))
        .collect();
    assert!(scripts.len() >= 2, "{scripts:?}");
    for script in scripts {
        let out = std::process::Command::new("node")
            .arg("--check")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
