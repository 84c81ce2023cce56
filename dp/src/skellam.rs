//! The distributed Skellam mechanism (Agarwal, Kairouz & Liu, "The Skellam Mechanism for
//! Differentially Private Federated Learning", NeurIPS 2021, arXiv 2110.04995): site-level DP
//! when the aggregator only sees the sum (secure aggregation), with the noise split across
//! the sites.
//!
//! Each site, on its update `x` (f32, length `d`):
//! 1. clips `x` to L2 norm `C`;
//! 2. rotates it: a random ±1 diagonal, then the orthonormal Walsh–Hadamard transform, in
//!    blocks of at most [`MAX_BLOCK`] coordinates (the last one zero-padded to a power of
//!    two). The diagonal comes from a public per-round seed; the rotation spreads the norm
//!    evenly, so no coordinate is likely to wrap the modulus;
//! 3. scales by `s` and rounds stochastically, redrawing until the rounded vector's L2 norm is
//!    within the bound of conditional randomized rounding (Kairouz, Liu & Steinke, ICML 2021,
//!    Thm. 23, with `β = e^{−1/2}`);
//! 4. adds symmetric Skellam noise, `Poisson(μ/2) − Poisson(μ/2)` (variance `μ`), with
//!    `μ = μ_central / t`, so that the sum over any `t` or more survivors carries at least the
//!    central variance (a sum of independent Skellams is exactly Skellam);
//! 5. reduces mod `2^32` (the secure-aggregation ring).
//!
//! The server unmasks the sum, reads it as signed, divides by `s` and rotates back.
//!
//! Privacy of one release (Agarwal et al., Thm. 3.5), in integer units, for integer `α > 1`:
//! `ε(α) ≤ α·Δ₂²/(2μ) + min(((2α−1)·Δ₂² + 6·Δ₁)/(4μ²), 3·Δ₁/(2μ))`, where `Δ₂` is the rounded
//! vector's L2 bound and `Δ₁ = min(√D·Δ₂, Δ₂²)` its L1 bound (`D` the padded length; an
//! integer vector has L1 ≤ L2²). Rounds compose by adding RDP; `(ε, δ)` comes from
//! [`crate::rdp::epsilon_from_rdp`]. As `s` grows, `ε(α)` tends to the Gaussian
//! mechanism's `α/(2z²)` with noise multiplier `z = √μ_central / (s·C)`.
//!
//! # Security
//! The guarantee is the central one only while at least `t` sites survive and the aggregator
//! learns nothing but the sum (secure aggregation with an honest-but-curious server). One
//! site's own upload carries only `1/t` of the variance: it is not private on its own. The
//! Poisson sampler is `rand_distr`'s floating-point one (as TensorFlow Federated's), not an
//! exact sampler.

use crate::DpError;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Poisson};

/// The largest Hadamard block: longer updates are rotated in blocks of this many
/// coordinates, so padding adds at most one partial block.
pub const MAX_BLOCK: usize = 1 << 14;

/// `β` of conditional randomized rounding (the probability bound of one redraw).
const BETA: f64 = 0.606_530_659_712_633_4; // e^{-1/2}

/// Standard deviations of the summed coordinate that must fit in half the ring: the chance
/// of a wrap is below 1e-15 per coordinate.
const WRAP_SIGMAS: f64 = 8.0;

/// The public parameters of one round's distributed Skellam mechanism.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skellam {
    /// Update length `d`.
    pub dim: usize,
    /// L2 clipping norm `C`.
    pub clip: f64,
    /// Central noise multiplier `z`: the summed noise has standard deviation `z·C` per
    /// coordinate (real units), as the central Gaussian mechanism with the same `z`.
    pub noise_multiplier: f64,
    /// Sites in the round, `n` (bounds the sum).
    pub sites: usize,
    /// Fewest survivors whose sum carries the full noise, `t` (the secure-aggregation
    /// threshold).
    pub min_survivors: usize,
    /// Public seed of the rotation's ±1 diagonal (new each round).
    pub rotation_seed: [u8; 32],
}

