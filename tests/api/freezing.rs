//! Freeze policies change exactly the parameters they should.

use std::collections::HashMap;

use finetuned::models::{self, Classifier};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::helpers::{torch_rng_blocking, weights_dir};

fn snapshot(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().copy()))
        .collect()
}

/// Runs one training step with the first `frozen` stages frozen; returns
/// the names of the variables that changed.
fn changed_after_one_step(frozen: usize, frozen_batchnorm: bool) -> (Vec<String>, usize) {
    let _rng = torch_rng_blocking();
    let spec = models::find("mobilenet_v2").unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut model =
        Classifier::new(&mut vs, spec, 3, Some(&spec.weights_path(&weights_dir()))).unwrap();
    model.set_frozen_stages(&vs, frozen);
    model.set_frozen_batchnorm(frozen_batchnorm);
    let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let before = snapshot(&vs);
    tch::manual_seed(0);
    let xs = Tensor::rand([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let ys = Tensor::from_slice(&[0i64, 1, 2, 0]);
    opt.backward_step(&model.forward_t(&xs, true).cross_entropy_for_logits(&ys));
    let mut changed: Vec<String> = snapshot(&vs)
        .into_iter()
        .filter(|(name, after)| !after.equal(&before[name]))
        .map(|(name, _)| name)
        .collect();
    changed.sort();
    (changed, model.num_stages())
}

/// The stage index of a backbone variable (`features.N.…`), by its layer.
fn layer(name: &str) -> Option<usize> {
    name.strip_prefix("features.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[test]
fn head_only_training_changes_only_the_head() {
    let (changed, stages) = changed_after_one_step(usize::MAX, true);
    assert_eq!(stages, 9);
    assert_eq!(changed, ["head.bias", "head.weight"]);
}

#[test]
fn last_n_trains_the_top_stages_and_keeps_frozen_batchnorm_statistics() {
    // Freeze all but the last two stages: block7 (features.17) and the
    // final conv (features.18).
    let (changed, stages) = changed_after_one_step(7, true);
    assert_eq!(stages, 9);
    let layers: Vec<usize> = changed.iter().filter_map(|n| layer(n)).collect();
    assert!(
        layers.iter().all(|&l| l >= 17),
        "frozen layers changed: {changed:?}"
    );
    assert!(changed
        .iter()
        .any(|n| n.starts_with("features.17.") && n.ends_with("running_mean")));
    assert!(changed.iter().any(|n| n == "features.18.0.weight"));
    assert!(changed.contains(&"head.weight".to_string()));
}

#[test]
fn frozen_stages_update_batchnorm_statistics_only_when_asked() {
    let (changed, _) = changed_after_one_step(7, false);
    // Weights of frozen stages stay, their running statistics move.
    assert!(
        changed
            .iter()
            .any(|n| n.starts_with("features.3.") && n.ends_with("running_var")),
        "{changed:?}"
    );
    assert!(
        !changed
            .iter()
            .any(|n| layer(n).is_some_and(|l| l < 17) && n.ends_with(".weight")),
        "{changed:?}"
    );
}

#[test]
fn full_training_changes_every_stage() {
    let (changed, _) = changed_after_one_step(0, true);
    let mut layers: Vec<usize> = changed.iter().filter_map(|n| layer(n)).collect();
    layers.sort();
    layers.dedup();
    assert_eq!(layers, (0..=18).collect::<Vec<_>>());
}
