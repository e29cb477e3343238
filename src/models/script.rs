//! Backbones users upload as TorchScript modules (`POST /backbones`).
//!
//! The contract: `forward` takes a float batch `[N, 3, S, S]`, normalized as
//! registered, and returns either features (`[N, D]`, or a feature map
//! `[N, D, H, W]` that is average-pooled) or logits from a final linear
//! layer, which is then removed: the stored module gets a `features` method,
//! `forward` without that layer (`src/native/shim.cpp`). Training puts a new
//! head on `features`; freezing counts stages made from the module's
//! parameter names. The module always runs in inference mode: its
//! BatchNorm statistics and dropout stay as uploaded (Keras' advice for
//! fine-tuning), so the uploaded file plus the trained parameters are the
//! whole model.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{CModule, Device, Kind, Tensor};

use crate::data::preprocess::Normalization;

/// The method the stored module gains; named so that it cannot shadow a
/// submodule (torchvision keeps `features` sequences).
pub const FEATURES_METHOD: &str = "finetuned_features";
/// Its name in modules stored before it was renamed.
const LEGACY_FEATURES_METHOD: &str = "features";
/// Family reported in the catalogue.
pub const FAMILY: &str = "TorchScript";

/// What `forward` returns, as the uploader says (or `Auto`: logits when it
/// ends with a linear layer, features otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    Auto,
    Features,
    Logits,
}

impl Output {
    pub const NAMES: [(&'static str, Output); 3] = [
        ("auto", Output::Auto),
        ("features", Output::Features),
        ("logits", Output::Logits),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, o)| *o)
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, o)| *o == self)
            .map_or("auto", |(n, _)| n)
    }
}

/// A run of parameters that freezes as one: every parameter under `prefix`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScriptStage {
    pub prefix: String,
}

/// What inspecting an upload found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspected {
    pub feature_dim: i64,
    pub parameters: i64,
    pub stages: Vec<ScriptStage>,
    /// The final linear layer removed from `forward` (`fc`), if any.
    pub removed_layer: Option<String>,
}

/// A registered TorchScript backbone, its module at a local path.
#[derive(Debug, Clone)]
pub struct ScriptSpec {
    pub name: String,
    pub module_path: PathBuf,
    pub image_size: i64,
    pub normalization: Normalization,
    pub feature_dim: i64,
    pub stages: Vec<ScriptStage>,
    pub removed_layer: Option<String>,
}

fn owns(prefix: &str, name: &str) -> bool {
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Stages from parameter names, in order of first appearance: the
/// top-level submodules (`conv1`, `layer1`, …), or their children when
/// there are fewer than three (`features.0`, `features.1`, … of a model
/// that keeps everything in one `features` sequence).
fn stages_from(names: &[String]) -> Vec<ScriptStage> {
    let group = |depth: usize| {
        let mut prefixes: Vec<String> = Vec::new();
        for name in names {
            let parts: Vec<&str> = name.split('.').collect();
            let prefix = parts[..depth.min(parts.len().saturating_sub(1)).max(1)].join(".");
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
        prefixes
    };
    let mut prefixes = group(1);
    if prefixes.len() < 3 {
        prefixes = group(2);
    }
    prefixes
        .into_iter()
        .map(|prefix| ScriptStage { prefix })
        .collect()
}

fn load(path: &Path, device: Device) -> Result<CModule, String> {
    let mut module = CModule::load_on_device(path, device).map_err(|e| {
        format!("not a TorchScript module (save one with torch.jit.trace or torch.jit.script, then torch.jit.save): {e}")
    })?;
    module.set_eval();
    Ok(module)
}

/// Runs `features` on a batch of zeros: `[N, D]` (after pooling a map).
fn probe(module: &CModule, image_size: i64) -> Result<Tensor, String> {
    let input = Tensor::zeros([2, 3, image_size, image_size], (Kind::Float, Device::Cpu));
    let output = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| module.method_ts(FEATURES_METHOD, &[input]))
    }))
    .map_err(|panic| crate::panic_message(&panic))?
    .map_err(|e| format!("forward fails on a [2, 3, {image_size}, {image_size}] batch: {e}"))?;
    pool(output).ok_or_else(|| "forward must return one tensor".to_string())
}

