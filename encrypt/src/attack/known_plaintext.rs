//! Known-plaintext attacks on tabular inputs `x' = T x + δ` (SECURITY.md, "Measured attacks"): an
//! attacker who knows `k` plaintext rows of encrypted inputs it saw (e.g. a few patients it
//! can identify, or published records) recovers the key.
//!
//! Two attackers:
//! - **generic**: least squares on `[x 1]`, `[Tᵀ; δᵀ] = pinv([X 1]) X'`, the minimum-norm
//!   solution when `k ≤ d`; exact from `k = d + 1` pairs in general position (any group);
//! - **structured**: knows the key is index-based (permutation, signed permutation,
//!   monomial) and matches each ciphertext coordinate to the plaintext coordinate that
//!   explains it best (a value copy, a signed copy, or a positive multiple); exact for
//!   (signed) permutations from one row with distinct absolute values.
//!
//! Tensors: `x`, `y` are `(k, d)` f64 on the CPU; keys `(d, d)` with `x' = T x + δ` per row.

use tch::{Kind, Tensor};

use crate::KeyGroup;

/// A recovered key: `T̂ (d, d)` and `δ̂ (d,)`, f64.
#[derive(Debug)]
pub struct Recovered {
    /// The key matrix estimate.
    pub t: Tensor,
    /// The offset estimate.
    pub delta: Tensor,
}

/// Least squares on `[x 1]` (module docs): the generic attacker.
pub fn generic(x: &Tensor, y: &Tensor) -> Recovered {
    let (k, d) = (x.size()[0], x.size()[1]);
    let ones = Tensor::ones([k, 1], (Kind::Double, x.device()));
    let xa = Tensor::cat(&[x.shallow_clone(), ones], 1);
    let a = xa.linalg_pinv(1e-10, false).matmul(y); // (d + 1, d)
    Recovered {
        t: a.narrow(0, 0, d).tr(),
        delta: a.get(d),
    }
}

/// The structured attacker for index-based key groups (module docs); `δ = 0` assumed, as the
/// trainable keys have no offset.
pub fn structured(x: &Tensor, y: &Tensor, group: KeyGroup) -> Recovered {
    let d = x.size()[1];
    // Per ciphertext coordinate i and plaintext coordinate j, the best scale c and residual.
    // x: (k, d) → xj (k, 1, d); y: (k, d) → yi (k, d, 1).
    let xj = x.unsqueeze(1);
    let yi = y.unsqueeze(2);
    let xx = (&xj * &xj).sum_dim_intlist(0, false, Kind::Double); // (1, d)
    let xy = (&xj * &yi).sum_dim_intlist(0, false, Kind::Double); // (d, d)
    let scale = match group {
        KeyGroup::Permutation => Tensor::ones([d, d], (Kind::Double, x.device())),
        KeyGroup::SignedPermutation => xy.sign(),
        _ => (&xy / xx.clamp_min(1e-300)).clamp_min(0.0),
    };
    let resid = (&yi - &xj * scale.unsqueeze(0))
        .square()
        .sum_dim_intlist(0, false, Kind::Double); // (d, d)
    let j = resid.argmin(1, false); // (d,)
    let rows = Tensor::arange(d, (Kind::Int64, x.device()));
    let t = Tensor::zeros([d, d], (Kind::Double, x.device()));
    let vals = scale.index(&[Some(&rows), Some(&j)]);
    let t = t.index_put(&[Some(rows), Some(j)], &vals, false);
    Recovered {
        t,
        delta: Tensor::zeros([d], (Kind::Double, x.device())),
    }
}

/// How well a recovered key decrypts: the relative Frobenius error of `T̂` against `T`, and
/// the relative error of plaintext rows recovered from held-out ciphertext rows
/// (`x̂ = pinv(T̂)(x' − δ̂)`), both in `[0, ∞)`, 0 = exact.
pub fn errors(rec: &Recovered, t: &Tensor, x_test: &Tensor, y_test: &Tensor) -> (f64, f64) {
    let key_err = (&rec.t - t).norm().double_value(&[]) / t.norm().double_value(&[]);
    let x_hat = (y_test - &rec.delta).matmul(&rec.t.linalg_pinv(1e-10, false).tr());
    let data_err = (&x_hat - x_test).norm().double_value(&[]) / x_test.norm().double_value(&[]);
    (key_err, data_err)
}
