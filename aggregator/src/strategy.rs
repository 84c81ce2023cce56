//! Aggregation strategies: how a round's updates become the next global model. Pure
//! functions. The service aggregates FedAvg, FedAdam and FedYogi from the round's mean update
//! ([`aggregate_mean_in_place`], from the running mean of [`crate::running_mean`] or from
//! secure aggregation's sum), and median and trimmed mean from the persisted update files
//! ([`aggregate_files`]).
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
//!   let one site claim many examples).
//!
//! Every rule is coordinate-wise ([`aggregate_slice`]), so updates can be aggregated from
//! their files a slice at a time ([`aggregate_files`]): memory does not grow with the number
//! of sites.

use crate::AggregatorError;
use crate::tensors::{FileTensors, Tensors};
use rayon::prelude::*;

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
    /// Whether the next global model depends on the updates only through their weighted mean
    /// (FedAvg, FedAdam, FedYogi): such a round is aggregated from a running mean
    /// ([`crate::running_mean`]) or a secure-aggregation sum. Median and trimmed mean need
    /// every update.
    pub fn is_mean_based(&self) -> bool {
        matches!(self, Self::FedAvg | Self::FedAdam(_) | Self::FedYogi(_))
    }

    /// Whether the strategy keeps server state between rounds (FedAdam, FedYogi).
    pub fn is_stateful(&self) -> bool {
        matches!(self, Self::FedAdam(_) | Self::FedYogi(_))
    }

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

    /// Tensor names and shapes of the state blob for a model of layout `like`: `m.NAME` for
    /// every tensor, then `v.NAME` (sorted, as written).
    pub fn names(like: &Tensors) -> (Vec<String>, Vec<Vec<usize>>) {
        ["m.", "v."]
            .iter()
            .flat_map(|p| {
                like.names
                    .iter()
                    .zip(&like.shapes)
                    .map(move |(n, s)| (format!("{p}{n}"), s.clone()))
            })
            .unzip()
    }

    /// Write as one safetensors blob (`m.NAME`, `v.NAME`), streaming.
    ///
    /// # Errors
    /// IO errors of `w`.
    pub fn write_safetensors<W: std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        let (names, _) = Self::names(&self.m);
        let entries = names.iter().zip(self.m.entries().chain(self.v.entries()));
        crate::tensors::write_safetensors(w, entries.map(|(n, (_, s, d))| (n.as_str(), s, d)))
    }

    /// As one safetensors blob (`m.NAME`, `v.NAME`).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_safetensors(&mut out)
            .expect("writing to memory cannot fail");
        out
    }

    /// Read a state blob bound to [`ServerState::names`] of `like` (see [`FileTensors::open`])
    /// slice by slice, without a second copy in memory, and check its SHA-256.
    ///
    /// # Errors
    /// IO errors; [`AggregatorError::Blob`] if its bytes do not hash to `sha`.
    pub fn from_file(
        file: &mut FileTensors,
        like: &Tensors,
        sha: &str,
    ) -> Result<Self, AggregatorError> {
        let mut s = Self::zeros(like, 0.0);
        for (i, t) in s.m.data.iter_mut().chain(s.v.data.iter_mut()).enumerate() {
            let len = t.len();
            for start in (0..len).step_by(1 << 18) {
                let end = (start + (1 << 18)).min(len);
                file.read(i, start, &mut t[start..end])?;
            }
        }
        file.verify_sha256(sha)?;
        Ok(s)
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

/// Values per slice, summed over the round's updates, when aggregating from files: with `k`
/// updates each is read `SLICE_VALUES / k` values at a time (8 MiB of f32 in all, twice: one
/// slice is aggregated while the next is read), so memory does not grow with the number of
/// sites.
const SLICE_VALUES: usize = 1 << 21;

/// The next global values of one slice of coordinates, appended to `out`.
///
/// `g`: the global model's values; `updates`: each site's `(num_examples, values)` for the same
/// coordinates, in site-name order; `moments`: FedAdam/FedYogi `(m, v)` for these coordinates,
/// updated in place (required for those strategies, ignored otherwise). Every strategy is
/// coordinate-wise, so aggregating a model slice by slice gives the same bits as aggregating it
/// whole: per coordinate the same f64 operations run in the same (site) order.
///
/// # Panics
/// If `updates` is empty, slices differ in length, or FedOpt gets no moments.
pub fn aggregate_slice(
    strategy: Strategy,
    g: &[f32],
    updates: &[(u64, &[f32])],
    moments: Option<(&mut [f32], &mut [f32])>,
    out: &mut Vec<f32>,
) {
    assert!(
        !updates.is_empty(),
        "a round aggregates at least one update"
    );
    let mean = || {
        // Σᵢ (nᵢ/N) Δᵢ in f64, one update at a time.
        // Weights summed in f64: exact below 2⁵³, and no wrap for any u64 weights.
        let total = updates.iter().map(|u| u.0 as f64).sum::<f64>().max(1.0);
        let mut acc = vec![0f64; g.len()];
        for (n, u) in updates {
            assert_eq!(u.len(), g.len(), "update slice length");
            let w = *n as f64 / total;
            for (a, &x) in acc.iter_mut().zip(*u) {
                *a += w * f64::from(x);
            }
        }
        acc
    };
    match strategy {
        Strategy::FedAvg | Strategy::FedAdam(_) | Strategy::FedYogi(_) => {
            apply_mean(strategy, g, mean(), moments, out);
        }
        Strategy::Median | Strategy::TrimmedMean(_) => {
            let mut col = vec![0f32; updates.len()];
            for (j, &gj) in g.iter().enumerate() {
                for (c, (_, u)) in col.iter_mut().zip(updates) {
                    *c = u[j];
                }
                col.sort_unstable_by(f32::total_cmp);
                let f = match strategy {
                    Strategy::TrimmedMean(b) => trimmed_mean(&col, b),
                    _ => median(&col),
                };
                out.push((f64::from(gj) + f) as f32);
            }
        }
    }
}

/// One coordinate of the next global model from the global value `g` and the round's mean
/// update `d`: FedAvg adds it; FedAdam/FedYogi take it as the pseudo-gradient and update
/// their moments `(m, v)` in place.
///
/// # Panics
/// For Median and TrimmedMean (they need every update, not a mean), or FedOpt without moments.
#[inline]
fn next_value(strategy: Strategy, g: f32, d: f64, moments: Option<(&mut f32, &mut f32)>) -> f32 {
    match strategy {
        Strategy::FedAvg => (f64::from(g) + d) as f32,
        Strategy::FedAdam(opt) | Strategy::FedYogi(opt) => {
            let (m, v) = moments.expect("FedOpt needs its moments");
            let mj = opt.beta1 * f64::from(*m) + (1.0 - opt.beta1) * d;
            let v0 = f64::from(*v);
            let d2 = d * d;
            let vj = if matches!(strategy, Strategy::FedYogi(_)) {
                v0 - (1.0 - opt.beta2) * d2 * (v0 - d2).signum()
            } else {
                opt.beta2 * v0 + (1.0 - opt.beta2) * d2
            };
            *m = mj as f32;
            *v = vj as f32;
            (f64::from(g) + opt.lr * mj / (vj.max(0.0).sqrt() + opt.tau)) as f32
        }
        Strategy::Median | Strategy::TrimmedMean(_) => {
            panic!("{strategy:?} aggregates every update, not a mean")
        }
    }
}

/// The next global values of one slice from the round's mean update `mean` (f64 per
/// coordinate, `Σᵢ (nᵢ/N) Δᵢ`), appended to `out`: FedAvg adds it, FedAdam/FedYogi take it as
/// the pseudo-gradient and update `moments` in place. Used by the in-memory and slice paths
/// and for secure aggregation's unmasked mean.
///
/// # Panics
/// For Median and TrimmedMean (they need every update, not a mean), if FedOpt gets no moments,
/// or if `mean` is shorter than `g`.
pub fn apply_mean(
    strategy: Strategy,
    g: &[f32],
    mean: impl IntoIterator<Item = f64>,
    moments: Option<(&mut [f32], &mut [f32])>,
    out: &mut Vec<f32>,
) {
    let start = out.len();
    let mut mean = mean.into_iter();
    match moments {
        None => out.extend(
            g.iter()
                .zip(&mut mean)
                .map(|(&g, d)| next_value(strategy, g, d, None)),
        ),
        Some((m, v)) => out.extend(
            g.iter()
                .zip(&mut mean)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .map(|((&g, d), mv)| next_value(strategy, g, d, Some(mv))),
        ),
    }
    assert_eq!(out.len() - start, g.len(), "mean shorter than the slice");
}

/// As [`apply_mean`], with the mean in f32 replaced by the next global values in place (no
/// second buffer): the running mean's close ([`crate::running_mean`]).
///
/// # Panics
/// As [`apply_mean`], or if the lengths differ.
pub fn apply_mean_in_place(
    strategy: Strategy,
    g: &[f32],
    mean: &mut [f32],
    moments: Option<(&mut [f32], &mut [f32])>,
) {
    assert_eq!(g.len(), mean.len(), "mean length");
    // On all cores, in chunks: each coordinate is computed alone, so the bits do not depend
    // on the threads.
    const CHUNK: usize = 1 << 16;
    match moments {
        None => mean
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(d, g)| {
                for (d, &g) in d.iter_mut().zip(g) {
                    *d = next_value(strategy, g, f64::from(*d), None);
                }
            }),
        Some((m, v)) => mean
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((d, g), (m, v))| {
                for ((d, &g), mv) in d.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
                    *d = next_value(strategy, g, f64::from(*d), Some(mv));
                }
            }),
    }
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

