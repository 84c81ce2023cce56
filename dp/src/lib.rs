//! Differential privacy for fedee, site-level unit: each round a site clips its model update
//! to L2 norm `C` and adds `N(0, (σC)²)` to every coordinate (the Gaussian mechanism).
//!
//! * [`clip_l2`] and [`add_gaussian_noise`] run on the site, on the flattened update.
//! * [`SiteLevelAccountant`] runs on the aggregator: zCDP `ρ = C²/(2(σC)²) = 1/(2σ²)` per round
//!   (Bun & Steinke 2016, Prop. 1.6), composed additively over rounds, converted to `(ε, δ)` with
//!   OpenDP's conversion (Canonne, Kamath & Steinke 2020), which is tighter than the classical
//!   `ε = ρ + 2·sqrt(ρ·ln(1/δ))`.
//!
//! The unit of privacy is **a site's update**: neighbouring datasets differ in one site's whole
//! contribution to a round. It says nothing per patient (issue 5 adds record-level DP-SGD).
//!
//! This crate does no IO; RNGs are passed in.

pub mod noise;
pub mod rdp;
pub mod skellam;

use opendp::combinators::{make_composition, make_zCDP_to_approxDP};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Errors of DP parameter validation and accounting.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// Clipping norm is not a positive finite number.
    #[error("clipping norm must be a positive finite number, got {0} (try 1.0)")]
    ClippingNorm(f64),
    /// Noise multiplier is negative or not finite.
    #[error(
        "noise multiplier must be a finite number >= 0, got {0} (0 disables noise and gives no privacy)"
    )]
    NoiseMultiplier(f64),
    /// δ outside (0, 1).
    #[error("delta must be in (0, 1), got {0} (typical: 1e-5, below 1/number-of-units)")]
    Delta(f64),
    /// OpenDP refused the computation.
    #[error("opendp: {0}")]
    OpenDp(String),
    /// Another mechanism parameter is out of range (the message names it and its range).
    #[error("{0}")]
    Parameter(String),
}

impl From<opendp::error::Error> for DpError {
    fn from(e: opendp::error::Error) -> Self {
        DpError::OpenDp(e.to_string())
    }
}

/// L2 clipping norm `C` (in the units of the model parameters), checked positive and finite.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClippingNorm(f64);

