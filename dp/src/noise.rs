//! Gaussian noise for DP: a fast sampler for large vectors and OpenDP's exact sampler.
//!
//! * [`Sampler::Fast`] (default): `rand_distr::StandardNormal` (ziggurat) driven by the caller's
//!   CSPRNG (the site agent passes ChaCha20 seeded from the OS), scaled by `std`, added in f64,
//!   and the noisy value rounded to a grid of spacing `γ = 2^(⌈log₂ std⌉ − 20)` before it is
//!   stored as f32.
//! * [`Sampler::Exact`]: OpenDP's `make_gaussian` over f32 vectors (discrete Gaussian noise on
//!   the grid of every f32 value, `2^-149`, sampled with exact rational arithmetic: Canonne,
//!   Kamath & Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020), run on
//!   slices of [`EXACT_SLICE`] values in parallel on rayon's pool. About 15 µs per value per
//!   core on a 2-core EPYC (`fedee bench noise`).
//!
//! # Security
//! Textbook floating-point Gaussian samplers leak through the low-order bits of the released
//! value: not every float is reachable from every input (Mironov, "On Significance of the Least
//! Significant Bits for Differential Privacy", CCS 2012). Rounding the released value to a
//! coarse power-of-two grid (Mironov's "snapping" idea) discards those bits; the grid is about
//! a millionth of the noise std, so utility is unchanged. This is a guard, not a proof: the
//! accounting assumes an ideal Gaussian. Use `Exact` where a formal guarantee on the sampler
//! itself is required and its cost is acceptable: at about 15 µs per value per core, a
//! 1 M-parameter update takes about 15 core-seconds and a 22.6 M MiniLM update about 6
//! core-minutes per round (`fedee bench noise`).

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::DpError;

/// Which Gaussian sampler adds DP noise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// CSPRNG + ziggurat, released values rounded to a grid (fast; see the module docs).
    #[default]
    Fast,
    /// OpenDP's exact sampler (slow).
    Exact,
}

impl std::str::FromStr for Sampler {
    type Err = DpError;
    fn from_str(s: &str) -> Result<Self, DpError> {
        match s {
            "fast" => Ok(Self::Fast),
            "exact" => Ok(Self::Exact),
            _ => Err(DpError::Parameter(format!(
                "noise sampler `{s}` is unknown: use `fast` (default) or `exact` (OpenDP, slow)"
            ))),
        }
    }
}

/// Grid spacing for noise of standard deviation `std`: `2^(⌈log₂ std⌉ − 20)`.
pub fn grid(std: f64) -> f64 {
    2f64.powi(std.log2().ceil() as i32 - 20)
}

/// Add `N(0, std²)` to every value of `values` with `sampler`.
///
/// # Errors
/// [`DpError::Parameter`] for a negative or non-finite `std`; [`DpError::OpenDp`] if OpenDP's
/// sampler fails.
pub fn add_noise<R: Rng + ?Sized>(
    values: &mut [f32],
    std: f64,
    sampler: Sampler,
    rng: &mut R,
) -> Result<(), DpError> {
    if !(std.is_finite() && std >= 0.0) {
        return Err(DpError::Parameter(format!(
            "noise std must be finite and ≥ 0, got {std}"
        )));
    }
    if std == 0.0 {
        return Ok(());
    }
    match sampler {
        Sampler::Fast => {
            let g = grid(std);
            let inv = 1.0 / g; // exact: g is a power of two
            for x in values.iter_mut() {
                let n: f64 = StandardNormal.sample(rng);
                *x = (((f64::from(*x) + std * n) * inv).round() * g) as f32;
            }
        }
        Sampler::Exact => values
            .par_chunks_mut(EXACT_SLICE)
            .try_for_each(|slice| exact_noise(slice, std))?,
    }
    Ok(())
}

/// Values per parallel task of the exact sampler (about 0.12 s of work each).
pub const EXACT_SLICE: usize = 8192;

