//! Uploaded TorchScript modules are code: refused unless the operator
//! allows them, and then checked against the operation allowlist and run
//! first in a confined child. Hostile modules are built here with the
//! virtualenv's torch; each is refused, stores nothing, costs the server
//! little, and leaves it answering. Honest torchvision modules still pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use serde_json::json;

use crate::helpers::{script_check, small_batching, torch_python, torch_rng, Part, TestApp};

/// Builds the module `kind` with the virtualenv's torch into `dir`.
/// `target` is the file the file-writing modules try to create.
fn module(kind: &str, dir: &Path, target: &Path) -> Vec<u8> {
    let script = r#"
import sys, torch, torchvision
kind, out, target = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)

class Base(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
        self.path = target
    def head(self, x):
        return self.fc(self.conv(x).mean([2, 3]))

class WritesFile(Base):
    def forward(self, x):
        t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
        t.fill_(65)
        return self.head(x) + t.sum().float() * 0

class Spins(Base):
    def forward(self, x):
        i = 0
        while i >= 0:
            i = i + 1
        return self.head(x)

# 10 GiB, feeding the features (what is left once `fc` is removed).
class Hogs(Base):
    def forward(self, x):
        big = torch.ones([40, 1 << 26])
        features = self.conv(x).mean([2, 3]) + big[-1, -1] * 0
        return self.fc(features)

if kind == "writes_file":
    module = torch.jit.script(WritesFile())
elif kind == "spins":
    module = torch.jit.script(Spins())
elif kind == "hogs":
    module = torch.jit.script(Hogs())
elif kind == "resnet18_traced":
    module = torch.jit.trace(torchvision.models.resnet18().eval(), torch.rand(1, 3, 64, 64))
elif kind == "efficientnet_b0_scripted":
    module = torch.jit.script(torchvision.models.efficientnet_b0().eval())
torch.jit.save(module, out)
"#;
    let out = dir.join(format!("{kind}.pt"));
    // From a file: torch.jit.script reads the classes' source.
    let source = dir.join(format!("build_{kind}.py"));
    std::fs::write(&source, script).unwrap();
    let status = Command::new(torch_python())
        .arg(&source)
        .arg(kind)
        .arg(&out)
        .arg(target)
        .status()
        .expect("the virtualenv's python (run scripts/setup)");
    assert!(status.success(), "building {kind}");
    std::fs::read(out).unwrap()
}

fn upload(name: &str, module: Vec<u8>) -> Vec<Part> {
    vec![
        Part::text("name", name),
        Part::text("image_size", "64"),
        Part::file("file", "model.pt", module),
    ]
}

/// Resident memory of this process (the server's, as tests run it).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

async fn assert_nothing_stored(app: &TestApp) {
    assert_eq!(app.count("script_backbones").await, 0);
    assert!(app.files_under("backbones").is_empty());
    assert!(
        app.files_under("tmp").is_empty(),
        "{:?}",
        app.files_under("tmp")
    );
    let listed = app.get("/backbones").await;
    assert_eq!(listed.status, StatusCode::OK, "the server still answers");
}

fn scratch(app: &TestApp) -> (PathBuf, PathBuf) {
    let dir = app.data_dir().join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    // Writable by anyone, so only the confinement can stop the write.
    let target_dir = app.data_dir().join("open");
    std::fs::create_dir_all(&target_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    (dir, target_dir.join("written-by-upload"))
}

#[tokio::test]
async fn uploading_modules_is_off_unless_the_operator_allows_it() {
    let app = TestApp::spawn_with(small_batching()).await;
    let (dir, target) = scratch(&app);
    let honest = module("resnet18_traced", &dir, &target);
    let refused = app
        .post_multipart("/backbones", &upload("mine", honest))
        .await;
    refused.assert_problem(StatusCode::FORBIDDEN);
    let detail = refused.json["detail"].as_str().unwrap();
    assert!(detail.contains("--allow-script-backbones"), "{detail}");
    assert_nothing_stored(&app).await;
    // The catalogue is unaffected.
    let listed = app.get("/backbones").await;
    assert!(listed.json.as_array().unwrap().len() >= 16);
}

#[tokio::test]
async fn a_module_that_touches_files_is_refused_naming_the_operation_and_writes_nothing() {
    let app = TestApp::spawn_allowing_scripts().await;
    let (dir, target) = scratch(&app);
    let evil = module("writes_file", &dir, &target);
    // torch.jit.script ran nothing; the file does not exist yet.
    assert!(!target.exists());
    let refused = app
        .post_multipart("/backbones", &upload("evil", evil))
        .await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let reason = errors[0]["reason"].as_str().unwrap();
    assert_eq!(errors[0]["path"], "file");
    assert!(reason.contains("`aten::from_file`"), "{reason}");
    assert!(reason.contains("WritesFile.forward"), "{reason}");
    assert!(!target.exists(), "the upload created a file on the server");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_module_that_spins_or_hogs_memory_fails_its_check_and_the_server_stays_up() {
    let app = TestApp::spawn_custom(small_batching(), |state| {
        state.script_check = Some(script_check(1024, 5))
    })
    .await;
    let (dir, target) = scratch(&app);

    let spins = module("spins", &dir, &target);
    let started = Instant::now();
    let refused = app
        .post_multipart("/backbones", &upload("spins", spins))
        .await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(reason.contains("within the check's 5 s limit"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_nothing_stored(&app).await;

    // 10 GiB without the limit; the check may use 1 GiB.
    let hogs = module("hogs", &dir, &target);
    let before = rss_bytes();
    let refused = app
        .post_multipart("/backbones", &upload("hogs", hogs))
        .await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("memory") || reason.contains("alloc") || reason.contains("1024 MiB"),
        "{reason}"
    );
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 512 * 1024 * 1024, "server RSS grew {grown} bytes");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn traced_resnet18_and_scripted_efficientnet_b0_pass_the_check_and_train_and_serve() {
    let _rng = torch_rng().await;
    let app = TestApp::spawn_allowing_scripts().await;
    let (dir, target) = scratch(&app);
    for (name, kind, removed) in [
        ("resnet-traced", "resnet18_traced", "fc"),
        (
            "effnet-scripted",
            "efficientnet_b0_scripted",
            "classifier.1",
        ),
    ] {
        let honest = module(kind, &dir, &target);
        let created = app
            .post_multipart("/backbones", &upload(name, honest))
            .await;
        assert_eq!(
            created.status,
            StatusCode::CREATED,
            "{kind}: {:?}",
            created.json
        );
        assert_eq!(created.json["removed_layer"], removed, "{kind}");
    }
    assert_eq!(app.count("script_backbones").await, 2);

    // The scripted one (control flow, stochastic depth) trains and serves
    // in-process once accepted.
    let dataset_id = app.shapes_dataset(3, 64).await;
    let job_id = app
        .submit_job(json!({
            "dataset_id": dataset_id, "backbone": "effnet-scripted", "epochs": 1,
            "batch_size": 6, "freeze": "last_n", "trainable_stages": 1
        }))
        .await;
    app.assert_job_trains_and_serves(&job_id).await;
}