impl ClippingNorm {
    /// # Errors
    /// [`DpError::ClippingNorm`] unless `0 < c < ∞`.
    pub fn new(c: f64) -> Result<Self, DpError> {
        if c.is_finite() && c > 0.0 {
            Ok(Self(c))
        } else {
            Err(DpError::ClippingNorm(c))
        }
    }
    /// The norm as a number.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// Noise multiplier `σ`: noise standard deviation is `σ·C`. Checked finite and `≥ 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoiseMultiplier(f64);

impl NoiseMultiplier {
    /// # Errors
    /// [`DpError::NoiseMultiplier`] unless `0 ≤ σ < ∞`.
    pub fn new(s: f64) -> Result<Self, DpError> {
        if s.is_finite() && s >= 0.0 {
            Ok(Self(s))
        } else {
            Err(DpError::NoiseMultiplier(s))
        }
    }
    /// The multiplier as a number.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// L2 norm of a flat vector, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scale `update` in place so that its L2 norm is at most `c`; returns the norm before clipping.
///
/// `update`: every parameter's update, flattened and concatenated (f32). Clipping the whole
/// update (not each tensor) bounds the mechanism's L2 sensitivity by `C`.
pub fn clip_l2(update: &mut [f32], c: ClippingNorm) -> f64 {
    let norm = l2_norm(update);
    if norm > c.get() {
        let scale = (c.get() / norm) as f32;
        // f32 rounding can leave the result a hair above C; shrink by one ulp-scale margin.
        let scale = scale * (1.0 - f32::EPSILON);
        update.iter_mut().for_each(|x| *x *= scale);
    }
    norm
}

/// Add independent `N(0, (σ·C)²)` noise to every coordinate of `update` with `sampler`
/// (see [`noise`]: the fast sampler rounds released values to a grid; `Exact` is OpenDP's).
///
/// The RNG should be a CSPRNG seeded from the OS (the site agent uses ChaCha20); tests pass a
/// seeded one. The exact sampler uses OpenDP's own randomness.
///
/// # Errors
/// [`DpError::OpenDp`] if OpenDP's exact sampler fails.
pub fn add_gaussian_noise<R: Rng + ?Sized>(
    update: &mut [f32],
    c: ClippingNorm,
    sigma: NoiseMultiplier,
    sampler: noise::Sampler,
    rng: &mut R,
) -> Result<(), DpError> {
    noise::add_noise(update, c.get() * sigma.get(), sampler, rng)
}

/// Standard deviations of slack in [`noised_update_norm_bound`]: a correctly noised update
/// exceeds the bound with probability at most `exp(−t²/2)` ≈ 2·10⁻²², `t` = 10.
pub const NORM_BOUND_SLACK: f64 = 10.0;

/// The largest L2 norm a site-level DP update of `d` coordinates may have:
/// `C · (1 + σ · (√d + t))`, `t` = [`NORM_BOUND_SLACK`].
///
/// The update is `clip(Δ) + σC·z` with `‖clip(Δ)‖ ≤ C` and `z ~ N(0, I_d)`. The norm is
/// 1-Lipschitz, so by Gaussian concentration (Boucheron, Lugosi, Massart, *Concentration
/// Inequalities*, Thm 5.6) `P(‖z‖ ≥ E‖z‖ + t) ≤ exp(−t²/2)`, and `E‖z‖ ≤ √d`. An update above
/// the bound was not clipped to `C` (or not noised as agreed): the aggregator refuses it, so one
/// site moves FedAvg by at most its weight times this bound.
pub fn noised_update_norm_bound(c: ClippingNorm, sigma: NoiseMultiplier, d: u64) -> f64 {
    c.get() * (1.0 + sigma.get() * ((d as f64).sqrt() + NORM_BOUND_SLACK))
}

/// What one unit of privacy is, and so where the mechanism runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpMode {
    /// Each site clips and noises its whole update (unit: a site's update; zCDP via OpenDP).
    #[default]
    Site,
    /// DP-SGD inside each site (unit: a patient record; RDP of the Poisson-subsampled
    /// Gaussian, see [`rdp`]).
    Record,
}

impl DpMode {
    /// The name on the wire and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Site => "site",
            Self::Record => "record",
        }
    }

    /// The unit of privacy protected.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Site => SiteLevelAccountant::UNIT,
            Self::Record => "patient record",
        }
    }
}

impl std::str::FromStr for DpMode {
    type Err = DpError;
    fn from_str(s: &str) -> Result<Self, DpError> {
        match s {
            "site" => Ok(Self::Site),
            "record" => Ok(Self::Record),
            _ => Err(DpError::Parameter(format!(
                "DP mode `{s}` is unknown: use `site` (unit: a site's update) or `record` (DP-SGD; unit: a patient record)"
            ))),
        }
    }
}

/// Privacy spent, site-level unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpent {
    /// zCDP ρ, composed over rounds.
    pub rho: f64,
    /// ε at [`PrivacySpent::delta`] (`f64::INFINITY` when σ = 0).
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// Site-level accountant: the Gaussian mechanism on a clipped update of `dim` coordinates,
/// composed over rounds, through OpenDP.
#[derive(Debug, Clone, Copy)]
pub struct SiteLevelAccountant {
    clipping_norm: ClippingNorm,
    noise_multiplier: NoiseMultiplier,
    delta: f64,
}

