//! The running weighted mean of a round's plaintext updates: each accepted update is folded
//! in as it is accepted, so the close of a FedAvg, FedAdam or FedYogi round computes the next
//! global model from it and does not read the round's updates back from disk.
//!
//! After `k` updates, per coordinate, `Mₖ = Mₖ₋₁ + (nₖ/Nₖ)(Δₖ − Mₖ₋₁)` with `Nₖ = n₁ + … + nₖ`
//! (West 1979, the weighted form of Welford's update), so `M = Σᵢ (nᵢ/N) Δᵢ`, FedAvg's mean
//! update. Each step is computed in f64 and rounded to f32 once: after `k` updates the
//! rounding error is at most `k/2` units in the last place of `max |Δᵢ|` (a convex
//! combination never leaves the updates' range, so it cannot overflow either). Flower's
//! `aggregate` sums in f32 throughout. The mean takes one f32 model copy, and at the close it
//! becomes the next global model in place ([`aggregate_mean_in_place`]): memory is the global
//! model and one copy (plus FedAdam/FedYogi's moments).
//!
//! Floating-point steps do not commute, so the bits depend on the acceptance order; that order
//! is persisted with the updates (their sequence number in the database), and an aggregator
//! that restarts mid-round (SIGKILL included) folds the round's persisted updates again in
//! the same order ([`RunningMean::catch_up`]) and produces the bits of an uninterrupted run.
//! Folding an update reads it back once from its file (usually from the page cache) and
//! re-checks its SHA-256.
//!
//! Median and trimmed mean need every update and keep aggregating from the files
//! ([`crate::strategy::aggregate_files`]); secure aggregation has its own running mean, of
//! masked words ([`crate::secure`]).

use crate::AggregatorError;
use crate::store::UpdateMeta;
use crate::strategy::{ServerState, Strategy, aggregate_mean_in_place};
use crate::tensors::{FileTensors, Tensors};

/// Values read per slice when an update is folded from its file (1 MiB of f32).
const FOLD_SLICE: usize = 1 << 18;

/// `Σᵢ (nᵢ/N) Δᵢ` and `N = Σᵢ nᵢ` over one round's updates, folded in acceptance order.
#[derive(Debug, Default)]
pub struct RunningMean {
    round: u32,
    /// The updates folded, in order.
    folded: Vec<UpdateMeta>,
    total: u64,
    /// Per tensor of the global model (in its order): the weighted mean so far; empty until
    /// the first update is folded.
    mean: Vec<Vec<f32>>,
}

impl RunningMean {
    /// An empty mean for `round`.
    pub fn new(round: u32) -> Self {
        Self {
            round,
            ..Self::default()
        }
    }

    /// The round this mean belongs to.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The updates folded so far, in order.
    pub fn folded(&self) -> &[UpdateMeta] {
        &self.folded
    }

    /// Bring the mean up to date with `round`'s accepted updates `accepted` (in acceptance
    /// order): fold those not yet folded, each read from the file `open` gives for it. If the
    /// mean belongs to another round, or what it folded is not the start of `accepted` (a fold
    /// that failed half-way, a restart), it starts again from nothing, so the result is always
    /// the fold of `accepted` in order. Returns how many updates were read.
    ///
    /// # Errors
    /// IO errors, or a blob whose bytes no longer hash to its name; the mean is then empty
    /// (the next call folds everything again).
    pub fn catch_up(
        &mut self,
        round: u32,
        layout: &Tensors,
        accepted: &[UpdateMeta],
        mut open: impl FnMut(&UpdateMeta) -> Result<FileTensors, AggregatorError>,
    ) -> Result<usize, AggregatorError> {
        if self.round != round || !accepted.starts_with(&self.folded) {
            *self = Self::new(round);
        }
        let todo = &accepted[self.folded.len()..];
        for meta in todo {
            let r = open(meta).and_then(|mut f| self.fold(layout, meta, &mut f));
            if let Err(e) = r {
                *self = Self::new(round);
                return Err(e);
            }
        }
        Ok(todo.len())
    }

