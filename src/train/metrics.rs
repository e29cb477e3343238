//! Classification metrics from a confusion matrix.

use crate::store::metrics::ClassMetrics;

/// Counts of (true label, predicted label) pairs.
pub struct Confusion {
    /// `matrix[truth][predicted]`.
    pub matrix: Vec<Vec<i64>>,
}

impl Confusion {
    pub fn new(num_classes: usize) -> Self {
        Self {
            matrix: vec![vec![0; num_classes]; num_classes],
        }
    }

    pub fn add(&mut self, truth: &[i64], predicted: &[i64]) {
        for (&t, &p) in truth.iter().zip(predicted) {
            self.matrix[t as usize][p as usize] += 1;
        }
    }

    pub fn total(&self) -> i64 {
        self.matrix.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let correct: i64 = (0..self.matrix.len()).map(|i| self.matrix[i][i]).sum();
        ratio(correct, self.total())
    }

    /// Per-class precision, recall, F1 and support, in label order.
    pub fn per_class(&self, labels: &[String]) -> Vec<ClassMetrics> {
        let n = self.matrix.len();
        (0..n)
            .map(|c| {
                let tp = self.matrix[c][c];
                let support: i64 = self.matrix[c].iter().sum();
                let predicted: i64 = (0..n).map(|t| self.matrix[t][c]).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassMetrics {
                    label: labels[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect()
    }
}

/// Mean F1 over the classes that have validation images.
pub fn macro_f1(per_class: &[ClassMetrics]) -> f64 {
    let present: Vec<f64> = per_class
        .iter()
        .filter(|c| c.support > 0)
        .map(|c| c.f1)
        .collect();
    if present.is_empty() {
        0.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    }
}

fn ratio(num: i64, den: i64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_from_a_known_confusion_matrix() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut c = Confusion::new(2);
        // truth a: 3 right, 1 called b; truth b: 2 right, 2 called a.
        c.add(&[0, 0, 0, 0, 1, 1, 1, 1], &[0, 0, 0, 1, 1, 1, 0, 0]);
        assert_eq!(c.matrix, vec![vec![3, 1], vec![2, 2]]);
        assert!((c.accuracy() - 5.0 / 8.0).abs() < 1e-12);
        let per = c.per_class(&labels);
        assert!((per[0].precision - 3.0 / 5.0).abs() < 1e-12);
        assert!((per[0].recall - 3.0 / 4.0).abs() < 1e-12);
        assert!((per[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((per[1].recall - 0.5).abs() < 1e-12);
        let f1_a = 2.0 * 0.6 * 0.75 / 1.35;
        let f1_b = 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5);
        assert!((macro_f1(&per) - (f1_a + f1_b) / 2.0).abs() < 1e-12);
    }
}