impl SiteLevelAccountant {
    /// # Errors
    /// [`DpError::Delta`] unless `0 < δ < 1`.
    pub fn new(
        clipping_norm: ClippingNorm,
        noise_multiplier: NoiseMultiplier,
        delta: f64,
    ) -> Result<Self, DpError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(DpError::Delta(delta));
        }
        Ok(Self {
            clipping_norm,
            noise_multiplier,
            delta,
        })
    }

    /// Unit of privacy protected.
    pub const UNIT: &'static str = "site update";

    /// zCDP ρ and (ε, δ) after `rounds` rounds of the mechanism.
    ///
    /// Built as OpenDP's `make_gaussian` over a vector domain with `L2Distance` and scale `σC`,
    /// evaluated at input distance `C` (the clipping bound), composed with `make_composition`
    /// and converted with `make_zCDP_to_approxDP`.
    ///
    /// # Errors
    /// [`DpError::OpenDp`] if OpenDP rejects the construction.
    pub fn spent(&self, rounds: u32) -> Result<PrivacySpent, DpError> {
        let c = self.clipping_norm.get();
        let scale = c * self.noise_multiplier.get();
        if rounds == 0 {
            return Ok(PrivacySpent {
                rho: 0.0,
                epsilon: 0.0,
                delta: self.delta,
            });
        }
        if scale == 0.0 {
            return Ok(PrivacySpent {
                rho: f64::INFINITY,
                epsilon: f64::INFINITY,
                delta: self.delta,
            });
        }
        let round = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
            L2Distance::<f64>::default(),
            scale,
            None,
        )?;
        let composed = make_composition(vec![round; rounds as usize])?;
        let rho = composed.map(&c)?;
        let profile = make_zCDP_to_approxDP(composed)?.map(&c)?;
        // OpenDP's tight conversion overflows for very large ρ (thousands); the classical
        // bound (Bun & Steinke 2016, Prop. 1.3) is then used: still a valid ε, only looser.
        let epsilon = profile
            .epsilon(self.delta)
            .or_else(|_| Ok::<_, DpError>(classical_epsilon(rho, self.delta)))?;
        Ok(PrivacySpent {
            rho,
            epsilon,
            delta: self.delta,
        })
    }
}

impl SiteLevelAccountant {
    /// The noise multiplier at which `rounds` rounds spend `epsilon` at `delta` (bisection on
    /// [`SiteLevelAccountant::spent`]; the result spends at most `epsilon`). `C` cancels out:
    /// each round's ρ is `1/(2σ²)`.
    ///
    /// # Errors
    /// [`DpError::Parameter`] for a target outside `(0, ∞)` or out of reach at `σ = 1000`;
    /// [`DpError::Delta`] unless `0 < δ < 1`.
    pub fn calibrate(rounds: u32, epsilon: f64, delta: f64) -> Result<NoiseMultiplier, DpError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(DpError::Parameter(format!(
                "target ε must be a positive number, got {epsilon}"
            )));
        }
        let c = ClippingNorm::new(1.0)?;
        let eps = |s: f64| {
            Self::new(c, NoiseMultiplier::new(s)?, delta)?
                .spent(rounds)
                .map(|p| p.epsilon)
        };
        let s = rdp::bisect_sigma(epsilon, 0.01, 1000.0, eps)?.ok_or_else(|| {
            DpError::Parameter(format!(
                "ε = {epsilon} at δ = {delta:e} is out of reach over {rounds} rounds even at σ = 1000: lower the rounds or raise the target"
            ))
        })?;
        NoiseMultiplier::new(s)
    }
}

/// The site-level noise multiplier for a target ε over `rounds` rounds, as aggregator and
/// sites both calibrate it: the Gaussian mechanism ([`SiteLevelAccountant::calibrate`]), or
/// under distributed DP the Skellam bound ([`skellam::calibrate`]).
///
/// # Errors
/// As the calibration used.
pub fn site_level_sigma(
    rounds: u32,
    epsilon: f64,
    delta: f64,
    distributed: bool,
) -> Result<NoiseMultiplier, DpError> {
    if distributed {
        NoiseMultiplier::new(skellam::calibrate(rounds, epsilon, delta)?)
    } else {
        SiteLevelAccountant::calibrate(rounds, epsilon, delta)
    }
}