/// The server state a round starts from: FedAdam/FedYogi's prior state, or the initial one;
/// `None` for the other strategies.
fn state_or_initial(
    strategy: Strategy,
    global: &Tensors,
    prior: Option<ServerState>,
) -> Option<ServerState> {
    match strategy {
        Strategy::FedAdam(_) | Strategy::FedYogi(_) => {
            prior.or_else(|| initial_state(strategy, global))
        }
        _ => None,
    }
}

/// FedAdam/FedYogi's moments `(m, v)` of tensor `i`, if the strategy keeps state.
fn moments(state: &mut Option<ServerState>, i: usize) -> Option<(&mut [f32], &mut [f32])> {
    state
        .as_mut()
        .map(|s| (s.m.data[i].as_mut_slice(), s.v.data[i].as_mut_slice()))
}

fn initial_state(strategy: Strategy, global: &Tensors) -> Option<ServerState> {
    match strategy {
        // Reddi et al. initialise v to τ² (so the first step is well scaled).
        Strategy::FedAdam(o) | Strategy::FedYogi(o) => {
            Some(ServerState::zeros(global, (o.tau * o.tau) as f32))
        }
        _ => None,
    }
}

/// The next global model from `global` and the round's `(num_examples, update)` pairs (in
/// site-name order), and the new server state (FedAdam / FedYogi only; `None` starts from
/// zero moments).
///
/// # Panics
/// If `updates` is empty or layouts differ (the service validates both first).
pub fn aggregate(
    strategy: Strategy,
    global: &Tensors,
    updates: &[(u64, &Tensors)],
    state: Option<ServerState>,
) -> (Tensors, Option<ServerState>) {
    let mut state = state_or_initial(strategy, global, state);
    let data = global
        .data
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let ups: Vec<(u64, &[f32])> = updates
                .iter()
                .map(|(n, u)| (*n, u.data[i].as_slice()))
                .collect();
            let moments = moments(&mut state, i);
            let mut out = Vec::with_capacity(g.len());
            aggregate_slice(strategy, g, &ups, moments, &mut out);
            out
        })
        .collect();
    (with_data(global, data), state)
}

