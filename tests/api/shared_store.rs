//! Several hosts, one object store: the API publishes a dataset, a worker
//! with an empty cache trains from the store and publishes its checkpoints,
//! and the API fetches the model it never saw to serve it.

use std::path::{Path, PathBuf};

use finetuned::artifacts::Artifacts;
use finetuned::train::Worker;
use image::ImageFormat;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{encode, ran_status, render, torch_rng, TestApp};

fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                walk(&entry.path(), root, out);
            } else {
                out.push(
                    entry
                        .path()
                        .strip_prefix(root)
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn hosts_share_datasets_checkpoints_and_models_through_the_store() {
    let _rng = torch_rng().await;
    let scratch = std::env::temp_dir().join(format!("finetuned-store-{}", uuid::Uuid::new_v4()));
    let store = scratch.join("bucket");
    let url = format!("file://{}", store.display());
    let api_cache: PathBuf = scratch.join("api");
    let remote = |cache: &Path| Artifacts::open_with_remote(cache, &url).expect("store opens");
    let api_artifacts = remote(&api_cache);
    let app = TestApp::spawn_custom(crate::helpers::small_batching(), |state| {
        state.artifacts = api_artifacts
    })
    .await;

    let dataset = app.shapes_dataset(6, 48).await;
    let stored = files(&store);
    assert!(
        stored
            .iter()
            .any(|f| f.starts_with(&format!("datasets/{dataset}/"))),
        "the dataset is published: {stored:?}"
    );

    // A worker on "another host": its cache starts empty.
    let worker_cache = scratch.join("worker");
    let worker = Worker {
        artifacts: remote(&worker_cache),
        ..app.worker.clone()
    };
    let job = app
        .submit_job(json!({ "dataset_id": dataset, "epochs": 3, "image_size": 48 }))
        .await;
    assert_eq!(
        ran_status(worker.try_execute_one(None).await.unwrap()),
        "succeeded"
    );
    let stored = files(&store);
    let job_files: Vec<&String> = stored.iter().filter(|f| f.starts_with("jobs/")).collect();
    for name in [
        "best.safetensors",
        "model.json",
        "epoch-3.safetensors",
        "epoch-2.safetensors",
    ] {
        assert!(
            stored.contains(&format!("jobs/{job}/{name}")),
            "{name} not published: {job_files:?}"
        );
    }
    // Only the epochs a resume could need are kept.
    assert!(!stored.contains(&format!("jobs/{job}/epoch-1.safetensors")));

    // The API host never had the model locally; it fetches it to serve.
    assert!(!api_cache.join(format!("jobs/{job}")).exists());
    let png = encode(&render(0, 99, 48), ImageFormat::Png);
    assert_eq!(app.predict_one(None, "x.png", png).await.len(), 3);
    // The model is the best checkpoint under its run's own name, a key no
    // other attempt of the job writes.
    let model_key: String = sqlx::query_scalar("SELECT artifact_key FROM models WHERE job_id = $1")
        .bind(Uuid::parse_str(&job).unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        model_key.starts_with(&format!("jobs/{job}/model-")),
        "{model_key}"
    );
    assert!(stored.contains(&model_key), "{model_key} not published");
    assert!(api_cache.join(&model_key).exists());
    let _ = std::fs::remove_dir_all(&scratch);
}
