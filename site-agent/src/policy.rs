//! A site's own privacy policy: the floor it accepts, whatever the aggregator or the
//! federation spec says. Checked before the site joins (against the spec) and again before
//! every round (against the settings the round will use), so a hospital's promise to its
//! patients does not rest on the aggregator behaving well.
//!
//! The defaults protect: at least σ = 0.5, δ ≤ 1e-5 (and always δ < 1/n), both DP modes, any
//! clipping norm, and an ε budget of 10 per ledger (at the federation's δ). Each is changed
//! only by an explicit `fedee site` flag.

// Every check is written as `!(value within limits)` so that a NaN, which compares false,
// is refused rather than let through.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use fedee_dp::DpMode;
use fedee_spec::FederationSpec;

use crate::SiteError;

/// Smallest noise multiplier σ a site accepts by default.
pub const DEFAULT_MIN_NOISE_MULTIPLIER: f64 = 0.5;
/// Largest δ a site accepts by default.
pub const DEFAULT_MAX_DELTA: f64 = 1e-5;
/// A site's default ε budget (cumulative over its ledger, at the federation's δ).
pub const DEFAULT_EPSILON_BUDGET: f64 = 10.0;

/// What a site accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyPolicy {
    /// Smallest noise multiplier σ (of a site's update, or of DP-SGD's per-example
    /// gradients).
    pub min_noise_multiplier: f64,
    /// Largest clipping norm C.
    pub max_clipping_norm: f64,
    /// DP modes the site takes part in.
    pub modes: Vec<DpMode>,
    /// Largest δ (δ < 1/n is required as well, for n training records).
    pub max_delta: f64,
    /// The ε the site's ledger may reach (at the federation's δ): a round that would pass it
    /// is refused and the site leaves; a spec whose target ε passes it is refused at join.
    pub epsilon_budget: f64,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        Self {
            min_noise_multiplier: DEFAULT_MIN_NOISE_MULTIPLIER,
            max_clipping_norm: f64::INFINITY,
            modes: vec![DpMode::Site, DpMode::Record],
            max_delta: DEFAULT_MAX_DELTA,
            epsilon_budget: DEFAULT_EPSILON_BUDGET,
        }
    }
}

/// The DP settings one round runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPrivacy {
    /// Where DP acts.
    pub mode: DpMode,
    /// Clipping norm C.
    pub clipping_norm: f64,
    /// Noise multiplier σ.
    pub noise_multiplier: f64,
    /// δ.
    pub delta: f64,
    /// Distributed DP (the spec's `secure_aggregation.distributed_dp`): each round is a
    /// Skellam release whose central noise multiplier is `noise_multiplier`; the site itself
    /// adds `1/t` of that variance.
    pub distributed: bool,
}

/// Counts a site sends (its training, validation and test examples) are rounded to the
/// nearest multiple of this (at least one multiple for a non-empty split).
pub const COUNT_GRANULARITY: u64 = 10;

/// A count as it leaves the site: `n` to the nearest multiple of [`COUNT_GRANULARITY`], at
/// least one multiple when `n > 0`.
///
/// # Security
/// Coarsening, not differential privacy: it hides a site's exact number of records (which
/// with a record's presence known would reveal it), not its order of magnitude.
pub fn coarse_count(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let g = COUNT_GRANULARITY;
    (n.saturating_add(g / 2) / g * g).max(g)
}