/// The next global model and server state from the round's mean update held per tensor in
/// f32 (`mean[i]` for the global model's tensor `i`), which becomes the next global model in
/// place: memory is the global model and one copy, whatever the strategy (plus FedOpt's
/// moments). `state` as in [`aggregate`].
///
/// # Panics
/// For Median and TrimmedMean, or if a tensor's mean has the wrong length.
pub fn aggregate_mean_in_place(
    strategy: Strategy,
    global: &Tensors,
    state: Option<ServerState>,
    mut mean: Vec<Vec<f32>>,
) -> (Tensors, Option<ServerState>) {
    let mut state = state_or_initial(strategy, global, state);
    assert_eq!(mean.len(), global.data.len(), "one mean per tensor");
    for (i, (g, d)) in global.data.iter().zip(&mut mean).enumerate() {
        let moments = moments(&mut state, i);
        apply_mean_in_place(strategy, g, d, moments);
    }
    (with_data(global, mean), state)
}

/// As [`aggregate`], reading the updates (and the prior server state, laid out as
/// [`ServerState::names`]) from files slice by slice: memory is the global model, the next
/// one, FedOpt's moments if any, and two sets of `SLICE_VALUES` f32 read buffers (the slice
/// being aggregated and the next one, read meanwhile), whatever the number of sites.
///
/// # Errors
/// IO errors reading the files.
pub fn aggregate_files(
    strategy: Strategy,
    global: &Tensors,
    updates: &mut [(u64, FileTensors)],
    prior: Option<&mut FileTensors>,
) -> Result<(Tensors, Option<ServerState>), AggregatorError> {
    aggregate_files_in_slices(strategy, global, updates, prior, SLICE_VALUES)
}

