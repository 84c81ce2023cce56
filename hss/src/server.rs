//! One HSS server: the EE model's linear maps in fixed point, and the one operation it offers.
//!
//! The server is architecture-agnostic: it holds named linear maps (`NAME.weight (out, in)`,
//! optional `NAME.bias (out,)`) and answers [`LinearRequest`]s. It sees a seed or a share
//! word matrix, the names and shapes of the maps asked for, and the activation scale; never a
//! key or an activation.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use tch::{Kind, Tensor};

use crate::engine::{Engine, Prepared, add_bias};
use crate::ring::QuantLinear;
use crate::share::{Seed, expand};
use crate::{HssError, Result};

/// Most share words one request may carry (32 Mi words, 256 MiB).
pub const MAX_SHARE_WORDS: usize = 1 << 25;
/// Largest activation scale exponent a request may ask for.
pub const MAX_FRAC_BITS: u32 = 40;

/// One server's share of a matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// Server 0: expand `X₀ = ChaCha20(seed)`; this server also adds the bias.
    Seed(Seed),
    /// Server 1: `X₁ = x̃ − X₀`, row-major.
    Words(Vec<u64>),
}

/// Apply the maps `maps` (all with input width `cols`) to a `(rows, cols)` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearRequest {
    /// Names of the linear maps (prefixes of `NAME.weight`).
    pub maps: Vec<String>,
    /// Rows of the shared matrix (tokens × batch).
    pub rows: usize,
    /// Its columns (the maps' input width).
    pub cols: usize,
    /// Activation scale exponent `f` (for the bias at server 0).
    pub frac_bits: u32,
    /// The share.
    pub share: Share,
}

/// The quantized linear maps of an EE model, ready to multiply shares.
pub struct HssModel {
    maps: BTreeMap<String, Prepared>,
    engine: Engine,
    /// Concatenated `W̃ᵀ` of map groups asked for together (e.g. Q/K/V): one GEMM per request.
    fused: RefCell<HashMap<Vec<String>, Tensor>>,
}

impl HssModel {
    /// Quantize the linear maps of `state`: every 2-D `NAME.weight` with its `NAME.bias` if
    /// present (f32 or f64).
    ///
    /// # Errors
    /// [`HssError::Invalid`] for a tensor that belongs to no linear map, a bias of the wrong
    /// shape, or no map at all; [`HssError::Range`] for weights that 16 bits cannot hold.
    pub fn from_state(state: &BTreeMap<String, Tensor>, engine: Engine) -> Result<Self> {
        Ok(Self {
            maps: quantize_state(state)?
                .into_iter()
                .map(|(n, q)| (n, Prepared::new(q, engine)))
                .collect(),
            engine,
            fused: RefCell::default(),
        })
    }

    /// Each map's per-row weight scale exponents, by name (what the client checks against its
    /// own quantization).
    pub fn weight_frac_bits(&self) -> BTreeMap<String, Vec<u32>> {
        self.maps
            .iter()
            .map(|(n, p)| (n.clone(), p.map.frac_bits.clone()))
            .collect()
    }

    /// Number of maps and of weights.
    pub fn size(&self) -> (usize, usize) {
        (
            self.maps.len(),
            self.maps.values().map(|p| p.map.out * p.map.inp).sum(),
        )
    }

