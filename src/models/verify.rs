//! Proof that a backbone computes what PyTorch computes: the untouched
//! pretrained network's ImageNet logits on real photos, here and in the
//! reference PyTorch implementation (`scripts/reference_logits.py`, run by
//! the torch virtualenv's python) on the same preprocessed input.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::catalogue::BackboneSpec;
use super::layers::global_average_pool;
use crate::data::preprocess;

/// The reference script, embedded so the binary can verify on its own.
const REFERENCE_SCRIPT: &str = include_str!("../../scripts/reference_logits.py");

/// Photos the comparison runs on: scikit-image's and scikit-learn's sample
/// photos, which `scripts/setup` puts in the fixtures directory.
pub const PHOTOS: [&str; 7] = [
    "chelsea.png",
    "coffee.png",
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "china.jpg",
    "flower.jpg",
];

/// Largest tolerated difference between the two implementations' logits.
pub const MAX_LOGIT_DIFFERENCE: f64 = 1e-4;

/// How one backbone compared.
#[derive(Debug)]
pub struct Verification {
    pub backbone: &'static str,
    pub photos: usize,
    pub max_abs_difference: f64,
    /// Photos whose top-5 classes (in order) differ.
    pub top5_mismatches: Vec<String>,
    /// Top-1 ImageNet class per photo (same in both).
    pub top1: Vec<i64>,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.max_abs_difference <= MAX_LOGIT_DIFFERENCE && self.top5_mismatches.is_empty()
    }
}

/// Runs the comparison for one backbone whose weights are installed.
pub fn against_pytorch(
    spec: &'static BackboneSpec,
    weights_dir: &Path,
    photos_dir: &Path,
    python: &Path,
) -> Result<Verification, String> {
    let canonical = PHOTOS
        .iter()
        .map(|name| {
            let bytes = std::fs::read(photos_dir.join(name)).map_err(|e| {
                format!(
                    "{}: {e} (scripts/setup fetches it)",
                    photos_dir.join(name).display()
                )
            })?;
            preprocess::decode_canonical(&bytes).map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let input = preprocess::model_input(
        &preprocess::stack_canonical(&canonical),
        spec.default_image_size,
        &spec.normalization,
    );
    let network =
        imagenet_network(spec, weights_dir).map_err(|e| format!("loading {}: {e}", spec.name))?;
    let ours = network(&input);

    let work = std::env::temp_dir().join(format!(
        "finetuned-verify-{}-{}",
        spec.name,
        std::process::id()
    ));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let result = reference_logits(spec, weights_dir, &input, python, &work);
    let _ = std::fs::remove_dir_all(&work);
    let theirs = result?;

    let max_abs_difference = (&ours - &theirs).abs().max().double_value(&[]);
    let top5 = |logits: &Tensor| -> Vec<Vec<i64>> {
        let (_, indices) = logits.topk(5, -1, true, true);
        Vec::<Vec<i64>>::try_from(indices).expect("int64 indices")
    };
    let top5_mismatches = top5(&ours)
        .iter()
        .zip(top5(&theirs))
        .zip(PHOTOS)
        .filter(|((a, b), _)| *a != b)
        .map(|(_, photo)| photo.to_string())
        .collect();
    Ok(Verification {
        backbone: spec.name,
        photos: PHOTOS.len(),
        max_abs_difference,
        top5_mismatches,
        top1: Vec::try_from(ours.argmax(-1, false).to_kind(Kind::Int64)).expect("int64"),
    })
}

/// The untouched pretrained network (its stages, pooling and ImageNet
/// classifier), loaded from the weights file: ImageNet logits.
fn imagenet_network(
    spec: &BackboneSpec,
    weights_dir: &Path,
) -> Result<impl Fn(&Tensor) -> Tensor, tch::TchError> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let stages = spec.arch.stages(&vs.root());
    let classifier_path = spec
        .arch
        .imagenet_classifier_prefix()
        .split('.')
        .fold(vs.root(), |path, part| &path / part);
    let classifier = nn::linear(classifier_path, spec.feature_dim, 1000, Default::default());
    vs.load(spec.weights_path(weights_dir))?;
    Ok(move |xs: &Tensor| {
        let _keep = &vs;
        tch::no_grad(|| {
            let x = stages
                .iter()
                .fold(xs.shallow_clone(), |x, s| s.forward_t(&x, false));
            classifier.forward(&global_average_pool(&x))
        })
    })
}

fn reference_logits(
    spec: &BackboneSpec,
    weights_dir: &Path,
    input: &Tensor,
    python: &Path,
    work: &Path,
) -> Result<Tensor, String> {
    let script = work.join("reference_logits.py");
    let (input_file, output_file) = (
        work.join("input.safetensors"),
        work.join("logits.safetensors"),
    );
    std::fs::write(&script, REFERENCE_SCRIPT).map_err(|e| e.to_string())?;
    Tensor::write_safetensors(&[("input", input)], &input_file).map_err(|e| e.to_string())?;
    let out = Command::new(python)
        .arg(&script)
        .arg(spec.name)
        .arg(spec.weights_path(weights_dir))
        .arg(&input_file)
        .arg(&output_file)
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Tensor::read_safetensors(&output_file)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|(name, _)| name == "logits")
        .map(|(_, t)| t)
        .ok_or_else(|| "the reference wrote no logits".to_string())
}

/// The torch virtualenv's python (`FINETUNED_VENV`), else `python3`.
pub fn default_python() -> PathBuf {
    std::env::var_os("FINETUNED_VENV")
        .map(|venv| PathBuf::from(venv).join("bin/python"))
        .unwrap_or_else(|| "python3".into())
}
