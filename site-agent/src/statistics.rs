//! Federated preprocessing (spec `data.standardize = "federated"`): the statistics a site
//! sends once before round 1, and the figures every site standardises with afterwards.
//!
//! Each numeric or boolean feature's training-split values are scaled by the spec's public
//! `range`, clipped and centred: `c = clamp((v − low) / (high − low), 0, 1) − ½ ∈ [−½, ½]`. A
//! site sends per feature `(count, Σc, Σc²)` over its non-missing values. Adding or removing
//! one patient record moves a feature's triple by at most `(1, ½, ¼)`, so the vector's L2
//! sensitivity is `√(21d/16)` for `d` features (centring makes it 1.5× smaller than `√(3d)`
//! for values in `[0, 1]`). The site adds `N(0, (σ_s · sensitivity)²)` to every number (the
//! Gaussian mechanism, RDP `α / (2σ_s²)`; Mironov 2017, Prop. 7) and records it in its privacy
//! ledger *before* sending. The aggregator only sums. From the sums `(N, S, Q)`:
//! `mean_c = S / N` (clamped to `[−½, ½]`), `var = Q / N − mean_c²` (clamped to
//! `[0.05², 0.5²]`, since noise can push it anywhere), back in the feature's units
//! `mean = low + (mean_c + ½)(high − low)`, `std = √var (high − low)`.
//!
//! # Security
//! The aggregator and the other sites learn the pooled sums only (the aggregator also each
//! site's noisy vector). What one record changes is hidden by the noise at the stated ρ.

use fedee_spec::FederationSpec;

use crate::table::{ColumnStats, Examples, Preprocessing};

/// One feature's `(count, Σc, Σc²)` of centred scaled values.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStatistics {
    /// Feature name.
    pub feature: String,
    /// Values counted.
    pub count: f64,
    /// Sum of the centred scaled values.
    pub sum: f64,
    /// Sum of their squares.
    pub sum_squares: f64,
}

/// The L2 sensitivity of a site's statistics vector to one record: `√(21d/16)`.
pub fn sensitivity(spec: &FederationSpec) -> f64 {
    (21.0 / 16.0 * spec.statistics_features().len() as f64).sqrt()
}

/// A site's statistics of its training split `(n, width)` row-major (missing = NaN), before
/// noise.
pub fn local(spec: &FederationSpec, train: &Examples, width: usize) -> Vec<FeatureStatistics> {
    spec.statistics_features()
        .into_iter()
        .map(|(feature, offset, [lo, hi])| {
            let mut s = FeatureStatistics {
                feature,
                count: 0.0,
                sum: 0.0,
                sum_squares: 0.0,
            };
            for row in train.x.chunks_exact(width) {
                let v = f64::from(row[offset]);
                if v.is_nan() {
                    continue;
                }
                let c = ((v - lo) / (hi - lo)).clamp(0.0, 1.0) - 0.5;
                s.count += 1.0;
                s.sum += c;
                s.sum_squares += c * c;
            }
            s
        })
        .collect()
}

/// Add Gaussian noise of std `sigma · sensitivity` to every number.
///
/// # Errors
/// [`fedee_dp::DpError`] for a bad `sigma`.
pub fn add_noise<R: rand::Rng + ?Sized>(
    stats: &mut [FeatureStatistics],
    sigma: f64,
    sensitivity: f64,
    sampler: fedee_dp::noise::Sampler,
    rng: &mut R,
) -> Result<(), fedee_dp::DpError> {
    let mut flat: Vec<f32> = stats
        .iter()
        .flat_map(|s| [s.count, s.sum, s.sum_squares])
        .map(|v| v as f32)
        .collect();
    fedee_dp::noise::add_noise(&mut flat, sigma * sensitivity, sampler, rng)?;
    for (s, v) in stats.iter_mut().zip(flat.chunks_exact(3)) {
        s.count = f64::from(v[0]);
        s.sum = f64::from(v[1]);
        s.sum_squares = f64::from(v[2]);
    }
    Ok(())
}

