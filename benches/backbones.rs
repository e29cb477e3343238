//! Inference speed of every installed backbone on this CPU: the network
//! `/predict` runs (BatchNorm folded, a 10-class head) against the
//! backbone's reference PyTorch implementation in eager mode, in one
//! invocation, at the backbone's input size, batch 1 and 16, same threads.
//!
//! `cargo bench --bench backbones` (after `source scripts/env.sh`).
//! BENCH_SECONDS (default 5) per measurement; BENCH_BACKBONES=a,b for a
//! subset. Backbones whose weights are not installed are timed at random
//! initialization (marked *).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use finetuned::models::{self, folded, BackboneSpec, Classifier};
use tch::{nn, Device, Kind, Tensor};

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32);
    let weights_dir = finetuned::setup_weights_dir();
    println!("inference images/s, {threads} threads, {seconds} s per cell; finetuned = the folded network /predict runs, PyTorch = the reference implementation, eager");
    println!(
        "{:<20} | {:>5} | {:>10} | {:>6} | {:>22} | {:>22}",
        "backbone",
        "input",
        "parameters",
        "top-1",
        "batch 1: ours / PyTorch",
        "batch 16: ours / PyTorch"
    );
    let only: Option<Vec<String>> = std::env::var("BENCH_BACKBONES")
        .ok()
        .map(|list| list.split(',').map(str::to_string).collect());
    for spec in models::CATALOGUE
        .iter()
        .filter(|s| only.as_ref().is_none_or(|o| o.iter().any(|n| n == s.name)))
    {
        // Architectures whose weights are not installed are timed at random
        // initialization (marked *): speed does not depend on the values.
        let weights = Some(spec.weights_path(&weights_dir)).filter(|w| w.exists());
        let net = serving_network(spec, weights.as_deref());
        let cells: Vec<String> = [1, 16]
            .iter()
            .map(|&batch| {
                let ours = ours(&net, spec.default_image_size, batch, seconds);
                let theirs = reference(spec, weights.as_deref(), batch, seconds, threads);
                format!("{ours:>6.1} / {theirs:>6.1} = {:>4.2}x", ours / theirs)
            })
            .collect();
        println!(
            "{:<20} | {:>5} | {:>10} | {:>5.1}% | {:>22} | {:>22}",
            format!("{}{}", spec.name, if weights.is_some() { "" } else { "*" }),
            spec.default_image_size,
            spec.parameters,
            spec.imagenet_top1,
            cells[0],
            cells[1]
        );
    }
}

/// The folded network of a checkpoint with the backbone's ImageNet weights
/// (or random ones) and a new 10-class head.
fn serving_network(spec: &BackboneSpec, weights: Option<&Path>) -> folded::FoldedNet {
    let mut vs = nn::VarStore::new(Device::Cpu);
    Classifier::new(&mut vs, spec, 10, weights).unwrap();
    let vars = folded::Variables(
        vs.variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect(),
    );
    spec.folded(&vars).unwrap()
}

fn ours(net: &folded::FoldedNet, size: i64, batch: i64, seconds: f64) -> f64 {
    let x = Tensor::rand([batch, 3, size, size], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        for _ in 0..3 {
            let _ = net.forward(&x);
        }
        let started = Instant::now();
        let mut done = 0;
        while started.elapsed().as_secs_f64() < seconds {
            let _ = net.forward(&x);
            done += batch;
        }
        done as f64 / started.elapsed().as_secs_f64()
    })
}

fn reference(
    spec: &BackboneSpec,
    weights: Option<&Path>,
    batch: i64,
    seconds: f64,
    threads: usize,
) -> f64 {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/reference_backbones.py"
    );
    let out = Command::new(models::verify::default_python())
        .arg(script)
        .arg(spec.name)
        .arg(weights.map_or("random".into(), |w| w.display().to_string()))
        .arg(spec.default_image_size.to_string())
        .arg(batch.to_string())
        .arg(seconds.to_string())
        .arg(threads.to_string())
        .output()
        .expect("python (source scripts/env.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
