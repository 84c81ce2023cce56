//! One round of a fedee federation as secure-aggregation parameters: what the aggregator and
//! every site derive alike from the federation spec's hash, the round, the roster and the
//! aggregator's session bytes, so that neither side takes the other's word for the threshold
//! or the encoding.
//!
//! Two encodings: the weighted fixed-point [`Quantizer`] (each site has already added its
//! own DP noise, or runs DP-SGD), and distributed DP with the Skellam mechanism
//! ([`fedee_dp::skellam`]), where each site adds `1/t` of the central noise and the sum over
//! at least `t` survivors carries all of it.

use crate::{Error, MAX_SITES, Quantizer, Result, RoundParams, SiteIndex};
use fedee_dp::skellam::Skellam;
use rand_chacha::rand_core::SeedableRng;
use sha2::{Digest, Sha256};

/// The public setup of one round.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    /// Graph, threshold and vector length.
    pub params: RoundParams,
    /// The fixed-point encoding of the updates and their weights (unused under distributed
    /// DP).
    pub quantizer: Quantizer,
    /// Distributed DP: the round's Skellam parameters (rotation seed derived from the
    /// context, `t` the protocol threshold). Each site then sends its encoded update and a
    /// weight of 1, so the mean is unweighted: a weight would scale the sensitivity.
    pub skellam: Option<Skellam>,
}

impl Setup {
    /// The words one site adds into the secure sum: its update `x` (the model's parameters
    /// flattened, f32) clipped to the bound (quantizer) or to `C` (Skellam), encoded, then
    /// its weight; and the update's L2 norm before clipping.
    ///
    /// # Errors
    /// [`Error::Input`] for a wrong length, a non-finite value or a weight above the
    /// round's largest.
    pub fn encode(
        &self,
        mut x: Vec<f32>,
        weight: u32,
        rng: &mut impl rand_core::Rng,
    ) -> Result<(Vec<u32>, f64)> {
        let Some(sk) = &self.skellam else {
            if x.len() + 1 != self.params.dim {
                return Err(Error::Input(format!(
                    "an update of {} parameters, round {} expects {}",
                    x.len(),
                    self.params.round,
                    self.params.dim - 1
                )));
            }
            // `clip_l2` leaves a one-ulp margin, so no coordinate ends a hair above the bound.
            let bound = fedee_dp::ClippingNorm::new(self.quantizer.clip)
                .map_err(|e| Error::Params(e.to_string()))?;
            let norm = fedee_dp::clip_l2(&mut x, bound);
            return Ok((self.quantizer.encode(&x, weight, rng)?, norm));
        };
        let norm = x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let mut noise_rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        let mut words = sk
            .encode(&x, &mut noise_rng)
            .map_err(|e| Error::Input(e.to_string()))?;
        words.push(1);
        Ok((words, norm))
    }

    /// The quantizer's step for a site of weight `weight`, in update units, when it exceeds
    /// 1e-4 of the bound (the weighted encoding gives a site of weight `w` steps of
    /// `W/(scale·w)`, so a `max_num_examples` far above the sites' sizes costs precision);
    /// `None` when it is finer, or under distributed DP (unweighted).
    pub fn coarse_step(&self, weight: u32) -> Option<f64> {
        let q = &self.quantizer;
        let step = f64::from(q.max_weight) / (q.scale * f64::from(weight.max(1)));
        (self.skellam.is_none() && step > 1e-4 * q.clip).then_some(step)
    }

    /// The mean of the survivors' updates and their total weight from the unmasked sum.
    ///
    /// # Errors
    /// [`Error::Input`] for a sum of the wrong length or a zero total weight.
    pub fn decode_mean(&self, sum: &[u32]) -> Result<(Vec<f32>, u64)> {
        let Some(sk) = &self.skellam else {
            return self.quantizer.decode_mean(sum);
        };
        let (&count, body) = sum
            .split_last()
            .ok_or_else(|| Error::Input("an empty sum".into()))?;
        if count == 0 {
            return Err(Error::Input("no site's update is in the sum".into()));
        }
        let total = sk
            .decode_sum(body)
            .map_err(|e| Error::Input(e.to_string()))?;
        let n = count as f32;
        Ok((total.into_iter().map(|v| v / n).collect(), u64::from(count)))
    }
}

