//! Key recovery by matching an EE model against public plaintext weights or activations
//! (SECURITY.md, "Measured attacks": weight matching, activation statistics).
//!
//! A permutation key leaves every value of a parameter in place up to index order, so the
//! server compares index-order-free descriptions of each channel with the public model's:
//! - **residual channels**: channel `c` of every LayerNorm `γ`, `β` of a post-LN BERT (26
//!   numbers in MiniLM) — assigned by the Hungarian algorithm (Kuhn 1955; `pathfinding`'s
//!   `kuhn_munkres`) on negative squared distances;
//! - **rows** (vocabulary, FFN units, attention units): once the residual key is known the
//!   columns are put back in public order and each EE row is matched to its nearest public row
//!   in L2;
//! - **dense keys** (the inference profile's invertible attention keys): no index order to
//!   match; one least-squares solve against the public weight ([`solve_key`]);
//! - **vocabulary without the residual key** (the causal LM): each embedding row described
//!   by something the residual key does not change — its largest absolute values for a
//!   (signed) permutation ([`sorted_abs_rows`]), its largest inner products with all rows for
//!   an orthogonal key ([`gram_profile`]) — and matched to the nearest public description;
//! - **activations**: per-channel mean and standard deviation of hidden states over the
//!   tokens observed, at every layer, z-scored, then Hungarian as above.
//!
//! Tensors: f32 or f64, CPU; results are index maps `ee index → public index`.

use pathfinding::prelude::{Matrix, kuhn_munkres};
use tch::{Kind, Tensor};

use crate::StateDict;

/// Maximum-weight assignment of rows to columns of a square `sim (n, n)`: `out[i]` is the
/// column of row `i`. Similarities are quantised to 10⁹ levels (the algorithm needs integers).
pub fn hungarian(sim: &Tensor) -> Vec<usize> {
    let n = sim.size()[0] as usize;
    let s = sim.to_kind(Kind::Double).contiguous();
    let (lo, hi) = (s.min().double_value(&[]), s.max().double_value(&[]));
    let span = (hi - lo).max(1e-300);
    let v: Vec<f64> = Vec::try_from(s.reshape([-1])).expect("f64 tensor");
    let w: Vec<i64> = v
        .iter()
        .map(|x| ((x - lo) / span * 1e9).round() as i64)
        .collect();
    let m = Matrix::from_vec(n, n, w).expect("square matrix");
    kuhn_munkres(&m).1
}

/// Negative squared L2 distances between the rows of `a (n, f)` and `b (m, f)`: `(n, m)`.
pub fn neg_sq_dist(a: &Tensor, b: &Tensor) -> Tensor {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let aa = a.square().sum_dim_intlist(1, true, Kind::Double);
    let bb = b.square().sum_dim_intlist(1, true, Kind::Double).tr();
    a.matmul(&b.tr()) * 2.0 - aa - bb
}

/// For each row of `a (n, f)`, the index of the nearest row of `b (m, f)` in L2 (chunked, so
/// a 30 522 × 30 522 vocabulary fits in memory).
pub fn nearest_rows(a: &Tensor, b: &Tensor) -> Vec<i64> {
    let b = b.to_kind(Kind::Float);
    let bb = b.square().sum_dim_intlist(1, false, Kind::Float);
    let n = a.size()[0];
    let mut out = Vec::with_capacity(n as usize);
    let chunk = 2048;
    for s in (0..n).step_by(chunk as usize) {
        let k = chunk.min(n - s);
        let x = a.narrow(0, s, k).to_kind(Kind::Float);
        // argmin ‖x − b‖² = argmax (2 x·b − ‖b‖²).
        let score = x.matmul(&b.tr()) * 2.0 - &bb;
        out.extend(Vec::<i64>::try_from(score.argmax(1, false)).expect("int64"));
    }
    out
}

/// Put the residual axis `axis` of an EE tensor back in public order, given `residual[c]` =
/// public channel of EE channel `c`.
pub fn unpermute(t: &Tensor, axis: i64, residual: &[usize]) -> Tensor {
    let mut inv = vec![0i64; residual.len()];
    for (c, &p) in residual.iter().enumerate() {
        inv[p] = c as i64;
    }
    t.index_select(axis, &Tensor::from_slice(&inv).to_device(t.device()))
}

/// Residual-channel features of a post-LN BERT: every LayerNorm `γ` and `β`, one row per
/// channel: `(hidden, 2 × LayerNorms)`.
pub fn layernorm_features(state: &StateDict) -> Tensor {
    let cols: Vec<Tensor> = state
        .iter()
        .filter(|(n, _)| n.contains("LayerNorm."))
        .map(|(_, t)| t.to_kind(Kind::Double))
        .collect();
    Tensor::stack(&cols, 1)
}

/// Recover the residual permutation of an EE BERT from its LayerNorm parameters and the
/// public model's: `out[c]` = public channel of EE channel `c`.
pub fn match_residual(public: &StateDict, ee: &StateDict) -> Vec<usize> {
    let (p, e) = (layernorm_features(public), layernorm_features(ee));
    hungarian(&neg_sq_dist(&e, &p))
}

