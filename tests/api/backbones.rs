//! Users' own weights: torchvision ResNet and EfficientNet state dicts (made by the
//! virtualenv's torch and saved with `torch.save`) is checked against the
//! architecture, imported, verified against torchvision, fine-tuned through
//! the API and served.

use std::path::Path;
use std::process::Command;

use axum::http::StatusCode;
use finetuned::models::{self, import, verify};
use serde_json::json;

use crate::helpers::{fixtures_dir, small_batching, torch_python, torch_rng, TestApp};

/// Saves a randomly initialised torchvision model's state dict, its
/// BatchNorm statistics taken from two batches of noise (so that they are
/// not the identity and the comparison covers them).
fn torchvision_state_dict(arch: &str, out: &Path) {
    let script = "import sys, torch, torchvision\n\
                  torch.manual_seed(0)\n\
                  model = getattr(torchvision.models, sys.argv[1])()\n\
                  with torch.no_grad():\n    \
                      [model(torch.rand(4, 3, 96, 96)) for _ in range(2)]\n\
                  torch.save(model.state_dict(), sys.argv[2])";
    let status = Command::new(torch_python())
        .args(["-c", script, arch])
        .arg(out)
        .status()
        .expect("the virtualenv's python (run scripts/setup)");
    assert!(status.success());
}

#[tokio::test]
async fn an_imported_resnet_is_checked_verified_trained_and_served() {
    let _rng = torch_rng().await;
    let dir = std::env::temp_dir().join(format!("import-{}", uuid::Uuid::new_v4().simple()));
    let weights_dir = dir.join("weights");
    std::fs::create_dir_all(&weights_dir).unwrap();
    let resnet18 = models::find("resnet18").unwrap();
    let python = torch_python();

    // A ResNet-34 file is not a ResNet-18: refused, naming the tensors.
    torchvision_state_dict("resnet34", &dir.join("resnet34.pth"));
    let err = import::import_weights(&dir.join("resnet34.pth"), resnet18, &weights_dir, &python)
        .unwrap_err();
    assert!(err.contains("does not match resnet18"), "{err}");
    assert!(
        err.contains("layer1.2.bn1.bias is not part of resnet18"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&weights_dir).unwrap().count(),
        0,
        "nothing installed"
    );

    torchvision_state_dict("resnet18", &dir.join("resnet18.pth"));
    let imported =
        import::import_weights(&dir.join("resnet18.pth"), resnet18, &weights_dir, &python).unwrap();
    assert!(imported.imagenet_classifier);
    assert!(resnet18.weights_path(&weights_dir).exists());

    // Same function as torchvision's ResNet-18 on the same weights.
    let report = verify::against_pytorch(resnet18, &weights_dir, &fixtures_dir(), &python).unwrap();
    assert!(report.passed(), "{report:?}");

    let app = TestApp::spawn_custom(small_batching(), |state| {
        state.weights_dir = weights_dir.clone();
    })
    .await;
    let catalogue = app.get("/backbones").await.json;
    let installed = |name: &str| {
        catalogue
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| b["weights"].clone())
    };
    assert_eq!(installed("resnet18"), Some(json!(true)));
    assert_eq!(installed("resnet50"), Some(json!(false)));

    let dataset_id = app.shapes_dataset(4, 64).await;
    let refused = app
        .post_json(
            "/jobs",
            &json!({ "dataset_id": dataset_id, "backbone": "resnet50" }),
        )
        .await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        errors[0]["reason"]
            .as_str()
            .unwrap()
            .contains("finetuned weights import"),
        "{errors:?}"
    );

    train_and_serve(&app, dataset_id, "resnet18").await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Fine-tunes the last stage and head of `backbone` for one epoch through
/// the API and serves the model.
async fn train_and_serve(app: &TestApp, dataset_id: String, backbone: &str) {
    let job_id = app
        .submit_job(json!({
            "dataset_id": dataset_id, "backbone": backbone, "epochs": 1,
            "image_size": 64, "batch_size": 6, "freeze": "last_n", "trainable_stages": 1
        }))
        .await;
    app.assert_job_trains_and_serves(&job_id).await;
}

#[tokio::test]
async fn an_imported_efficientnet_is_checked_verified_trained_and_served() {
    let _rng = torch_rng().await;
    let dir = std::env::temp_dir().join(format!("import-{}", uuid::Uuid::new_v4().simple()));
    let weights_dir = dir.join("weights");
    std::fs::create_dir_all(&weights_dir).unwrap();
    let b0 = models::find("efficientnet_b0").unwrap();
    let python = torch_python();

    // B1 has more blocks than B0 at the same width: refused by name.
    torchvision_state_dict("efficientnet_b1", &dir.join("b1.pth"));
    let err = import::import_weights(&dir.join("b1.pth"), b0, &weights_dir, &python).unwrap_err();
    assert!(err.contains("does not match efficientnet_b0"), "{err}");
    assert!(err.contains("features.1.1.block"), "{err}");

    torchvision_state_dict("efficientnet_b0", &dir.join("b0.pth"));
    let imported = import::import_weights(&dir.join("b0.pth"), b0, &weights_dir, &python).unwrap();
    assert!(imported.imagenet_classifier);
    let report = verify::against_pytorch(b0, &weights_dir, &fixtures_dir(), &python).unwrap();
    assert!(report.passed(), "{report:?}");

    let app = TestApp::spawn_custom(small_batching(), |state| {
        state.weights_dir = weights_dir.clone();
    })
    .await;
    let dataset_id = app.shapes_dataset(4, 64).await;
    train_and_serve(&app, dataset_id, "efficientnet_b0").await;
    std::fs::remove_dir_all(&dir).unwrap();
}