/// What a round's setup is derived from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// SHA-256 of the federation spec (hex).
    pub spec_sha256: &'a str,
    /// The round.
    pub round: u32,
    /// The round's sites, ascending names; a site's index is its position.
    pub roster: &'a [String],
    /// Neighbours per site (0: all others).
    pub degree: u32,
    /// The aggregator's random bytes for this protocol run.
    pub session: &'a [u8],
    /// Model parameters (the masked vector has one more word, the weight).
    pub parameters: usize,
    /// L2 norm every update is clipped to, so every coordinate lies in `±bound`.
    pub bound: f64,
    /// The largest weight (`num_examples`) a site may send.
    pub max_weight: u64,
    /// Distributed DP: the central noise multiplier `z` of the Skellam mechanism (`bound` is
    /// then the clipping norm `C`); `None` for the weighted quantizer.
    pub distributed_dp: Option<f64>,
}

/// The L2 norm a site clips its update to before encoding it ([`Inputs::bound`]), as sites
/// and aggregator both derive it: the clipping norm `c` under distributed DP (the clip is
/// part of the release); else the spec's `max_update_norm`, or in its absence the
/// high-probability norm of a clipped update with Gaussian noise `σ·c` on `parameters`
/// coordinates ([`fedee_dp::noised_update_norm_bound`]).
pub fn update_bound(
    c: fedee_dp::ClippingNorm,
    sigma: fedee_dp::NoiseMultiplier,
    parameters: usize,
    max_update_norm: Option<f64>,
    distributed_dp: bool,
) -> f64 {
    match (distributed_dp, max_update_norm) {
        (true, _) => c.get(),
        (false, Some(b)) => b,
        (false, None) => fedee_dp::noised_update_norm_bound(c, sigma, parameters as u64),
    }
}

/// The setup of one round from its [`Inputs`].
///
/// The threshold is a strict majority of the `k + 1` holders of a site's shares,
/// `t = ⌊(k + 1)/2⌋ + 1`; the context binds keys, shares and masks to
/// `SHA-256(spec ‖ round ‖ session ‖ roster)`.
///
/// # Errors
/// [`Error::Params`] for a roster that is not ascending and unique or holds fewer than 3 or
/// more than 255 sites, or an encoding that cannot hold `roster.len()` sites with these
/// weights.
pub fn setup(i: &Inputs<'_>) -> Result<Setup> {
    let Inputs {
        spec_sha256,
        round,
        roster,
        degree,
        session,
        parameters,
        bound,
        max_weight,
        distributed_dp,
    } = *i;
    let n = roster.len();
    if !(3..=MAX_SITES).contains(&n) {
        return Err(Error::Params(format!(
            "a roster of {n} sites: secure aggregation needs 3 to {MAX_SITES}"
        )));
    }
    if roster.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Params(
            "the roster's site names must be unique and ascending".into(),
        ));
    }
    let k = if degree == 0 || degree as usize >= n - 1 {
        n - 1
    } else {
        degree as usize
    };
    let mut h = Sha256::new();
    h.update(b"fedee-secagg/v1/federation");
    h.update((spec_sha256.len() as u64).to_le_bytes());
    h.update(spec_sha256.as_bytes());
    h.update(u64::from(round).to_le_bytes());
    h.update((session.len() as u64).to_le_bytes());
    h.update(session);
    for name in roster {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
    }
    let context: [u8; 32] = h.finalize().into();
    let threshold = k.div_ceil(2) + 1;
    let skellam = match distributed_dp {
        None => None,
        Some(z) => {
            let mut r = Sha256::new();
            r.update(b"fedee-secagg/v1/skellam-rotation");
            r.update(context);
            let s = Skellam {
                dim: parameters,
                clip: bound,
                noise_multiplier: z,
                sites: n,
                min_survivors: threshold,
                rotation_seed: r.finalize().into(),
            };
            s.check().map_err(|e| Error::Params(e.to_string()))?;
            Some(s)
        }
    };
    let params = RoundParams {
        context,
        round: u64::from(round),
        sites: n,
        degree: k,
        threshold,
        dim: skellam.as_ref().map_or(parameters, Skellam::padded_dim) + 1,
    };
    params.check()?;
    let max_weight = u32::try_from(max_weight).map_err(|_| {
        Error::Params(format!(
            "max_num_examples {max_weight} does not fit the 32-bit masked weight: lower it to at most {}",
            u32::MAX as usize / n
        ))
    })?;
    let quantizer = Quantizer::new(n, bound, max_weight)?;
    Ok(Setup {
        params,
        quantizer,
        skellam,
    })
}

