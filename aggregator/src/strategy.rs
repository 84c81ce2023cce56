//! Aggregation strategies: how a round's updates become the next global model. Pure
//! functions; the service feeds them the persisted updates in site-name order, so results are
//! reproducible from what was persisted.
//!
//! * **FedAvg** (McMahan et al. 2017): `x + Σᵢ (nᵢ/N) Δᵢ`. Also the aggregation of **FedProx**
//!   (Li et al. 2020), whose proximal term `μ/2 ‖w − x‖²` acts in the sites' local training.
//! * **FedAdam / FedYogi** (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
//!   Algorithm 2): with `Δ = Σᵢ (nᵢ/N) Δᵢ`, `m ← β₁m + (1−β₁)Δ`;
//!   Adam `v ← β₂v + (1−β₂)Δ²`, Yogi `v ← v − (1−β₂)Δ² sign(v − Δ²)`; `x ← x + η m/(√v + τ)`.
//!   The moments `(m, v)` are server state, persisted with the global model.
//! * **Coordinate-wise median** and **trimmed mean** (Yin et al., "Byzantine-Robust
//!   Distributed Learning", ICML 2018): per coordinate, the median of the sites' values, or the
//!   mean after dropping the `⌊βk⌋` largest and smallest. Unweighted by design (a weight would
//!   let one site claim many examples). These hold all `k` updates in memory.

use crate::AggregatorError;
use crate::fedavg::FedAvg;
use crate::tensors::Tensors;

/// FedOpt server-optimizer settings (defaults from Reddi et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedOpt {
    /// Server learning rate η.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// Adaptivity τ.
    pub tau: f64,
}

impl Default for FedOpt {
    fn default() -> Self {
        Self {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }
}

/// An aggregation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Strategy {
    /// Weighted average (FedAvg; FedProx aggregates the same way).
    #[default]
    FedAvg,
    /// FedAvg's average as a pseudo-gradient for a server Adam.
    FedAdam(FedOpt),
    /// FedAvg's average as a pseudo-gradient for a server Yogi.
    FedYogi(FedOpt),
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean dropping a fraction `β ∈ [0, 0.5)` at each end.
    TrimmedMean(f64),
}

impl Strategy {
    /// Parse a name (`fedavg`, `fedprox`, `fedadam`, `fedyogi`, `median`, `trimmed-mean`) with
    /// the given settings.
    ///
    /// # Errors
    /// [`AggregatorError::Config`] for an unknown name or a trim fraction outside `[0, 0.5)`.
    pub fn parse(name: &str, opt: FedOpt, trim: f64) -> Result<Self, AggregatorError> {
        match name {
            "fedavg" | "fedprox" => Ok(Self::FedAvg),
            "fedadam" => Ok(Self::FedAdam(opt)),
            "fedyogi" => Ok(Self::FedYogi(opt)),
            "median" => Ok(Self::Median),
            "trimmed-mean" if (0.0..0.5).contains(&trim) => Ok(Self::TrimmedMean(trim)),
            "trimmed-mean" => Err(AggregatorError::Config(format!(
                "trim fraction must be in [0, 0.5), got {trim}"
            ))),
            _ => Err(AggregatorError::Config(format!(
                "strategy `{name}` is unknown: use fedavg, fedprox, fedadam, fedyogi, median or trimmed-mean"
            ))),
        }
    }

    /// Whether the strategy needs every update in memory at once.
    pub fn needs_all_updates(&self) -> bool {
        matches!(self, Self::Median | Self::TrimmedMean(_))
    }
}

/// Server optimizer moments `(m, v)` with the model's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    /// First moment.
    pub m: Tensors,
    /// Second moment.
    pub v: Tensors,
}

impl ServerState {
    fn zeros(like: &Tensors, v0: f32) -> Self {
        let z = |x: f32| Tensors {
            names: like.names.clone(),
            shapes: like.shapes.clone(),
            data: like.data.iter().map(|d| vec![x; d.len()]).collect(),
        };
        Self {
            m: z(0.0),
            v: z(v0),
        }
    }

