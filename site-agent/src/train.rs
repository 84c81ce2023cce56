//! Local training and the site-level DP update.

use fedee_dp::noise::Sampler;
use fedee_dp::{ClippingNorm, NoiseMultiplier, add_gaussian_noise, clip_l2};
use fedee_encrypt::StateDict;
use fedee_model::{Mlp, OptimizerSpec};
use rand::Rng;
use rand::seq::SliceRandom;
use tch::{Device, Kind, Tensor};

use crate::SiteError;
use crate::table::Examples;

/// Examples as tensors on `device`: `x (n, features)` of `kind`, `y (n,)` int64.
pub fn to_tensors(ex: &Examples, features: usize, device: Device, kind: Kind) -> (Tensor, Tensor) {
    let x = Tensor::from_slice(&ex.x)
        .reshape([ex.len() as i64, features as i64])
        .to_kind(kind)
        .to_device(device);
    let y = Tensor::from_slice(&ex.y).to_device(device);
    (x, y)
}

/// Local training settings for one round.
#[derive(Debug, Clone, Copy)]
pub struct LocalTraining {
    /// Passes over the local training split.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Optimizer (fresh state every round).
    pub optimizer: OptimizerSpec,
}

/// Train `model` on `(x, y)` for the configured epochs with shuffled mini-batches drawn from
/// `rng`; returns the mean loss of the last epoch.
pub fn train_local<R: Rng + ?Sized>(
    model: &mut Mlp,
    x: &Tensor,
    y: &Tensor,
    cfg: &LocalTraining,
    proximal: Option<(&StateDict, f64)>,
    rng: &mut R,
) -> Result<f64, SiteError> {
    let n = y.size()[0] as usize;
    let mut opt = model.optimizer(&cfg.optimizer)?;
    let mut last = 0.0;
    for _ in 0..cfg.epochs {
        let mut idx: Vec<i64> = (0..n as i64).collect();
        idx.shuffle(rng);
        let (mut sum, mut batches) = (0.0, 0);
        for b in idx.chunks(cfg.batch_size.max(1) as usize) {
            let bi = Tensor::from_slice(b).to_device(x.device());
            let (xb, yb) = (x.index_select(0, &bi), y.index_select(0, &bi));
            sum += match proximal {
                Some((anchor, mu)) => model.train_step_proximal(&mut opt, &xb, &yb, anchor, mu),
                None => model.train_step(&mut opt, &xb, &yb),
            };
            batches += 1;
        }
        last = sum / f64::from(batches.max(1));
    }
    Ok(last)
}

/// The site's DP update: `Δ = local − global`, flattened in parameter-name order, clipped to
/// L2 norm `C` as a whole, plus `N(0, (σC)²)` per coordinate; returned as f32 tensors of the
/// global model's shapes, and the L2 norm before clipping.
///
/// # Security
/// Unit of privacy: the site's whole update in one round. Only this noised update leaves the
/// site.
pub fn dp_update<R: Rng + ?Sized>(
    local: &StateDict,
    global: &StateDict,
    c: ClippingNorm,
    sigma: NoiseMultiplier,
    sampler: Sampler,
    rng: &mut R,
) -> Result<(StateDict, f64), SiteError> {
    let mut flat: Vec<f32> = Vec::new();
    let mut shapes = Vec::new();
    for (name, g) in global {
        let d = (&local[name] - g)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .reshape([-1]);
        shapes.push((name.clone(), g.size()));
        flat.extend(Vec::<f32>::try_from(&d).expect("f32 tensor"));
    }
    let norm = clip_l2(&mut flat, c);
    add_gaussian_noise(&mut flat, c, sigma, sampler, rng)?;
    let mut out = StateDict::new();
    let mut off = 0usize;
    for (name, shape) in shapes {
        let n: i64 = shape.iter().product();
        out.insert(
            name,
            Tensor::from_slice(&flat[off..off + n as usize]).reshape(&shape),
        );
        off += n as usize;
    }
    Ok((out, norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn update_is_clipped_difference() {
        let mut g = StateDict::new();
        g.insert(
            "w".into(),
            Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
        );
        let mut l = StateDict::new();
        l.insert(
            "w".into(),
            Tensor::from_slice(&[3.0f32, 0.0, 0.0, 4.0]).reshape([2, 2]),
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let (u, norm) = dp_update(
            &l,
            &g,
            ClippingNorm::new(1.0).unwrap(),
            NoiseMultiplier::new(0.0).unwrap(),
            Sampler::Fast,
            &mut rng,
        )
        .unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let v = Vec::<f32>::try_from(u["w"].reshape([-1])).unwrap();
        assert!(
            (v[0] - 0.6).abs() < 1e-5 && (v[3] - 0.8).abs() < 1e-5,
            "{v:?}"
        );
        assert_eq!(u["w"].size(), vec![2, 2]);
    }
}