/// Per-channel statistics of hidden states: for each state `(tokens, hidden)`, the mean and
/// standard deviation of every channel; one row per channel, `(hidden, 2 × states)`.
pub fn channel_stats(states: &[Tensor]) -> Tensor {
    let mut cols = Vec::new();
    for h in states {
        let h = h.to_kind(Kind::Double);
        cols.push(h.mean_dim(0, false, Kind::Double));
        cols.push(h.std_dim(0, true, false));
    }
    Tensor::stack(&cols, 1)
}

/// Match EE channels to public channels by their activation statistics (module docs):
/// `out[c]` = public channel of EE channel `c`. Features are z-scored with the public
/// statistics' column mean and deviation.
pub fn match_activations(ee_stats: &Tensor, public_stats: &Tensor) -> Vec<usize> {
    let mu = public_stats.mean_dim(0, true, Kind::Double);
    let sd = public_stats.std_dim(0, true, true).clamp_min(1e-12);
    let z = |t: &Tensor| (t - &mu) / &sd;
    hungarian(&neg_sq_dist(&z(ee_stats), &z(public_stats)))
}

/// Recover a dense key on the output axis of a weight from its public and EE versions:
/// the least-squares `K̂` with `K̂ · public ≈ ee` (one linear solve; the public weight's
/// `n` columns act as `n` known plaintext pairs, so any invertible key falls once
/// `public (d, n)` has rank `d`). `public`, `ee`: `(d, n)`, residual columns already in
/// public order; result `(d, d)`, f64.
///
/// This is how the inference profile's general invertible attention keys (`M_h`, `N_h`)
/// fall when the base model is public: `W_q' = K W_q` after [`unpermute`].
pub fn solve_key(public: &Tensor, ee: &Tensor) -> Tensor {
    let a = public.to_kind(Kind::Double).transpose(0, 1);
    let b = ee.to_kind(Kind::Double).transpose(0, 1);
    let (x, _, _, _) = Tensor::linalg_lstsq(&a, &b, None::<f64>, "gelsd");
    x.transpose(0, 1).contiguous()
}

/// Rows described independently of any signed permutation of the columns: the `k` largest
/// absolute values of each row, in descending order: `(n, k)` f32. Under a residual key that
/// is a (signed) permutation, an EE embedding row has the same description as its public row,
/// so nearest descriptions give the vocabulary permutation without the residual key.
pub fn sorted_abs_rows(t: &Tensor, k: i64) -> Tensor {
    let k = k.min(t.size()[1]);
    t.to_kind(Kind::Float).abs().topk(k, 1, true, true).0
}

/// Rows described independently of any orthogonal transform of the columns and of the order
/// of the rows: the `k` largest inner products of each row with every row (itself included),
/// descending: `(n, k)` f32. `E Q (E Q)ᵀ = E Eᵀ` for orthogonal `Q`, and a row permutation
/// only reorders each row's inner products. Costs `n² d` multiply-adds, in chunks.
pub fn gram_profile(t: &Tensor, k: i64) -> Tensor {
    let t = t.to_kind(Kind::Float);
    let n = t.size()[0];
    let k = k.min(n);
    let mut parts = Vec::new();
    for s in (0..n).step_by(1024) {
        let c = 1024.min(n - s);
        parts.push(t.narrow(0, s, c).matmul(&t.tr()).topk(k, 1, true, true).0);
    }
    Tensor::cat(&parts, 0)
}

/// Relative Frobenius error `‖guess − truth‖ / ‖truth‖` of a recovered key matrix.
pub fn relative_error(guess: &Tensor, truth: &Tensor) -> f64 {
    let truth = truth.to_kind(Kind::Double);
    (guess.to_kind(Kind::Double) - &truth)
        .norm()
        .double_value(&[])
        / truth.norm().double_value(&[]).max(1e-300)
}

/// Share of rows of a recovered key matrix `guess (d, d)` within relative L2 error `tol` of
/// the true key's rows.
pub fn rows_recovered(guess: &Tensor, truth: &Tensor, tol: f64) -> f64 {
    let truth = truth.to_kind(Kind::Double);
    let err = (guess.to_kind(Kind::Double) - &truth).norm_scalaropt_dim(2, [1], false)
        / truth.norm_scalaropt_dim(2, [1], false).clamp_min(1e-300);
    let ok = err.lt(tol).sum(Kind::Int64).int64_value(&[]);
    ok as f64 / truth.size()[0].max(1) as f64
}

/// Share of positions where `guess[i] == truth[i]`.
pub fn share_correct(guess: &[i64], truth: &[i64]) -> f64 {
    let ok = guess.iter().zip(truth).filter(|(g, t)| g == t).count();
    ok as f64 / truth.len().max(1) as f64
}

/// `usize` indices as `i64`.
pub fn as_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}
