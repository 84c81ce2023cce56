//! Exact share products with libtorch: `Y = X·W̃ᵀ` in `Z_2^64`.
//!
//! - [`Engine::Limbs`]: split each share word into limbs of 22, 22 and 20 bits (the top one
//!   signed), stack them as a `(3·rows, in)` f64 matrix and run one f64 GEMM against `W̃ᵀ`
//!   (`|W̃| < 2^15`). Every partial sum is an integer below `in · 2^37 < 2^53`, so the GEMM is
//!   exact; the client-independent recombination `G₀ + G₁·2^22 + G₂·2^44 mod 2^64` runs here in
//!   Rust. Runs on any libtorch device (CUDA included: int64 matmul is not implemented there,
//!   pytorch#44428). The limb idea follows CrypTen's `cuda_tensor.py`, simplified because
//!   the weights are public to the server and small.
//! - [`Engine::Int64`]: one int64 `matmul` on the CPU (libtorch's integer GEMM wraps
//!   modulo 2^64; checked bit for bit against `wrapping_mul` / `wrapping_add` in the tests).
//!   For at most [`SMALL_ROWS`] rows (a decode step, a small batch) it runs [`ring_product`]
//!   instead: the weights read as `i16` (they fit: `|W̃| ≤ 2^15 − 1`), a quarter of int64's
//!   bytes, which is what bounds a matrix–vector product.

use tch::{Device, Kind, Tensor};

use crate::ring::QuantLinear;
use crate::{HssError, Result};

const LIMB: u32 = 22;
const LIMB_MASK: u64 = (1 << LIMB) - 1;

/// Up to this many rows [`Engine::Int64`] multiplies with [`ring_product`] (memory-bound:
/// each weight row is read once and used for every input row); beyond, libtorch's int64 GEMM.
pub const SMALL_ROWS: usize = 16;

/// `Σₖ x[k]·w[k]` in `Z_2^64`, `w` sign-extended. Written so that the compiler vectorizes it
/// (16 independent lanes); [`ring_product`] compiles it for the CPU's vector extensions.
#[inline(always)]
fn dot_ring(x: &[u64], w: &[i16]) -> u64 {
    const L: usize = 16;
    let mut acc = [0u64; L];
    let (xc, wc) = (x.chunks_exact(L), w.chunks_exact(L));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..L {
            acc[i] = acc[i].wrapping_add(a[i].wrapping_mul(b[i] as i64 as u64));
        }
    }
    let mut s = acc.iter().fold(0u64, |s, v| s.wrapping_add(*v));
    for (a, b) in xr.iter().zip(wr) {
        s = s.wrapping_add(a.wrapping_mul(*b as i64 as u64));
    }
    s
}

#[inline(always)]
fn ring_product_generic(x: &[u64], rows: usize, w: &[i16], out: usize, y: &mut [u64]) {
    let inp = x.len() / rows.max(1);
    for (j, wj) in w.chunks_exact(inp).enumerate().take(out) {
        for r in 0..rows {
            y[r * out + j] = dot_ring(&x[r * inp..(r + 1) * inp], wj);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
fn ring_product_avx512(x: &[u64], rows: usize, w: &[i16], out: usize, y: &mut [u64]) {
    ring_product_generic(x, rows, w, out, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn ring_product_avx2(x: &[u64], rows: usize, w: &[i16], out: usize, y: &mut [u64]) {
    ring_product_generic(x, rows, w, out, y);
}

/// `X·W̃ᵀ` in `Z_2^64` for `x (rows, in)` share words and `w (out, in)` 16-bit weights, both
/// row-major: `(rows, out)` row-major words, exact (wrapping). Each weight row is read once,
/// in a loop the compiler vectorizes with AVX-512 (64-bit lane products) or AVX2 when the
/// CPU has them (checked at run time), else the baseline instructions.
///
/// # Panics
/// If `x` is not `rows × in` words or `w` is not `out × in`.
pub fn ring_product(x: &[u64], rows: usize, w: &[i16], out: usize) -> Vec<u64> {
    assert!(
        rows > 0 && x.len().is_multiple_of(rows),
        "x is not {rows} rows"
    );
    assert_eq!(w.len(), out * (x.len() / rows), "w is not ({out}, in)");
    let mut y = vec![0u64; rows * out];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512dq") && is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            unsafe { ring_product_avx512(x, rows, w, out, &mut y) };
            return y;
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            unsafe { ring_product_avx2(x, rows, w, out, &mut y) };
            return y;
        }
    }
    ring_product_generic(x, rows, w, out, &mut y);
    y
}

/// How a server multiplies shares by its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Three f64 GEMMs' worth (one stacked GEMM) on this device.
    Limbs(Device),
    /// int64 matmul on the CPU ([`ring_product`] for at most [`SMALL_ROWS`] rows).
    Int64,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "limbs" | "limbs-cpu" => Ok(Self::Limbs(Device::Cpu)),
            "limbs-cuda" => Ok(Self::Limbs(Device::Cuda(0))),
            "int64" => Ok(Self::Int64),
            _ => Err(format!(
                "unknown engine `{s}`: use limbs (f64 GEMMs, CPU), limbs-cuda, or int64 (CPU)"
            )),
        }
    }
}

impl Engine {
    /// Whether `rows` rows go through [`ring_product`] rather than a GEMM.
    pub fn small(&self, rows: usize) -> bool {
        *self == Engine::Int64 && rows <= SMALL_ROWS
    }

