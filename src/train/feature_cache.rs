//! Backbone features computed once, for runs whose backbone stays frozen.

use tch::{Device, Kind, Tensor};

use super::augment::View;
use super::config::{Freeze, JobConfig};
use super::evaluate::EVAL_BATCH;
use super::layout::Layout;
use crate::data::preprocess;
use crate::models::Classifier;

/// Backbone features computed once, when the backbone stays frozen for the
/// whole run and training sees only a few distinct views of each image (no
/// augmentation, or horizontal flips alone): epochs then cost only the head.
pub(super) struct FeatureCache {
    /// Per view, `[n_train, feature_dim]`.
    train: Vec<Tensor>,
    /// `[n_val, feature_dim]`, of the evaluation view.
    pub(super) val: Tensor,
}

impl FeatureCache {
    pub(super) fn build(
        model: &Classifier,
        cfg: &JobConfig,
        train_x: &Tensor,
        val_x: &Tensor,
        device: Device,
        norm: &preprocess::Normalization,
        layout: Layout,
    ) -> Option<Self> {
        if !cfg.cache_features || cfg.freeze != Freeze::Head {
            return None;
        }
        let views = cfg.augmentation.enumerable_views()?;
        let features = |stored: &Tensor, view: View| {
            let n = stored.size()[0];
            let parts: Vec<Tensor> = (0..n)
                .step_by(EVAL_BATCH as usize)
                .map(|start| {
                    let xs = stored
                        .narrow(0, start, EVAL_BATCH.min(n - start))
                        .to_device(device);
                    let input = preprocess::normalize(&view.apply(&xs, cfg.image_size), norm);
                    tch::no_grad(|| model.features_t(&layout.input(&input), false))
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        Some(Self {
            train: views.iter().map(|&v| features(train_x, v)).collect(),
            val: features(val_x, View::Plain),
        })
    }

    /// Features of the training images `idx`, each in a random view.
    pub(super) fn train_batch(&self, idx: &Tensor) -> Tensor {
        let idx = idx.to_device(self.val.device());
        let plain = self.train[0].index_select(0, &idx);
        match self.train.get(1) {
            None => plain,
            Some(mirrored) => {
                let pick = Tensor::rand([idx.size()[0], 1], (Kind::Float, plain.device())).lt(0.5);
                mirrored.index_select(0, &idx).where_self(&pick, &plain)
            }
        }
    }
}