/// OpenDP's Gaussian mechanism on one slice of the values.
///
/// The measurement is over `VectorDomain<AtomDomain<f32>>` with the default `k` (`2^-149`, the
/// spacing of the smallest f32): every input is already on that grid, so OpenDP adds no
/// rounding distance to the sensitivity and its zCDP map is the ideal `ρ = Δ²/(2·std²)` of a
/// Gaussian, as the accountants assume ([`crate::SiteLevelAccountant::spent`],
/// [`crate::rdp`]). Over f64 the same noise took 3.7× as long (`2^-1074` grid, wider
/// integers) and was then rounded to f32 a second time.
///
/// # Security
/// OpenDP's vector mechanism draws every coordinate independently from the same discrete
/// Gaussian (`MakeNoise<VectorDomain<AtomDomain<IBig>>, ..> for ZExpFamily<2>`: one
/// `sample_discrete_gaussian` per element). Invoking it on disjoint slices therefore releases
/// exactly the distribution of one invocation on the whole vector, and that invocation's
/// guarantee holds. Randomness comes from OpenDP's own OS-backed generator, on every thread.
fn exact_noise(values: &mut [f32], std: f64) -> Result<(), DpError> {
    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<f32>::new_non_nan()),
        L2Distance::<f32>::default(),
        std,
        None,
    )?;
    let out = m.invoke(&values.to_vec())?;
    values.copy_from_slice(&out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn moments(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    #[test]
    fn both_samplers_have_the_requested_std() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for (sampler, n) in [(Sampler::Fast, 200_000), (Sampler::Exact, 20_000)] {
            let mut v = vec![1.0f32; n];
            add_noise(&mut v, 0.5, sampler, &mut rng).unwrap();
            let (mean, std) = moments(&v);
            let tol = 5.0 * 0.5 / (n as f64).sqrt();
            assert!((mean - 1.0).abs() < tol, "{sampler:?}: mean {mean}");
            assert!((std - 0.5).abs() < 2.0 * tol, "{sampler:?}: std {std}");
        }
    }

    #[test]
    fn exact_noise_is_independent_across_parallel_slices() {
        // Five slices (the last one short), each with the requested mean and std, and no two
        // alike: every slice draws its own noise.
        let n = 4 * EXACT_SLICE + 1000;
        let mut v = vec![-2.0f32; n];
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        add_noise(&mut v, 0.25, Sampler::Exact, &mut rng).unwrap();
        let slices: Vec<&[f32]> = v.chunks(EXACT_SLICE).collect();
        assert_eq!(slices.len(), 5);
        for (i, s) in slices.iter().enumerate() {
            let (mean, std) = moments(s);
            let tol = 5.0 * 0.25 / (s.len() as f64).sqrt();
            assert!((mean + 2.0).abs() < tol, "slice {i}: mean {mean}");
            assert!((std - 0.25).abs() < 2.0 * tol, "slice {i}: std {std}");
        }
        for (i, a) in slices.iter().enumerate() {
            for b in &slices[i + 1..] {
                assert_ne!(&a[..1000], &b[..1000], "two slices got the same noise");
            }
        }
    }

    #[test]
    fn fast_values_lie_on_the_grid() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(4);
        let mut v = vec![0.123f32; 1000];
        add_noise(&mut v, 0.3, Sampler::Fast, &mut rng).unwrap();
        let g = grid(0.3);
        assert_eq!(g, 2f64.powi(-21));
        for &x in &v {
            let k = f64::from(x) / g;
            assert_eq!(k, k.round(), "{x} is not a multiple of {g}");
        }
    }

    #[test]
    fn parses_names() {
        assert_eq!("exact".parse::<Sampler>().unwrap(), Sampler::Exact);
        assert!(
            "gauss"
                .parse::<Sampler>()
                .unwrap_err()
                .to_string()
                .contains("fast")
        );
    }
}
