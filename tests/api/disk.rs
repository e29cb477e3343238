//! The free-space floor: below it, uploads and new jobs are refused with
//! 507 before anything is written, readiness says why, reads still work.

use axum::http::StatusCode;
use serde_json::json;

use finetuned::artifacts::{free_bytes, Artifacts};
use finetuned::train::Outcome;
use image::ImageFormat;

use crate::helpers::{
    encode, ran_status, render, shapes_zip, small_batching, torch_rng, Part, TestApp,
};

#[tokio::test]
async fn below_the_free_space_floor_uploads_and_jobs_are_507_and_readiness_says_why() {
    let app = TestApp::spawn_custom(small_batching(), |state| {
        // A floor no disk meets: as if the disk were full.
        state.artifacts = state.artifacts.clone().with_min_free(u64::MAX / 4);
    })
    .await;
    let upload = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", "shapes.zip", shapes_zip(2, 32))],
        )
        .await;
    upload.assert_problem(StatusCode::INSUFFICIENT_STORAGE);
    let detail = upload.json["detail"].as_str().unwrap();
    assert!(detail.contains("--min-free-disk-mib"), "{detail}");
    app.assert_no_dataset_stored().await;

    let job = app
        .post_json("/jobs", &json!({"dataset_id": uuid::Uuid::new_v4()}))
        .await;
    job.assert_problem(StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(app.count("jobs").await, 0);

    let module = app
        .post_multipart("/backbones", &[Part::file("file", "m.pt", vec![0; 16])])
        .await;
    // Uploaded modules are off by default; the floor is checked after that.
    module.assert_problem(StatusCode::FORBIDDEN);

    let ready = app.get("/readyz").await;
    ready.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.json["detail"].as_str().unwrap().contains("floor"));
    assert_eq!(app.get("/models").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_worker_below_the_floor_takes_no_job_and_the_job_stays_queued() {
    let mut app = TestApp::spawn().await;
    let dataset_id = app.shapes_dataset(4, 32).await;
    let job_id = app
        .submit_job(json!({"dataset_id": dataset_id, "epochs": 1}))
        .await;
    app.worker.artifacts = app.artifacts.clone().with_min_free(u64::MAX / 4);
    let outcome = app.worker.try_execute_one(None).await.expect("worker step");
    assert!(matches!(outcome, Outcome::Idle), "it claimed a job");
    let job = app.get(&format!("/jobs/{job_id}")).await.json;
    assert_eq!(job["status"], "queued", "{job:?}");
    assert_eq!(job["attempts"], 0, "{job:?}");
}

/// A small tmpfs, unmounted when dropped: a disk that really fills up.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(mib: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("ft-disk-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn partial_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            } else if entry.path().to_string_lossy().ends_with(".partial") {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn a_job_that_fills_the_disk_fails_with_the_reason_and_the_previous_model_still_serves() {
    let _rng = torch_rng().await;
    let disk = SmallDisk::mount(64);
    let artifacts = Artifacts::open(disk.0.join("artifacts")).unwrap();
    let on_disk = artifacts.clone();
    let mut app = TestApp::spawn_custom(small_batching(), move |state| {
        state.artifacts = on_disk;
    })
    .await;
    app.artifacts = artifacts.clone();
    app.worker.artifacts = artifacts.clone();

    let dataset_id = app.shapes_dataset(4, 32).await;
    let config = json!({"dataset_id": dataset_id, "epochs": 1, "image_size": 64, "batch_size": 6});
    let first = app.submit_job(config.clone()).await;
    assert_eq!(
        ran_status(app.worker.try_execute_one(None).await.unwrap()),
        "succeeded"
    );
    let best = artifacts.path(&format!("jobs/{first}/best.safetensors"));
    let weights = std::fs::read(&best).unwrap();
    let photo = encode(&render(1, 9, 64), ImageFormat::Png);
    let before = app.predict_one(None, "square.png", photo.clone()).await;

    // Fill the disk but for 1 MiB: the next checkpoint cannot be written.
    let free = free_bytes(&disk.0).unwrap();
    let filler = std::fs::File::create(disk.0.join("filler")).unwrap();
    filler.set_len(0).unwrap();
    std::io::Write::write_all(
        &mut &filler,
        &vec![0u8; free.saturating_sub(1024 * 1024) as usize],
    )
    .unwrap();
    let second = app.submit_job(config).await;
    let status = ran_status(app.worker.try_execute_one(None).await.unwrap());
    let job = app.get(&format!("/jobs/{second}")).await.json;
    assert!(matches!(status.as_str(), "failed" | "queued"), "{job:?}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("No space left"), "{job:?}");
    assert_eq!(app.count("models").await, 1, "no model from the failed job");

    // The first model is whole and still serves the same answer.
    assert_eq!(std::fs::read(&best).unwrap(), weights);
    assert_eq!(app.predict_one(None, "square.png", photo).await, before);
    assert!(
        partial_files(&disk.0).is_empty(),
        "{:?}",
        partial_files(&disk.0)
    );
}
