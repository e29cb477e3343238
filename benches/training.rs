//! Training speed: finetuned's worker loop against a hand-written PyTorch
//! script, in one invocation, on the same images, weights and threads.
//!
//! `cargo bench --bench training` (after `source scripts/env.sh`; the
//! reference runs with the virtualenv's python). Prints images/s of one
//! training epoch (after a warm-up epoch) for MobileNetV2 at 224 px, batch 32:
//! head-only with the classic augmentation, head-only on cached features (no
//! augmentation), and full fine-tuning; the ratio to PyTorch; and the GFLOP/s
//! achieved against a nominal peak of this CPU. Set BENCH_IMAGES_PER_CLASS
//! (default 32, 3 classes) to change the epoch size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use finetuned::data::{self, IngestOptions};
use finetuned::models;
use finetuned::train::trainer::{self, TrainEvent, TrainSpec};
use finetuned::train::JobRequest;
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CLASSES: [&str; 3] = ["a", "b", "c"];
const IMAGE_SIZE: i64 = 224;
/// Forward-pass cost of MobileNetV2 at 224 px: 0.30 G multiply-adds.
const FORWARD_GFLOP: f64 = 0.60;

struct Mode {
    name: &'static str,
    /// The job configuration (on top of the dataset and common settings).
    config: Value,
    /// The reference's mode, and how many backbone forward passes one
    /// image's step costs (none on cached features).
    reference: &'static str,
    forward_passes: Option<f64>,
}

fn main() {
    let per_class: usize = std::env::var("BENCH_IMAGES_PER_CLASS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32);
    let weights_dir = weights_dir();
    let work = std::env::temp_dir().join(format!("finetuned-bench-{}", std::process::id()));
    let images = work.join("images");
    let dataset = work.join("dataset");
    write_images(&images, &work.join("images.zip"), per_class);
    let options = IngestOptions {
        val_fraction: 0.1,
        ..Default::default()
    };
    data::ingest_archive(&work.join("images.zip"), &dataset, &options, &|_| {}).expect("ingest");

    let modes = [
        Mode {
            name: "head only, augmented",
            config: json!({ "freeze": "head" }),
            reference: "head",
            forward_passes: Some(1.0),
        },
        Mode {
            name: "head only, cached features",
            config: json!({ "freeze": "head", "augmentation": { "enabled": false } }),
            reference: "head",
            forward_passes: None,
        },
        Mode {
            name: "full fine-tuning",
            config: json!({ "freeze": "full" }),
            reference: "full",
            forward_passes: Some(3.0),
        },
    ];
    let reference = run_reference(&images, &weights_dir, threads);
    let peak = nominal_peak_gflops(threads);
    println!(
        "MobileNetV2, {IMAGE_SIZE} px, batch 32, {} training images, {threads} threads; nominal CPU peak {peak:.0} GFLOP/s",
        per_class * CLASSES.len()
    );
    println!(
        "{:<28} | {:>16} | {:>14} | {:>7} | {:>9} | {:>7}",
        "mode", "finetuned img/s", "PyTorch img/s", "ratio", "GFLOP/s", "% peak"
    );
    let mut speeds = Vec::new();
    for mode in &modes {
        let ours = train_epoch_speed(&dataset, &work.join("job"), &weights_dir, &mode.config);
        let theirs = reference[mode.reference]
            .as_f64()
            .expect("reference measured this mode");
        let (gflops, share) = match mode.forward_passes {
            Some(passes) => {
                let gflops = ours * FORWARD_GFLOP * passes;
                (
                    format!("{gflops:.1}"),
                    format!("{:.1}%", 100.0 * gflops / peak),
                )
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<28} | {ours:>16.1} | {theirs:>14.1} | {:>6.2}x | {gflops:>9} | {share:>7}",
            mode.name,
            ours / theirs
        );
        speeds.push(ours);
    }
    println!(
        "cached head-only epochs are {:.0}x faster than uncached ones on the same data",
        speeds[1] / speeds[0]
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// Images/s of finetuned's second training epoch (the first warms up and,
/// when cached, computes the features).
fn train_epoch_speed(dataset: &Path, job_dir: &Path, weights_dir: &Path, extra: &Value) -> f64 {
    let mut body = json!({ "dataset_id": uuid::Uuid::nil(), "epochs": 2, "batch_size": 32, "image_size": IMAGE_SIZE });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let request: JobRequest = serde_json::from_value(body).unwrap();
    let config = request
        .validate(weights_dir, None)
        .expect("valid configuration")
        .config;
    let spec = TrainSpec {
        config,
        labels: CLASSES.iter().map(|c| c.to_string()).collect(),
        dataset_dir: dataset.to_path_buf(),
        weights_dir: weights_dir.to_path_buf(),
        job_dir: job_dir.to_path_buf(),
        device: tch::Device::Cpu,
        resume: None,
        script: None,
    };
    let mut speeds = Vec::new();
    trainer::train(&spec, &AtomicBool::new(false), &mut |event| {
        if let TrainEvent::Epoch(m) = event {
            speeds.push(m.images_per_second);
        }
    })
    .expect("training runs");
    speeds[1]
}

/// Runs `reference_train.py`; returns images/s by mode.
fn run_reference(images: &Path, weights_dir: &Path, threads: usize) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/reference_train.py");
    let weights = models::find("mobilenet_v2")
        .unwrap()
        .weights_path(weights_dir);
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--images",
            &images.to_string_lossy(),
            "--weights",
            &weights.to_string_lossy(),
        ])
        .args([
            "--threads",
            &threads.to_string(),
            "--size",
            &IMAGE_SIZE.to_string(),
        ])
        .output()
        .expect("python3 runs (source scripts/env.sh first)");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut speeds = json!({});
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let row: Value = serde_json::from_str(line).expect("reference prints JSON lines");
        speeds[row["mode"].as_str().unwrap()] = row["images_per_second"].clone();
    }
    speeds
}

/// Writes `per_class` noisy 320×240 JPEGs per class as class folders and as
/// a zip of the same files.
fn write_images(dir: &Path, zip_path: &Path, per_class: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    std::fs::create_dir_all(dir).unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(zip_path).unwrap());
    for class in CLASSES {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let tint: [u8; 3] = rng.gen();
            let img = RgbImage::from_fn(320, 240, |_, _| {
                Rgb(tint.map(|t| t / 2 + rng.gen_range(0..128)))
            });
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, ImageFormat::Jpeg).unwrap();
            let name = format!("{class}/{i}.jpg");
            std::fs::write(dir.join(&name), bytes.get_ref()).unwrap();
            zip.start_file(name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(bytes.get_ref()).unwrap();
        }
    }
    zip.finish().unwrap();
}

fn weights_dir() -> PathBuf {
    finetuned::setup_weights_dir()
}

/// A nominal peak from /proc/cpuinfo: cores × clock × FP32 FLOP per cycle
/// (two FMA units of 16 lanes with AVX-512, of 8 with AVX2). An estimate,
/// not a measurement.
fn nominal_peak_gflops(threads: usize) -> f64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz: f64 = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(2000.0);
    let flops_per_cycle = if info.contains(" avx512f") {
        64.0
    } else if info.contains(" avx2") {
        32.0
    } else {
        8.0
    };
    threads as f64 * mhz / 1000.0 * flops_per_cycle
}
