//! The train/val split: the archive's own, or a seeded stratified one.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::archive::GivenSplit;

/// An image's place in the upload, its label, and the split its folder gave.
pub struct Item {
    pub index: usize,
    pub label: usize,
    pub given: Option<GivenSplit>,
}

/// Returns (train, val) indices. Items the archive placed keep their split;
/// when the archive gives no validation images, each class holds out
/// `val_fraction` of its images (at least one, never all).
pub fn assign(
    items: &[Item],
    num_classes: usize,
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let has_given_val = items.iter().any(|i| i.given == Some(GivenSplit::Val));
    if has_given_val {
        let (val, train): (Vec<&Item>, Vec<&Item>) =
            items.iter().partition(|i| i.given == Some(GivenSplit::Val));
        return (
            train.iter().map(|i| i.index).collect(),
            val.iter().map(|i| i.index).collect(),
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut train = Vec::new();
    let mut val = Vec::new();
    for label in 0..num_classes {
        let mut members: Vec<usize> = items
            .iter()
            .filter(|i| i.label == label)
            .map(|i| i.index)
            .collect();
        members.shuffle(&mut rng);
        let n = members.len();
        let n_val = if val_fraction <= 0.0 || n < 2 {
            0
        } else {
            ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1)
        };
        val.extend_from_slice(&members[..n_val]);
        train.extend_from_slice(&members[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Images per class among `members`.
pub fn counts(members: &[usize], items: &[Item], num_classes: usize) -> Vec<i64> {
    let mut counts = vec![0; num_classes];
    for &m in members {
        counts[items[m].label] += 1;
    }
    counts
}
