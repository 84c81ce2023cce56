//! Fixed point in the ring `Z_2^64`.
//!
//! An activation `x` is encoded as `x̃ = round(x · 2^f) mod 2^64` (two's complement in a
//! `u64`); a weight row `j` as `W̃ⱼ = round(Wⱼ · 2^f_wⱼ)` with the largest `f_wⱼ` that keeps
//! `|W̃ⱼₖ| ≤ 2^15 − 1` (so a 22-bit limb times a weight stays below `2^37`). A product sum
//! `Σₖ x̃ₖ W̃ⱼₖ + b̃ⱼ` is exact in the ring; it decodes to `yⱼ` at scale `2^(f + f_wⱼ)` as long
//! as its true value stays below `2^63` in magnitude, which [`safe_frac_bits`] guarantees a
//! priori from `max |x|`.

use crate::{HssError, Result};

/// Largest weight magnitude after quantization: `2^15 − 1`.
pub const MAX_WEIGHT: i64 = (1 << 15) - 1;
/// Largest weight scale exponent (rows of zeros get it).
pub const MAX_WEIGHT_FRAC: u32 = 40;
/// Largest input width of a linear map: the limb GEMMs are exact while `in · 2^37 < 2^53`.
pub const MAX_IN: usize = 1 << 15;
/// Headroom kept below `2^63` when choosing `f`.
const HEADROOM_BITS: i32 = 61;

/// `x̃ = round(x · 2^frac_bits)` as ring elements.
///
/// # Errors
/// [`HssError::Range`] for a NaN or infinite value, or one whose encoding exceeds `2^62`.
pub fn encode(x: &[f32], frac_bits: u32) -> Result<Vec<u64>> {
    let s = (frac_bits as f64).exp2();
    let limit = 2f64.powi(62);
    x.iter()
        .map(|&v| {
            let e = (f64::from(v) * s).round();
            if !e.is_finite() || e.abs() >= limit {
                return Err(HssError::Range(format!(
                    "activation {v} cannot be encoded at 2^{frac_bits}: use a smaller scale"
                )));
            }
            Ok(e as i64 as u64)
        })
        .collect()
}

/// Decode ring elements at scale `2^frac_bits`.
pub fn decode(y: u64, frac_bits: u32) -> f64 {
    (y as i64) as f64 / (frac_bits as f64).exp2()
}

/// A linear map `y = x·Wᵀ + b` in fixed point: `weight (out, in)` row-major `i16` with
/// `|W̃| ≤ 2^15 − 1`, one scale exponent per output row, and the bias kept in f64 (quantized at
/// `2^(f + f_wⱼ)` per request).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantLinear {
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
    /// `W̃`, `(out, in)` row-major.
    pub weight: Vec<i16>,
    /// `f_wⱼ` per output row.
    pub frac_bits: Vec<u32>,
    /// `b`, `(out,)`, if the map has one.
    pub bias: Option<Vec<f64>>,
}

/// The scale exponent of a weight row with largest magnitude `max_abs`: the largest
/// `f ≤ MAX_WEIGHT_FRAC` with `round(max_abs · 2^f) ≤ 2^15 − 1`.
///
/// # Errors
/// [`HssError::Range`] for a non-finite weight or one above `2^15 − 1`.
pub fn row_frac_bits(max_abs: f64) -> Result<u32> {
    if !max_abs.is_finite() || (max_abs).round() > MAX_WEIGHT as f64 {
        return Err(HssError::Range(format!(
            "weight magnitude {max_abs} cannot be held in 16 bits: rescale the model"
        )));
    }
    let mut f = 0;
    while f < MAX_WEIGHT_FRAC && (max_abs * ((f + 1) as f64).exp2()).round() <= MAX_WEIGHT as f64 {
        f += 1;
    }
    Ok(f)
}

impl QuantLinear {
    /// Quantize `weight (out, in)` row-major and `bias (out,)`.
    ///
    /// # Errors
    /// [`HssError::Invalid`] for inconsistent sizes or `in > 2^15`; [`HssError::Range`] for a
    /// non-finite or too large value.
    pub fn new(weight: &[f32], out: usize, inp: usize, bias: Option<&[f32]>) -> Result<Self> {
        if weight.len() != out * inp || out == 0 || inp == 0 {
            return Err(HssError::Invalid(format!(
                "a weight of {} values is not ({out}, {inp})",
                weight.len()
            )));
        }
        if inp > MAX_IN {
            return Err(HssError::Invalid(format!(
                "input width {inp} exceeds {MAX_IN}: the limb GEMMs would not be exact"
            )));
        }
        if let Some(b) = bias {
            if b.len() != out {
                return Err(HssError::Invalid(format!(
                    "a bias of {} values for {out} outputs",
                    b.len()
                )));
            }
            if let Some(v) = b.iter().find(|v| !v.is_finite()) {
                return Err(HssError::Range(format!("bias value {v} is not finite")));
            }
        }
        let mut q = Vec::with_capacity(out * inp);
        let mut frac_bits = Vec::with_capacity(out);
        for row in weight.chunks_exact(inp) {
            let max = row.iter().map(|v| f64::from(*v).abs()).fold(0.0, f64::max);
            if row.iter().any(|v| !v.is_finite()) {
                return Err(HssError::Range("a weight is not finite".into()));
            }
            let f = row_frac_bits(max)?;
            let s = (f as f64).exp2();
            // In range: `row_frac_bits` keeps `round(max · 2^f) ≤ 2^15 − 1`.
            q.extend(row.iter().map(|v| (f64::from(*v) * s).round() as i16));
            frac_bits.push(f);
        }
        Ok(Self {
            out,
            inp,
            weight: q,
            frac_bits,
            bias: bias.map(|b| b.iter().map(|v| f64::from(*v)).collect()),
        })
    }

