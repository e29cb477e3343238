//! Scoring a split without gradients: mean loss (class-weighted when the
//! job weighs classes), the confusion matrix and top-k accuracy.

use tch::{Device, Kind, Reduction, Tensor};

use super::metrics::Confusion;
use super::trainer::TrainSpec;

/// Batch size of evaluation passes (no gradients, so it can be large).
pub(super) const EVAL_BATCH: i64 = 64;
/// Top-k accuracy uses k = min(this, classes).
const TOP_K: i64 = 5;

/// Scores of a split.
pub(super) struct Evaluation {
    pub(super) loss: f64,
    pub(super) confusion: Confusion,
    pub(super) k: i64,
    pub(super) top_k_accuracy: f64,
}

/// Mean validation loss, the confusion matrix and top-k accuracy, without
/// gradients. `logits_of(start, len)` gives the logits of a slice of the
/// validation split.
pub(super) fn evaluate(
    logits_of: impl Fn(i64, i64) -> Tensor,
    labels: &Tensor,
    spec: &TrainSpec,
    class_weights: Option<&Tensor>,
) -> Evaluation {
    let n = labels.size()[0];
    let k = TOP_K.min(spec.labels.len() as i64);
    let mut confusion = Confusion::new(spec.labels.len());
    let (mut loss_sum, mut top_k_hits) = (0.0, 0i64);
    tch::no_grad(|| {
        for start in (0..n).step_by(EVAL_BATCH as usize) {
            let len = EVAL_BATCH.min(n - start);
            let ys = labels.narrow(0, start, len).to_device(spec.device);
            let logits = logits_of(start, len);
            loss_sum += logits
                .cross_entropy_loss(&ys, class_weights, Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            let (_, top) = logits.topk(k, -1, true, true);
            top_k_hits += top
                .eq_tensor(&ys.unsqueeze(1))
                .any_dim(1, false)
                .sum(Kind::Int64)
                .int64_value(&[]);
            let predicted = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))
                .expect("int64");
            let truth = Vec::<i64>::try_from(ys.to_device(Device::Cpu)).expect("int64 labels");
            confusion.add(&truth, &predicted);
        }
    });
    Evaluation {
        // With class weights, the summed loss is normalized by the weight total.
        loss: match class_weights {
            Some(w) => {
                loss_sum
                    / w.index_select(0, &labels.to_device(w.device()))
                        .sum(Kind::Double)
                        .double_value(&[])
            }
            None => loss_sum / n as f64,
        },
        confusion,
        k,
        top_k_accuracy: top_k_hits as f64 / n as f64,
    }
}
