//! Ingest speed: finetuned's whole ingest of a zip (read, decode, RGB,
//! shorter side to 256, center crop, channels-first uint8, split files
//! written) against Pillow doing the same decode + resize + store in Python
//! on the same archive, in one invocation.
//!
//! `cargo bench --bench ingest` (after `source scripts/env.sh`). Set
//! BENCH_INGEST_IMAGES (default 200) for more files.

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use finetuned::data::{self, preprocess, IngestOptions};
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};

fn main() {
    let count: usize = std::env::var("BENCH_INGEST_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("finetuned-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = photos(count);
    let archive = dir.join("photos.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&archive).unwrap());
    for (i, bytes) in files.iter().enumerate() {
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file(format!("class{}/{i}.jpg", i % 2), options)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();

    let started = Instant::now();
    for bytes in &files {
        preprocess::decode_canonical(bytes).unwrap();
    }
    let one_thread = count as f64 / started.elapsed().as_secs_f64();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    data::ingest_archive(
        &archive,
        &dir.join("dataset"),
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    let ingest = count as f64 / started.elapsed().as_secs_f64();

    let pillow = |processes: usize| -> f64 {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference_ingest.py");
        let out = Command::new("python3")
            .arg(script)
            .arg(&archive)
            .arg(dir.join("reference.npy"))
            .arg(processes.to_string())
            .output()
            .expect("python3 (source scripts/env.sh)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (pillow_one, pillow_all) = (pillow(1), pillow(threads));
    let _ = std::fs::remove_dir_all(&dir);

    println!("read + decode + resize to 256 + center crop + store, {count} JPEGs of 640x480 to 1600x1200 in a zip");
    println!(
        "{:<40} | {:>9} | {:>21}",
        "", "images/s", "vs Pillow, same cores"
    );
    let row = |name: String, rate: f64, reference: f64| {
        println!("{name:<40} | {rate:>9.1} | {:>20.2}x", rate / reference);
    };
    row("Pillow, 1 process".into(), pillow_one, pillow_one);
    row(
        format!("Pillow, {threads} processes"),
        pillow_all,
        pillow_all,
    );
    row(
        "finetuned decode, 1 thread (no I/O)".into(),
        one_thread,
        pillow_one,
    );
    row(
        format!("finetuned ingest, {threads} threads"),
        ingest,
        pillow_all,
    );
}

/// Camera-like JPEGs: smooth gradients at three common sizes.
fn photos(count: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let sizes = [(640, 480), (1024, 768), (1600, 1200)];
    (0..count)
        .map(|i| {
            let (w, h) = sizes[i % sizes.len()];
            let (a, b): (f32, f32) = (rng.gen_range(0.01..0.05), rng.gen_range(0.01..0.05));
            let img = RgbImage::from_fn(w, h, |x, y| {
                let v = ((x as f32 * a).sin() * (y as f32 * b).cos() * 120.0 + 128.0) as u8;
                Rgb([v, v / 2 + 40, 255 - v])
            });
            let mut bytes = std::io::Cursor::new(Vec::new());
            img.write_to(&mut bytes, ImageFormat::Jpeg).unwrap();
            bytes.into_inner()
        })
        .collect()
}