impl Skellam {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`DpError::Parameter`] naming the value.
    pub fn check(&self) -> Result<(), DpError> {
        let bad = |m: String| Err(DpError::Parameter(m));
        if self.dim == 0 {
            return bad("Skellam: an empty update (dim 0)".into());
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!(
                "Skellam: clipping norm {}: use a positive number",
                self.clip
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return bad(format!(
                "Skellam: noise multiplier {}: use a positive number",
                self.noise_multiplier
            ));
        }
        if self.min_survivors == 0 || self.min_survivors > self.sites {
            return bad(format!(
                "Skellam: {} minimum survivors of {} sites: use 1 to {}",
                self.min_survivors, self.sites, self.sites
            ));
        }
        if self.padded_dim() as u64 > MAX_WORDS {
            return bad(format!(
                "Skellam: an update of {} values pads to more than {MAX_WORDS} words",
                self.dim
            ));
        }
        if self.scale() < 1.0 {
            return bad(format!(
                "Skellam: {} sites leave less than one integer step per unit of update",
                self.sites
            ));
        }
        Ok(())
    }

    /// Hadamard block length.
    pub fn block(&self) -> usize {
        self.dim.next_power_of_two().min(MAX_BLOCK)
    }

    /// Padded length `D` (what each site sends): `d` rounded up to whole blocks.
    pub fn padded_dim(&self) -> usize {
        self.dim.div_ceil(self.block()) * self.block()
    }

    /// The scale `s` (integer steps per unit): the largest with `8 σ_sum < 2^31`, where
    /// `σ_sum² = n·(s²C²/B + s²z²C²/t + 1/4)` bounds a summed coordinate's variance (signal
    /// spread over a block of `B`, noise, rounding).
    pub fn scale(&self) -> f64 {
        let (n, c, z) = (self.sites as f64, self.clip, self.noise_multiplier);
        let half = 2f64.powi(31) / WRAP_SIGMAS;
        let per = n * (c * c / self.block() as f64 + z * z * c * c / self.min_survivors as f64);
        ((half * half - n / 4.0).max(0.0) / per).sqrt()
    }

    /// Variance of the summed noise per coordinate, integer units: `μ_central = (s·z·C)²`.
    pub fn central_variance(&self) -> f64 {
        (self.scale() * self.noise_multiplier * self.clip).powi(2)
    }

    /// Variance each site adds per coordinate, integer units: `μ_central / t`.
    pub fn local_variance(&self) -> f64 {
        self.central_variance() / self.min_survivors as f64
    }

    /// `(Δ₁, Δ₂)`: L1 and L2 bounds of one site's rounded vector, integer units.
    pub fn sensitivities(&self) -> (f64, f64) {
        sensitivities(self.scale() * self.clip, self.padded_dim() as f64)
    }

    /// This round as the accountant sees it, with the fewest survivors (`t`) in the sum.
    pub fn round(&self) -> SkellamRound {
        let (l1, l2) = self.sensitivities();
        SkellamRound {
            l1,
            l2,
            mu: self.central_variance(),
        }
    }

    /// RDP of one round at order `alpha` with `survivors` sites in the sum (at least `t`).
    pub fn rdp(&self, alpha: f64, survivors: usize) -> f64 {
        let (l1, l2) = self.sensitivities();
        let mu = self.local_variance() * survivors.max(self.min_survivors) as f64;
        skellam_rdp(alpha, l1, l2, mu)
    }

    /// Central-equivalent `(ε, best order)` after `rounds` rounds, each summing at least `t`
    /// sites, at `delta`.
    pub fn epsilon(&self, rounds: u32, delta: f64) -> (f64, f64) {
        let orders = orders();
        let rdp: Vec<f64> = orders
            .iter()
            .map(|&a| f64::from(rounds) * self.rdp(a, self.min_survivors))
            .collect();
        crate::rdp::epsilon_from_rdp(&orders, &rdp, delta)
    }

    fn signs(&self) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::from_seed(self.rotation_seed)
    }

    /// Steps 1–5 on one site: the `D` words it adds into the secure sum.
    ///
    /// # Errors
    /// [`DpError::Parameter`] for a wrong length or a non-finite value (naming the index), or
    /// when rounding keeps exceeding its bound (1000 draws).
    pub fn encode<R: Rng + ?Sized>(&self, x: &[f32], rng: &mut R) -> Result<Vec<u32>, DpError> {
        self.check()?;
        if x.len() != self.dim {
            return Err(DpError::Parameter(format!(
                "Skellam: an update of {} values, the round expects {}",
                x.len(),
                self.dim
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(DpError::Parameter(format!(
                "Skellam: update[{i}] = {} is not finite",
                x[i]
            )));
        }
        let mut v: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > self.clip {
            let f = self.clip / norm;
            v.iter_mut().for_each(|a| *a *= f);
        }
        v.resize(self.padded_dim(), 0.0);
        self.rotate(&mut v, false);
        let s = self.scale();
        v.iter_mut().for_each(|a| *a *= s);
        let (_, bound) = self.sensitivities();
        let mut rounded = vec![0i64; v.len()];
        let mut tries = 0;
        loop {
            for (r, &a) in rounded.iter_mut().zip(&v) {
                let lo = a.floor();
                *r = lo as i64 + i64::from(rng.random::<f64>() < a - lo);
            }
            let n2: f64 = rounded.iter().map(|&r| (r as f64) * (r as f64)).sum();
            if n2.sqrt() <= bound {
                break;
            }
            tries += 1;
            if tries == 1000 {
                return Err(DpError::Parameter(
                    "Skellam: conditional rounding exceeded its norm bound 1000 times".into(),
                ));
            }
        }
        let half = self.local_variance() / 2.0;
        let poisson = Poisson::new(half)
            .map_err(|e| DpError::Parameter(format!("Skellam: Poisson({half}): {e}")))?;
        Ok(rounded
            .into_iter()
            .map(|r| {
                let noise = poisson.sample(rng) as i64 - poisson.sample(rng) as i64;
                (r + noise) as u32
            })
            .collect())
    }

    /// The sum of the sites' updates (real units, length `d`) from the unmasked sum of their
    /// [`Skellam::encode`] outputs; divide by the number of survivors for the mean.
    ///
    /// # Errors
    /// [`DpError::Parameter`] for a sum of the wrong length.
    pub fn decode_sum(&self, sum: &[u32]) -> Result<Vec<f32>, DpError> {
        if sum.len() != self.padded_dim() {
            return Err(DpError::Parameter(format!(
                "Skellam: a sum of {} words, the round's padded length is {}",
                sum.len(),
                self.padded_dim()
            )));
        }
        let s = self.scale();
        let mut v: Vec<f64> = sum.iter().map(|&w| f64::from(w as i32) / s).collect();
        self.rotate(&mut v, true);
        Ok(v[..self.dim].iter().map(|&a| a as f32).collect())
    }

    /// The blockwise rotation `H·diag(signs)` (orthonormal), or its inverse
    /// `diag(signs)·H` (the Walsh–Hadamard matrix is its own inverse).
    fn rotate(&self, v: &mut [f64], inverse: bool) {
        let mut rng = self.signs();
        let b = self.block();
        let norm = 1.0 / (b as f64).sqrt();
        for block in v.chunks_mut(b) {
            let signs: Vec<f64> = (0..b)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect();
            if !inverse {
                block.iter_mut().zip(&signs).for_each(|(a, s)| *a *= s);
            }
            walsh_hadamard(block);
            block.iter_mut().for_each(|a| *a *= norm);
            if inverse {
                block.iter_mut().zip(&signs).for_each(|(a, s)| *a *= s);
            }
        }
    }
}

/// `(Δ₁, Δ₂)` of a vector of L2 norm `l2` (integer units) over `d` coordinates after
/// conditional randomized rounding (Kairouz, Liu & Steinke 2021, Thm. 23).
fn sensitivities(l2: f64, d: f64) -> (f64, f64) {
    let sq = l2 * l2 + d / 4.0 + (2.0 * (1.0 / BETA).ln()).sqrt() * (l2 + d.sqrt() / 2.0);
    let l2r = sq.sqrt().min(l2 + d.sqrt());
    (l2r * d.sqrt().min(l2r), l2r)
}

/// The most words one Skellam-encoded update may have (`2^32`, 16 GiB): the bound
/// [`worst_case_round`] assumes.
pub const MAX_WORDS: u64 = 1 << 32;

/// The most sites [`worst_case_round`] assumes in a round (fedee's secure aggregation takes
/// at most 255).
pub const MAX_SITES: usize = 255;

/// One round's Skellam release as the accountant sees it: sensitivities `Δ₁`, `Δ₂` and the
/// summed noise variance `μ` per coordinate, all in integer units.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SkellamRound {
    /// L1 sensitivity `Δ₁`.
    pub l1: f64,
    /// L2 sensitivity `Δ₂`.
    pub l2: f64,
    /// Variance `μ` of the summed noise per coordinate.
    pub mu: f64,
}

impl SkellamRound {
    /// RDP at integer order `alpha` ([`skellam_rdp`]).
    pub fn rdp(&self, alpha: f64) -> f64 {
        skellam_rdp(alpha, self.l1, self.l2, self.mu)
    }
}

/// An upper bound on the RDP of any one round at central noise multiplier `z`, whatever the
/// roster, threshold and model size: the bound grows as the integer scale `s·C` shrinks and
/// as the padded length `D` grows, and `s·C` (independent of `C`) is smallest with
/// [`MAX_SITES`] sites, threshold 2 and a one-coordinate Hadamard block; `D` is at most
/// [`MAX_WORDS`]. Over 20 rounds at δ = 1e-5 its ε exceeds the Gaussian mechanism's at the
/// same `z` by a relative 4e-6 (z = 1) to 7e-5 (z = 8): the 32-bit ring leaves a smaller
/// integer scale as the noise grows. Used to plan and calibrate before the rosters are
/// known, and to charge every round alike.
pub fn worst_case_round(noise_multiplier: f64) -> SkellamRound {
    let (n, z) = (MAX_SITES as f64, noise_multiplier);
    let half = 2f64.powi(31) / WRAP_SIGMAS;
    let l2 = ((half * half - n / 4.0) / (n * (1.0 + z * z / 2.0))).sqrt();
    let (l1, l2r) = sensitivities(l2, MAX_WORDS as f64);
    SkellamRound {
        l1,
        l2: l2r,
        mu: (l2 * z).powi(2),
    }
}

/// The central noise multiplier `z` at which `rounds` rounds of [`worst_case_round`] spend
/// at most `epsilon` at `delta` (integer orders of the default accountant).
///
/// # Errors
/// [`DpError::Parameter`] for a target outside `(0, ∞)` or out of reach at `z = 1000`.
pub fn calibrate(rounds: u32, epsilon: f64, delta: f64) -> Result<f64, DpError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(DpError::Parameter(format!(
            "Skellam calibration needs a target ε > 0, got {epsilon}"
        )));
    }
    let eps = |z: f64| Ok(spent(worst_case_round(z), u64::from(rounds), delta));
    crate::rdp::bisect_sigma(epsilon, 0.01, 1000.0, eps)?.ok_or_else(|| {
        DpError::Parameter(format!(
            "ε = {epsilon} at δ = {delta:e} is out of reach for {rounds} Skellam rounds even at z = 1000"
        ))
    })
}

/// `ε` at `delta` after `rounds` releases of `round` (integer orders of the default
/// accountant).
pub fn spent(round: SkellamRound, rounds: u64, delta: f64) -> f64 {
    let mut acc = crate::rdp::RdpAccountant::default();
    acc.add_integer_orders(rounds, |a| round.rdp(a));
    acc.epsilon(delta).0
}

/// In-place unnormalized fast Walsh–Hadamard transform (length a power of two).
pub fn walsh_hadamard(v: &mut [f64]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// RDP of the Skellam mechanism at integer order `alpha > 1` for integer-valued queries
/// with L1 sensitivity `l1`, L2 sensitivity `l2` and noise variance `mu` per coordinate
/// (Agarwal, Kairouz & Liu 2021, Thm. 3.5).
pub fn skellam_rdp(alpha: f64, l1: f64, l2: f64, mu: f64) -> f64 {
    let a = alpha;
    a * l2 * l2 / (2.0 * mu)
        + (((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu)).min(3.0 * l1 / (2.0 * mu))
}

/// The integer orders the Skellam bound holds for: 2 to 256.
pub fn orders() -> Vec<f64> {
    (2..=64)
        .chain((72..=256).step_by(8))
        .map(f64::from)
        .collect()
}