/// `ε` at `delta` of a mechanism that is `ρ`-zCDP: OpenDP's tight conversion
/// (`make_zCDP_to_approxDP` on a Gaussian of that `ρ`), or [`classical_epsilon`] where it
/// overflows. A ledger of unsampled Gaussian releases (`ρ = Σ steps/(2σ²)`) gets the same
/// figure as [`SiteLevelAccountant::spent`].
///
/// # Errors
/// [`DpError::Delta`] unless `0 < δ < 1`; [`DpError::Parameter`] for a negative or NaN ρ.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> Result<f64, DpError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(DpError::Delta(delta));
    }
    if rho.is_nan() || rho < 0.0 {
        return Err(DpError::Parameter(format!("zCDP ρ = {rho}: use ρ ≥ 0")));
    }
    if rho == 0.0 || rho.is_infinite() {
        return Ok(if rho == 0.0 { 0.0 } else { f64::INFINITY });
    }
    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        L2Distance::<f64>::default(),
        (1.0 / (2.0 * rho)).sqrt(),
        None,
    )?;
    Ok(make_zCDP_to_approxDP(m)?
        .map(&1.0)?
        .epsilon(delta)
        .unwrap_or_else(|_| classical_epsilon(rho, delta)))
}

/// The classical zCDP → (ε, δ) conversion `ε = ρ + 2·sqrt(ρ·ln(1/δ))` (Bun & Steinke 2016,
/// Prop. 1.3): an upper bound on the tight conversion.
///
/// # Security
/// ∞ for a δ outside (0, 1) or a ρ that is negative or NaN (never a small figure).
pub fn classical_epsilon(rho: f64, delta: f64) -> f64 {
    if !(delta > 0.0 && delta < 1.0 && rho >= 0.0) {
        return f64::INFINITY;
    }
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zcdp_epsilon_matches_the_site_level_accountant() {
        for (rounds, sigma) in [(1u32, 1.0), (20, 2.85), (100, 0.7)] {
            let a = SiteLevelAccountant::new(
                ClippingNorm::new(1.3).unwrap(),
                NoiseMultiplier::new(sigma).unwrap(),
                1e-5,
            )
            .unwrap()
            .spent(rounds)
            .unwrap();
            let rho = f64::from(rounds) / (2.0 * sigma * sigma);
            let e = zcdp_epsilon(rho, 1e-5).unwrap();
            assert!(
                (e - a.epsilon).abs() <= 1e-9 * a.epsilon,
                "{e} vs {}",
                a.epsilon
            );
        }
        assert_eq!(zcdp_epsilon(0.0, 1e-5).unwrap(), 0.0);
        assert!(zcdp_epsilon(f64::NAN, 1e-5).is_err());
        assert!(zcdp_epsilon(1.0, 1.0).is_err());
    }

    #[test]
    fn site_level_calibration_spends_the_target() {
        let s = SiteLevelAccountant::calibrate(10, 1.0, 1e-5).unwrap();
        let c = ClippingNorm::new(2.0).unwrap();
        let eps = |sigma: f64| {
            SiteLevelAccountant::new(c, NoiseMultiplier::new(sigma).unwrap(), 1e-5)
                .unwrap()
                .spent(10)
                .unwrap()
                .epsilon
        };
        assert!(
            eps(s.get()) <= 1.0 && eps(s.get()) > 0.999,
            "σ = {}",
            s.get()
        );
        assert!(eps(s.get() * 0.99) > 1.0);
        assert!(SiteLevelAccountant::calibrate(10, -1.0, 1e-5).is_err());
    }

    #[test]
    fn clipping_bounds_norm_and_keeps_small_updates() {
        let c = ClippingNorm::new(1.0).unwrap();
        let mut v = vec![3.0f32, 4.0];
        let before = clip_l2(&mut v, c);
        assert!((before - 5.0).abs() < 1e-12);
        assert!(l2_norm(&v) <= 1.0);
        assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6, "direction kept");
        let mut small = vec![0.3f32, 0.4];
        clip_l2(&mut small, c);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn honest_site_updates_stay_under_the_norm_bound_and_unclipped_ones_do_not() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let (c, sigma, d) = (
            ClippingNorm::new(1.0).unwrap(),
            NoiseMultiplier::new(1.0).unwrap(),
            10_000usize,
        );
        let bound = noised_update_norm_bound(c, sigma, d as u64);
        assert!(
            (bound - 111.0).abs() < 1e-9,
            "1·(1 + 1·(100 + 10)) = {bound}"
        );
        let noised = |delta: f32, rng: &mut rand_chacha::ChaCha20Rng| {
            let mut v = vec![delta; d];
            clip_l2(&mut v, c);
            add_gaussian_noise(&mut v, c, sigma, noise::Sampler::Fast, rng).unwrap();
            l2_norm(&v)
        };
        let mut largest = 0f64;
        for _ in 0..200 {
            largest = largest.max(noised(1.0, &mut rng));
        }
        assert!(
            largest < bound,
            "honest update norm {largest} vs bound {bound}"
        );
        assert!(largest > 100.0, "the noise's norm is about σC√d: {largest}");
        // The same noise on an unclipped update of norm 100 is refused.
        let mut v = vec![1.0f32; d];
        add_gaussian_noise(&mut v, c, sigma, noise::Sampler::Fast, &mut rng).unwrap();
        assert!(l2_norm(&v) > bound, "{} ≤ {bound}", l2_norm(&v));
    }

    #[test]
    fn noise_has_the_requested_std() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let mut v = vec![0.0f32; 200_000];
        add_gaussian_noise(
            &mut v,
            ClippingNorm::new(2.0).unwrap(),
            NoiseMultiplier::new(0.5).unwrap(),
            noise::Sampler::Fast,
            &mut rng,
        )
        .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "std {}", var.sqrt());
    }

    #[test]
    fn rho_and_epsilon_match_hand_computed_values() {
        // σ = 4: ρ per round = 1/(2·16) = 1/32.
        let acc = SiteLevelAccountant::new(
            ClippingNorm::new(0.5).unwrap(),
            NoiseMultiplier::new(4.0).unwrap(),
            1e-3,
        )
        .unwrap();
        let one = acc.spent(1).unwrap();
        assert!((one.rho - 1.0 / 32.0).abs() < 1e-12, "rho {}", one.rho);
        // Reference value of the zCDP → (ε, δ) conversion for ρ = 1/32, δ = 1e-3
        // (OpenDP's own test of cdp_epsilon).
        assert!(
            (one.epsilon - 0.688_002_455_487_808_5).abs() < 1e-9,
            "eps {}",
            one.epsilon
        );
        // Classical bound ρ + 2 sqrt(ρ ln 1/δ) = 0.9605…; the tight conversion is below it.
        let classical = classical_epsilon(one.rho, 1e-3);
        assert!(
            (classical - 0.960_480_547).abs() < 1e-8,
            "hand-computed 1/32 + 2·sqrt(ln(1000)/32)"
        );
        assert!(one.epsilon < classical);
        // Ten rounds compose additively in ρ.
        let ten = acc.spent(10).unwrap();
        assert!((ten.rho - 10.0 / 32.0).abs() < 1e-12);
        assert!(ten.epsilon > one.epsilon);
        let classical10 = classical_epsilon(ten.rho, 1e-3);
        assert!(ten.epsilon < classical10 && ten.epsilon > 0.8 * classical10);
    }

    #[test]
    fn huge_rho_falls_back_to_the_classical_bound() {
        let acc = SiteLevelAccountant::new(
            ClippingNorm::new(1.0).unwrap(),
            NoiseMultiplier::new(0.01).unwrap(),
            1e-5,
        )
        .unwrap();
        let s = acc.spent(20).unwrap();
        assert!((s.rho - 100_000.0).abs() < 1e-6);
        assert!(
            s.epsilon.is_finite()
                && s.epsilon <= classical_epsilon(s.rho, 1e-5)
                && s.epsilon > s.rho
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(ClippingNorm::new(0.0).is_err());
        assert!(ClippingNorm::new(f64::NAN).is_err());
        assert!(NoiseMultiplier::new(-1.0).is_err());
        let c = ClippingNorm::new(1.0).unwrap();
        let s = NoiseMultiplier::new(1.0).unwrap();
        assert!(SiteLevelAccountant::new(c, s, 0.0).is_err());
        assert!(SiteLevelAccountant::new(c, s, 1.5).is_err());
    }
}