/// `[N, D]` features from what `features` returned (a map is averaged).
fn pool(output: Tensor) -> Option<Tensor> {
    match output.dim() {
        2 => Some(output),
        4 => Some(super::layers::global_average_pool(&output)),
        _ => None,
    }
}

/// Checks the serialized module `upload` (its operations against the
/// allowlist, then a forward pass) and returns it with its `features`
/// method. Loading and running it executes the uploader's code: call this
/// only inside the upload check's child process ([`crate::sandbox`]).
pub fn inspect(
    upload: &[u8],
    image_size: i64,
    output: Output,
) -> Result<(Inspected, Vec<u8>), Vec<String>> {
    let operations = crate::native::script_operations(upload).map_err(|e| {
        vec![format!(
            "not a TorchScript module (save one with torch.jit.trace or torch.jit.script, then torch.jit.save): {e}"
        )]
    })?;
    let refused = super::script_ops::refused(&operations);
    if !refused.is_empty() {
        return Err(refused);
    }
    inspect_allowed(upload, image_size, output).map_err(|reason| vec![reason])
}

fn inspect_allowed(
    upload: &[u8],
    image_size: i64,
    output: Output,
) -> Result<(Inspected, Vec<u8>), String> {
    let strip = output != Output::Features;
    let (stored, removed_weight) =
        match crate::native::add_features_method(upload, FEATURES_METHOD, strip) {
            Ok(done) => done,
            Err(reason)
                if output == Output::Auto && reason.contains("does not end with a linear") =>
            {
                crate::native::add_features_method(upload, FEATURES_METHOD, false)?
            }
            Err(reason) => return Err(reason),
        };
    let removed_layer = removed_weight.map(|w| w.trim_end_matches(".weight").to_string());
    let mut module = CModule::load_data_on_device(&mut std::io::Cursor::new(&stored), Device::Cpu)
        .map_err(|e| e.to_string())?;
    module.set_eval();
    let shape = probe(&module, image_size)?.size();
    if shape.len() != 2 || shape[1] < 1 {
        return Err(format!(
            "features must be [N, D] or [N, D, H, W]; got {shape:?}"
        ));
    }
    let params: Vec<(String, Tensor)> = module
        .named_parameters()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(name, _)| !removed_layer.as_deref().is_some_and(|l| owns(l, name)))
        .collect();
    if params.is_empty() {
        return Err("the module has no parameters to fine-tune".into());
    }
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let inspected = Inspected {
        feature_dim: shape[1],
        parameters: params.iter().map(|(_, t)| t.numel() as i64).sum(),
        stages: stages_from(&names),
        removed_layer,
    };
    Ok((inspected, stored))
}

/// Variable-name prefix of a TorchScript backbone's parameters in a
/// checkpoint (`backbone.layer1/0/conv1/weight`).
const VAR_PREFIX: &str = "backbone";

fn var_name(parameter: &str) -> String {
    parameter.replace('.', "/")
}

/// A loaded TorchScript backbone whose parameters live in a VarStore.
pub struct ScriptBase {
    module: CModule,
    /// Each trainable parameter with its stage.
    params: Vec<(usize, Tensor)>,
    stages: usize,
}