/// A metric (accuracy, balanced accuracy, macro-F1, AUROC) as it leaves the site: rounded to
/// two decimals.
///
/// # Security
/// Not differential privacy: a per-round metric is a function of the site's test split. It
/// is rounded, and the aggregator shows it per site only to operator certificates.
pub fn coarse_metric(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Whether a cumulative ε stays within `budget` (a NaN ε never does).
pub fn within_budget(epsilon: f64, budget: f64) -> bool {
    epsilon <= budget
}

impl PrivacyPolicy {
    /// Check the policy itself (flags a user typed).
    ///
    /// # Errors
    /// [`SiteError::Refused`] naming the flag for a negative, NaN or out-of-range value.
    pub fn validate(&self) -> Result<(), SiteError> {
        let bad = |flag: &str, v: f64, want: &str| {
            Err(SiteError::Refused(format!(
                "{flag} = {v} is not a policy: it must be {want}"
            )))
        };
        if !(self.min_noise_multiplier >= 0.0) {
            return bad(
                "--min-noise-multiplier",
                self.min_noise_multiplier,
                "a number ≥ 0",
            );
        }
        if !(self.max_clipping_norm > 0.0) {
            return bad(
                "--max-clipping-norm",
                self.max_clipping_norm,
                "a number > 0 (or inf)",
            );
        }
        if !(self.max_delta > 0.0 && self.max_delta < 1.0) {
            return bad("--max-delta", self.max_delta, "in (0, 1)");
        }
        if !(self.epsilon_budget >= 0.0) {
            return bad("--epsilon-budget", self.epsilon_budget, "a number ≥ 0");
        }
        if self.modes.is_empty() {
            return Err(SiteError::Refused(
                "--dp-modes names no mode: allow `site`, `record` or both".into(),
            ));
        }
        Ok(())
    }

    /// Check one round's settings (or a spec's, before joining) for a site with `n` training
    /// records.
    ///
    /// # Errors
    /// [`SiteError::Refused`] naming the setting, its value, the site's limit and the fix.
    ///
    /// # Security
    /// NaN and infinite values fail every check (comparisons are written so that NaN is
    /// refused).
    pub fn check(&self, p: &RoundPrivacy, n: u64) -> Result<(), SiteError> {
        let refuse = |what: String| {
            Err(SiteError::Refused(format!(
                "{what}: this site's privacy policy refuses it; ask the consortium to change the federation, or, if the hospital accepts it, start the site with the flag named"
            )))
        };
        if !self.modes.contains(&p.mode) {
            let allowed: Vec<&str> = self.modes.iter().map(|m| m.as_str()).collect();
            return refuse(format!(
                "DP mode `{}` (unit: {}) is not one this site allows ({}; --dp-modes)",
                p.mode.as_str(),
                p.mode.unit(),
                allowed.join(", ")
            ));
        }
        if !(p.noise_multiplier.is_finite() && p.noise_multiplier >= self.min_noise_multiplier) {
            return refuse(format!(
                "noise multiplier σ = {} is below this site's minimum σ = {} (--min-noise-multiplier)",
                p.noise_multiplier, self.min_noise_multiplier
            ));
        }
        if !(p.clipping_norm > 0.0
            && p.clipping_norm <= self.max_clipping_norm
            && p.clipping_norm.is_finite())
        {
            return refuse(format!(
                "clipping norm C = {} is outside this site's limit (0, {}] (--max-clipping-norm)",
                p.clipping_norm, self.max_clipping_norm
            ));
        }
        if !(p.delta > 0.0 && p.delta <= self.max_delta) {
            return refuse(format!(
                "δ = {:e} is outside this site's range (0, {:e}] (--max-delta)",
                p.delta, self.max_delta
            ));
        }
        if n > 0 && !(p.delta < 1.0 / n as f64) {
            return refuse(format!(
                "δ = {:e} is not below 1/n = {:e} for this site's {n} training records: such a δ allows releasing a record outright (no flag changes this)",
                p.delta,
                1.0 / n as f64
            ));
        }
        Ok(())
    }

    /// Check a spec's stated target ε against the budget (before joining).
    ///
    /// # Errors
    /// [`SiteError::Refused`] when the spec plans to spend more than the budget.
    pub fn check_target(&self, spec: &FederationSpec) -> Result<(), SiteError> {
        match spec.privacy.target_epsilon {
            Some(t) if !(t <= self.epsilon_budget) => Err(SiteError::Refused(format!(
                "the federation spec targets ε = {t} (δ = {:e}), over this site's budget of ε = {}: ask the consortium for a smaller privacy.target_epsilon, or raise --epsilon-budget explicitly",
                spec.privacy.delta, self.epsilon_budget
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(sigma: f64, c: f64, delta: f64) -> RoundPrivacy {
        RoundPrivacy {
            distributed: false,
            mode: DpMode::Record,
            clipping_norm: c,
            noise_multiplier: sigma,
            delta,
        }
    }

    #[test]
    fn what_leaves_the_site_is_coarsened() {
        assert_eq!(
            [0, 1, 4, 5, 14, 15, 36, 1234].map(coarse_count),
            [0, 10, 10, 10, 10, 20, 40, 1230]
        );
        assert_eq!(coarse_metric(0.7349), 0.73);
        assert_eq!(coarse_metric(0.735_01), 0.74);
    }

    #[test]
    fn the_default_policy_refuses_weak_or_malformed_settings_by_name() {
        let p = PrivacyPolicy::default();
        p.validate().unwrap();
        p.check(&round(1.0, 1.0, 1e-5), 1000).unwrap();
        for (r, n, needle) in [
            (round(0.0, 1.0, 1e-5), 1000, "--min-noise-multiplier"),
            (round(0.49, 1.0, 1e-5), 1000, "--min-noise-multiplier"),
            (round(f64::NAN, 1.0, 1e-5), 1000, "σ = NaN"),
            (round(f64::INFINITY, 1.0, 1e-5), 1000, "σ = inf"),
            (round(1.0, f64::NAN, 1e-5), 1000, "--max-clipping-norm"),
            (round(1.0, 0.0, 1e-5), 1000, "--max-clipping-norm"),
            (round(1.0, 1.0, 1.0), 1000, "--max-delta"),
            (round(1.0, 1.0, 1e300), 1000, "--max-delta"),
            (round(1.0, 1.0, f64::NAN), 1000, "--max-delta"),
            (round(1.0, 1.0, 0.0), 1000, "--max-delta"),
        ] {
            let e = p.check(&r, n).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // δ < 1/n whatever the flags say.
        let loose = PrivacyPolicy {
            max_delta: 0.5,
            ..PrivacyPolicy::default()
        };
        let e = loose.check(&round(1.0, 1.0, 0.01), 100).unwrap_err();
        assert!(e.to_string().contains("1/n"), "{e}");
        loose.check(&round(1.0, 1.0, 0.001), 100).unwrap();
        // Modes.
        let site_only = PrivacyPolicy {
            modes: vec![DpMode::Site],
            ..PrivacyPolicy::default()
        };
        let e = site_only.check(&round(1.0, 1.0, 1e-5), 1000).unwrap_err();
        assert!(e.to_string().contains("--dp-modes"), "{e}");
        // A policy that is not one.
        for bad in [
            PrivacyPolicy {
                epsilon_budget: f64::NAN,
                ..PrivacyPolicy::default()
            },
            PrivacyPolicy {
                max_delta: 1.0,
                ..PrivacyPolicy::default()
            },
            PrivacyPolicy {
                modes: vec![],
                ..PrivacyPolicy::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
