//! TorchScript backbones uploaded with `POST /backbones`: a traced
//! torchvision ResNet-18 (logits; its `fc` is removed) and a small
//! feature-map network, checked, fine-tuned with stages frozen by
//! parameter-name prefix, served, exported, and refused when bad.

use std::path::Path;
use std::process::Command;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use image::ImageFormat;
use serde_json::json;
use tch::{Kind, Tensor};

use crate::helpers::{encode, render, torch_python, torch_rng, Part, TestApp};

/// Traces a model with the virtualenv's torch and saves it with
/// `torch.jit.save`: `resnet18` (torchvision, random weights, BatchNorm
/// statistics from two batches of noise) or `fmap` (convolutions that end
/// in a `[N, 24, h, w]` feature map).
fn traced(kind: &str, out: &Path) {
    let script = r#"
import sys, torch, torchvision
torch.manual_seed(0)
if sys.argv[1] == "resnet18":
    model = torchvision.models.resnet18()
    with torch.no_grad():
        [model(torch.rand(4, 3, 64, 64)) for _ in range(2)]
else:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, stride=2), torch.nn.ReLU())
model.eval()
torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 64, 64)), sys.argv[2])
"#;
    let status = Command::new(torch_python())
        .args(["-c", script, kind])
        .arg(out)
        .status()
        .expect("the virtualenv's python (run scripts/setup)");
    assert!(status.success());
}

fn upload(name: &str, module: Vec<u8>, fields: &[(&str, &str)]) -> Vec<Part> {
    let mut parts = vec![Part::text("name", name)];
    parts.extend(fields.iter().map(|(k, v)| Part::text(k, v)));
    parts.push(Part::file("file", "model.pt", module));
    parts
}