    /// `W̃ᵀ (in, out)` as this engine multiplies it: f64 on its device, or int64 on the CPU.
    pub fn weights(&self, map: &QuantLinear) -> Tensor {
        let w = Tensor::from_slice(&map.weight)
            .to_kind(Kind::Int64)
            .view([map.out as i64, map.inp as i64]);
        match self {
            Engine::Limbs(dev) => w.to_kind(Kind::Double).tr().contiguous().to_device(*dev),
            Engine::Int64 => w.tr().contiguous(),
        }
    }

    /// A share `x (rows, cols)` as this engine multiplies it: its three limbs stacked,
    /// `(3·rows, cols)` f64 on the device, or `(rows, cols)` int64.
    ///
    /// # Errors
    /// [`HssError::Invalid`] if `x` is not `rows × cols` words.
    pub fn input(&self, x: &[u64], rows: usize, cols: usize) -> Result<Tensor> {
        if x.len() != rows * cols {
            return Err(HssError::Invalid(format!(
                "a share of {} words is not ({rows}, {cols})",
                x.len()
            )));
        }
        Ok(match self {
            Engine::Limbs(dev) => {
                let len = x.len();
                let mut limbs = vec![0f64; 3 * len];
                let (l0, rest) = limbs.split_at_mut(len);
                let (l1, l2) = rest.split_at_mut(len);
                for (i, &v) in x.iter().enumerate() {
                    l0[i] = (v & LIMB_MASK) as f64;
                    l1[i] = ((v >> LIMB) & LIMB_MASK) as f64;
                    l2[i] = ((v as i64) >> (2 * LIMB)) as f64;
                }
                Tensor::from_slice(&limbs)
                    .view([3 * rows as i64, cols as i64])
                    .to_device(*dev)
            }
            Engine::Int64 => {
                let xs: Vec<i64> = x.iter().map(|v| *v as i64).collect();
                Tensor::from_slice(&xs).view([rows as i64, cols as i64])
            }
        })
    }

    /// `X·W̃ᵀ` in the ring for an [`Engine::input`] of `rows` rows and [`Engine::weights`]
    /// (possibly several maps' concatenated): `(rows, out)` row-major words.
    ///
    /// # Errors
    /// libtorch errors.
    pub fn product(&self, input: &Tensor, w_t: &Tensor, rows: usize) -> Result<Vec<u64>> {
        let g = input.f_matmul(w_t)?.to_device(Device::Cpu);
        Ok(match self {
            Engine::Limbs(_) => {
                let g = Vec::<f64>::try_from(g.view([-1]))?;
                let len = g.len() / 3;
                debug_assert_eq!(len % rows.max(1), 0);
                (0..len)
                    .map(|i| {
                        let (a, b, c) = (
                            g[i] as i64 as u64,
                            g[len + i] as i64 as u64,
                            g[2 * len + i] as i64 as u64,
                        );
                        a.wrapping_add(b << LIMB).wrapping_add(c << (2 * LIMB))
                    })
                    .collect()
            }
            Engine::Int64 => Vec::<i64>::try_from(g.view([-1]))?
                .into_iter()
                .map(|v| v as u64)
                .collect(),
        })
    }
}

/// A linear map's weights as the engine multiplies them: `W̃ᵀ (in, out)` in f64 on the
/// engine's device, or int64 on the CPU.
pub struct Prepared {
    /// The quantized map.
    pub map: QuantLinear,
    /// `W̃ᵀ` as [`Engine::weights`] made it.
    pub w_t: Tensor,
    engine: Engine,
}

impl Prepared {
    /// Move `map`'s weights to where `engine` multiplies them.
    pub fn new(map: QuantLinear, engine: Engine) -> Self {
        let w_t = engine.weights(&map);
        Self { map, w_t, engine }
    }

    /// `X·W̃ᵀ` without the bias, `(rows, out)` row-major, for an `x` already checked to be
    /// `rows × in` words.
    pub(crate) fn product(&self, x: &[u64], rows: usize) -> Result<Vec<u64>> {
        if self.engine.small(rows) {
            return Ok(ring_product(x, rows, &self.map.weight, self.map.out));
        }
        let input = self.engine.input(x, rows, self.map.inp)?;
        self.engine.product(&input, &self.w_t, rows)
    }

    /// `X·W̃ᵀ` (+ `b̃` at scale `2^(f + f_w)` when `bias_frac_bits` is given) for `x (rows,
    /// in)` row-major ring words: `(rows, out)` row-major.
    ///
    /// # Errors
    /// [`HssError::Invalid`] if `x` is not `rows × in` words; libtorch errors.
    pub fn apply(&self, x: &[u64], rows: usize, bias_frac_bits: Option<u32>) -> Result<Vec<u64>> {
        if x.len() != rows * self.map.inp {
            return Err(HssError::Invalid(format!(
                "a share of {} words is not ({rows}, {})",
                x.len(),
                self.map.inp
            )));
        }
        let mut y = self.product(x, rows)?;
        if let Some(f) = bias_frac_bits {
            add_bias(&mut y, &self.map.bias_words(f));
        }
        Ok(y)
    }
}

/// `y (rows, out) += b̃` row by row, wrapping.
pub fn add_bias(y: &mut [u64], b: &[u64]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut()
            .zip(b)
            .for_each(|(v, b)| *v = v.wrapping_add(*b));
    }
}