    /// Fold one update read slice by slice from `file` (bound to `layout`), then check the
    /// file's SHA-256. On error the mean is left half-folded: the caller resets it.
    fn fold(
        &mut self,
        layout: &Tensors,
        meta: &UpdateMeta,
        file: &mut FileTensors,
    ) -> Result<(), AggregatorError> {
        if self.mean.is_empty() {
            self.mean = layout.data.iter().map(|g| vec![0f32; g.len()]).collect();
        }
        // At most 2¹⁶ sites of at most `max_num_examples` each; saturate anyway.
        let total = self.total.saturating_add(meta.num_examples);
        // The first update's weight is exactly 1: the mean starts as that update's bits.
        let w = meta.num_examples as f64 / (total as f64).max(1.0);
        let slices = crate::strategy::slices(&self.mean, FOLD_SLICE);
        let largest = slices.iter().map(|s| s.2).max().unwrap_or(0);
        let (mut cur, mut next) = (vec![0f32; largest], vec![0f32; largest]);
        if let Some(&(t, start, len)) = slices.first() {
            file.read(t, start, &mut cur[..len])?;
        }
        for (j, &(t, start, len)) in slices.iter().enumerate() {
            // The next slice is read (and hashed) on one core while this one is folded on the
            // other; one step per coordinate, so the bits do not depend on the threads.
            let mean = &mut self.mean[t][start..start + len];
            let (got, ()) = rayon::join(
                || match slices.get(j + 1) {
                    Some(&(t, start, len)) => file.read(t, start, &mut next[..len]),
                    None => Ok(()),
                },
                || {
                    for (m, &x) in mean.iter_mut().zip(&cur[..len]) {
                        let m0 = f64::from(*m);
                        *m = (m0 + w * (f64::from(x) - m0)) as f32;
                    }
                },
            );
            got?;
            std::mem::swap(&mut cur, &mut next);
        }
        file.verify_sha256(&meta.sha256)?;
        self.folded.push(meta.clone());
        self.total = total;
        Ok(())
    }

