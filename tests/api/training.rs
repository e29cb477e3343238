//! The whole path: upload → fine-tune → metrics → predict.

use axum::http::StatusCode;
use finetuned::train::Outcome;
use image::ImageFormat;
use serde_json::json;

use crate::helpers::{encode, ran_status, render, shapes_zip, torch_rng, Part, TestApp, SHAPES};

#[tokio::test]
async fn upload_train_and_predict_beats_chance_by_far() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;

    let reply = app
        .post_multipart("/predict", &[Part::file("image", "x.png", vec![])])
        .await;
    let _ = reply.assert_problem(StatusCode::NOT_FOUND); // nothing trained yet

    let dataset = app
        .post_multipart(
            "/datasets",
            &[
                Part::text("test_fraction", "0.2"),
                Part::file("file", "shapes.zip", shapes_zip(15, 96)),
            ],
        )
        .await;
    assert_eq!(dataset.status, StatusCode::CREATED, "{:?}", dataset.json);
    assert_eq!(dataset.json["num_train"], 27);
    assert_eq!(dataset.json["num_val"], 9);
    assert_eq!(dataset.json["num_test"], 9);

    let job = app
        .post_json(
            "/jobs",
            &json!({
                "dataset_id": dataset.json["id"], "backbone": "mobilenet_v2",
                "epochs": 3, "image_size": 96, "batch_size": 12, "learning_rate": 0.01
            }),
        )
        .await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{:?}", job.json);
    assert_eq!(job.json["status"], "queued");
    let job_id = job.json["id"].as_str().unwrap().to_string();

    let outcome = app.worker.try_execute_one(None).await.expect("worker step");
    assert_eq!(
        outcome,
        Outcome::Ran {
            job_id: job_id.parse().unwrap(),
            status: "succeeded".into()
        }
    );
    assert_eq!(
        app.worker.try_execute_one(None).await.unwrap(),
        Outcome::Idle
    );

    let job = app.get(&format!("/jobs/{job_id}")).await.json;
    assert_eq!(job["status"], "succeeded", "{job:?}");
    assert_eq!(job["epoch"], 3);
    assert_eq!(job["attempts"], 1);
    let best_epoch = job["best_epoch"].as_i64().expect("best epoch");
    let model_id = job["model_id"].as_str().expect("model id").to_string();
    // The best checkpoint was scored once on the held-out test split.
    let test = &job["test_metrics"];
    assert_eq!(test["epoch"], best_epoch, "{test:?}");
    assert_eq!(test["images"], 9);
    let tested: i64 = test["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
        .sum();
    assert_eq!(tested, 9);
    assert!(test["accuracy"].as_f64().unwrap() >= 0.6, "{test:?}");

    let metrics = app.get(&format!("/jobs/{job_id}/metrics")).await.json;
    let epochs = metrics["epochs"].as_array().unwrap();
    assert_eq!(
        epochs
            .iter()
            .map(|e| e["epoch"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for e in epochs {
        assert!(e["train_loss"].as_f64().unwrap().is_finite());
        assert!(e["images_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(e["per_class"].as_array().unwrap().len(), 3);
        let confusion: i64 = e["confusion_matrix"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
            .sum();
        assert_eq!(confusion, 9, "every validation image counted once");
    }
    let best = epochs
        .iter()
        .map(|e| e["val_accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(job["best_val_accuracy"].as_f64().unwrap(), best);
    assert_eq!(
        epochs[best_epoch as usize - 1]["val_accuracy"]
            .as_f64()
            .unwrap(),
        best
    );
    assert!(
        epochs[2]["train_loss"].as_f64() < epochs[0]["train_loss"].as_f64(),
        "loss falls: {epochs:?}"
    );
    assert_eq!(app.count("runs").await, 1);
    assert_eq!(app.count("checkpoints WHERE is_best").await, 1);
    assert!(app
        .artifacts
        .path(&format!("jobs/{job_id}/best.safetensors"))
        .exists());
    assert!(app
        .artifacts
        .path(&format!("jobs/{job_id}/model.json"))
        .exists());

    // Held-out images the model never saw, several per request.
    let mut correct = 0;
    let mut total = 0;
    for (class, name) in SHAPES.iter().enumerate() {
        let parts: Vec<Part> = (0..10)
            .map(|i| {
                let seed = 1000 + i;
                Part::file(
                    "image",
                    &format!("{name}-{seed}.jpg"),
                    encode(&render(class, seed, 96), ImageFormat::Jpeg),
                )
            })
            .collect();
        let reply = app
            .post_multipart(&format!("/predict?top_k=2&model={model_id}"), &parts)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
        assert_eq!(reply.json["model_id"], model_id);
        for result in reply.json["results"].as_array().unwrap() {
            let predictions = result["predictions"].as_array().unwrap();
            assert_eq!(predictions.len(), 2);
            let (first, second) = (
                predictions[0]["score"].as_f64().unwrap(),
                predictions[1]["score"].as_f64().unwrap(),
            );
            assert!(first >= second && first <= 1.0 && second >= 0.0);
            total += 1;
            correct += usize::from(predictions[0]["label"] == *name);
        }
    }
    let accuracy = correct as f64 / total as f64;
    assert!(
        accuracy >= 0.8,
        "held-out accuracy {accuracy} (chance is 0.33)"
    );

    // The first model is deployed as the default; a broken image gets its
    // own error without failing its neighbour.
    let ok = || {
        Part::file(
            "image",
            "ok.png",
            encode(&render(0, 77, 64), ImageFormat::Png),
        )
    };
    let broken = || Part::file("image", "broken.jpg", b"\xff\xd8 not really".to_vec());
    let reply = app.post_multipart("/predict", &[ok(), broken()]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    assert_eq!(reply.json["model_id"], model_id);
    assert_eq!(
        reply.json["results"][0]["predictions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let error = reply.json["results"][1]["error"].as_str().unwrap();
    assert!(error.starts_with("cannot decode"), "{error}");
    assert!(reply.json["results"][1]["predictions"].is_null());
    let reply = app.post_multipart("/predict", &[broken()]).await;
    let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "image[0] (broken.jpg)");
}

#[tokio::test]
async fn cached_features_train_the_same_model_as_the_full_forward_pass() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app.shapes_dataset(6, 48).await;
    let mut histories = Vec::new();
    for cache in [true, false] {
        let job = app
            .submit_job(json!({
                "dataset_id": dataset, "epochs": 3, "image_size": 64, "batch_size": 4,
                "learning_rate": 0.01, "augmentation": { "enabled": false }, "cache_features": cache
            }))
            .await;
        let outcome = app.worker.try_execute_one(None).await.unwrap();
        assert_eq!(ran_status(outcome), "succeeded");
        let view = app.get(&format!("/jobs/{job}")).await.json;
        assert_eq!(view["runs"][0]["cached_features"], cache, "{view:?}");
        // Mixed precision is on by default, but only for CUDA devices.
        assert_eq!(view["runs"][0]["precision"], "fp32", "{view:?}");
        let rows = app.get(&format!("/jobs/{job}/metrics")).await.json["epochs"].clone();
        histories.push(rows.as_array().unwrap().clone());
    }
    let (cached, full) = (&histories[0], &histories[1]);
    assert_eq!(cached.len(), 3);
    for (c, f) in cached.iter().zip(full) {
        for field in ["train_loss", "val_loss", "val_accuracy"] {
            let (c, f) = (c[field].as_f64().unwrap(), f[field].as_f64().unwrap());
            assert!((c - f).abs() < 1e-4, "{field}: cached {c} vs full {f}");
        }
    }
}

#[tokio::test]
async fn a_dataset_stored_at_a_smaller_side_trains_and_serves_at_that_side() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset = app
        .post_multipart(
            "/datasets",
            &[
                Part::text("stored_size", "72"),
                Part::file("file", "shapes.zip", shapes_zip(6, 96)),
            ],
        )
        .await;
    assert_eq!(dataset.status, StatusCode::CREATED, "{:?}", dataset.json);
    assert_eq!(dataset.json["stored_size"], 72);
    let dataset_id = dataset.json["id"].as_str().unwrap();
    let stored = finetuned::data::load_split(
        &app.artifacts.path(&format!("datasets/{dataset_id}")),
        finetuned::data::TRAIN_FILE,
    )
    .unwrap()
    .0;
    assert_eq!(stored.size()[1..], [3, 72, 72]);

    let job_id = app
        .submit_job(json!({
            "dataset_id": dataset_id, "epochs": 1, "image_size": 64,
            "augmentation": { "enabled": false }
        }))
        .await;
    app.worker.try_execute_one(None).await.expect("worker step");
    let job = app.get(&format!("/jobs/{job_id}")).await.json;
    assert_eq!(job["status"], "succeeded", "{job:?}");
    let model = app
        .get(&format!("/models/{}", job["model_id"].as_str().unwrap()))
        .await
        .json;
    assert_eq!(model["stored_size"], 72);

    let photo = encode(&render(0, 99, 120), ImageFormat::Png);
    assert_eq!(app.predict_one(None, "disc.png", photo).await.len(), 3);

    let bad = app
        .post_multipart(
            "/datasets",
            &[
                Part::text("stored_size", "8"),
                Part::file("file", "shapes.zip", shapes_zip(2, 32)),
            ],
        )
        .await;
    let errors = bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "stored_size");
}

#[tokio::test]
async fn each_efficientnet_lite_fine_tunes_and_serves_through_the_api() {
    let app = TestApp::spawn().await;
    let _rng = torch_rng().await;
    let dataset_id = app.shapes_dataset(4, 64).await;
    for backbone in [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ] {
        // The last stage trains too: gradients flow through the Lite blocks.
        let job_id = app
            .submit_job(json!({
                "dataset_id": dataset_id, "backbone": backbone, "epochs": 1,
                "image_size": 64, "batch_size": 6, "freeze": "last_n", "trainable_stages": 2
            }))
            .await;
        app.worker.try_execute_one(None).await.expect("worker step");
        let job = app.get(&format!("/jobs/{job_id}")).await.json;
        assert_eq!(job["status"], "succeeded", "{backbone}: {job:?}");
        let model_id = job["model_id"].as_str().unwrap();
        let model = app.get(&format!("/models/{model_id}")).await.json;
        assert_eq!(model["backbone"], backbone);

        let photo = encode(&render(1, 5, 80), ImageFormat::Jpeg);
        let scores: f64 = app
            .predict_one(Some(model_id), "square.jpg", photo)
            .await
            .iter()
            .map(|p| p["score"].as_f64().unwrap())
            .sum();
        assert!(
            (scores - 1.0).abs() < 1e-4,
            "{backbone}: scores sum to {scores}"
        );
    }
}
