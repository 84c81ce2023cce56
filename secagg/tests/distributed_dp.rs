//! Distributed DP through secure aggregation: each site adds its part of the Skellam noise
//! (`fedee_dp::skellam`), the protocol unmasks only the sum, and the decoded sum carries the
//! central noise (a site dropped after sharing keys).

use fedee_dp::skellam::Skellam;
use fedee_secagg::{RoundParams, SiteIndex};

mod common;
use rand::{Rng, SeedableRng};

#[test]
fn skellam_noise_adds_up_to_the_central_noise_through_the_protocol() {
    let (n, t, d) = (9, 6, 4000);
    let dp = Skellam {
        dim: d,
        clip: 1.0,
        noise_multiplier: 0.8,
        sites: n,
        min_survivors: t,
        rotation_seed: [3; 32],
    };
    dp.check().unwrap();
    let p = RoundParams {
        context: [1; 32],
        round: 1,
        sites: n,
        degree: n - 1,
        threshold: t,
        dim: dp.padded_dim(),
    };
    let mut noise_rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let mut rng = fedee_secagg::os_rng().unwrap();
    let (mut server, mut sites) = common::to_masked_stage(&p, &mut rng);
    let mut truth = vec![0f64; d];
    for (i, s) in sites.iter_mut().enumerate() {
        if i == 4 {
            continue; // dropped after sharing keys
        }
        // Updates of norm 0.5 (under the clipping norm, so unchanged by clipping).
        let x: Vec<f32> = (0..d).map(|_| noise_rng.random::<f32>() - 0.5).collect();
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let x: Vec<f32> = x.iter().map(|v| 0.5 * v / norm).collect();
        truth
            .iter_mut()
            .zip(&x)
            .for_each(|(a, v)| *a += f64::from(*v));
        let input = dp.encode(&x, &mut noise_rng).unwrap();
        let y = s
            .masked_input(&server.shares_for(i as SiteIndex), &input)
            .unwrap();
        server.receive_masked(i as SiteIndex, &y).unwrap();
    }
    let req = server.close_masked().unwrap();
    assert_eq!(req.dropped, vec![4]);
    for &i in &req.alive {
        server
            .receive_unmask(i, sites[usize::from(i)].unmask(&req).unwrap())
            .unwrap();
    }
    let sum = dp.decode_sum(&server.finish().unwrap()).unwrap();
    let err: Vec<f64> = sum
        .iter()
        .zip(&truth)
        .map(|(a, b)| f64::from(*a) - b)
        .collect();
    let sd = (err.iter().map(|e| e * e).sum::<f64>() / d as f64).sqrt();
    // 8 survivors each added 1/6 of the central variance (0.8²).
    let want = 0.8 * (8.0f64 / 6.0).sqrt();
    assert!((sd / want - 1.0).abs() < 0.05, "noise sd {sd}, want {want}");
}