    /// The next global model and server state: the strategy applied to the mean update (see
    /// [`aggregate_mean_in_place`]; `prior` is FedAdam/FedYogi's state, `None` starts from
    /// zero moments). The mean's memory becomes the next model.
    ///
    /// # Panics
    /// If nothing was folded, or for Median and TrimmedMean.
    pub fn finish(
        self,
        strategy: Strategy,
        global: &Tensors,
        prior: Option<ServerState>,
    ) -> (Tensors, Option<ServerState>) {
        assert!(
            !self.folded.is_empty(),
            "a round aggregates at least one update"
        );
        aggregate_mean_in_place(strategy, global, prior, self.mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{FedOpt, aggregate};

    fn layout(seed: f32) -> Tensors {
        Tensors {
            names: vec!["a".into(), "b".into()],
            shapes: vec![vec![3, 5000], vec![7]],
            data: vec![
                (0..15000)
                    .map(|i| ((i as f32) * 0.37 + seed).sin() * 0.01)
                    .collect(),
                (0..7).map(|i| i as f32 * seed).collect(),
            ],
        }
    }

    struct Files {
        dir: tempfile::TempDir,
        metas: Vec<UpdateMeta>,
        updates: Vec<Tensors>,
    }

    fn files(k: usize) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let updates: Vec<Tensors> = (0..k).map(|i| layout(i as f32 + 1.3)).collect();
        let metas = updates
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let bytes = u.to_safetensors();
                let sha = crate::blobs::sha256_hex(&bytes);
                std::fs::write(dir.path().join(&sha), bytes).unwrap();
                UpdateMeta {
                    site: format!("site{i}"),
                    num_examples: 10 + 7 * i as u64,
                    sha256: sha,
                }
            })
            .collect();
        Files {
            dir,
            metas,
            updates,
        }
    }

    impl Files {
        fn open(
            &self,
            g: &Tensors,
        ) -> impl FnMut(&UpdateMeta) -> Result<FileTensors, AggregatorError> {
            let dir = self.dir.path().to_owned();
            let (names, shapes) = (g.names.clone(), g.shapes.clone());
            move |m: &UpdateMeta| {
                FileTensors::open(&dir.join(&m.sha256), &names, &shapes)
                    .map_err(|e| e.unwrap_or_else(|e| e))
            }
        }
    }

    #[test]
    fn the_running_mean_gives_fedavg_and_fedopt_within_its_rounding_bound() {
        let global = layout(0.5);
        let f = files(5);
        let o = FedOpt::default();
        for strategy in [Strategy::FedAvg, Strategy::FedAdam(o), Strategy::FedYogi(o)] {
            let mut sum = RunningMean::default();
            // Folded one at a time as they are accepted, as the service does.
            for k in 1..=f.metas.len() {
                let read = sum
                    .catch_up(1, &global, &f.metas[..k], f.open(&global))
                    .unwrap();
                assert_eq!(read, 1, "only the new update is read");
            }
            assert_eq!(sum.folded(), &f.metas[..]);
            let (got, got_state) = sum.finish(strategy, &global, None);
            let pairs: Vec<(u64, &Tensors)> = f
                .metas
                .iter()
                .zip(&f.updates)
                .map(|(m, u)| (m.num_examples, u))
                .collect();
            // The slice path sums Σ (nᵢ/N)Δᵢ in f64 and rounds once; the running mean rounds
            // each of its k = 5 steps to f32: within k/2 ulp of the largest update, plus an
            // ulp of the result (FedOpt's step is scaled by its learning rate and below that).
            let (want, want_state) = aggregate(strategy, &global, &pairs, None);
            for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
                for (j, (g, w)) in g.iter().zip(w).enumerate() {
                    let largest = f
                        .updates
                        .iter()
                        .map(|u| u.data[i][j].abs())
                        .fold(0f32, f32::max);
                    let bound = f32::EPSILON * (2.5 * largest + w.abs());
                    assert!(
                        (g - w).abs() <= bound,
                        "{strategy:?}: {g} vs {w} (bound {bound})"
                    );
                }
            }
            assert_eq!(got_state.is_some(), want_state.is_some());
            // And the mean did move the model.
            assert_ne!(got, global);
        }
    }

    /// The mean after k updates is within k/2 ulp of the largest update of the exact weighted
    /// mean (computed in f64), over 64 updates of mixed magnitudes and weights.
    #[test]
    fn the_running_mean_stays_within_its_error_bound() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let d = 20_000;
        let layout = Tensors {
            names: vec!["w".into()],
            shapes: vec![vec![d]],
            data: vec![vec![0.0; d]],
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut metas, mut updates) = (vec![], vec![]);
        for i in 0..64 {
            let scale = 10f32.powi(rng.random_range(-6..3));
            let u: Vec<f32> = (0..d)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect();
            let t = Tensors {
                data: vec![u.clone()],
                ..layout.clone()
            };
            let bytes = t.to_safetensors();
            let sha = crate::blobs::sha256_hex(&bytes);
            std::fs::write(dir.path().join(&sha), bytes).unwrap();
            metas.push(UpdateMeta {
                site: format!("s{i}"),
                num_examples: rng.random_range(1..5000),
                sha256: sha,
            });
            updates.push(u);
        }
        let mut m = RunningMean::default();
        m.catch_up(1, &layout, &metas, |u| {
            FileTensors::open(&dir.path().join(&u.sha256), &layout.names, &layout.shapes)
                .map_err(|e| e.unwrap_or_else(|e| e))
        })
        .unwrap();
        let total: f64 = metas.iter().map(|m| m.num_examples as f64).sum();
        let mut worst = 0f64;
        for j in 0..d {
            let exact: f64 = metas
                .iter()
                .zip(&updates)
                .map(|(m, u)| m.num_examples as f64 * f64::from(u[j]))
                .sum::<f64>()
                / total;
            let largest = updates.iter().map(|u| u[j].abs()).fold(0f32, f32::max);
            let ulp = f64::from(f32::EPSILON * largest);
            let err = (f64::from(m.mean[0][j]) - exact).abs();
            assert!(
                err <= 32.0 * ulp,
                "coordinate {j}: error {err} over 32 ulp {ulp}"
            );
            worst = worst.max(err / ulp);
        }
        // Typically a few ulp: the bound is far from tight, but the error is not zero.
        assert!(worst > 0.0 && worst < 8.0, "worst error {worst} ulp");
    }

    #[test]
    fn a_rebuilt_mean_gives_the_same_bits_and_a_stale_or_broken_prefix_is_refolded() {
        let global = layout(0.5);
        let f = files(4);
        let mut live = RunningMean::default();
        for k in 1..=4 {
            live.catch_up(3, &global, &f.metas[..k], f.open(&global))
                .unwrap();
        }
        let want = live.finish(Strategy::FedAvg, &global, None).0;
        // A restart: an empty mean folds all four, in the persisted order, to the same bits.
        let mut rebuilt = RunningMean::default();
        assert_eq!(
            rebuilt
                .catch_up(3, &global, &f.metas, f.open(&global))
                .unwrap(),
            4
        );
        assert_eq!(rebuilt.finish(Strategy::FedAvg, &global, None).0, want);
        // Another order gives other bits in general, which is why the order is persisted; the
        // mean notices a list that does not extend what it folded and starts again.
        let mut sum = RunningMean::default();
        sum.catch_up(3, &global, &f.metas[..2], f.open(&global))
            .unwrap();
        let mut other = f.metas.clone();
        other.swap(0, 1);
        assert_eq!(
            sum.catch_up(3, &global, &other, f.open(&global)).unwrap(),
            4
        );
        assert_eq!(sum.folded(), &other[..]);
        // A mean of another round starts again too.
        assert_eq!(
            sum.catch_up(4, &global, &f.metas[..1], f.open(&global))
                .unwrap(),
            1
        );
        assert_eq!(sum.round(), 4);
    }

    #[test]
    fn a_corrupt_blob_empties_the_mean_and_the_next_catch_up_refolds_everything() {
        let global = layout(0.5);
        let f = files(3);
        let mut sum = RunningMean::default();
        sum.catch_up(1, &global, &f.metas[..2], f.open(&global))
            .unwrap();
        // One value of the third update flipped on disk, its length and header intact.
        let p = f.dir.path().join(&f.metas[2].sha256);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let e = sum
            .catch_up(1, &global, &f.metas, f.open(&global))
            .unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert!(
            sum.folded().is_empty(),
            "a half-folded update must not stay in the sum"
        );
        // Repaired: everything is folded again, from zero.
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            sum.catch_up(1, &global, &f.metas, f.open(&global)).unwrap(),
            3
        );
        let mut fresh = RunningMean::default();
        fresh
            .catch_up(1, &global, &f.metas, f.open(&global))
            .unwrap();
        assert_eq!(
            sum.finish(Strategy::FedAvg, &global, None).0,
            fresh.finish(Strategy::FedAvg, &global, None).0
        );
    }

    #[test]
    fn a_missing_blob_is_an_error_not_a_panic() {
        let global = layout(0.5);
        let f = files(2);
        std::fs::remove_file(f.dir.path().join(&f.metas[1].sha256)).unwrap();
        let mut sum = RunningMean::default();
        assert!(sum.catch_up(1, &global, &f.metas, f.open(&global)).is_err());
        assert!(sum.folded().is_empty());
    }
}
