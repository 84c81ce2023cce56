//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism (DP-SGD).
//!
//! One step samples each record independently with probability `q`, clips each sampled
//! record's gradient to L2 norm `C`, sums, and adds `N(0, (σC)²)` per coordinate. Its RDP at
//! order `α` is `log A_α / (α − 1)` with `A_α` from Mironov, Talwar & Zhang, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism" (2019), §3.3: the finite binomial sum
//! for integer `α`, the two-sided series with `erfc` for fractional `α`. `T` steps compose
//! additively. Conversion to `(ε, δ)` uses Balle et al., "Hypothesis Testing Interpretations and
//! Renyi Differential Privacy" (AISTATS 2020), Thm 21:
//! `ε = RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1)`, minimised over the orders.
//!
//! This is the computation of Opacus's `RDPAccountant` (and TensorFlow Privacy's
//! `compute_rdp`); `dp/fixtures/opacus_rdp.json` holds Opacus's ε on a grid of `(q, σ, steps,
//! δ)` and the tests require agreement within 1 %.

use crate::DpError;

/// Opacus's default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_sub(x: f64, y: f64) -> f64 {
    // Callers only subtract smaller terms; clamp rounding to keep the log defined.
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x <= y {
        return f64::NEG_INFINITY;
    }
    let d = (x - y).exp_m1();
    if d.is_infinite() { x } else { d.ln() + y }
}

/// `log erfc(x)`, accurate where `erfc` underflows (large `x`) by its asymptotic series.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // erfc(x) = exp(−x²)/(x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + …)
    let x2 = x * x;
    let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
    -x2 - (x * std::f64::consts::PI.sqrt()).ln() + series.ln()
}

fn ln_binom(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (i, a) = (i as f64, alpha as f64);
        let log_coef = ln_binom(a, i) + i * q.ln() + (a - i) * (1.0 - q).ln();
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut coef = 1.0f64; // binom(alpha, i), updated by the recurrence
    let s2 = 2.0f64.sqrt() * sigma;
    for i in 0..100_000u32 {
        let fi = f64::from(i);
        if i > 0 {
            coef *= (alpha - fi + 1.0) / fi;
        }
        if coef == 0.0 {
            break;
        }
        let log_coef = coef.abs().ln();
        let j = alpha - fi;
        let log_t0 = log_coef + fi * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + fi * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// RDP of one step of the sampled Gaussian mechanism at order `alpha > 1`.
pub fn rdp_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// `(ε, best order)` at `delta` from RDP values at `orders` (Mironov 2017, Prop. 3, with the
/// tighter conversion of Canonne, Kamath & Steinke 2020, Prop. 12).
///
/// # Security
/// A δ outside (0, 1) (NaN included) gives ε = ∞: the formula would otherwise go negative for
/// δ > 1 and report no spend, so a budget check could never fire.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    if !(delta > 0.0 && delta < 1.0) {
        return best;
    }
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
        if eps.is_finite() && eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Privacy of DP-SGD steps, accumulated as RDP over a fixed set of orders.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An accountant with nothing spent, tracking `orders` (each > 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Add `steps` steps at sampling rate `q` and noise multiplier `sigma`.
    ///
    /// # Errors
    /// [`DpError::Parameter`] for `q` outside `[0, 1]` or a negative or non-finite `sigma`.
    pub fn add(&mut self, q: f64, sigma: f64, steps: u64) -> Result<(), DpError> {
        if !(0.0..=1.0).contains(&q) {
            return Err(DpError::Parameter(format!(
                "sampling rate q must be in [0, 1], got {q}"
            )));
        }
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(DpError::Parameter(format!(
                "noise multiplier must be finite and ≥ 0, got {sigma}"
            )));
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_step(q, sigma, a);
        }
        Ok(())
    }

    /// Add `times` releases of a mechanism whose RDP bound `rdp(α)` holds at integer orders
    /// only (the Skellam mechanism): the fractional orders become unusable (+∞), so ε is
    /// taken over the integer ones.
    pub fn add_integer_orders(&mut self, times: u64, rdp: impl Fn(f64) -> f64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            if a.fract() == 0.0 && a >= 2.0 {
                *r += times as f64 * rdp(a);
            } else {
                *r = f64::INFINITY;
            }
        }
    }

    /// The orders tracked.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Accumulated RDP per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// `ε` at `delta` (and the order that achieves it).
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// Bisection for the smallest `σ` in `[lo, hi]` with `eps(σ) ≤ target` (`eps` decreasing in
/// `σ`); `None` when even `hi` spends more.
pub(crate) fn bisect_sigma(
    target: f64,
    lo: f64,
    hi: f64,
    mut eps: impl FnMut(f64) -> Result<f64, DpError>,
) -> Result<Option<f64>, DpError> {
    if eps(hi)? > target {
        return Ok(None);
    }
    let (mut lo, mut hi) = (lo, hi);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(hi))
}