/// The preprocessing of the pooled sums `totals` (one per statistics feature, in spec order).
///
/// # Errors
/// [`crate::table::DataError::Preprocessing`] if `totals` does not cover the spec's features.
pub fn preprocessing(
    spec: &FederationSpec,
    totals: &[FeatureStatistics],
) -> Result<Preprocessing, crate::table::DataError> {
    let features = spec.statistics_features();
    let names: Vec<&str> = totals.iter().map(|t| t.feature.as_str()).collect();
    if names != features.iter().map(|f| f.0.as_str()).collect::<Vec<_>>() {
        return Err(crate::table::DataError::Preprocessing(format!(
            "the aggregator's statistics cover {names:?}, the spec's numeric and boolean features are {:?}",
            features.iter().map(|f| &f.0).collect::<Vec<_>>()
        )));
    }
    let numeric: Vec<bool> = spec
        .features
        .iter()
        .filter(|f| f.kind != fedee_spec::FeatureType::Categorical)
        .map(|f| f.kind == fedee_spec::FeatureType::Numeric)
        .collect();
    let columns = features
        .into_iter()
        .zip(totals)
        .zip(numeric)
        .map(|(((name, offset, [lo, hi]), t), scale)| {
            let n = t.count.max(1.0);
            let mean_c = (t.sum / n).clamp(-0.5, 0.5);
            let var = (t.sum_squares / n - mean_c * mean_c).clamp(0.05 * 0.05, 0.25);
            ColumnStats {
                name,
                offset,
                mean: lo + (mean_c + 0.5) * (hi - lo),
                std: var.sqrt() * (hi - lo),
                scale,
            }
        })
        .collect();
    Ok(Preprocessing {
        features: spec.in_features(),
        columns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederationSpec {
        FederationSpec::from_toml(
            r#"
version = 1
[task]
kind = "tabular-classification"
label = "y"
classes = ["0", "1"]
[[features]]
name = "age"
type = "numeric"
range = [0, 100]
[[features]]
name = "ward"
type = "categorical"
levels = ["A", "B"]
[[features]]
name = "smoker"
type = "boolean"
[data]
standardize = "federated"
[model]
kind = "mlp"
hidden = [4]
[privacy]
mode = "record"
noise_multiplier = 1.0
statistics_noise_multiplier = 2.0
"#,
        )
        .unwrap()
    }

    #[test]
    fn pooled_sums_give_the_pooled_mean_and_std() {
        let spec = spec();
        // Two sites: ages 20, 40 (one missing) and 60, 80 (one out of range, clipped to 100).
        let site = |rows: &[[f32; 4]]| {
            let mut e = Examples::default();
            for r in rows {
                e.push(r, 0);
            }
            local(&spec, &e, 4)
        };
        let a = site(&[
            [20.0, 1.0, 0.0, 1.0],
            [40.0, 0.0, 1.0, 0.0],
            [f32::NAN, 1.0, 0.0, 1.0],
        ]);
        let b = site(&[[60.0, 1.0, 0.0, 0.0], [180.0, 0.0, 1.0, 0.0]]);
        assert_eq!(a[0].count, 2.0, "the missing age is not counted");
        assert!(
            (b[0].sum - 0.6).abs() < 1e-12,
            "180 is clipped to the range's top"
        );
        let totals: Vec<FeatureStatistics> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| FeatureStatistics {
                feature: x.feature.clone(),
                count: x.count + y.count,
                sum: x.sum + y.sum,
                sum_squares: x.sum_squares + y.sum_squares,
            })
            .collect();
        let p = preprocessing(&spec, &totals).unwrap();
        // Ages 20, 40, 60, 100: mean 55, population std √875 ≈ 29.58.
        assert!((p.columns[0].mean - 55.0).abs() < 1e-9, "{p:?}");
        assert!((p.columns[0].std - 875f64.sqrt()).abs() < 1e-9, "{p:?}");
        assert_eq!((p.columns[0].offset, p.columns[1].offset), (0, 3));
        assert!(p.columns[0].scale && !p.columns[1].scale);
        assert!((p.columns[1].mean - 0.4).abs() < 1e-9, "smoker: 2 of 5");
        p.check(&spec).unwrap();
        assert!((sensitivity(&spec) - (42f64 / 16.0).sqrt()).abs() < 1e-12);
        // Noise moves every number; σ = 0 moves none.
        let mut noisy = totals.clone();
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(1);
        add_noise(
            &mut noisy,
            2.0,
            sensitivity(&spec),
            Default::default(),
            &mut rng,
        )
        .unwrap();
        assert!(
            noisy
                .iter()
                .zip(&totals)
                .all(|(n, t)| n.sum != t.sum && n.count != t.count)
        );
        assert!(preprocessing(&spec, &totals[..1]).is_err());
    }
}
