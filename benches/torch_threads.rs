//! How many libtorch intra-op threads should a worker use on this machine?
//!
//! Times fine-tuning steps (frozen MobileNetV2 base, new head, the real
//! preprocessing) and evaluation passes at 1, 2, … threads in one process and
//! prints images/s with the ratio to the 1-thread run measured in the same
//! invocation. Run with `cargo bench --bench torch_threads` (after
//! `source scripts/env.sh`). Random pixels stand in for images: the cost of a
//! step does not depend on what the pixels show.

use std::time::Instant;

use finetuned::data::preprocess::{self, STORED_SIZE};
use finetuned::models::{self, Classifier};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 32;
const IMAGE_SIZE: i64 = 160;
const WARMUP_STEPS: usize = 2;
const STEPS: usize = 8;

fn main() {
    let backbone = models::find("mobilenet_v2").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut model = Classifier::new(&mut vs, backbone, 5, None).unwrap();
    let stages = model.num_stages();
    model.set_frozen_stages(&vs, stages);
    let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
    let side = i64::from(STORED_SIZE);
    let stored = Tensor::randint(256, [BATCH, 3, side, side], (Kind::Uint8, Device::Cpu));
    let labels = Tensor::randint(5, [BATCH], (Kind::Int64, Device::Cpu));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The reference (1 thread) runs again last: the gap between its two
    // runs is the machine's noise.
    let mut counts: Vec<usize> = vec![1, 2, 4, 8, 16, 1];
    counts.retain(|&n| n <= cores.max(2));

    println!("MobileNetV2, frozen base, batch {BATCH}, {IMAGE_SIZE}px, {cores} cores");
    println!(
        "{:>8} | {:>14} | {:>8} | {:>14} | {:>8}",
        "threads", "train img/s", "ratio", "eval img/s", "ratio"
    );
    let mut reference: Option<(f64, f64)> = None;
    for threads in counts {
        tch::set_num_threads(threads as i32);
        let train = images_per_second(|| {
            let input = preprocess::model_input(&stored, IMAGE_SIZE, &backbone.normalization);
            let loss = model
                .forward_t(&input, true)
                .cross_entropy_for_logits(&labels);
            opt.backward_step(&loss);
        });
        let eval = images_per_second(|| {
            tch::no_grad(|| {
                let input = preprocess::model_input(&stored, IMAGE_SIZE, &backbone.normalization);
                let _ = model.forward_t(&input, false).argmax(-1, false);
            })
        });
        let (train_ref, eval_ref) = *reference.get_or_insert((train, eval));
        println!(
            "{threads:>8} | {train:>14.1} | {:>7.2}x | {eval:>14.1} | {:>7.2}x",
            train / train_ref,
            eval / eval_ref
        );
    }
}

fn images_per_second(mut step: impl FnMut()) -> f64 {
    for _ in 0..WARMUP_STEPS {
        step();
    }
    let started = Instant::now();
    for _ in 0..STEPS {
        step();
    }
    (STEPS as i64 * BATCH) as f64 / started.elapsed().as_secs_f64()
}
