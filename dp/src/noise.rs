//! Gaussian noise for DP: a fast sampler for large vectors and OpenDP's exact sampler.
//!
//! * [`Sampler::Fast`] (default): `rand_distr::StandardNormal` (ziggurat) driven by the caller's
//!   CSPRNG (the site agent passes ChaCha20 seeded from the OS), scaled by `std`, added in f64,
//!   and the noisy value rounded to a grid of spacing `γ = 2^(⌈log₂ std⌉ − 20)` before it is
//!   stored as f32.
//! * [`Sampler::Exact`]: OpenDP's `make_gaussian` (exact discrete sampling of the continuous
//!   Gaussian with arbitrary-precision arithmetic), about 6.5 s per million values.
//!
//! # Security
//! Textbook floating-point Gaussian samplers leak through the low-order bits of the released
//! value: not every float is reachable from every input (Mironov, "On Significance of the Least
//! Significant Bits for Differential Privacy", CCS 2012). Rounding the released value to a
//! coarse power-of-two grid (Mironov's "snapping" idea) discards those bits; the grid is about
//! a millionth of the noise std, so utility is unchanged. This is a guard, not a proof: the
//! accounting assumes an ideal Gaussian. Use `Exact` where a formal guarantee on the sampler
//! itself is required and its cost is acceptable (it is too slow for million-parameter
//! updates: see `fedee bench noise`).

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

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
        Sampler::Exact => {
            let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
                L2Distance::<f64>::default(),
                std,
                None,
            )?;
            let input: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
            let out = m.invoke(&input)?;
            for (x, y) in values.iter_mut().zip(out) {
                *x = y as f32;
            }
        }
    }
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
