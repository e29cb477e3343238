//! Training speed: finetuned's worker loop against a hand-written PyTorch
//! script, in one invocation, on the same images, weights, recipe and threads.
//!
//! `cargo bench --bench training [-- SIZE…]` (after `source scripts/env.sh`;
//! the reference runs with the virtualenv's python). For each input size
//! (default 64, 128 and 224 px; MobileNetV2, batch 32, Adam 1e-3, the
//! classic augmentation: rotation ±20°, zoom ±20 %, horizontal flip) it
//! times head-only training and full fine-tuning, finetuned's
//! `trainer::train` against `benches/reference_train.py`, and prints
//! images/s over the measured epochs (after a warm-up epoch), the ratio, and
//! the GFLOP/s achieved against a nominal peak of this CPU.
//!
//! Environment: BENCH_IMAGES_PER_CLASS (3 classes; by default 32 at 224 px,
//! more at smaller sizes so an epoch lasts a few seconds), BENCH_EPOCHS
//! (measured epochs, default 2), BENCH_MODES (`head,full`),
//! BENCH_REFERENCE_WORKERS (the reference DataLoader's worker processes,
//! default 2), BENCH_THREADS (both sides' intra-op threads, default every
//! core), BENCH_REFERENCE=0 (finetuned alone, e.g. under a profiler).

use std::io::Write;
use std::path::Path;
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
const DEFAULT_SIZES: [i64; 3] = [64, 128, 224];
/// Forward-pass cost of MobileNetV2 at 224 px: 0.30 G multiply-adds
/// (it scales with the pixel count).
const FORWARD_GFLOP_224: f64 = 0.60;

struct Mode {
    name: &'static str,
    /// The job's `freeze`, and the reference's mode of the same name.
    freeze: &'static str,
    /// Backbone forward-pass equivalents one image's step costs (forward
    /// only when frozen; forward and a backward of about twice that when not).
    forward_passes: f64,
}

const MODES: [Mode; 2] = [
    Mode {
        name: "head only",
        freeze: "head",
        forward_passes: 1.0,
    },
    Mode {
        name: "full fine-tuning",
        freeze: "full",
        forward_passes: 3.0,
    },
];

struct Row {
    size: i64,
    mode: &'static str,
    images: usize,
    ours: f64,
    theirs: f64,
    gflops: f64,
}

fn main() {
    let sizes = sizes();
    let epochs: usize = env_or("BENCH_EPOCHS", 2);
    let workers: usize = env_or("BENCH_REFERENCE_WORKERS", 2);
    let wanted = std::env::var("BENCH_MODES").unwrap_or_else(|_| "head,full".into());
    let modes: Vec<&Mode> = MODES
        .iter()
        .filter(|m| wanted.split(',').any(|w| w == m.freeze))
        .collect();
    let threads = env_or(
        "BENCH_THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    tch::set_num_threads(threads as i32);
    let weights_dir = finetuned::setup_weights_dir();
    let peak = nominal_peak_gflops(threads);
    println!(
        "MobileNetV2, batch 32, classic augmentation, {threads} threads, {epochs} measured epochs, \
         reference DataLoader num_workers={workers}; nominal CPU peak {peak:.0} GFLOP/s"
    );
    let mut rows = Vec::new();
    for &size in &sizes {
        let per_class = env_or("BENCH_IMAGES_PER_CLASS", default_per_class(size));
        let work =
            std::env::temp_dir().join(format!("finetuned-bench-{}-{size}", std::process::id()));
        let images = work.join("images");
        let dataset = work.join("dataset");
        write_images(&images, &work.join("images.zip"), per_class);
        let options = IngestOptions {
            val_fraction: 0.1,
            ..Default::default()
        };
        data::ingest_archive(&work.join("images.zip"), &dataset, &options, &|_| {})
            .expect("ingest");
        let names: Vec<&str> = modes.iter().map(|m| m.freeze).collect();
        let reference = if env_or("BENCH_REFERENCE", 1) == 0 {
            json!({})
        } else {
            run_reference(
                &images,
                &weights_dir,
                threads,
                size,
                epochs,
                workers,
                &names,
            )
        };
        for mode in &modes {
            let ours = train_speed(
                &dataset,
                &work.join("job"),
                &weights_dir,
                size,
                epochs,
                mode.freeze,
            );
            let theirs = reference[mode.freeze].as_f64().unwrap_or(f64::NAN);
            let gflop = FORWARD_GFLOP_224 * (size as f64 / 224.0).powi(2) * mode.forward_passes;
            let row = Row {
                size,
                mode: mode.name,
                images: per_class * CLASSES.len(),
                ours,
                theirs,
                gflops: ours * gflop,
            };
            eprintln!(
                "{size} px, {}: finetuned {ours:.1} img/s, PyTorch {theirs:.1} img/s, {:.2}x",
                mode.name,
                ours / theirs
            );
            rows.push(row);
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    println!(
        "{:>4} | {:<16} | {:>6} | {:>15} | {:>13} | {:>6} | {:>7} | {:>6}",
        "px", "mode", "images", "finetuned img/s", "PyTorch img/s", "ratio", "GFLOP/s", "% peak"
    );
    for r in &rows {
        println!(
            "{:>4} | {:<16} | {:>6} | {:>15.1} | {:>13.1} | {:>5.2}x | {:>7.1} | {:>5.1}%",
            r.size,
            r.mode,
            r.images,
            r.ours,
            r.theirs,
            r.ours / r.theirs,
            r.gflops,
            100.0 * r.gflops / peak
        );
    }
}

/// Image sizes from the command line (`cargo bench --bench training -- 64
/// 128`; cargo's own `--bench` flag is skipped), else all three.
fn sizes() -> Vec<i64> {
    let sizes: Vec<i64> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("{a:?} is not an image size"))
        })
        .collect();
    if sizes.is_empty() {
        DEFAULT_SIZES.to_vec()
    } else {
        sizes
    }
}

/// Images per class: 32 at 224 px, more at smaller sizes (an epoch of a few
/// seconds at least, so per-epoch noise stays small).
fn default_per_class(size: i64) -> usize {
    match size {
        ..=96 => 128,
        97..=160 => 64,
        _ => 32,
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Images/s of finetuned's training epochs after the first (which warms up),
/// with the job's defaults (Adam 1e-3, the classic augmentation).
fn train_speed(
    dataset: &Path,
    job_dir: &Path,
    weights_dir: &Path,
    size: i64,
    epochs: usize,
    freeze: &str,
) -> f64 {
    let body = json!({
        "dataset_id": uuid::Uuid::nil(),
        "epochs": epochs + 1,
        "batch_size": 32,
        "image_size": size,
        "freeze": freeze,
    });
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
    // Every epoch has the same images: total images over total seconds.
    let measured = &speeds[1..];
    measured.len() as f64 / measured.iter().map(|s| 1.0 / s).sum::<f64>()
}

/// Runs `reference_train.py`; returns images/s by mode.
fn run_reference(
    images: &Path,
    weights_dir: &Path,
    threads: usize,
    size: i64,
    epochs: usize,
    workers: usize,
    modes: &[&str],
) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/reference_train.py");
    let weights = models::find("mobilenet_v2")
        .unwrap()
        .weights_path(weights_dir);
    let out = Command::new("python3")
        .arg(script)
        .arg("--images")
        .arg(images)
        .arg("--weights")
        .arg(&weights)
        .args(["--threads", &threads.to_string()])
        .args(["--size", &size.to_string()])
        .args(["--epochs", &epochs.to_string()])
        .args(["--workers", &workers.to_string()])
        .args(["--modes", &modes.join(",")])
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
