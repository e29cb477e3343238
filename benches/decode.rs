//! Decode-once speed: finetuned's ingest preprocessing (decode, RGB,
//! shorter side to 256, center crop, channels-first uint8) against Pillow
//! doing the same in Python on the same files, in one invocation.
//!
//! `cargo bench --bench decode` (after `source scripts/env.sh`). Set
//! BENCH_DECODE_IMAGES (default 200) for more files.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use finetuned::data::preprocess;
use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};

fn main() {
    let count: usize = std::env::var("BENCH_DECODE_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("finetuned-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let sizes = [(640, 480), (1024, 768), (1600, 1200)];
    let mut paths: Vec<PathBuf> = Vec::new();
    for i in 0..count {
        let (w, h) = sizes[i % sizes.len()];
        let (a, b): (f32, f32) = (rng.gen_range(0.01..0.05), rng.gen_range(0.01..0.05));
        let img = RgbImage::from_fn(w, h, |x, y| {
            let v = ((x as f32 * a).sin() * (y as f32 * b).cos() * 120.0 + 128.0) as u8;
            Rgb([v, v / 2 + 40, 255 - v])
        });
        let path = dir.join(format!("{i}.jpg"));
        img.save_with_format(&path, ImageFormat::Jpeg).unwrap();
        paths.push(path);
    }
    let files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();

    let started = Instant::now();
    for bytes in &files {
        preprocess::decode_canonical(bytes).unwrap();
    }
    let one_thread = count as f64 / started.elapsed().as_secs_f64();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for part in files.chunks(count.div_ceil(threads)) {
            scope.spawn(move || {
                part.iter()
                    .for_each(|b| drop(preprocess::decode_canonical(b).unwrap()))
            });
        }
    });
    let all_cores = count as f64 / started.elapsed().as_secs_f64();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference_decode.py");
    let out = Command::new("python3")
        .arg(script)
        .args(&paths)
        .output()
        .expect("python3 (source scripts/env.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pillow: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    println!("decode + resize to 256 + center crop, {count} JPEGs of 640x480 to 1600x1200");
    println!("{:<34} | {:>9} | {:>8}", "", "images/s", "vs Pillow");
    println!("{:<34} | {pillow:>9.1} | {:>7.2}x", "Pillow, 1 thread", 1.0);
    println!(
        "{:<34} | {one_thread:>9.1} | {:>7.2}x",
        "finetuned, 1 thread",
        one_thread / pillow
    );
    println!(
        "{:<34} | {all_cores:>9.1} | {:>7.2}x",
        format!("finetuned, {threads} threads (ingest)"),
        all_cores / pillow
    );
}