/// Fresh random session bytes for one protocol run (the aggregator draws them per round).
///
/// # Errors
/// The operating system's randomness source failed.
pub fn new_session() -> Result<[u8; 32]> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| Error::Params(format!("OS randomness failed: {e}")))?;
    Ok(s)
}

/// The index of `site` in `roster`, if it is in it.
pub fn index_of(roster: &[String], site: &str) -> Option<SiteIndex> {
    roster
        .iter()
        .position(|s| s == site)
        .map(|i| i as SiteIndex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site{i:03}")).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn setup(
        spec_sha256: &str,
        round: u32,
        roster: &[String],
        degree: u32,
        session: &[u8],
        parameters: usize,
        bound: f64,
        max_weight: u64,
    ) -> Result<Setup> {
        super::setup(&Inputs {
            spec_sha256,
            round,
            roster,
            degree,
            session,
            parameters,
            bound,
            max_weight,
            distributed_dp: None,
        })
    }

    #[test]
    fn both_sides_derive_the_same_setup_and_it_binds_every_input() {
        let r = names(5);
        let a = setup("abc", 3, &r, 0, b"s", 10, 2.0, 1000).unwrap();
        assert_eq!(a, setup("abc", 3, &r, 0, b"s", 10, 2.0, 1000).unwrap());
        assert_eq!(
            (a.params.degree, a.params.threshold, a.params.dim),
            (4, 3, 11)
        );
        for other in [
            setup("abd", 3, &r, 0, b"s", 10, 2.0, 1000),
            setup("abc", 4, &r, 0, b"s", 10, 2.0, 1000),
            setup("abc", 3, &r, 0, b"t", 10, 2.0, 1000),
            setup("abc", 3, &names(6)[1..], 0, b"s", 10, 2.0, 1000),
        ] {
            assert_ne!(other.unwrap().params.context, a.params.context);
        }
        let plus = setup("abc", 3, &names(50), 20, b"s", 10, 2.0, 1000).unwrap();
        assert_eq!((plus.params.degree, plus.params.threshold), (20, 11));
    }

    #[test]
    fn distributed_dp_sends_skellam_words_and_decodes_the_unweighted_mean() {
        use rand_core::SeedableRng;
        let r = names(4);
        let inputs = |z: Option<f64>| Inputs {
            spec_sha256: "abc",
            round: 2,
            roster: &r,
            degree: 0,
            session: b"s",
            parameters: 100,
            bound: 1.0,
            max_weight: 1000,
            distributed_dp: z,
        };
        let plain = super::setup(&inputs(None)).unwrap();
        let dist = super::setup(&inputs(Some(0.01))).unwrap();
        assert_eq!(plain.params.context, dist.params.context);
        let sk = dist.skellam.as_ref().unwrap();
        // Padded to the Hadamard block, plus the weight word; t is the protocol threshold.
        assert_eq!(dist.params.dim, 129);
        assert_eq!(sk.min_survivors, dist.params.threshold);
        let mut rng = chacha20::ChaCha20Rng::seed_from_u64(3);
        let mut sum = vec![0u32; dist.params.dim];
        let mut want = vec![0f32; 100];
        for s in 0..4 {
            // Site 0 sends a long update: it is clipped to C = 1.
            let x: Vec<f32> = (0..100)
                .map(|i| ((i * 7 + s * 13) % 11) as f32 / 10.0 - 0.5)
                .map(|v| if s == 0 { v * 10.0 } else { v / 10.0 })
                .collect();
            let (w, norm) = dist.encode(x.clone(), 777, &mut rng).unwrap();
            let f = if norm > 1.0 { (1.0 / norm) as f32 } else { 1.0 };
            want.iter_mut().zip(&x).for_each(|(m, v)| *m += v * f / 4.0);
            assert_eq!(w.len(), 129);
            assert_eq!(
                *w.last().unwrap(),
                1,
                "the weight is 1 under distributed DP"
            );
            sum.iter_mut()
                .zip(&w)
                .for_each(|(a, b)| *a = a.wrapping_add(*b));
        }
        let (mean, count) = dist.decode_mean(&sum).unwrap();
        assert_eq!((mean.len(), count), (100, 4));
        // Central noise z·C = 0.01 on the sum, /4 on the mean: far below 0.02.
        let err = mean
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 0.02, "max error {err}");
        assert!(dist.encode(vec![0.0; 99], 1, &mut rng).is_err());
        assert!(dist.encode(vec![f32::NAN; 100], 1, &mut rng).is_err());
        sum.pop();
        assert!(dist.decode_mean(&sum).is_err());
    }

    #[test]
    fn an_update_along_one_axis_is_clipped_into_the_quantizers_range() {
        use rand_core::SeedableRng;
        let r = names(3);
        let s = super::setup(&Inputs {
            spec_sha256: "abc",
            round: 1,
            roster: &r,
            degree: 0,
            session: b"s",
            parameters: 4,
            bound: 0.3,
            max_weight: 10,
            distributed_dp: None,
        })
        .unwrap();
        let mut rng = chacha20::ChaCha20Rng::seed_from_u64(1);
        // All of the norm on one coordinate: the clipped value sits at the bound itself,
        // where f32 rounding could push it over.
        for v in [7.3f32, -1e6, 0.3000001, 123.456] {
            let (words, norm) = s.encode(vec![0.0, v, 0.0, 0.0], 10, &mut rng).unwrap();
            assert_eq!((words.len(), norm), (5, f64::from(v.abs())));
        }
        let e = s
            .encode(vec![0.0, f32::NAN, 0.0, 0.0], 10, &mut rng)
            .unwrap_err();
        assert!(e.to_string().contains("update[1]"), "{e}");
    }

    #[test]
    fn a_weight_far_below_max_num_examples_is_flagged() {
        let roster = names(5);
        let setup = |max_weight: u64, distributed_dp: Option<f64>| {
            super::setup(&Inputs {
                spec_sha256: "x",
                round: 1,
                roster: &roster,
                degree: 0,
                session: b"",
                parameters: 10,
                bound: 10.0,
                max_weight,
                distributed_dp,
            })
            .unwrap()
        };
        // The main job: W = 100 000, a hospital of 100 records: steps of about 2e-5.
        assert_eq!(setup(100_000, None).coarse_step(100), None);
        // The default W = 10 000 000 for the same hospital: about 2e-3, flagged.
        let step = setup(10_000_000, None).coarse_step(100).unwrap();
        assert!((1e-3..1e-2).contains(&step), "{step}");
        // Unweighted under distributed DP: nothing to flag.
        assert_eq!(setup(10_000_000, Some(1.0)).coarse_step(100), None);
    }

    #[test]
    fn bad_rosters_and_weights_are_refused_by_name() {
        fn e(r: &[String]) -> String {
            setup("x", 1, r, 0, b"", 4, 1.0, 10)
                .unwrap_err()
                .to_string()
        }
        assert!(e(&names(2)).contains("3 to 255"));
        let mut unsorted = names(4);
        unsorted.swap(0, 1);
        assert!(e(&unsorted).contains("ascending"));
        let mut dup = names(4);
        dup[1] = dup[0].clone();
        assert!(e(&dup).contains("unique"));
        let w = setup("x", 1, &names(4), 0, b"", 4, 1.0, u64::from(u32::MAX))
            .unwrap_err()
            .to_string();
        assert!(w.contains("max weight"), "{w}");
        assert_eq!(index_of(&names(4), "site002"), Some(2));
        assert_eq!(index_of(&names(4), "nobody"), None);
    }
}