/// The noise multiplier at which `steps` Poisson-subsampled Gaussian steps at rate `q` spend
/// `epsilon` at `delta` (bisection on this accountant, to a relative precision far below any
/// noise that matters; the result spends at most `epsilon`).
///
/// # Errors
/// [`DpError::Parameter`] for a target outside `(0, ∞)`, `q` outside `(0, 1]`, or a target
/// out of reach at `σ = 1000` (too many steps for so small an ε).
pub fn calibrate_sigma(q: f64, steps: u64, epsilon: f64, delta: f64) -> Result<f64, DpError> {
    calibrate_sigma_after(&RdpAccountant::default(), q, steps, epsilon, delta)
}

/// [`calibrate_sigma`] when `spent` has already been spent (e.g. a federated statistics
/// round): the `σ` at which `spent` plus the steps stay within `epsilon`.
///
/// # Errors
/// As [`calibrate_sigma`]; also when `spent` alone reaches `epsilon`.
pub fn calibrate_sigma_after(
    spent: &RdpAccountant,
    q: f64,
    steps: u64,
    epsilon: f64,
    delta: f64,
) -> Result<f64, DpError> {
    if !(epsilon.is_finite() && epsilon > 0.0 && q > 0.0 && q <= 1.0) {
        return Err(DpError::Parameter(format!(
            "calibration needs a target ε > 0 and a sampling rate in (0, 1], got ε = {epsilon}, q = {q}"
        )));
    }
    let eps = |s: f64| {
        let mut a = spent.clone();
        a.add(q, s, steps)?;
        Ok(a.epsilon(delta).0)
    };
    bisect_sigma(epsilon, 0.01, 1000.0, eps)?.ok_or_else(|| {
        DpError::Parameter(format!(
            "ε = {epsilon} at δ = {delta:e} is out of reach for {steps} steps at q = {q:.4} even at σ = 1000 (ε already spent before them: {:.3}): lower the steps (epochs, rounds), raise the target, or spend less before",
            spent.epsilon(delta).0
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_outside_zero_one_spends_everything() {
        let mut acc = RdpAccountant::default();
        acc.add(0.1, 1.0, 100).unwrap();
        assert!(acc.epsilon(1e-5).0.is_finite());
        for bad in [0.0, 1.0, 1e300, -1e-5, f64::NAN, f64::INFINITY] {
            assert_eq!(acc.epsilon(bad).0, f64::INFINITY, "δ = {bad}");
        }
    }

    #[test]
    fn calibrated_sigma_reaches_the_target_epsilon() {
        let (q, steps, delta) = (4.0 / 200.0, 1500, 1e-4);
        let s = calibrate_sigma(q, steps, 1.0, delta).unwrap();
        let mut a = RdpAccountant::default();
        a.add(q, s, steps).unwrap();
        let eps = a.epsilon(delta).0;
        assert!(eps <= 1.0 && eps > 0.999, "σ = {s} gives ε = {eps}");
        let mut b = RdpAccountant::default();
        b.add(q, s * 0.9, steps).unwrap();
        assert!(b.epsilon(delta).0 > 1.0, "a smaller σ must spend more");
        assert!(
            calibrate_sigma(1.0, 1_000_000, 1e-3, 1e-5).is_err(),
            "out of reach"
        );
        assert!(calibrate_sigma(0.1, 10, 0.0, 1e-5).is_err());
    }

    #[test]
    fn calibration_leaves_room_for_what_was_spent() {
        let (q, steps, delta) = (0.05, 200, 1e-5);
        let mut spent = RdpAccountant::default();
        spent.add(1.0, 20.0, 1).unwrap();
        let alone = calibrate_sigma(q, steps, 1.0, delta).unwrap();
        let after = calibrate_sigma_after(&spent, q, steps, 1.0, delta).unwrap();
        assert!(after > alone, "{after} vs {alone}");
        spent.add(q, after, steps).unwrap();
        let eps = spent.epsilon(delta).0;
        assert!(eps <= 1.0 && eps > 0.999, "{eps}");
        let mut all = RdpAccountant::default();
        all.add(1.0, 0.5, 1).unwrap();
        assert!(calibrate_sigma_after(&all, q, steps, 1.0, delta).is_err());
    }

    #[test]
    fn full_batch_is_the_gaussian_mechanism() {
        // q = 1: RDP(α) = α/(2σ²) exactly.
        assert!((rdp_step(1.0, 2.0, 8.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn integer_and_fractional_orders_agree_where_they_meet() {
        // The fractional series at α = 5 ± tiny must match the binomial sum at α = 5.
        let a = rdp_step(0.01, 1.1, 5.0);
        let b = rdp_step(0.01, 1.1, 5.0 + 1e-9);
        assert!((a - b).abs() / a < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn subsampling_amplifies() {
        assert!(rdp_step(0.01, 1.0, 4.0) < rdp_step(1.0, 1.0, 4.0) / 100.0);
    }
}
