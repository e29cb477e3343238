//! `/predict` in every form, model selection and deployment, export,
//! limits and overload.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use finetuned::data::{self, preprocess};
use finetuned::models::{self, Classifier};
use finetuned::serve::{self, BatchingConfig, ModelSpec};
use image::ImageFormat;
use serde_json::{json, Value};

use crate::helpers::{encode, ran_status, render, torch_python, torch_rng, Part, TestApp};

/// Trains a small model on cached features; returns (model id, dataset id).
async fn trained_model(app: &TestApp, seed: i64) -> (String, String) {
    let dataset = app.shapes_dataset(6, 48).await;
    let job = app
        .submit_job(json!({
            "dataset_id": dataset, "epochs": 2, "image_size": 64, "batch_size": 6,
            "learning_rate": 0.01, "seed": seed, "augmentation": { "enabled": false }
        }))
        .await;
    let _rng = torch_rng().await;
    assert_eq!(
        ran_status(app.worker.try_execute_one(None).await.unwrap()),
        "succeeded"
    );
    let view = app.get(&format!("/jobs/{job}")).await.json;
    (view["model_id"].as_str().unwrap().to_string(), dataset)
}

fn png(shape: usize, seed: u64) -> Vec<u8> {
    encode(&render(shape, seed, 64), ImageFormat::Png)
}

/// Starts a JSON POST that runs concurrently with the test; the handle
/// yields the response's status and `Retry-After` header.
fn spawn_json_post(
    app: &TestApp,
    path: String,
    body: String,
) -> tokio::task::JoinHandle<(StatusCode, Option<header::HeaderValue>)> {
    let router = app.router.clone();
    tokio::spawn(async move {
        use tower::ServiceExt;
        let request = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        (
            response.status(),
            response.headers().get(header::RETRY_AFTER).cloned(),
        )
    })
}

/// Same labels in the same order, scores within 1e-5 (a forward pass over a
/// batch of two may round differently from one over a single image).
fn assert_same_predictions(a: &Value, b: &Value) {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["label"], y["label"]);
        assert!(
            (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5,
            "{x} vs {y}"
        );
    }
}