    /// `b̃ⱼ = round(bⱼ · 2^(f + f_wⱼ))` (zeros without a bias).
    pub fn bias_words(&self, frac_bits: u32) -> Vec<u64> {
        match &self.bias {
            None => vec![0; self.out],
            Some(b) => b
                .iter()
                .zip(&self.frac_bits)
                .map(|(v, fw)| (v * ((frac_bits + fw) as f64).exp2()).round() as i64 as u64)
                .collect(),
        }
    }

    /// The largest activation scale `f ≤ wanted` for which every output of this map on inputs
    /// with `|x| ≤ max_abs_x` stays below `2^61` in the ring: `in · (|x|·2^f + ½) · (2^15 − 1)
    /// + |b|·2^(f + f_w) < 2^61`. `None` if not even `f = 0` fits.
    pub fn safe_frac_bits(&self, max_abs_x: f64, wanted: u32) -> Option<u32> {
        let max_bias = self.bias.as_ref().map_or(0.0, |b| {
            b.iter()
                .zip(&self.frac_bits)
                .map(|(v, fw)| v.abs() * (*fw as f64).exp2())
                .fold(0.0, f64::max)
        });
        let limit = 2f64.powi(HEADROOM_BITS);
        (0..=wanted).rev().find(|&f| {
            let s = (f as f64).exp2();
            self.inp as f64 * (max_abs_x * s + 0.5) * MAX_WEIGHT as f64 + max_bias * s < limit
        })
    }

    /// The bound on `|ŷⱼ − yⱼ|` of the fixed-point result against the exact `x·Wᵀ + b` in
    /// real arithmetic, for inputs with `Σₖ|xₖ| ≤ l1_x` and `|x| ≤ max_abs_x`, at scale
    /// `frac_bits`: `½·2^-f_wⱼ·Σ|xₖ| + ½·2^-f·Σₖ|W̃ⱼₖ|·2^-f_wⱼ (rounded weights) + 2^-(f+f_wⱼ)`
    /// (input rounding, weight rounding, bias rounding), maximised over rows.
    pub fn error_bound(&self, l1_x: f64, frac_bits: u32) -> f64 {
        self.weight
            .chunks_exact(self.inp)
            .zip(&self.frac_bits)
            .map(|(row, fw)| {
                let sw = (*fw as f64).exp2();
                let l1_w: f64 = row.iter().map(|v| (*v as f64).abs()).sum::<f64>() / sw;
                0.5 * l1_x / sw
                    + 0.5 * l1_w / (frac_bits as f64).exp2()
                    + 1.0 / ((frac_bits + fw) as f64).exp2()
            })
            .fold(0.0, f64::max)
    }

    /// `Y = X·W̃ᵀ + b̃` in the ring, element by element with `wrapping_mul` / `wrapping_add`:
    /// the reference the engines are checked against (slow).
    pub fn reference(&self, x: &[u64], rows: usize, bias_frac_bits: Option<u32>) -> Vec<u64> {
        let b = bias_frac_bits.map(|f| self.bias_words(f));
        let mut y = vec![0u64; rows * self.out];
        for r in 0..rows {
            let xr = &x[r * self.inp..(r + 1) * self.inp];
            for (j, wr) in self.weight.chunks_exact(self.inp).enumerate() {
                let mut acc = b.as_ref().map_or(0, |b| b[j]);
                for (xv, wv) in xr.iter().zip(wr) {
                    acc = acc.wrapping_add(xv.wrapping_mul(i64::from(*wv) as u64));
                }
                y[r * self.out + j] = acc;
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_negative_values() {
        let x = [0.0f32, 1.5, -2.25, 1e-6, -1234.5];
        let e = encode(&x, 20).unwrap();
        for (v, w) in x.iter().zip(&e) {
            assert!((decode(*w, 20) - f64::from(*v)).abs() <= 0.5 / (1u64 << 20) as f64);
        }
        assert!(encode(&[f32::NAN], 20).is_err());
        assert!(encode(&[1e30], 20).is_err());
    }

    #[test]
    fn weight_rows_use_their_own_scale_within_16_bits() {
        let w = [0.5f32, -0.25, 3.0, 0.001, 0.0, 0.0];
        let q = QuantLinear::new(&w, 3, 2, None).unwrap();
        assert_eq!(q.frac_bits[0], 15); // 0.5·2^16 = 32768 > 32767
        assert_eq!(q.frac_bits[2], MAX_WEIGHT_FRAC);
        assert!(q.weight.iter().all(|v| i64::from(v.abs()) <= MAX_WEIGHT));
        assert_eq!(q.weight[2], 3 * (1 << 13)); // 3·2^13 = 24576 ≤ 32767 < 3·2^14
        assert!(QuantLinear::new(&[1e6], 1, 1, None).is_err());
        assert!(QuantLinear::new(&[1.0, 2.0], 1, 3, None).is_err());
    }

    #[test]
    fn safe_scale_keeps_the_worst_case_below_2_61() {
        let q = QuantLinear::new(&vec![1.0; 1536], 1, 1536, Some(&[100.0])).unwrap();
        let f = q.safe_frac_bits(50.0, 40).unwrap();
        let worst = 1536.0 * (50.0 * (f as f64).exp2() + 0.5) * 32767.0;
        assert!(worst < 2f64.powi(61));
        assert!(f < 40);
        assert!(q.safe_frac_bits(1e30, 40).is_none());
    }
}
