//! Fixed-point encoding of clipped updates in `Z_2^32`, so that the masked sum is exact
//! integer arithmetic and cannot wrap.
//!
//! A site with update `x` (f32, L2 norm at most the clipping norm `C`, so every coordinate is
//! in `[−C, C]`) and weight `w = num_examples ≤ W` sends
//! `[round_s(scale · (w/W) · x_i) for each i] ‖ [w]`, where `round_s` is unbiased stochastic
//! rounding. The scale is the largest with `n · (scale · C + 1) < 2^31`, so the signed sum of
//! `n` sites stays inside `i32`; the weights' sum `n · W` must stay below `2^32`. The server
//! divides the unmasked sum by `scale · Σw / W`: FedAvg weighted by `num_examples`, with an
//! error of at most `n / scale` per coordinate before the division (each rounding moves a
//! value by less than one step).

use crate::{Error, Result};
use rand_core::Rng;

/// The encoding of one round (public: every site and the server use the same).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantizer {
    /// Steps per unit of update value.
    pub scale: f64,
    /// The clipping norm `C` the sites apply (largest coordinate magnitude).
    pub clip: f64,
    /// The largest weight (`num_examples`) a site may send, `W`.
    pub max_weight: u32,
}

impl Quantizer {
    /// The encoding for `sites` sites with clipping norm `clip` and weights up to
    /// `max_weight`.
    ///
    /// # Errors
    /// [`Error::Params`] when `clip` is not positive and finite, or `sites · max_weight`
    /// does not fit in 32 bits.
    pub fn new(sites: usize, clip: f64, max_weight: u32) -> Result<Self> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::Params(format!(
                "clipping norm {clip}: use a positive number"
            )));
        }
        if sites == 0 || (sites as u64) * u64::from(max_weight) > u64::from(u32::MAX) {
            return Err(Error::Params(format!(
                "{sites} sites × max weight {max_weight} exceeds 2^32: lower --max-weight to at most {}",
                u32::MAX as usize / sites.max(1)
            )));
        }
        let scale = ((i32::MAX as f64) / sites as f64 - 1.0) / clip;
        if scale < 1.0 {
            return Err(Error::Params(format!(
                "clipping norm {clip} with {sites} sites leaves less than one step per unit"
            )));
        }
        Ok(Self {
            scale: scale.floor(),
            clip,
            max_weight,
        })
    }

    /// `[round(scale · (w/W) · x_i)] ‖ [w]` as `u32` words (two's complement).
    ///
    /// # Errors
    /// [`Error::Input`] naming the first coordinate that is not finite or lies outside
    /// `[−C, C]` (clip the update first), or a weight above `W`.
    pub fn encode(&self, x: &[f32], weight: u32, rng: &mut impl Rng) -> Result<Vec<u32>> {
        if weight > self.max_weight {
            return Err(Error::Input(format!(
                "num_examples {weight} exceeds the round's max weight {}",
                self.max_weight
            )));
        }
        let f = self.scale * f64::from(weight) / f64::from(self.max_weight);
        let mut out = Vec::with_capacity(x.len() + 1);
        for (i, &xi) in x.iter().enumerate() {
            let v = f64::from(xi);
            if !v.is_finite() || v.abs() > self.clip {
                return Err(Error::Input(format!(
                    "update[{i}] = {xi} is outside ±{} (clip the update before encoding)",
                    self.clip
                )));
            }
            let y = v * f;
            let lo = y.floor();
            // P(round up) = y − ⌊y⌋: unbiased.
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let q = if u < y - lo { lo + 1.0 } else { lo };
            out.push(q as i64 as i32 as u32);
        }
        out.push(weight);
        Ok(out)
    }

    /// The weighted mean from an unmasked sum of [`Quantizer::encode`] outputs, and the total
    /// weight (`Σ num_examples`).
    ///
    /// # Errors
    /// [`Error::Input`] when the total weight is zero or the vector is empty.
    pub fn decode_mean(&self, sum: &[u32]) -> Result<(Vec<f32>, u64)> {
        let (&w, body) = sum
            .split_last()
            .ok_or_else(|| Error::Input("an empty sum".into()))?;
        if w == 0 {
            return Err(Error::Input(
                "the sites' total weight (num_examples) is zero".into(),
            ));
        }
        let d = self.scale * f64::from(w) / f64::from(self.max_weight);
        Ok((
            body.iter()
                .map(|&q| (f64::from(q as i32) / d) as f32)
                .collect(),
            u64::from(w),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn weighted_mean_within_the_rounding_bound() {
        let n = 100;
        let q = Quantizer::new(n, 1.0, 1 << 20).unwrap();
        assert!((n as f64) * (q.scale * q.clip + 1.0) < 2f64.powi(31));
        let mut rng = chacha20::ChaCha20Rng::seed_from_u64(1);
        let mut sum = vec![0u32; 4];
        let (mut num, mut den) = (vec![0f64; 3], 0f64);
        for s in 0..n {
            let x = [1.0f32, -1.0, (s as f32 / 50.0) - 1.0];
            let w = 1 + (s as u32 * 997) % 5000;
            for (a, b) in sum.iter_mut().zip(q.encode(&x, w, &mut rng).unwrap()) {
                *a = a.wrapping_add(b);
            }
            for i in 0..3 {
                num[i] += f64::from(w) * f64::from(x[i]);
            }
            den += f64::from(w);
        }
        let (mean, total) = q.decode_mean(&sum).unwrap();
        assert_eq!(total as f64, den);
        let bound = n as f64 / (q.scale * den / f64::from(q.max_weight));
        for i in 0..3 {
            let err = (f64::from(mean[i]) - num[i] / den).abs();
            assert!(err <= bound + 1e-6, "coordinate {i}: error {err} > {bound}");
        }
    }

    #[test]
    fn refuses_unclipped_and_nan() {
        let q = Quantizer::new(3, 0.5, 100).unwrap();
        let mut rng = chacha20::ChaCha20Rng::seed_from_u64(1);
        let e = q.encode(&[0.1, 0.7], 1, &mut rng).unwrap_err().to_string();
        assert!(e.contains("update[1] = 0.7"), "{e}");
        let e = q.encode(&[f32::NAN], 1, &mut rng).unwrap_err().to_string();
        assert!(e.contains("update[0] = NaN"), "{e}");
        assert!(q.encode(&[0.1], 101, &mut rng).is_err());
        assert!(Quantizer::new(300, 1.0, u32::MAX / 100).is_err());
    }
}