    /// As one safetensors blob (`m.NAME`, `v.NAME`).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut all = Tensors {
            names: vec![],
            shapes: vec![],
            data: vec![],
        };
        for (prefix, t) in [("m.", &self.m), ("v.", &self.v)] {
            for ((n, s), d) in t.names.iter().zip(&t.shapes).zip(&t.data) {
                all.names.push(format!("{prefix}{n}"));
                all.shapes.push(s.clone());
                all.data.push(d.clone());
            }
        }
        all.to_safetensors()
    }

    /// From [`ServerState::to_safetensors`] bytes, checked against the model's layout.
    ///
    /// # Errors
    /// [`AggregatorError::InvalidUpdate`] for malformed bytes or a layout mismatch.
    pub fn from_safetensors(bytes: &[u8], like: &Tensors) -> Result<Self, AggregatorError> {
        let all = Tensors::from_safetensors(bytes)?;
        let pick = |prefix: &str| -> Result<Tensors, AggregatorError> {
            let mut t = Tensors {
                names: vec![],
                shapes: vec![],
                data: vec![],
            };
            for ((n, s), d) in all.names.iter().zip(&all.shapes).zip(&all.data) {
                if let Some(base) = n.strip_prefix(prefix) {
                    t.names.push(base.to_owned());
                    t.shapes.push(s.clone());
                    t.data.push(d.clone());
                }
            }
            t.check_layout(like)?;
            Ok(t)
        };
        Ok(Self {
            m: pick("m.")?,
            v: pick("v.")?,
        })
    }
}

/// The FedAvg accumulator holding `Σᵢ (nᵢ/N) Δᵢ`.
fn weighted_average(global: &Tensors, updates: &[(u64, &Tensors)]) -> FedAvg {
    let total: u64 = updates.iter().map(|u| u.0).sum();
    let mut avg = FedAvg::new(global, total.max(1));
    for (n, u) in updates {
        avg.add(*n, u);
    }
    avg
}

fn with_data(global: &Tensors, data: Vec<Vec<f32>>) -> Tensors {
    Tensors {
        names: global.names.clone(),
        shapes: global.shapes.clone(),
        data,
    }
}

/// Apply FedAdam / FedYogi to the average `delta`.
fn fedopt(
    global: &Tensors,
    delta: &[Vec<f64>],
    opt: FedOpt,
    yogi: bool,
    state: Option<ServerState>,
) -> (Tensors, ServerState) {
    // Reddi et al. initialise v to τ² (so the first step is well scaled).
    let mut s = state.unwrap_or_else(|| ServerState::zeros(global, (opt.tau * opt.tau) as f32));
    let mut next = global.data.clone();
    for (i, d) in delta.iter().enumerate() {
        for (j, &dj) in d.iter().enumerate() {
            let m = opt.beta1 * f64::from(s.m.data[i][j]) + (1.0 - opt.beta1) * dj;
            let v0 = f64::from(s.v.data[i][j]);
            let d2 = dj * dj;
            let v = if yogi {
                v0 - (1.0 - opt.beta2) * d2 * (v0 - d2).signum()
            } else {
                opt.beta2 * v0 + (1.0 - opt.beta2) * d2
            };
            s.m.data[i][j] = m as f32;
            s.v.data[i][j] = v as f32;
            next[i][j] =
                (f64::from(global.data[i][j]) + opt.lr * m / (v.max(0.0).sqrt() + opt.tau)) as f32;
        }
    }
    (with_data(global, next), s)
}

/// Per coordinate, combine the sites' values with `f` (given sorted values).
fn coordinatewise(
    global: &Tensors,
    updates: &[(u64, &Tensors)],
    f: impl Fn(&[f32]) -> f64,
) -> Tensors {
    let mut col = vec![0f32; updates.len()];
    let data = global
        .data
        .iter()
        .enumerate()
        .map(|(i, g)| {
            g.iter()
                .enumerate()
                .map(|(j, &gj)| {
                    for (c, (_, u)) in col.iter_mut().zip(updates) {
                        *c = u.data[i][j];
                    }
                    col.sort_unstable_by(f32::total_cmp);
                    (f64::from(gj) + f(&col)) as f32
                })
                .collect()
        })
        .collect();
    with_data(global, data)
}

fn median(sorted: &[f32]) -> f64 {
    let k = sorted.len();
    if k % 2 == 1 {
        f64::from(sorted[k / 2])
    } else {
        (f64::from(sorted[k / 2 - 1]) + f64::from(sorted[k / 2])) / 2.0
    }
}

