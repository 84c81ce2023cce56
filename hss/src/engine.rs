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

use tch::{Device, Kind, Tensor};

use crate::ring::QuantLinear;
use crate::{HssError, Result};

const LIMB: u32 = 22;
const LIMB_MASK: u64 = (1 << LIMB) - 1;

/// How a server multiplies shares by its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Three f64 GEMMs' worth (one stacked GEMM) on this device.
    Limbs(Device),
    /// int64 matmul on the CPU.
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
    /// `W̃ᵀ (in, out)` as this engine multiplies it: f64 on its device, or int64 on the CPU.
    pub fn weights(&self, map: &QuantLinear) -> Tensor {
        let w = Tensor::from_slice(&map.weight).view([map.out as i64, map.inp as i64]);
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

    /// `X·W̃ᵀ` (+ `b̃` at scale `2^(f + f_w)` when `bias_frac_bits` is given) for `x (rows,
    /// in)` row-major ring words: `(rows, out)` row-major.
    ///
    /// # Errors
    /// [`HssError::Invalid`] if `x` is not `rows × in` words; libtorch errors.
    pub fn apply(&self, x: &[u64], rows: usize, bias_frac_bits: Option<u32>) -> Result<Vec<u64>> {
        let input = self.engine.input(x, rows, self.map.inp)?;
        let mut y = self.engine.product(&input, &self.w_t, rows)?;
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
