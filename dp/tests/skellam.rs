//! The distributed Skellam mechanism: accounting against the paper's formula (fixture made by
//! `dp/fixtures/make_skellam_rdp.py`) and against the Gaussian limit, and the site pipeline's
//! sum, bias and noise measured.

use fedee_dp::rdp::{epsilon_from_rdp, rdp_step};
use fedee_dp::skellam::{Skellam, orders, skellam_rdp, walsh_hadamard};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[test]
fn accounting_matches_the_papers_formula() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/skellam_rdp.json")).unwrap();
    let rows = doc["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 144);
    let orders = orders();
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap();
        let rdp: Vec<f64> = orders
            .iter()
            .map(|&a| f("rounds") * skellam_rdp(a, f("l1"), f("l2"), f("mu")))
            .collect();
        let (eps, _) = epsilon_from_rdp(&orders, &rdp, f("delta"));
        let want = f("epsilon");
        assert!(
            (eps - want).abs() <= 1e-9 * want.max(1.0),
            "{r}: {eps} vs {want}"
        );
    }
}

/// At a large scale the Skellam bound tends to the Gaussian mechanism's RDP with the same
/// noise multiplier (an independent check of units and of the central-equivalent ε).
#[test]
fn large_scale_tends_to_the_gaussian_mechanism() {
    let p = Skellam {
        dim: 1 << 20,
        clip: 1.0,
        noise_multiplier: 1.1,
        sites: 100,
        min_survivors: 60,
        rotation_seed: [1; 32],
    };
    p.check().unwrap();
    let orders = orders();
    let gauss: Vec<f64> = orders
        .iter()
        .map(|&a| 50.0 * rdp_step(1.0, 1.1, a))
        .collect();
    let (g, _) = epsilon_from_rdp(&orders, &gauss, 1e-5);
    let (s, _) = p.epsilon(50, 1e-5);
    assert!(
        s >= g,
        "Skellam's bound cannot beat the Gaussian: {s} < {g}"
    );
    assert!(
        s <= 1.01 * g,
        "50 rounds at z = 1.1: Skellam ε {s} vs Gaussian {g}"
    );
    // A small scale (few integer steps) costs visibly more: the discreteness terms matter.
    // Δ₂ = 3 steps, Δ₁ = 9, variance 9 (z = 1): the Gaussian part is 8·9/18 = 4.
    let coarse = skellam_rdp(8.0, 9.0, 3.0, 9.0);
    assert!(coarse > 1.1 * 4.0, "{coarse}");
}

/// n sites encode, the sum is decoded: unbiased, and the noise per coordinate has the
/// central standard deviation z·C·√(n/t) (n survivors, each adding 1/t of the variance).
#[test]
fn summed_sites_decode_to_the_sum_with_the_target_noise() {
    let (n, t, d) = (12, 8, 3000);
    let p = Skellam {
        dim: d,
        clip: 1.0,
        noise_multiplier: 0.5,
        sites: n,
        min_survivors: t,
        rotation_seed: [4; 32],
    };
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut sum = vec![0u32; p.padded_dim()];
    let mut truth = vec![0f64; d];
    for _ in 0..n {
        let x: Vec<f32> = (0..d).map(|_| rng.random::<f32>() - 0.5).collect();
        let norm = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let f = (1.0 / norm).min(1.0);
        truth
            .iter_mut()
            .zip(&x)
            .for_each(|(a, v)| *a += f64::from(*v) * f);
        let y = p.encode(&x, &mut rng).unwrap();
        sum.iter_mut()
            .zip(y)
            .for_each(|(a, b)| *a = a.wrapping_add(b));
    }
    let got = p.decode_sum(&sum).unwrap();
    let err: Vec<f64> = got
        .iter()
        .zip(&truth)
        .map(|(g, t)| f64::from(*g) - t)
        .collect();
    let mean = err.iter().sum::<f64>() / d as f64;
    let sd = (err.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / d as f64).sqrt();
    let want = 0.5 * (n as f64 / t as f64).sqrt();
    assert!(mean.abs() < 4.0 * want / (d as f64).sqrt(), "bias {mean}");
    assert!((sd / want - 1.0).abs() < 0.05, "noise sd {sd}, want {want}");
}

/// Negative control: a site that skips the noise is caught by the same measurement.
#[test]
fn the_noise_measurement_can_fail() {
    let p = Skellam {
        dim: 2000,
        clip: 1.0,
        noise_multiplier: 0.5,
        sites: 4,
        min_survivors: 4,
        rotation_seed: [5; 32],
    };
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let x: Vec<f32> = (0..2000).map(|i| (i % 7) as f32 * 1e-3).collect();
    let y = p.encode(&x, &mut rng).unwrap();
    let noisy = p.decode_sum(&y).unwrap();
    // The same vector with the noise removed: decode what rounding alone gives.
    let quiet = Skellam {
        noise_multiplier: 1e-9,
        ..p.clone()
    };
    let yq = quiet.encode(&x, &mut rng).unwrap();
    let clean = quiet.decode_sum(&yq).unwrap();
    let sd = |v: &[f32]| {
        let e: Vec<f64> = v.iter().zip(&x).map(|(a, b)| f64::from(a - b)).collect();
        (e.iter().map(|e| e * e).sum::<f64>() / e.len() as f64).sqrt()
    };
    // One site of t = 4: its own noise is z·C/√t = 0.25.
    assert!((sd(&noisy) / 0.25 - 1.0).abs() < 0.1, "{}", sd(&noisy));
    assert!(sd(&clean) < 1e-3, "{}", sd(&clean));
}