fn trimmed_mean(sorted: &[f32], beta: f64) -> f64 {
    let k = sorted.len();
    let cut = ((beta * k as f64).floor() as usize).min((k - 1) / 2);
    let kept = &sorted[cut..k - cut];
    kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
}

/// The next global model from `global` and the round's `(num_examples, update)` pairs (in
/// site-name order), and the new server state (FedAdam / FedYogi only).
///
/// # Panics
/// If `updates` is empty or layouts differ (the service validates both first).
pub fn aggregate(
    strategy: Strategy,
    global: &Tensors,
    updates: &[(u64, &Tensors)],
    state: Option<ServerState>,
) -> (Tensors, Option<ServerState>) {
    assert!(
        !updates.is_empty(),
        "a round aggregates at least one update"
    );
    match strategy {
        Strategy::FedAvg => (weighted_average(global, updates).finish(global), None),
        Strategy::FedAdam(o) | Strategy::FedYogi(o) => {
            let mean = weighted_average(global, updates).into_mean();
            let yogi = matches!(strategy, Strategy::FedYogi(_));
            let (next, s) = fedopt(global, &mean, o, yogi, state);
            (next, Some(s))
        }
        Strategy::Median => (coordinatewise(global, updates, median), None),
        Strategy::TrimmedMean(b) => (
            coordinatewise(global, updates, |s| trimmed_mean(s, b)),
            None,
        ),
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
    fn robust_rules_ignore_one_outlier_and_fedavg_does_not() {
        let g = one(vec![0.0, 0.0]);
        let us = [
            one(vec![1.0, 2.0]),
            one(vec![1.2, 2.2]),
            one(vec![0.8, 1.8]),
            one(vec![100.0, -100.0]),
        ];
        let ups: Vec<(u64, &Tensors)> = us.iter().map(|u| (10, u)).collect();
        let (avg, _) = aggregate(Strategy::FedAvg, &g, &ups, None);
        assert!((avg.data[0][0] - 25.75).abs() < 1e-4);
        let (med, _) = aggregate(Strategy::Median, &g, &ups, None);
        assert_eq!(med.data[0], vec![1.1, 1.9]);
        let (tm, _) = aggregate(Strategy::TrimmedMean(0.25), &g, &ups, None);
        assert!((tm.data[0][0] - 1.1).abs() < 1e-6 && (tm.data[0][1] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn fedadam_first_step_follows_reddi_et_al() {
        let g = one(vec![1.0]);
        let u = one(vec![0.5]);
        let o = FedOpt::default();
        let (next, s) = aggregate(Strategy::FedAdam(o), &g, &[(1, &u)], None);
        let s = s.unwrap();
        let m = 0.1 * 0.5;
        let v = 0.99 * 1e-6 + 0.01 * 0.25;
        assert!((f64::from(s.m.data[0][0]) - m).abs() < 1e-7);
        assert!((f64::from(s.v.data[0][0]) - v).abs() < 1e-7);
        let want = 1.0 + 0.01 * m / (f64::sqrt(v) + 1e-3);
        assert!((f64::from(next.data[0][0]) - want).abs() < 1e-6);
        // The state round-trips through its blob.
        let back = ServerState::from_safetensors(&s.to_safetensors(), &g).unwrap();
        assert_eq!(back, s);
        // Yogi moves v towards Δ² additively.
        let (_, y) = aggregate(Strategy::FedYogi(o), &g, &[(1, &u)], None);
        let vy = 1e-6 - 0.01 * 0.25 * (1e-6f64 - 0.25).signum();
        assert!((f64::from(y.unwrap().v.data[0][0]) - vy).abs() < 1e-7);
    }

    #[test]
    fn parses_names() {
        let o = FedOpt::default();
        assert_eq!(
            Strategy::parse("fedprox", o, 0.1).unwrap(),
            Strategy::FedAvg
        );
        assert!(Strategy::parse("trimmed-mean", o, 0.6).is_err());
        assert!(
            Strategy::parse("krum", o, 0.1)
                .unwrap_err()
                .to_string()
                .contains("median")
        );
    }
}
