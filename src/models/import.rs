//! `finetuned weights import`: installs a user's pretrained weights for an
//! architecture of the catalogue, after checking every tensor's name and
//! shape against it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use tch::{nn, Device, Tensor};

use super::catalogue::BackboneSpec;

/// The converter `scripts/setup` uses, embedded for `.pth` files.
const CONVERT_SCRIPT: &str = include_str!("../../scripts/convert_weights.py");

/// How many offending tensors an error names.
const SHOWN: usize = 5;

/// What an import installed.
#[derive(Debug)]
pub struct Imported {
    pub tensors: usize,
    /// Whether the file carried the 1000-class ImageNet layer (needed by
    /// `weights verify`, ignored by fine-tuning).
    pub imagenet_classifier: bool,
}

/// Checks `file` (safetensors, or a PyTorch `.pth`/`.pt` state dict, zip
/// or legacy format, converted with `python`) against `spec`'s
/// architecture and installs it as the backbone's weights file.
pub fn import_weights(
    file: &Path,
    spec: &BackboneSpec,
    weights_dir: &Path,
    python: &Path,
) -> Result<Imported, String> {
    std::fs::create_dir_all(weights_dir).map_err(|e| e.to_string())?;
    let staged = weights_dir.join(format!(".{}.importing.safetensors", spec.name));
    let result = stage(file, &staged, python).and_then(|()| check(&staged, spec));
    match result {
        Ok(imported) => {
            std::fs::rename(&staged, spec.weights_path(weights_dir)).map_err(|e| e.to_string())?;
            Ok(imported)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&staged);
            Err(err)
        }
    }
}

/// Writes the file as safetensors at `staged`.
fn stage(file: &Path, staged: &Path, python: &Path) -> Result<(), String> {
    let is_safetensors = file.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        std::fs::copy(file, staged).map_err(|e| format!("{}: {e}", file.display()))?;
        return Ok(());
    }
    let script = staged.with_extension("convert.py");
    std::fs::write(&script, CONVERT_SCRIPT).map_err(|e| e.to_string())?;
    let out = Command::new(python)
        .arg(&script)
        .arg(file)
        .arg(staged)
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()));
    let _ = std::fs::remove_file(&script);
    let out = out?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} is not a readable PyTorch state dict: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Every variable of the architecture's feature extractor must be in the
/// file with its shape; the file may add only the ImageNet classifier.
fn check(staged: &Path, spec: &BackboneSpec) -> Result<Imported, String> {
    let given: HashMap<String, Tensor> = Tensor::read_safetensors(staged)
        .map_err(|e| format!("not a safetensors file: {e}"))?
        .into_iter()
        .collect();
    let vs = nn::VarStore::new(Device::Cpu);
    let _stages = spec.arch.stages(&vs.root());
    let classifier = spec.arch.imagenet_classifier_prefix();
    let wanted = vs.variables();
    let mut problems = Vec::new();
    let mut names: Vec<&String> = wanted.keys().collect();
    names.sort();
    for name in names {
        let shape = wanted[name].size();
        match given.get(name) {
            None => problems.push(format!("{name} {shape:?} is missing")),
            Some(t) if t.size() != shape => problems.push(format!(
                "{name} is {:?}; {} needs {shape:?}",
                t.size(),
                spec.name
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = given
        .keys()
        .filter(|n| !wanted.contains_key(*n) && !n.starts_with(&format!("{classifier}.")))
        .collect();
    unexpected.sort();
    problems.extend(
        unexpected
            .into_iter()
            .map(|n| format!("{n} is not part of {}", spec.name)),
    );
    if !problems.is_empty() {
        let shown: Vec<String> = problems.iter().take(SHOWN).cloned().collect();
        return Err(format!(
            "the file does not match {} ({} problems): {}{}",
            spec.name,
            problems.len(),
            shown.join("; "),
            if problems.len() > SHOWN { "; …" } else { "" }
        ));
    }
    let imagenet_classifier = given
        .get(&format!("{classifier}.weight"))
        .is_some_and(|w| w.size() == [1000, spec.feature_dim]);
    Ok(Imported {
        tensors: given.len(),
        imagenet_classifier,
    })
}
