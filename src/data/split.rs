//! The train/val/test split: the archive's own, or a seeded stratified one.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::archive::GivenSplit;

/// An image's label, and the split its folder or manifest gave.
pub struct Item {
    pub label: usize,
    pub given: Option<GivenSplit>,
}

/// Indices into the items, by split.
#[derive(Debug, Default, PartialEq)]
pub struct Assignment {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// Items the archive placed in val or test keep their split. When the
/// archive gives no validation (test) images, each class holds out
/// `val_fraction` (`test_fraction`) of its remaining images, chosen by
/// `seed`: at least one when the fraction is positive, never all of them.
pub fn assign(
    items: &[Item],
    num_classes: usize,
    val_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> Assignment {
    let given = |split| items.iter().any(|i| i.given == Some(split));
    let val_fraction = if given(GivenSplit::Val) {
        0.0
    } else {
        val_fraction
    };
    let test_fraction = if given(GivenSplit::Test) {
        0.0
    } else {
        test_fraction
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Assignment::default();
    for (index, item) in items.iter().enumerate() {
        match item.given {
            Some(GivenSplit::Val) => out.val.push(index),
            Some(GivenSplit::Test) => out.test.push(index),
            _ => {}
        }
    }
    for label in 0..num_classes {
        let mut pool: Vec<usize> = items
            .iter()
            .enumerate()
            .filter(|(_, i)| i.label == label && matches!(i.given, None | Some(GivenSplit::Train)))
            .map(|(index, _)| index)
            .collect();
        pool.shuffle(&mut rng);
        let n = pool.len();
        let held = |fraction: f64, room: usize| {
            if fraction <= 0.0 || room == 0 {
                0
            } else {
                ((n as f64 * fraction).round() as usize).clamp(1, room)
            }
        };
        let n_val = held(val_fraction, n.saturating_sub(1));
        let n_test = held(test_fraction, n.saturating_sub(1 + n_val));
        out.val.extend_from_slice(&pool[..n_val]);
        out.test.extend_from_slice(&pool[n_val..n_val + n_test]);
        out.train.extend_from_slice(&pool[n_val + n_test..]);
    }
    out.train.sort_unstable();
    out.val.sort_unstable();
    out.test.sort_unstable();
    out
}

/// Images per class among `members`.
pub fn counts(members: &[usize], items: &[Item], num_classes: usize) -> Vec<i64> {
    let mut counts = vec![0; num_classes];
    for &m in members {
        counts[items[m].label] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsplit(per_class: usize, classes: usize) -> Vec<Item> {
        (0..per_class * classes)
            .map(|i| Item {
                label: i % classes,
                given: None,
            })
            .collect()
    }

    #[test]
    fn fractions_hold_out_per_class_and_never_empty_train() {
        let items = unsplit(10, 2);
        let split = assign(&items, 2, 0.2, 0.1, 7);
        assert_eq!(counts(&split.train, &items, 2), vec![7, 7]);
        assert_eq!(counts(&split.val, &items, 2), vec![2, 2]);
        assert_eq!(counts(&split.test, &items, 2), vec![1, 1]);
        assert_eq!(split, assign(&items, 2, 0.2, 0.1, 7), "seeded");

        let tiny = unsplit(2, 2);
        let split = assign(&tiny, 2, 0.4, 0.4, 0);
        assert_eq!(counts(&split.train, &tiny, 2), vec![1, 1]);
        assert_eq!(counts(&split.val, &tiny, 2), vec![1, 1]);
        assert!(split.test.is_empty());
    }

    #[test]
    fn given_splits_are_kept_and_only_missing_ones_are_held_out() {
        let mut items = unsplit(10, 2);
        for item in items.iter_mut().take(4) {
            item.given = Some(GivenSplit::Val);
        }
        let split = assign(&items, 2, 0.2, 0.1, 1);
        assert_eq!(split.val, vec![0, 1, 2, 3]);
        assert_eq!(split.test.len(), 2, "one per class from the rest");
        assert_eq!(split.train.len(), 14);
    }
}