fn aggregate_files_in_slices(
    strategy: Strategy,
    global: &Tensors,
    updates: &mut [(u64, FileTensors)],
    prior: Option<&mut FileTensors>,
    slice_values: usize,
) -> Result<(Tensors, Option<ServerState>), AggregatorError> {
    assert!(
        !updates.is_empty(),
        "a round aggregates at least one update"
    );
    let mut state = initial_state(strategy, global);
    let k = global.data.len();
    if let (Some(s), Some(f)) = (state.as_mut(), prior) {
        for i in 0..k {
            f.read(i, 0, &mut s.m.data[i])?;
            f.read(k + i, 0, &mut s.v.data[i])?;
        }
    }
    let largest = global.data.iter().map(Vec::len).max().unwrap_or(0);
    let per = (slice_values / updates.len()).clamp(1 << 12, largest.max(1 << 12));
    // Every slice, in order: (tensor, first value, number of values).
    let slices = slices(&global.data, per);
    let read = |updates: &mut [(u64, FileTensors)], bufs: &mut [Vec<f32>], (i, start, len)| {
        // The files are read (positioned read, SHA-256 as read, decode) on all cores at once.
        bufs.par_iter_mut()
            .zip(updates.par_iter_mut())
            .try_for_each(|(buf, (_, f))| f.read(i, start, &mut buf[..len]))
    };
    let mut cur = vec![vec![0f32; per.min(largest)]; updates.len()];
    let mut next = cur.clone();
    let mut data: Vec<Vec<f32>> = global
        .data
        .iter()
        .map(|g| Vec::with_capacity(g.len()))
        .collect();
    if let Some(&first) = slices.first() {
        read(updates, &mut cur, first)?;
    }
    let weights: Vec<u64> = updates.iter().map(|(n, _)| *n).collect();
    for (j, &(i, start, len)) in slices.iter().enumerate() {
        // The next slice is read while this one is aggregated; the aggregation runs in site
        // order, so the bits do not depend on the number of threads.
        let (got, ()) = rayon::join(
            || match slices.get(j + 1) {
                Some(&s) => read(updates, &mut next, s),
                None => Ok(()),
            },
            || {
                let ups: Vec<(u64, &[f32])> = weights
                    .iter()
                    .zip(&cur)
                    .map(|(n, b)| (*n, &b[..len]))
                    .collect();
                let moments = state.as_mut().map(|s| {
                    (
                        &mut s.m.data[i][start..start + len],
                        &mut s.v.data[i][start..start + len],
                    )
                });
                aggregate_slice(
                    strategy,
                    &global.data[i][start..start + len],
                    &ups,
                    moments,
                    &mut data[i],
                );
            },
        );
        got?;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok((with_data(global, data), state))
}

/// Every slice of at most `per` values of `tensors`, in order: (tensor, first value, number
/// of values).
pub(crate) fn slices<T>(tensors: &[Vec<T>], per: usize) -> Vec<(usize, usize, usize)> {
    tensors
        .iter()
        .enumerate()
        .flat_map(|(i, g)| {
            (0..g.len())
                .step_by(per)
                .map(move |s| (i, s, per.min(g.len() - s)))
        })
        .collect()
}

/// Tensors with `global`'s names and shapes and the values `data`.
pub(crate) fn with_data(global: &Tensors, data: Vec<Vec<f32>>) -> Tensors {
    Tensors {
        names: global.names.clone(),
        shapes: global.shapes.clone(),
        data,
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
    fn fedavg_weights_by_num_examples() {
        let global = one(vec![1.0, 1.0]);
        let (a, b) = (one(vec![4.0, 0.0]), one(vec![0.0, 8.0]));
        let (next, s) = aggregate(Strategy::FedAvg, &global, &[(100, &a), (300, &b)], None);
        // 1 + 0.25·4 = 2 ; 1 + 0.75·8 = 7
        assert_eq!(next.data[0], vec![2.0, 7.0]);
        assert!(s.is_none());
    }

    #[test]
    fn files_slice_by_slice_give_the_same_bits_as_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = |seed: f32| Tensors {
            names: vec!["a".into(), "b".into()],
            shapes: vec![vec![3, 5000], vec![7]],
            data: vec![
                (0..15000)
                    .map(|i| ((i as f32) * 0.37 + seed).sin())
                    .collect(),
                (0..7).map(|i| i as f32 * seed).collect(),
            ],
        };
        let global = layout(0.5);
        let ups: Vec<Tensors> = (0..5).map(|i| layout(i as f32 + 1.3)).collect();
        let pairs: Vec<(u64, &Tensors)> = ups
            .iter()
            .enumerate()
            .map(|(i, u)| (10 + i as u64, u))
            .collect();
        let o = FedOpt::default();
        for strategy in [
            Strategy::FedAvg,
            Strategy::FedAdam(o),
            Strategy::FedYogi(o),
            Strategy::Median,
            Strategy::TrimmedMean(0.2),
        ] {
            let (want, want_state) = aggregate(strategy, &global, &pairs, None);
            // Second round from the first round's state, in memory and from its file.
            let (want2, want_state2) = aggregate(strategy, &want, &pairs, want_state.clone());
            let mut files: Vec<(u64, FileTensors)> = pairs
                .iter()
                .enumerate()
                .map(|(i, (n, u))| {
                    let p = dir.path().join(format!("u{i}"));
                    std::fs::write(&p, u.to_safetensors()).unwrap();
                    (
                        *n,
                        FileTensors::open(&p, &global.names, &global.shapes).unwrap(),
                    )
                })
                .collect();
            // 4096 values at a time: tensor `a` (15 000 values) is read in 4 slices.
            let (got, got_state) =
                aggregate_files_in_slices(strategy, &global, &mut files, None, 100).unwrap();
            assert_eq!(got, want, "{strategy:?}");
            assert_eq!(got_state, want_state, "{strategy:?}");
            for (i, (_, f)) in files.iter_mut().enumerate() {
                f.verify_sha256(&crate::blobs::sha256_hex(&ups[i].to_safetensors()))
                    .unwrap();
            }
            if let Some(s) = got_state {
                let p = dir.path().join("state");
                std::fs::write(&p, s.to_safetensors()).unwrap();
                let (names, shapes) = ServerState::names(&global);
                let mut prior = FileTensors::open(&p, &names, &shapes).unwrap();
                let (got2, got_state2) =
                    aggregate_files_in_slices(strategy, &want, &mut files, Some(&mut prior), 100)
                        .unwrap();
                assert_eq!(got2, want2, "{strategy:?} round 2");
                assert_eq!(got_state2, want_state2, "{strategy:?} round 2");
            }
        }
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