fn delete(name: &str) -> Request<Body> {
    Request::delete(format!("/backbones/{name}"))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_torchscript_backbone_is_uploaded_trained_with_frozen_stages_served_and_exported() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn_allowing_scripts().await;
    let dir = app.data_dir().join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    traced("resnet18", &dir.join("resnet18.pt"));
    let module = std::fs::read(dir.join("resnet18.pt")).unwrap();

    // Bad uploads: each named, nothing stored.
    let garbage = app
        .post_multipart("/backbones", &upload("junk", b"not a module".to_vec(), &[]))
        .await;
    let errors = garbage.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file");
    assert!(
        errors[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not a TorchScript module"),
        "{errors:?}"
    );
    let fields = app
        .post_multipart(
            "/backbones",
            &upload(
                "Bad Name",
                module.clone(),
                &[("mean", "0.5,0.5"), ("image_size", "9")],
            ),
        )
        .await;
    let errors = fields.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["name", "mean", "image_size"]);
    let taken = app
        .post_multipart("/backbones", &upload("mobilenet_v2", module.clone(), &[]))
        .await;
    taken.assert_problem(StatusCode::CONFLICT);
    assert_eq!(app.count("script_backbones").await, 0);
    for dir in ["backbones", "tmp"] {
        assert!(
            app.files_under(dir).is_empty(),
            "{:?}",
            app.files_under(dir)
        );
    }

    let created = app
        .post_multipart(
            "/backbones",
            &upload("my-resnet", module.clone(), &[("image_size", "64")]),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.json);
    assert_eq!(created.location.as_deref(), Some("/backbones/my-resnet"));
    assert_eq!(created.json["removed_layer"], "fc");
    assert_eq!(created.json["feature_dim"], 512);
    assert_eq!(
        created.json["parameters"], 11_176_512,
        "ResNet-18 without fc"
    );
    assert_eq!(
        created.json["stages"],
        json!(["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"])
    );
    let again = app
        .post_multipart("/backbones", &upload("my-resnet", module.clone(), &[]))
        .await;
    again.assert_problem(StatusCode::CONFLICT);
    let listed = app.get("/backbones").await.json;
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "my-resnet")
        .expect("listed");
    assert_eq!(entry["family"], "TorchScript");
    assert_eq!(entry["uploaded"], true);

    // `features` is forward without fc: forward = fc(features), exactly.
    let key: String =
        sqlx::query_scalar("SELECT artifact_key FROM script_backbones WHERE name = 'my-resnet'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let stored = tch::CModule::load(app.artifacts.path(&key)).unwrap();
    let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, tch::Device::Cpu));
    let params: std::collections::HashMap<String, Tensor> =
        stored.named_parameters().unwrap().into_iter().collect();
    let (logits, features) = tch::no_grad(|| {
        (
            stored.forward_ts(&[&x]).unwrap(),
            stored
                .method_ts(finetuned::models::script::FEATURES_METHOD, &[&x])
                .unwrap(),
        )
    });
    assert_eq!(features.size(), [2, 512]);
    let relinked = features.linear(&params["fc.weight"], Some(&params["fc.bias"]));
    let diff = (&logits - &relinked).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |difference| {diff}");

    // Fine-tune only layer4 and the head.
    let dataset_id = app.shapes_dataset(4, 64).await;
    let job_id = app
        .submit_job(json!({
            "dataset_id": dataset_id, "backbone": "my-resnet", "epochs": 2,
            "batch_size": 6, "freeze": "last_n", "trainable_stages": 1
        }))
        .await;
    app.worker.try_execute_one(None).await.expect("worker step");
    let job = app.get(&format!("/jobs/{job_id}")).await.json;
    assert_eq!(job["status"], "succeeded", "{job:?}");
    let best: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(
        app.artifacts
            .path(&format!("jobs/{job_id}/best.safetensors")),
    )
    .unwrap()
    .into_iter()
    .collect();
    let moved = |name: &str| {
        let trained = &best[&format!("backbone.{}", name.replace('.', "/"))];
        (trained - &params[name]).abs().max().double_value(&[]) > 0.0
    };
    assert!(!moved("conv1.weight"), "frozen stage unchanged");
    assert!(!moved("layer3.1.conv2.weight"), "frozen stage unchanged");
    assert!(moved("layer4.1.conv2.weight"), "trainable stage trained");
    assert!(
        !best.contains_key("backbone.fc/weight"),
        "the removed layer is not trained"
    );

    let photo = encode(&render(2, 7, 80), ImageFormat::Png);
    assert_eq!(app.predict_one(None, "stripes.png", photo).await.len(), 3);
    let models = app.get("/models").await.json;
    let model_id = models[0]["id"].as_str().unwrap().to_string();
    let export = app
        .get(&format!("/models/{model_id}/export?format=torchscript"))
        .await;
    assert_eq!(export.status, StatusCode::OK);

    // A model needs it: it stays.
    app.send(delete("my-resnet"))
        .await
        .assert_problem(StatusCode::CONFLICT);
    app.send(delete("mobilenet_v2"))
        .await
        .assert_problem(StatusCode::CONFLICT);
    app.send(delete("nothing-here"))
        .await
        .assert_problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_feature_map_module_is_pooled_and_can_be_deleted() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn_allowing_scripts().await;
    let dir = app.data_dir().join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    traced("fmap", &dir.join("fmap.pt"));
    let module = std::fs::read(dir.join("fmap.pt")).unwrap();

    // It does not end in a linear layer: asked for logits, refused.
    let refused = app
        .post_multipart(
            "/backbones",
            &upload("tiny", module.clone(), &[("output", "logits")]),
        )
        .await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        errors[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not end with a linear layer"),
        "{errors:?}"
    );
    let created = app
        .post_multipart(
            "/backbones",
            &upload(
                "tiny",
                module,
                &[
                    ("image_size", "48"),
                    ("mean", "0.5, 0.5, 0.5"),
                    ("std", "0.25,0.25,0.25"),
                ],
            ),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.json);
    assert_eq!(created.json["feature_dim"], 24);
    assert_eq!(created.json["removed_layer"], serde_json::Value::Null);
    assert_eq!(created.json["stages"], json!(["0", "1", "3"]));
    assert_eq!(
        created.json["normalization"]["mean"],
        json!([0.5, 0.5, 0.5])
    );
    assert_eq!(
        app.get("/backbones/tiny").await.json["default_image_size"],
        48
    );

    let deleted = app.send(delete("tiny")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get("/backbones/tiny").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(app.files_under("backbones").is_empty());
}
