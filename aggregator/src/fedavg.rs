//! FedAvg (McMahan et al. 2017, Algorithm 1): the next global model is the current one plus the
//! average of the sites' updates weighted by `num_examples`. Pure functions, no IO.
//!
//! Memory is O(model size): updates are added one at a time into an f64 accumulator, in the
//! caller's order (the aggregator uses site-name order, so a round's global model is
//! reproducible bit for bit from its persisted inputs).

use crate::tensors::Tensors;

/// Accumulates `Σ_i (n_i / N) · Δ_i` one update at a time.
#[derive(Debug)]
pub struct FedAvg {
    total_examples: u64,
    acc: Vec<Vec<f64>>,
    added: usize,
}

impl FedAvg {
    /// Start a round whose updates together hold `total_examples` examples (`N = Σ n_i > 0`),
    /// for a model with the layout of `global`.
    pub fn new(global: &Tensors, total_examples: u64) -> Self {
        assert!(total_examples > 0, "FedAvg needs at least one example");
        Self {
            total_examples,
            acc: global.data.iter().map(|d| vec![0.0; d.len()]).collect(),
            added: 0,
        }
    }

    /// Add one site's update `Δ_i` (same layout as the global model) with weight `n_i / N`.
    pub fn add(&mut self, num_examples: u64, update: &Tensors) {
        let w = num_examples as f64 / self.total_examples as f64;
        for (acc, d) in self.acc.iter_mut().zip(&update.data) {
            for (a, &x) in acc.iter_mut().zip(d) {
                *a += w * f64::from(x);
            }
        }
        self.added += 1;
    }

    /// The weighted mean `Σᵢ (nᵢ/N) Δᵢ` in f64, per tensor.
    pub fn into_mean(self) -> Vec<Vec<f64>> {
        self.acc
    }

    /// Number of updates added.
    pub fn len(&self) -> usize {
        self.added
    }

    /// Whether no update was added.
    pub fn is_empty(&self) -> bool {
        self.added == 0
    }

    /// The next global model: `global + Σ_i (n_i/N) Δ_i`, rounded to f32 once.
    pub fn finish(self, global: &Tensors) -> Tensors {
        let data = global
            .data
            .iter()
            .zip(self.acc)
            .map(|(g, a)| {
                g.iter()
                    .zip(a)
                    .map(|(&g, a)| (f64::from(g) + a) as f32)
                    .collect()
            })
            .collect();
        Tensors {
            names: global.names.clone(),
            shapes: global.shapes.clone(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: Vec<f32>) -> Tensors {
        Tensors {
            names: vec!["w".into()],
            shapes: vec![vec![v.len()]],
            data: vec![v],
        }
    }

    #[test]
    fn weights_by_num_examples() {
        let global = one(vec![1.0, 1.0]);
        let mut f = FedAvg::new(&global, 400);
        f.add(100, &one(vec![4.0, 0.0]));
        f.add(300, &one(vec![0.0, 8.0]));
        assert_eq!(f.len(), 2);
        let next = f.finish(&global);
        // 1 + 0.25·4 = 2 ; 1 + 0.75·8 = 7
        assert_eq!(next.data[0], vec![2.0, 7.0]);
    }

    #[test]
    fn equal_weights_give_the_mean() {
        let global = one(vec![0.0]);
        let mut f = FedAvg::new(&global, 30);
        for v in [1.0, 2.0, 6.0] {
            f.add(10, &one(vec![v]));
        }
        assert!((f.finish(&global).data[0][0] - 3.0).abs() < 1e-6);
    }
}
