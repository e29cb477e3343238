//! Accuracy proof on real photos: MobileNetV2 on Fashion-MNIST (100 training
//! images per class, 20 for validation, 2,000 held out for the test),
//! fine-tuned from ImageNet weights, with only a new head on a frozen base,
//! and trained from scratch with the same budget. Prints the held-out test
//! accuracy of each (the best checkpoint by validation accuracy).
//!
//! `cargo bench --bench accuracy` (after `scripts/setup` and
//! `source scripts/env.sh`). BENCH_EPOCHS (default 15) and
//! BENCH_IMAGE_SIZE (default 96) change the budget.

#[path = "../tests/api/fashion.rs"]
mod fashion;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use fashion::{fashion_photos, FashionSet, FASHION_CLASSES};
use finetuned::data::{self, IngestOptions};
use finetuned::train::trainer::{self, TrainSpec};
use finetuned::train::JobRequest;
use serde_json::{json, Value};

fn env_or(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let epochs = env_or("BENCH_EPOCHS", 15);
    let image_size = env_or("BENCH_IMAGE_SIZE", 96);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32);
    let work = std::env::temp_dir().join(format!("finetuned-accuracy-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let archive = work.join("fashion.zip");
    write_archive(&archive);
    let dataset = work.join("dataset");
    data::ingest_archive(&archive, &dataset, &IngestOptions::default(), &|_| {}).expect("ingest");

    let common = json!({ "epochs": epochs, "image_size": image_size, "batch_size": 32,
                         "schedule": "cosine", "selection_metric": "val_accuracy" });
    let runs = [
        (
            "ImageNet weights, full fine-tuning",
            json!({ "freeze": "full", "learning_rate": 0.001 }),
        ),
        (
            "ImageNet weights, frozen base + new head",
            json!({ "freeze": "head", "learning_rate": 0.01, "augmentation": { "enabled": false } }),
        ),
        (
            "random init (from scratch), same budget",
            json!({ "freeze": "full", "learning_rate": 0.001, "pretrained": false }),
        ),
    ];
    println!(
        "MobileNetV2 on Fashion-MNIST: 100 train + 20 val images per class, 2,000 test images; {image_size} px, {epochs} epochs, batch 32, {threads} threads"
    );
    println!(
        "{:<42} | {:>13} | {:>10} | {:>9}",
        "", "test accuracy", "best epoch", "seconds"
    );
    for (name, extra) in runs {
        let mut config = common.clone();
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let started = Instant::now();
        let (accuracy, best_epoch) = train(&dataset, &work.join(name.replace(' ', "_")), config);
        println!(
            "{name:<42} | {:>12.1}% | {best_epoch:>10} | {:>9.0}",
            accuracy * 100.0,
            started.elapsed().as_secs_f64()
        );
        std::io::stdout().flush().unwrap();
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Trains one configuration; returns the best checkpoint's test accuracy
/// and its epoch.
fn train(dataset: &Path, job_dir: &Path, mut config: Value) -> (f64, i32) {
    config["dataset_id"] = json!(uuid::Uuid::nil());
    let weights_dir = finetuned::setup_weights_dir();
    let request: JobRequest = serde_json::from_value(config).unwrap();
    let job = request
        .validate(&weights_dir, None)
        .expect("a valid configuration");
    let spec = TrainSpec {
        config: job.config,
        labels: sorted_classes(),
        dataset_dir: dataset.to_path_buf(),
        weights_dir,
        job_dir: job_dir.to_path_buf(),
        device: tch::Device::Cpu,
        resume: None,
        script: None,
    };
    let summary =
        trainer::train(&spec, &AtomicBool::new(false), &mut |_| {}).expect("training runs");
    let test = summary.test.expect("the dataset has a test split");
    (test.accuracy, summary.best_epoch)
}

fn sorted_classes() -> Vec<String> {
    let mut classes: Vec<String> = FASHION_CLASSES.iter().map(|c| c.to_string()).collect();
    classes.sort();
    classes
}

/// train/ and val/ from Fashion-MNIST's training set, test/ from its test set.
fn write_archive(path: &Path) {
    let labels: Vec<usize> = (0..FASHION_CLASSES.len()).collect();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let splits = [
        ("train", fashion_photos(FashionSet::Train, &labels, 0, 100)),
        ("val", fashion_photos(FashionSet::Train, &labels, 100, 20)),
        ("test", fashion_photos(FashionSet::Test, &labels, 0, 200)),
    ];
    for (split, photos) in splits {
        for (i, (label, photo)) in photos.iter().enumerate() {
            let mut png = std::io::Cursor::new(Vec::new());
            photo.write_to(&mut png, image::ImageFormat::Png).unwrap();
            zip.start_file(
                format!("{split}/{}/{i:04}.png", FASHION_CLASSES[*label]),
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            zip.write_all(png.get_ref()).unwrap();
        }
    }
    zip.finish().unwrap();
}