    /// `Yᵢ = Xᵢ·W̃ᵀ` for each requested map (`+ b̃` when the share is a seed): one `(rows,
    /// out)` row-major word matrix per map, in request order.
    ///
    /// # Errors
    /// [`HssError::Invalid`] naming an unknown map, a width mismatch, a share of the wrong
    /// length, too many words, or a scale above [`MAX_FRAC_BITS`].
    pub fn linear(&self, req: &LinearRequest) -> Result<Vec<Vec<u64>>> {
        if req.maps.is_empty() {
            return Err(HssError::Invalid("a request names no linear map".into()));
        }
        if req.frac_bits > MAX_FRAC_BITS {
            return Err(HssError::Invalid(format!(
                "activation scale 2^{} exceeds 2^{MAX_FRAC_BITS}",
                req.frac_bits
            )));
        }
        let words = req
            .rows
            .checked_mul(req.cols)
            .filter(|w| *w > 0 && *w <= MAX_SHARE_WORDS)
            .ok_or_else(|| {
                HssError::Invalid(format!(
                    "a ({}, {}) share is empty or exceeds {MAX_SHARE_WORDS} words: send smaller batches",
                    req.rows, req.cols
                ))
            })?;
        let maps = req
            .maps
            .iter()
            .map(|n| {
                let p = self.maps.get(n).ok_or_else(|| {
                    HssError::Invalid(format!(
                        "no linear map `{n}` on this server: load the model that names it"
                    ))
                })?;
                if p.map.inp != req.cols {
                    return Err(HssError::Invalid(format!(
                        "map `{n}` takes {} inputs, the share has {} columns",
                        p.map.inp, req.cols
                    )));
                }
                Ok(p)
            })
            .collect::<Result<Vec<_>>>()?;
        let (x, bias) = match &req.share {
            Share::Seed(seed) => (
                std::borrow::Cow::Owned(expand(seed, words)),
                Some(req.frac_bits),
            ),
            Share::Words(w) if w.len() == words => (std::borrow::Cow::Borrowed(w), None),
            Share::Words(w) => {
                return Err(HssError::Invalid(format!(
                    "a share of {} words for a ({}, {}) matrix",
                    w.len(),
                    req.rows,
                    req.cols
                )));
            }
        };
        // One product per map for a single map or a few rows (memory-bound: each weight read
        // once), else one GEMM over the maps' concatenated weights, split per map.
        let mut out: Vec<Vec<u64>> = if maps.len() == 1 || self.engine.small(req.rows) {
            maps.iter()
                .map(|p| p.product(&x, req.rows))
                .collect::<Result<_>>()?
        } else {
            let input = self.engine.input(&x, req.rows, req.cols)?;
            let mut fused = self.fused.borrow_mut();
            let w = fused.entry(req.maps.clone()).or_insert_with(|| {
                Tensor::cat(
                    &maps
                        .iter()
                        .map(|p| p.w_t.shallow_clone())
                        .collect::<Vec<_>>(),
                    1,
                )
            });
            let y = self.engine.product(&input, w, req.rows)?;
            let total: usize = maps.iter().map(|p| p.map.out).sum();
            let mut start = 0;
            maps.iter()
                .map(|p| {
                    let n = p.map.out;
                    let yi = (0..req.rows)
                        .flat_map(|r| &y[r * total + start..r * total + start + n])
                        .copied()
                        .collect();
                    start += n;
                    yi
                })
                .collect()
        };
        // Server 0 adds each map's bias.
        if let Some(f) = bias {
            for (yi, p) in out.iter_mut().zip(&maps) {
                add_bias(yi, &p.map.bias_words(f));
            }
        }
        Ok(out)
    }
}