#[tokio::test]
async fn every_input_form_gives_the_same_scores() {
    let app = TestApp::spawn().await;
    let (model, _) = trained_model(&app, 0).await;
    let image = png(1, 5);
    let other = png(2, 6);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);

    let multipart = app
        .post_multipart(
            "/predict?top_k=3",
            &[Part::file("image", "a.png", image.clone())],
        )
        .await;
    let json_one = app
        .post_json("/predict?top_k=3", &json!({ "image": b64(&image) }))
        .await;
    let json_many = app
        .post_json(
            "/predict?top_k=3",
            &json!({ "images": [b64(&image), b64(&other), "%%%"] }),
        )
        .await;
    let raw = app
        .post_bytes("/predict?top_k=3", "image/png", image.clone())
        .await;
    for reply in [&multipart, &json_one, &json_many, &raw] {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
        assert_eq!(reply.json["model_id"], model.as_str());
    }
    let first = |r: &crate::helpers::Reply| r.json["results"][0]["predictions"].clone();
    assert_eq!(first(&multipart).as_array().unwrap().len(), 3);
    for reply in [&json_one, &json_many, &raw] {
        assert_same_predictions(&first(reply), &first(&multipart));
    }
    assert_eq!(json_many.json["results"].as_array().unwrap().len(), 3);
    assert!(json_many.json["results"][2]["error"]
        .as_str()
        .unwrap()
        .contains("base64"));

    let top1 = app
        .post_json("/predict?top_k=1", &json!({ "image": b64(&image) }))
        .await;
    assert_eq!(first(&top1).as_array().unwrap().len(), 1);
    assert_same_predictions(&json!([first(&top1)[0]]), &json!([first(&multipart)[0]]));

    app.post_bytes("/predict", "text/plain", b"hello".to_vec())
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    app.post_json("/predict", &json!({ "images": [] }))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    app.post_json("/predict?top_k=0", &json!({ "image": b64(&image) }))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    // Over the 4 MiB limit of the test app.
    app.post_bytes("/predict", "image/png", vec![0; 5 * 1024 * 1024])
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn predict_scores_equal_the_evaluation_path() {
    let app = TestApp::spawn().await;
    let (model_id, dataset_id) = trained_model(&app, 0).await;
    let model = app.get(&format!("/models/{model_id}")).await.json;
    let labels: Vec<String> = serde_json::from_value(model["labels"].clone()).unwrap();

    // The evaluation path: a stored validation image through the model.
    let dataset_dir = app.artifacts.path(&format!("datasets/{dataset_id}"));
    let (images, _) = data::load_split(&dataset_dir, data::VAL_FILE).unwrap();
    let spec = ModelSpec {
        id: model_id.parse().unwrap(),
        checkpoint: app.artifacts.path(&format!(
            "jobs/{}/best.safetensors",
            model["job_id"].as_str().unwrap()
        )),
        backbone: "mobilenet_v2".into(),
        labels: labels.clone(),
        image_size: 64,
        stored_size: preprocess::STORED_SIZE,
        normalization: preprocess::Normalization::IMAGENET,
        script: None,
    };
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let classifier =
        Classifier::new(&mut vs, models::find("mobilenet_v2").unwrap(), 3, None).unwrap();
    vs.load(&spec.checkpoint).unwrap();
    let expected =
        tch::no_grad(|| serve::forward_probabilities(&classifier, &spec, &images.narrow(0, 0, 1)));

    // The same image through /predict, as a lossless PNG of its stored pixels.
    let pixels: Vec<u8> =
        Vec::try_from(images.get(0).permute([1, 2, 0]).contiguous().view([-1])).unwrap();
    let side = preprocess::STORED_SIZE;
    let png = encode(
        &image::RgbImage::from_raw(side, side, pixels).unwrap(),
        ImageFormat::Png,
    );
    let reply = app
        .post_multipart(
            &format!("/predict?model={model_id}"),
            &[Part::file("image", "v.png", png)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    for p in reply.json["results"][0]["predictions"].as_array().unwrap() {
        let index = labels
            .iter()
            .position(|l| l == p["label"].as_str().unwrap())
            .unwrap() as i64;
        let want = expected.double_value(&[0, index]);
        let got = p["score"].as_f64().unwrap();
        assert!(
            (want - got).abs() < 1e-5,
            "{}: predict {got} vs evaluation {want}",
            p["label"]
        );
    }
}

#[tokio::test]
async fn models_are_selected_by_id_alias_or_default_and_redeployed_under_load() {
    let app = TestApp::spawn().await;
    let (first, _) = trained_model(&app, 1).await;
    let (second, _) = trained_model(&app, 2).await;

    let listed = app.get("/models").await.json;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let detail = app.get(&format!("/models/{second}")).await.json;
    assert_eq!(detail["lineage"]["job"]["config"]["epochs"], 2);
    assert_eq!(
        detail["lineage"]["dataset"]["classes"],
        json!(["disc", "square", "stripes"])
    );
    assert_eq!(detail["aliases"], json!([]));
    // The first trained model became the default; the second did not.
    assert_eq!(
        app.get(&format!("/models/{first}")).await.json["aliases"],
        json!(["default"])
    );

    let body = json!({ "image": base64::engine::general_purpose::STANDARD.encode(png(0, 9)) });
    let served_by =
        |reply: &crate::helpers::Reply| reply.json["model_id"].as_str().unwrap().to_string();
    assert_eq!(served_by(&app.post_json("/predict", &body).await), first);
    assert_eq!(
        served_by(
            &app.post_json(&format!("/predict?model={second}"), &body)
                .await
        ),
        second
    );
    app.post_json("/predict?model=production", &body)
        .await
        .assert_problem(StatusCode::NOT_FOUND);

    let deployed = app
        .post_json(
            &format!("/models/{second}/deploy"),
            &json!({ "alias": "production" }),
        )
        .await;
    assert_eq!(deployed.status, StatusCode::OK, "{:?}", deployed.json);
    assert_eq!(deployed.json["previous_model_id"], Value::Null);
    assert_eq!(
        served_by(&app.post_json("/predict?model=production", &body).await),
        second
    );

    // Switch the default while requests are in flight: none may fail.
    let load: Vec<_> = (0..24)
        .map(|_| spawn_json_post(&app, "/predict".into(), body.to_string()))
        .collect();
    let switched = app.post_empty(&format!("/models/{second}/deploy")).await;
    assert_eq!(switched.json["previous_model_id"], first.as_str());
    for request in load {
        assert_eq!(request.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(served_by(&app.post_json("/predict", &body).await), second);
    // The previous default stays available by id.
    assert_eq!(
        served_by(
            &app.post_json(&format!("/predict?model={first}"), &body)
                .await
        ),
        first
    );

    let bad_alias = app
        .post_json(
            &format!("/models/{second}/deploy"),
            &json!({ "alias": "no spaces" }),
        )
        .await;
    bad_alias.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn export_is_a_zip_of_weights_and_the_preprocessing_contract() {
    let app = TestApp::spawn().await;
    let (model, _) = trained_model(&app, 0).await;
    let reply = app.get(&format!("/models/{model}/export")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/zip");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(reply.body.clone())).unwrap();
    let card: Value = serde_json::from_reader(zip.by_name("model.json").unwrap()).unwrap();
    assert_eq!(card["labels"], json!(["disc", "square", "stripes"]));
    assert_eq!(card["image_size"], 64);
    assert_eq!(card["preprocessing"]["normalization"]["mean"][0], 0.485);
    let mut weights = Vec::new();
    std::io::Read::read_to_end(
        &mut zip.by_name("weights.safetensors").unwrap(),
        &mut weights,
    )
    .unwrap();
    let path = std::env::temp_dir().join(format!("export-{model}.safetensors"));
    std::fs::write(&path, weights).unwrap();
    let tensors = tch::Tensor::read_safetensors(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let head = tensors
        .iter()
        .find(|(name, _)| name == "head.weight")
        .expect("head weights");
    assert_eq!(head.1.size(), [3, 1280]);
    assert!(tensors
        .iter()
        .any(|(name, _)| name == "features.0.0.weight"));

    // PyTorch loads the export and, following model.json, scores an image
    // as /predict does.
    let png = png(1, 42);
    let canonical = preprocess::decode_canonical(&png).unwrap();
    let side = preprocess::STORED_SIZE;
    let hwc: Vec<u8> = (0..(side * side) as usize)
        .flat_map(|i| (0..3).map(move |c| (c, i)))
        .map(|(c, i)| canonical[c * (side * side) as usize + i])
        .collect();
    let canonical_png = encode(
        &image::RgbImage::from_raw(side, side, hwc).unwrap(),
        ImageFormat::Png,
    );
    let pytorch = score_export("load_export.py", &reply.body, &canonical_png);
    let served = app
        .post_multipart(
            &format!("/predict?model={model}"),
            &[Part::file("image", "x.png", png)],
        )
        .await;
    assert_same_scores(&served.json, &pytorch, 1e-4);

    // The TorchScript export carries the network and the preprocessing after
    // decoding: PyTorch alone gives /predict's scores for the canonical image.
    let reply = app
        .get(&format!("/models/{model}/export?format=torchscript"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let traced = score_export("load_torchscript.py", &reply.body, &canonical_png);
    assert_same_scores(&served.json, &traced, 1e-5);

    app.get(&format!("/models/{model}/export?format=onnx"))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
}

/// Runs a script of `tests/api` on an exported zip and a canonical PNG in
/// the torch virtualenv; returns the scores by label it prints.
fn score_export(script: &str, zip: &[u8], canonical_png: &[u8]) -> Value {
    let dir = std::env::temp_dir().join(format!("export-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.zip"), zip).unwrap();
    std::fs::write(dir.join("image.png"), canonical_png).unwrap();
    let out = std::process::Command::new(torch_python())
        .arg(format!("{}/tests/api/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(dir.join("model.zip"))
        .arg(dir.join("image.png"))
        .output()
        .expect("the virtualenv's python runs (scripts/setup)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every score `/predict` returned equals the other's for its label.
fn assert_same_scores(predicted: &Value, other: &Value, tolerance: f64) {
    for p in predicted["results"][0]["predictions"].as_array().unwrap() {
        let ours = p["score"].as_f64().unwrap();
        let theirs = other[p["label"].as_str().unwrap()].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < tolerance,
            "{}: finetuned {ours} vs export {theirs}",
            p["label"]
        );
    }
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    // One waiting request at most, one image per forward pass.
    let app = TestApp::spawn_with(BatchingConfig {
        device: tch::Device::Cpu,
        cache_capacity: 1,
        threads: 1,
        torch_threads: 0,
        cache_bytes: usize::MAX,
        window: Duration::ZERO,
        max_batch: 1,
        queue: 1,
    })
    .await;
    let (model, _) = trained_model(&app, 0).await;
    let body =
        json!({ "image": base64::engine::general_purpose::STANDARD.encode(png(0, 1)) }).to_string();
    let requests: Vec<_> = (0..48)
        .map(|_| spawn_json_post(&app, format!("/predict?model={model}"), body.clone()))
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let (status, retry_after) = request.await.unwrap();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(retry_after.unwrap(), "1");
        }
        statuses.push(status);
    }
    assert!(statuses
        .iter()
        .all(|s| [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(s)));
    assert!(statuses.contains(&StatusCode::OK));
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "the queue never filled"
    );
}

#[tokio::test]
async fn a_many_image_request_is_shared_by_the_threads_and_keeps_its_order() {
    // Two inference threads, one image per forward pass (the CPU default):
    // the request's images are queued one by one and both threads take some.
    let app = TestApp::spawn_with(BatchingConfig {
        device: tch::Device::Cpu,
        cache_capacity: 1,
        threads: 2,
        torch_threads: 2,
        cache_bytes: usize::MAX,
        window: Duration::ZERO,
        max_batch: 1,
        queue: 64,
    })
    .await;
    let (model, _) = trained_model(&app, 0).await;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let images: Vec<String> = (0..12).map(|i| b64(&png(i % 3, 100 + i as u64))).collect();
    // An undecodable image in the middle keeps its place and its own error.
    let mut sent = images.clone();
    sent.insert(5, "%%%".into());
    let path = format!("/predict?model={model}&top_k=3");
    let many = app.post_json(&path, &json!({ "images": sent })).await;
    assert_eq!(many.status, StatusCode::OK, "{:?}", many.json);
    let results = many.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 13);
    assert!(results[5]["error"].as_str().unwrap().contains("base64"));
    let mut results: Vec<&Value> = results.iter().collect();
    results.remove(5);
    for (image, result) in images.iter().zip(results) {
        let one = app.post_json(&path, &json!({ "image": image })).await;
        assert_eq!(one.status, StatusCode::OK, "{:?}", one.json);
        assert_same_predictions(
            &result["predictions"],
            &one.json["results"][0]["predictions"],
        );
    }

    // Admission counts every image against the queue, but a request larger
    // than the whole queue (12 images, queue of 4) still runs when nothing
    // else waits.
    let small = TestApp::spawn_with(BatchingConfig {
        max_batch: 1,
        queue: 4,
        ..crate::helpers::small_batching()
    })
    .await;
    let (model, _) = trained_model(&small, 0).await;
    let reply = small
        .post_json(
            &format!("/predict?model={model}"),
            &json!({ "images": images }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    assert_eq!(reply.json["results"].as_array().unwrap().len(), 12);
}