impl ScriptSpec {
    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.prefix.clone()).collect()
    }

    fn stage_of(&self, parameter: &str) -> Option<usize> {
        self.stages.iter().position(|s| owns(&s.prefix, parameter))
    }

    fn removed(&self, parameter: &str) -> bool {
        self.removed_layer
            .as_deref()
            .is_some_and(|l| owns(l, parameter))
    }

    /// Loads the module onto `vs`'s device and registers its parameters in
    /// `vs` (stage `i` in optimizer group `i`), so that training updates the
    /// module and checkpoints hold them.
    pub fn load_into(&self, vs: &nn::VarStore) -> Result<ScriptBase, String> {
        let module = load(&self.module_path, vs.device())?;
        let mut params = Vec::new();
        for (name, tensor) in module.named_parameters().map_err(|e| e.to_string())? {
            if self.removed(&name) {
                let _ = tensor.set_requires_grad(false);
                continue;
            }
            let stage = self.stage_of(&name).unwrap_or(self.stages.len());
            let path = vs.root().set_group(stage) / VAR_PREFIX;
            params.push((stage, path.add(&var_name(&name), tensor, true)));
        }
        Ok(ScriptBase {
            module,
            params,
            stages: self.stages.len(),
        })
    }

    /// The module with a checkpoint's parameter values, for serving (no
    /// parameter requires gradients, so tracing it for export can make them
    /// constants).
    pub fn load_trained(
        &self,
        vars: &super::folded::Variables,
        device: Device,
    ) -> Result<CModule, String> {
        let module = load(&self.module_path, device)?;
        tch::no_grad(|| -> Result<(), String> {
            for (name, mut tensor) in module.named_parameters().map_err(|e| e.to_string())? {
                let _ = tensor.set_requires_grad(false);
                if self.removed(&name) {
                    continue;
                }
                let key = format!("{VAR_PREFIX}.{}", var_name(&name));
                let value = vars
                    .0
                    .get(&key)
                    .ok_or_else(|| format!("the checkpoint lacks {key}"))?;
                tensor.copy_(value);
            }
            Ok(())
        })?;
        Ok(module)
    }
}

impl ScriptBase {
    pub fn num_stages(&self) -> usize {
        self.stages
    }

    /// Freezes the parameters of the first `n` stages, unfreezes the rest.
    pub fn set_frozen_stages(&self, n: usize) {
        for (stage, tensor) in &self.params {
            let _ = tensor.set_requires_grad(*stage >= n);
        }
    }

    /// Pooled features `[N, D]`; without gradients when every stage is frozen.
    pub fn features(&self, xs: &Tensor, all_frozen: bool) -> Tensor {
        let run = || {
            let output = run_features(&self.module, xs)
                .unwrap_or_else(|e| panic!("the TorchScript backbone failed: {e}"));
            pool(output).expect("features were [N, D] or [N, D, H, W] at registration")
        };
        if all_frozen {
            tch::no_grad(run)
        } else {
            run()
        }
    }
}

/// The stored module's features method, or its former name in a module
/// stored before the rename.
fn run_features(module: &CModule, xs: &Tensor) -> Result<Tensor, tch::TchError> {
    module.method_ts(FEATURES_METHOD, &[xs]).or_else(|err| {
        match module.method_ts(LEGACY_FEATURES_METHOD, &[xs]) {
            Ok(output) => Ok(output),
            Err(_) => Err(err),
        }
    })
}

/// Runs a served TorchScript backbone: pooled features.
pub fn served_features(module: &CModule, xs: &Tensor) -> Result<Tensor, String> {
    let output = run_features(module, xs).map_err(|e| e.to_string())?;
    pool(output).ok_or_else(|| "features were not [N, D] or [N, D, H, W]".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_top_level_submodules_or_their_children() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let prefixes =
            |stages: Vec<ScriptStage>| stages.into_iter().map(|s| s.prefix).collect::<Vec<_>>();
        let resnet = names(&[
            "conv1.weight",
            "bn1.weight",
            "layer1.0.conv1.weight",
            "layer1.1.bn2.bias",
            "layer2.0.conv1.weight",
        ]);
        assert_eq!(
            prefixes(stages_from(&resnet)),
            ["conv1", "bn1", "layer1", "layer2"]
        );
        let mobilenet = names(&[
            "features.0.0.weight",
            "features.0.1.weight",
            "features.1.conv.0.weight",
            "features.18.1.bias",
        ]);
        assert_eq!(
            prefixes(stages_from(&mobilenet)),
            ["features.0", "features.1", "features.18"]
        );
        assert!(owns("layer1", "layer1.0.conv1.weight"));
        assert!(!owns("layer1", "layer10.weight"));
    }
}
