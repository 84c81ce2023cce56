//! Classification metrics of a model on a site's test split: accuracy, balanced accuracy,
//! macro-F1 and (binary tasks) AUROC, computed from class scores. Pure functions; the
//! definitions are scikit-learn's (`balanced_accuracy_score`, `f1_score(average="macro")`
//! over the labels present in truth or prediction, `roc_auc_score`).

/// Metrics of one model on one test split.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// Fraction of examples whose top-scored class is the label.
    pub accuracy: f64,
    /// Mean recall over the classes present in the labels.
    pub balanced_accuracy: f64,
    /// Mean F1 over the classes present in the labels or the predictions.
    pub macro_f1: f64,
    /// Area under the ROC curve of the positive class (class 1) score; `None` for more than
    /// two classes or when the split holds one class only.
    pub auroc: Option<f64>,
}

/// Metrics from `scores` (`(n, k)` row-major, higher = more likely; probabilities or logits)
/// and labels `y` (`(n,)`, class indices in `0..k`). Ties in the top score go to the lower
/// class. An empty split gives zeros.
///
/// # Panics
/// If `scores.len() != y.len() * k` or a label is outside `0..k` (caller bugs).
pub fn classification(scores: &[f32], k: usize, y: &[i64]) -> Metrics {
    assert_eq!(scores.len(), y.len() * k, "scores must be (n, k)");
    let n = y.len();
    if n == 0 {
        return Metrics {
            accuracy: 0.0,
            balanced_accuracy: 0.0,
            macro_f1: 0.0,
            auroc: None,
        };
    }
    let (mut tp, mut predicted, mut support) = (vec![0u64; k], vec![0u64; k], vec![0u64; k]);
    for (row, &label) in scores.chunks_exact(k).zip(y) {
        let label = usize::try_from(label).expect("label in 0..k");
        assert!(label < k, "label {label} outside 0..{k}");
        let mut pred = 0;
        for (c, &s) in row.iter().enumerate() {
            if s > row[pred] {
                pred = c;
            }
        }
        support[label] += 1;
        predicted[pred] += 1;
        if pred == label {
            tp[label] += 1;
        }
    }
    let correct: u64 = tp.iter().sum();
    let present: Vec<usize> = (0..k).filter(|&c| support[c] > 0).collect();
    let recall = |c: usize| tp[c] as f64 / support[c] as f64;
    let balanced = present.iter().map(|&c| recall(c)).sum::<f64>() / present.len() as f64;
    let labelled: Vec<usize> = (0..k)
        .filter(|&c| support[c] > 0 || predicted[c] > 0)
        .collect();
    let f1 = |c: usize| {
        let (t, fp, fneg) = (tp[c], predicted[c] - tp[c], support[c] - tp[c]);
        2.0 * t as f64 / (2 * t + fp + fneg) as f64
    };
    let macro_f1 = labelled.iter().map(|&c| f1(c)).sum::<f64>() / labelled.len() as f64;
    let auroc = (k == 2 && present.len() == 2).then(|| {
        let positive: Vec<f32> = scores.chunks_exact(2).map(|r| r[1] - r[0]).collect();
        auroc(&positive, y)
    });
    Metrics {
        accuracy: correct as f64 / n as f64,
        balanced_accuracy: balanced,
        macro_f1,
        auroc,
    }
}

/// AUROC of `score` for labels `y` in {0, 1}: the Mann–Whitney U statistic of the positives'
/// ranks (ties get their average rank), divided by `n₀ · n₁`.
fn auroc(score: &[f32], y: &[i64]) -> f64 {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut rank = vec![0f64; score.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &t in &idx[i..=j] {
            rank[t] = average;
        }
        i = j + 1;
    }
    let n1 = y.iter().filter(|&&v| v == 1).count() as f64;
    let n0 = y.len() as f64 - n1;
    let rank_sum: f64 = rank
        .iter()
        .zip(y)
        .filter(|(_, v)| **v == 1)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - n1 * (n1 + 1.0) / 2.0) / (n0 * n1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(p1: &[f32]) -> Vec<f32> {
        p1.iter().flat_map(|&p| [1.0 - p, p]).collect()
    }

    #[test]
    fn binary_metrics_match_hand_computed_values() {
        // scikit-learn's roc_auc_score example: AUROC 0.75.
        let y = [0, 0, 1, 1];
        let m = classification(&binary(&[0.1, 0.4, 0.35, 0.8]), 2, &y);
        assert_eq!(m.auroc, Some(0.75));
        // Predictions (p > 0.5): 0, 0, 0, 1. Recall 1.0 and 0.5; F1 0.8 and 2/3.
        assert_eq!(m.accuracy, 0.75);
        assert_eq!(m.balanced_accuracy, 0.75);
        assert!((m.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // Ties share their rank: a constant score is AUROC 0.5.
        assert_eq!(classification(&binary(&[0.3; 4]), 2, &y).auroc, Some(0.5));
        // One class only: no AUROC.
        assert_eq!(classification(&binary(&[0.3, 0.7]), 2, &[1, 1]).auroc, None);
    }

    #[test]
    fn imbalance_shows_in_balanced_accuracy_and_macro_f1() {
        // 9 negatives, 1 positive, always predicting negative.
        let y: Vec<i64> = (0..10).map(|i| i64::from(i == 9)).collect();
        let m = classification(&binary(&[0.1; 10]), 2, &y);
        assert_eq!(m.accuracy, 0.9);
        assert_eq!(m.balanced_accuracy, 0.5);
        assert!((m.macro_f1 - (18.0 / 19.0) / 2.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn multiclass_has_no_auroc() {
        let scores = [0.9, 0.05, 0.05, 0.1, 0.8, 0.1, 0.2, 0.3, 0.5];
        let m = classification(&scores, 3, &[0, 1, 1]);
        assert_eq!(m.auroc, None);
        assert!((m.accuracy - 2.0 / 3.0).abs() < 1e-12);
        // Recall: class 0 = 1, class 1 = 1/2 (class 2 absent from the labels).
        assert_eq!(m.balanced_accuracy, 0.75);
        // F1: class 0 = 1, class 1 = 2/3, class 2 (predicted once, never true) = 0.
        assert!((m.macro_f1 - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }
}