#[test]
fn hadamard_is_its_own_inverse_up_to_n() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let v: Vec<f64> = (0..1024).map(|_| rng.random::<f64>()).collect();
    let mut w = v.clone();
    walsh_hadamard(&mut w);
    walsh_hadamard(&mut w);
    for (a, b) in v.iter().zip(&w) {
        assert!((a * 1024.0 - b).abs() < 1e-9);
    }
}

#[test]
fn bad_input_is_named() {
    let p = Skellam {
        dim: 10,
        clip: 1.0,
        noise_multiplier: 1.0,
        sites: 5,
        min_survivors: 3,
        rotation_seed: [0; 32],
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let e = p.encode(&[0.0; 9], &mut rng).unwrap_err().to_string();
    assert!(e.contains("9 values") && e.contains("expects 10"), "{e}");
    let mut x = [0.0f32; 10];
    x[3] = f32::NAN;
    assert!(
        p.encode(&x, &mut rng)
            .unwrap_err()
            .to_string()
            .contains("update[3]")
    );
    assert!(
        p.decode_sum(&[0; 3])
            .unwrap_err()
            .to_string()
            .contains("3 words")
    );
    let bad = Skellam {
        min_survivors: 6,
        ..p
    };
    assert!(
        bad.check()
            .unwrap_err()
            .to_string()
            .contains("6 minimum survivors")
    );
}

/// The planning bound charged for every round covers every roster, threshold and model size
/// the federation can run (a round's exact RDP never exceeds it), and stays close to the
/// Gaussian mechanism at the same central noise multiplier (relative excess printed; below
/// 1e-3 up to σ = 8, where the ring leaves a smaller integer scale).
#[test]
fn the_worst_case_round_bounds_every_round_and_tracks_the_gaussian() {
    use fedee_dp::skellam::{spent, worst_case_round};
    for z in [0.3, 1.0, 2.0, 4.0, 8.0] {
        let worst = worst_case_round(z);
        for (n, t) in [(3, 2), (3, 3), (10, 6), (255, 2), (255, 129), (100, 11)] {
            for dim in [1, 14, 1000, 1 << 20] {
                let p = Skellam {
                    dim,
                    clip: 0.7,
                    noise_multiplier: z,
                    sites: n,
                    min_survivors: t,
                    rotation_seed: [0; 32],
                };
                p.check().unwrap();
                let exact = p.round();
                for a in orders() {
                    assert!(
                        exact.rdp(a) <= worst.rdp(a),
                        "z {z}, n {n}, t {t}, d {dim}, α {a}: {} > {}",
                        exact.rdp(a),
                        worst.rdp(a)
                    );
                }
            }
        }
        let mut gauss = fedee_dp::rdp::RdpAccountant::default();
        gauss.add_integer_orders(20, |a| rdp_step(1.0, z, a));
        let (g, s) = (gauss.epsilon(1e-5).0, spent(worst, 20, 1e-5));
        println!(
            "σ = {z}: 20 rounds, ε Skellam (worst case) {s:.6} vs Gaussian {g:.6}: +{:.1e}",
            s / g - 1.0
        );
        assert!(
            s >= g && s <= g * (1.0 + 1e-3),
            "z {z}: Skellam {s}, Gaussian {g}"
        );
    }
}

#[test]
fn calibration_spends_at_most_the_target_and_little_less() {
    use fedee_dp::skellam::{calibrate, spent, worst_case_round};
    for (rounds, eps) in [(10, 8.0), (30, 1.0), (1, 0.5)] {
        let z = calibrate(rounds, eps, 1e-5).unwrap();
        let got = spent(worst_case_round(z), u64::from(rounds), 1e-5);
        assert!(
            got <= eps && got > eps * 0.999,
            "{rounds} rounds, target {eps}: {got} at z {z}"
        );
    }
    let e = calibrate(10, 0.0, 1e-5).unwrap_err().to_string();
    assert!(e.contains("ε > 0"), "{e}");
    // Fractional orders are closed to a Skellam ledger: only integer ones give ε.
    let mut acc = fedee_dp::rdp::RdpAccountant::default();
    acc.add_integer_orders(1, |a| worst_case_round(1.0).rdp(a));
    let (_, order) = acc.epsilon(1e-5);
    assert_eq!(order.fract(), 0.0);
}