/// The linear maps of a state dict, quantized (what server and client both compute).
///
/// # Errors
/// As [`HssModel::from_state`].
pub fn quantize_state(state: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, QuantLinear>> {
    let mut out = BTreeMap::new();
    for (name, t) in state {
        if let Some(prefix) = name.strip_suffix(".bias") {
            if !state.contains_key(&format!("{prefix}.weight")) {
                return Err(HssError::Invalid(format!(
                    "`{name}` has no `{prefix}.weight`: send linear maps only"
                )));
            }
            continue;
        }
        let Some(prefix) = name.strip_suffix(".weight") else {
            return Err(HssError::Invalid(format!(
                "`{name}` is not a linear map's weight or bias: send linear maps only"
            )));
        };
        let size = t.size();
        let [o, i] = size[..] else {
            return Err(HssError::Invalid(format!(
                "`{name}` has shape {size:?}, not (out, in)"
            )));
        };
        let w = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))?;
        let b = match state.get(&format!("{prefix}.bias")) {
            Some(b) if b.size() == [o] => {
                Some(Vec::<f32>::try_from(b.to_kind(Kind::Float).contiguous())?)
            }
            Some(b) => {
                return Err(HssError::Invalid(format!(
                    "`{prefix}.bias` has shape {:?}, not ({o},)",
                    b.size()
                )));
            }
            None => None,
        };
        let q = QuantLinear::new(&w, o as usize, i as usize, b.as_deref())
            .map_err(|e| HssError::Invalid(format!("`{name}`: {e}")))?;
        out.insert(prefix.to_owned(), q);
    }
    if out.is_empty() {
        return Err(HssError::Invalid("the model has no linear map".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> HssModel {
        let mut s = BTreeMap::new();
        s.insert(
            "a.weight".to_owned(),
            Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3]),
        );
        s.insert("a.bias".to_owned(), Tensor::from_slice(&[0.5f32, -0.5]));
        s.insert(
            "b.weight".to_owned(),
            Tensor::from_slice(&[1f32, 0., 0.]).view([1, 3]),
        );
        HssModel::from_state(&s, Engine::Int64).unwrap()
    }

    fn req(maps: &[&str], rows: usize, cols: usize, share: Share) -> LinearRequest {
        LinearRequest {
            maps: maps.iter().map(|m| (*m).to_owned()).collect(),
            rows,
            cols,
            frac_bits: 16,
            share,
        }
    }

    /// Hostile requests are refused with an error naming the problem; the model still
    /// answers a good request afterwards.
    #[test]
    fn hostile_requests_are_refused() {
        let m = model();
        let bad = [
            (req(&[], 1, 3, Share::Seed([0; 32])), "names no linear map"),
            (req(&["c"], 1, 3, Share::Seed([0; 32])), "no linear map `c`"),
            (
                req(&["a"], 1, 2, Share::Words(vec![0; 2])),
                "takes 3 inputs",
            ),
            (
                req(&["a"], 2, 3, Share::Words(vec![0; 5])),
                "a share of 5 words",
            ),
            (req(&["a"], 0, 3, Share::Words(vec![])), "empty or exceeds"),
            (
                req(&["a"], usize::MAX, 3, Share::Seed([0; 32])),
                "empty or exceeds",
            ),
        ];
        for (r, want) in bad {
            let e = m.linear(&r).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut r = req(&["a"], 1, 3, Share::Seed([0; 32]));
        r.frac_bits = 64;
        assert!(
            m.linear(&r)
                .unwrap_err()
                .to_string()
                .contains("exceeds 2^40")
        );
        // Fused and single answers agree.
        let x = vec![1u64 << 16, 2 << 16, 3 << 16];
        let both = m
            .linear(&req(&["a", "b"], 1, 3, Share::Words(x.clone())))
            .unwrap();
        assert_eq!(
            both[0],
            m.linear(&req(&["a"], 1, 3, Share::Words(x.clone())))
                .unwrap()[0]
        );
        assert_eq!(
            both[1],
            m.linear(&req(&["b"], 1, 3, Share::Words(x))).unwrap()[0]
        );
    }

    #[test]
    fn states_that_are_not_linear_maps_are_refused() {
        let mut s = BTreeMap::new();
        s.insert(
            "e.table".to_owned(),
            Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)),
        );
        assert!(
            quantize_state(&s)
                .unwrap_err()
                .to_string()
                .contains("not a linear map")
        );
        let mut s = BTreeMap::new();
        s.insert(
            "a.weight".to_owned(),
            Tensor::zeros([2, 2, 2], (Kind::Float, tch::Device::Cpu)),
        );
        assert!(
            quantize_state(&s)
                .unwrap_err()
                .to_string()
                .contains("not (out, in)")
        );
        let mut s = BTreeMap::new();
        s.insert(
            "a.weight".to_owned(),
            Tensor::from_slice(&[f32::NAN, 1.0]).view([1, 2]),
        );
        assert!(quantize_state(&s).is_err());
        assert!(quantize_state(&BTreeMap::new()).is_err());
    }
}
